"""Export screening: no clip that leaks into an evaluation set, one clip per duplicate group.

Applied after the selection and caption policy, in this order:

1. ``--exclude-eval-sets all|NAME,...``: clips with a ``leakage`` row into those sets are dropped.
2. ``--dedup LEVEL`` (identity | fingerprint | semantic[:COSINE] | none): the pairs of that level
   and of the stricter ones (identity < fingerprint < semantic) form connected groups over
   the remaining clips, and each group keeps one clip (:func:`soundlake.stages.dedup.group_members`:
   best license, then caption score, then length, then clip id). Without ``--dedup`` the level
   is ``fingerprint`` when the lake has dedup results, and nothing is dropped when it has none
   (the export is then exactly what it was before dedup existed, and the manifest says why).

The manifest's ``dedup`` and ``eval_sets`` sections record what was applied, the duplicates
left by level among the exported clips, and per registered eval set the exported clips
leaking into it by level, the levels checked and the clips nobody checked (committed after
the last check, or without a fingerprint / embedding where the set has content).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa

from soundlake.catalog import snapshots
from soundlake.catalog.schema import SNAPSHOT_TABLES
from soundlake.core.errors import UserError
from soundlake.stages.dedup import group_members

LEVELS = ("identity", "fingerprint", "semantic")   # strictest first
DEFAULT_LEVEL = "fingerprint"
REPORTED_SEMANTIC = 0.99                           # also reported when the lake's threshold is lower


@dataclass
class Snapshot:
    """The snapshot tables an export reads, pinned once (parts) with their records (meta)."""
    parts: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, dict] = field(default_factory=dict)
    seq: int | None = None   # the snapshot commit they are as of (None: none, or one without a history)


def pinned_snapshot(lake, seq: int | str | None = snapshots.NOW) -> Snapshot:
    """The snapshots of the dedup and eval-set tables, current or as commit ``seq`` left them
    (none: an empty Snapshot)."""
    pointer = snapshots.pointer_at(lake, seq)
    return Snapshot({t: [lake.path(p) for p in pointer[t]["parts"]] for t in SNAPSHOT_TABLES if t in pointer},
                    {t: pointer[t].get("meta", {}) for t in SNAPSHOT_TABLES if t in pointer},
                    snapshots.version(lake, pointer))


def parse_dedup(text: str | None) -> tuple[str | None, float | None]:
    """'fingerprint' -> ('fingerprint', None); 'semantic:0.99' -> ('semantic', 0.99); 'none' -> (None, None)."""
    if text is None or text == "none":
        return None, None
    level, _, value = text.partition(":")
    if level not in LEVELS or (value and level != "semantic"):
        raise UserError(f"--dedup {text!r}: expected identity, fingerprint, semantic, semantic:COSINE or none")
    try:
        threshold = float(value) if value else None
    except ValueError:
        raise UserError(f"--dedup {text!r}: {value!r} is not a cosine") from None
    if threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"--dedup {text!r}: the cosine must be in (0, 1]")
    return level, threshold


@dataclass
class Screen:
    drop: set[str]
    dropped: dict[str, int]          # {"eval_leakage": n, "duplicate": n}
    manifest: dict                   # {"dedup": ..., "eval_sets": ...}


def _eligible(con, clip_ids: list[str]) -> None:
    con.register("_eligible", pa.table({"clip_id": pa.array(clip_ids, pa.string())}))


def _pairs(con, levels: list[str], threshold: float | None, among: str = "_eligible") -> list[tuple[str, str]]:
    lv = ", ".join(f"'{x}'" for x in levels)
    return con.execute(f"""SELECT clip_a, clip_b FROM duplicates
                           WHERE level IN ({lv}) AND (level <> 'semantic' OR score >= ?)
                             AND clip_a IN (SELECT clip_id FROM {among}) AND clip_b IN (SELECT clip_id FROM {among})""",
                       [threshold or 0.0]).fetchall()


def _dedup(con, dedup: str | None, levels_meta: dict, keep: set[str]) -> tuple[set[str], dict]:
    explicit = dedup is not None
    level, threshold = parse_dedup(dedup if explicit else DEFAULT_LEVEL)
    section: dict = {"level": dedup if explicit else DEFAULT_LEVEL, "default": not explicit,
                     "data": bool(levels_meta)}
    if level is None:
        return set(), section
    wanted = list(LEVELS[: LEVELS.index(level) + 1])
    missing = [lv for lv in wanted if lv not in levels_meta]
    if explicit and missing:
        raise UserError(f"--dedup {dedup}: the lake has no {', '.join(missing)} duplicates yet: run "
                        f"`soundlake dedup --levels {','.join(wanted)}` first (or pass --dedup none)")
    if not levels_meta:
        section["note"] = "no dedup results in the lake: nothing deduplicated (run `soundlake dedup` first)"
        return set(), section
    if missing:
        section["note"] = f"levels {', '.join(missing)} not computed: applied {', '.join(x for x in wanted if x not in missing)}"
    applied = [lv for lv in wanted if lv in levels_meta]
    if "semantic" in applied:
        base = float(levels_meta["semantic"]["threshold"])
        threshold = base if threshold is None else threshold
        if threshold < base:
            raise UserError(f"--dedup semantic:{threshold:g}: the lake's semantic pairs were found at cosine >= "
                            f"{base:g}; run `soundlake dedup --semantic-threshold {threshold:g}` first")
        section["threshold"] = threshold
        section["clap_model"] = {k: levels_meta["semantic"].get(k) for k in ("method", "model_hash")}
    _eligible(con, sorted(keep))
    groups = group_members(con, _pairs(con, applied, threshold), keep)
    drop = {c for kept, members in groups for c in members if c != kept}
    section.update(applied=applied, groups=len(groups), dropped=len(drop),
                   runs={lv: levels_meta[lv]["run_id"] for lv in applied})
    return drop, section


def _remaining(con, levels_meta: dict, exported: list[str]) -> dict[str, int]:
    """Exported clips that still have a duplicate among the exported clips, by level."""
    from soundlake.dedup.groups import connected_groups

    _eligible(con, exported)
    out = {}
    for level, rec in levels_meta.items():
        ts = [float(rec.get("threshold") or 0)] if level != "semantic" else \
            sorted({float(rec["threshold"]), max(float(rec["threshold"]), REPORTED_SEMANTIC)})
        for t in ts:
            key = level if level != "semantic" else f"semantic@{t:g}"
            out[key] = len(connected_groups(_pairs(con, [level], t)))
    return out


def _leakage(con, exclude: list[str], leak_meta: dict, keep: set[str]) -> tuple[set[str], dict]:
    registered = dict(con.execute("SELECT name, set_id FROM eval_sets").fetchall())
    content = {r[0]: (r[1], r[2]) for r in con.execute(
        "SELECT name, fingerprinted, embedded FROM eval_sets").fetchall()}
    names = sorted(registered) if exclude == ["all"] else list(exclude)
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise UserError(f"--exclude-eval-sets {','.join(unknown)}: no such eval set in the lake (registered: "
                        f"{', '.join(sorted(registered)) or 'none'}; add one with `soundlake eval-sets add`)")
    _eligible(con, sorted(keep))
    rows = con.execute("""SELECT DISTINCT l.clip_id, l.eval_set, l.level FROM leakage l
                          JOIN _eligible USING (clip_id)""").fetchall()
    sets = {}
    drop: set[str] = set()
    for name, set_id in sorted(registered.items()):
        checked = [lv for lv in LEVELS if leak_meta.get(lv, {}).get("eval_sets", {}).get(name) == set_id]
        fingerprinted, embedded = content[name]
        needed = ["identity"] + (["fingerprint"] if fingerprinted else []) + (["semantic"] if embedded else [])
        leaking = {lv: {c for c, s, x in rows if s == name and x == lv} for lv in checked}
        if name in names:
            drop |= {c for clips in leaking.values() for c in clips}
        sets[name] = {"set_id": set_id, "leaking": leaking, "checked_levels": checked,
                      "unchecked_levels": [lv for lv in needed if lv not in checked],
                      "unchecked_clips": _unchecked(con, [leak_meta[lv] for lv in needed if lv in checked])}
    return drop, {"registered": sorted(registered), "excluded": names, "sets": sets}


def _unchecked(con, records: list[dict]) -> int:
    """Eligible clips a leakage record did not cover: committed after it, or (content levels)
    without the fingerprint / embedding it compared."""
    if not records:
        return 0
    conds = []
    params: list = []
    for rec in records:
        conds.append("c.created > ?")
        params.append(datetime.fromisoformat(rec["covered_until"]))
        if "threshold" in rec and "model_hash" in rec:
            conds.append("""NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.clip_id = c.clip_id AND e.model_id = ?
                            AND e.model_hash IS NOT DISTINCT FROM ?)""")
            params += [rec["method"], rec["model_hash"]]
        elif "threshold" in rec:
            conds.append("NOT EXISTS (SELECT 1 FROM fingerprints f WHERE f.clip_id = c.clip_id AND f.fingerprinter = ?)")
            params.append(rec["method"])
    return con.execute(f"""SELECT count(DISTINCT c.clip_id) FROM clips c JOIN _eligible USING (clip_id)
                           WHERE {' OR '.join(conds)}""", params).fetchall()[0][0]


def screen(con, snap: Snapshot, clip_ids: list[str], dedup: str | None, exclude_eval_sets: list[str]) -> Screen:
    """What to drop from ``clip_ids`` (the selection, in order) and the manifest's record of it;
    ``con``: a catalog connection reading ``snap``'s parts."""
    keep = set(clip_ids)
    dedup_levels = snap.meta.get("duplicates", {}).get("levels", {})
    leak_meta = snap.meta.get("leakage", {}).get("levels", {})
    leak_drop, eval_section = _leakage(con, exclude_eval_sets, leak_meta, keep)
    keep -= leak_drop
    dup_drop, dedup_section = _dedup(con, dedup, dedup_levels, keep)
    keep -= dup_drop
    dedup_section["remaining"] = _remaining(con, dedup_levels, sorted(keep)) if dedup_levels else {}
    for s in eval_section["sets"].values():
        s["dropped"] = len({c for clips in s["leaking"].values() for c in clips} & leak_drop)
        s["leaking"] = {lv: len(clips & keep) for lv, clips in s["leaking"].items()}
    dropped = {k: v for k, v in (("eval_leakage", len(leak_drop)), ("duplicate", len(dup_drop))) if v}
    return Screen(leak_drop | dup_drop, dropped, {"dedup": dedup_section, "eval_sets": eval_section})
