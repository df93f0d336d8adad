"""`soundlake dedup`: find the lake's duplicate clips at three levels, and its leakage into eval sets.

    run_dedup("./lake", DedupArgs(levels=["identity", "fingerprint", "semantic"], semantic_threshold=0.95))

1. ``fingerprint``: clips without a fingerprint from this fingerprinter are fingerprinted on
   Ray (:class:`~soundlake.stages.dedup.FingerprintStage`; the workers read the FLAC from the
   clip parts and commit ``fingerprints`` parts as they go, so a killed run resumes where it
   stopped and a finished clip is never fingerprinted again).
2. Each level's pairs (:mod:`soundlake.pipelines.matches`) become ``duplicates`` rows and
   connected groups with a kept representative (``duplicate_groups``); the same level's
   matches against the registered evaluation sets become ``leakage`` rows.
3. The three tables are committed together as new snapshots (:mod:`soundlake.catalog.snapshots`):
   a kill leaves the previous results in view, never half of the new ones. Levels not run this
   time keep their previous rows.

Each level's record in the snapshot (``levels`` in its meta) says what produced it (the
fingerprinter and threshold, the CLAP model and hash and threshold), when it listed the clips
(``covered_until``: clips committed later are not covered) and which eval sets it checked.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from soundlake.catalog import snapshots
from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import close, connect
from soundlake.core.errors import UserError
from soundlake.core.ray_env import RaySpec, init_ray
from soundlake.dedup.detail import THRESHOLDS as DETAIL
from soundlake.pipelines import matches
from soundlake.pipelines.matches import LEVELS
from soundlake.pipelines.runner import RunSummary, consume, lake_clips_dataset, map_and_write, new_run_id, recorded_run
from soundlake.stages.caption import captioner_ranking
from soundlake.stages.dedup import COLUMNS, FingerprintStage

REPORTED_THRESHOLDS = (0.95, 0.99)   # semantic groups are reported at these cosines too
DEDUP_TABLES = ("duplicates", "duplicate_groups")


@dataclass
class DedupArgs:
    levels: list[str] | None = None   # None: all, semantic only where the lake has embeddings
    semantic_threshold: float = 0.95
    clap_model: str | None = None     # default: the model of the newest embeddings
    batch_size: int = 64              # clips per fingerprint task


@dataclass
class DedupSummary:
    run_id: str
    lake: str
    clips: int = 0
    fingerprinted: int = 0            # clips fingerprinted by this run
    fingerprint_failures: int = 0
    levels: dict[str, dict] = field(default_factory=dict)     # level -> pairs, groups, clips, removable, ...
    semantic_at: dict[str, dict] = field(default_factory=dict)  # "0.95" -> groups, clips
    leakage: dict[str, dict[str, int]] = field(default_factory=dict)  # eval set -> level -> clips
    notes: list[str] = field(default_factory=list)   # levels left out, and why
    ray_startup_s: float = 0.0
    elapsed_s: float = 0.0


def parse_levels(text: str) -> list[str]:
    levels = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in levels if x not in LEVELS]
    if bad or not levels:
        raise UserError(f"--levels {text!r}: expected a comma-separated subset of {', '.join(LEVELS)}")
    return [lv for lv in LEVELS if lv in levels]


def fingerprinter(required: bool = False) -> tuple[str, float]:
    """(the fingerprint algorithm's identity, its match threshold); ``required``: refuse, in one
    line on the driver, when its library is missing (rather than in every Ray task)."""
    from soundlake.dedup.fingerprint import FINGERPRINTER, FP_THRESHOLD

    if required and FINGERPRINTER.endswith("-missing"):
        raise UserError("the fingerprint level needs libchromaprint: install Debian's libchromaprint-tools "
                        "(scripts/setup.sh), or leave fingerprint out of --levels")
    return FINGERPRINTER, float(FP_THRESHOLD)


def backfill_fingerprints(lake: Lake, run_id: str, args: DedupArgs, ray: RaySpec, summary: DedupSummary,
                          progress: RunSummary) -> None:
    """Fingerprint, on Ray, every clip without a fingerprint (or a fingerprint failure) from this
    fingerprinter, and again those fingerprinted before envelopes or detail were kept (their new
    row replaces the old one in the ``fingerprints`` view)."""
    name, _ = fingerprinter(required=True)
    con = connect(lake)
    try:
        need = {r[0] for r in con.execute(
            f"""SELECT clip_id FROM clips c WHERE NOT EXISTS (
                  SELECT 1 FROM (SELECT clip_id, fingerprinter, {matches.later_columns(con, 'fingerprints')}
                                 FROM fingerprints) f
                  WHERE f.clip_id = c.clip_id AND f.fingerprinter = ? AND f.env IS NOT NULL
                    AND f.contour IS NOT NULL)
                AND NOT EXISTS (SELECT 1 FROM failures x WHERE x.clip_id = c.clip_id AND x.stage = 'fingerprint')""",
            [name]).fetchall()}
    finally:
        close(con)
    if not need:
        return
    summary.ray_startup_s = init_ray(ray)
    t0 = time.perf_counter()
    ds = lake_clips_dataset(lake, need, COLUMNS)
    try:
        consume(map_and_write(ds, [FingerprintStage(run_id, args.batch_size)], lake.uri, run_id), progress, t0, None,
                lake)
    except BaseException:
        lake.clean_tmp(run_id, settle_s=10)   # let writing tasks end, then remove their .tmp parts
        raise
    summary.fingerprinted = progress.rows.get("fingerprints", 0)
    summary.fingerprint_failures = progress.rows.get("failures", 0)


def level_matches(con, level: str, args: DedupArgs) -> tuple[list[tuple], list[tuple], dict]:
    """(duplicate pairs, eval-set leakage matches, the level's meta) of one level."""
    clips = con.execute("SELECT count(DISTINCT clip_id) FROM clips").fetchall()[0][0]
    if level == "identity":
        return matches.identity_pairs(con), matches.identity_leakage(con), {"method": "freesound_id, youtube_id"}
    if level == "fingerprint":
        name, threshold = fingerprinter()
        index = matches.clip_fingerprint_index(con, name)
        meta = {"method": name, "threshold": threshold, "env_threshold": index.env_threshold, "detail": DETAIL,
                "clips_without": clips - len(index)}
        return (matches.fingerprint_pairs(index, threshold, name),
                matches.fingerprint_leakage(con, index, name, threshold), meta)
    model = matches.newest_clap_model(con, args.clap_model)
    if model is None:   # (run_dedup leaves semantic out of the default levels when the lake has no embeddings)
        raise UserError("the semantic level needs CLAP embeddings"
                        + (f" from {args.clap_model}" if args.clap_model else "")
                        + ": curate with --set clap.model=PATH first, or leave semantic out of --levels")
    ids = matches.clip_embedding_ids(con, model)
    t = args.semantic_threshold
    meta = {"method": model[0], "model_hash": model[1], "threshold": t, "clips_without": clips - len(ids)}
    return (matches.semantic_pairs(ids, matches.clip_embedding_blocks(con, model), t, model[0]),
            matches.semantic_leakage(con, ids, model, t), meta)


def eval_set_ids(con) -> dict[str, str]:
    """{eval set name: set_id} of the registered eval sets (what a leakage record checked)."""
    return dict(con.execute("SELECT name, set_id FROM eval_sets ORDER BY name").fetchall())


def write_duplicates(lake: Lake, con, level: str, pairs: list[tuple], meta: dict, run_id: str,
                     now: datetime) -> dict:
    """Write one level's duplicates and groups parts; returns the level's record."""
    dup = matches.duplicate_rows(level, pairs, run_id, now, meta.get("model_hash"))
    groups = matches.group_rows(con, level, pairs, run_id, now)
    parts = {t: [p for p in [lake.write_part(t, data, run_id)] if p]
             for t, data in (("duplicates", dup), ("duplicate_groups", groups))}
    n_groups = len(set(groups["group_id"].to_pylist()))
    return {"run_id": run_id, "covered_until": now.isoformat(), **meta, "pairs": len(pairs), "groups": n_groups,
            "clips": groups.num_rows, "removable": groups.num_rows - n_groups, "parts": parts}


def write_leakage(lake: Lake, con, level: str, leaks: list[tuple], meta: dict, run_id: str, now: datetime) -> dict:
    """Write one level's leakage part; returns the level's record (with the eval sets it checked)."""
    part = lake.write_part("leakage", matches.leakage_rows(level, leaks, run_id, now), run_id)
    return {"run_id": run_id, "covered_until": now.isoformat(), **meta, "eval_sets": eval_set_ids(con),
            "parts": [part] if part else []}


def commit_levels(lake: Lake, run_id: str, dedup: dict[str, dict] | None, leakage: dict[str, dict],
                  extra: dict[str, list[str]] | None = None, extra_meta: dict[str, dict] | None = None) -> None:
    """Commit the level records (``dedup``: duplicates + groups; ``leakage``) as new snapshots,
    keeping the previous records of levels not given; ``extra`` tables commit in the same step."""
    tables: dict[str, list[str]] = dict(extra or {})
    meta: dict[str, dict] = dict(extra_meta or {})
    if dedup is not None:
        levels = {**((snapshots.table_info(lake, "duplicates") or {}).get("meta", {}).get("levels", {})), **dedup}
        for t in DEDUP_TABLES:
            tables[t] = [p for rec in levels.values() for p in rec["parts"].get(t, [])]
            meta[t] = {"levels": levels}
    levels = {**((snapshots.table_info(lake, "leakage") or {}).get("meta", {}).get("levels", {})), **leakage}
    tables["leakage"] = [p for rec in levels.values() for p in rec["parts"]]
    meta["leakage"] = {"levels": levels}
    snapshots.commit(lake, tables, run_id, meta)


def default_levels(lake: Lake, summary: DedupSummary) -> list[str]:
    """Every level; semantic only when the lake has CLAP embeddings (else a note says so)."""
    con = connect(lake)
    try:
        embedded = matches.newest_clap_model(con) is not None
    finally:
        close(con)
    if not embedded:
        summary.notes.append("semantic level skipped: the lake has no CLAP embeddings (curate with "
                             "--set clap.model=PATH, then run dedup again)")
    return [lv for lv in LEVELS if lv != "semantic" or embedded]


def run_dedup(lake_uri: str, args: DedupArgs, ray: RaySpec | None = None, wait: bool = False) -> DedupSummary:
    if not 0 < args.semantic_threshold <= 1:
        raise UserError(f"--semantic-threshold {args.semantic_threshold}: expected a cosine in (0, 1]")
    lake = Lake(lake_uri)
    if not lake.parts("clips"):
        raise UserError(f"lake {lake.uri} has no clips: curate first (soundlake curate demo --lake {lake.uri})")
    run_id = new_run_id()
    summary = DedupSummary(run_id, lake.uri)
    progress = RunSummary(run_id=run_id, pipeline="dedup", lake=lake.uri)
    t0 = time.perf_counter()
    with lake.lock(run_id, wait=wait):
        lake.clean_tmp()
        with recorded_run(lake, "dedup", json.dumps(asdict(args)), progress):
            levels = args.levels or default_levels(lake, summary)
            if "fingerprint" in levels:
                backfill_fingerprints(lake, run_id, args, ray or RaySpec(), summary, progress)
            con = connect(lake, ranking=captioner_ranking())
            try:
                summary.clips = con.execute("SELECT count(DISTINCT clip_id) FROM clips").fetchall()[0][0]
                now = datetime.now(timezone.utc)
                dedup, leakage = {}, {}
                for level in levels:
                    pairs, leaks, meta = level_matches(con, level, args)
                    dedup[level] = write_duplicates(lake, con, level, pairs, meta, run_id, now)
                    leakage[level] = write_leakage(lake, con, level, leaks, meta, run_id, now)
                    summary.levels[level] = {k: v for k, v in dedup[level].items() if k not in ("parts", "run_id")}
                    for clip, name, *_ in leaks:
                        summary.leakage.setdefault(name, {}).setdefault(level, set()).add(clip)
                    if level == "semantic":
                        for t in sorted({*REPORTED_THRESHOLDS, args.semantic_threshold}):
                            if t >= args.semantic_threshold:
                                summary.semantic_at[f"{t:g}"] = matches.group_counts([p for p in pairs if p[2] >= t])
                commit_levels(lake, run_id, dedup, leakage)
            finally:
                close(con)
    summary.leakage = {n: {lv: len(c) for lv, c in by.items()} for n, by in summary.leakage.items()}
    summary.elapsed_s = time.perf_counter() - t0
    return summary
