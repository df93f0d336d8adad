"""Export: a SQL selection of the catalog becomes WebDataset shards, with provenance.

    plan = plan_export(lake, ExportArgs(out="./shards/v1", where="license = 'CC0'", ...))
    result = run_export(lake, args)     # plans, writes missing shards, records the export

Selection: ``clips`` rows matching ``where`` (any SQL over the ``clips`` view), the
license list and not in the exclusion lists, one caption policy applied
(``preferred`` | ``all`` | a captioner name), an optional CLAP score threshold, in
``clip_id`` order, then screened (:mod:`soundlake.export.screening`: clips leaking into
evaluation sets dropped with ``exclude_eval_sets``, one clip per duplicate group with
``dedup``). ``preferred`` is the ``dataset`` view's caption (else captioner
priority reference > refine > qwen > autocap > template, then text); with
``--min-score`` it is the caption the threshold's model scores best. Each clip lands in a split by a stable hash of its clip id, so a
clip keeps its split when the catalog grows.

Shards: ``<out>/{split}-{index:06d}.tar`` with ``<key>.flac`` (the stored FLAC bytes)
and ``<key>.json``; deterministic bytes (see :mod:`soundlake.export.shards`). The
manifest ``<out>/manifest.json`` is rewritten after every shard, so a killed export
re-run with the same arguments keeps each finished shard whose sha256 still matches
and writes only the rest. At the end the export and its members are written to the
lake tables ``exports`` and ``export_members``.

Scores: the ``scores`` table (clip_id, caption_text, clap_model_id or model_id, score)
is joined on (clip_id, caption text, CLAP model id); ``--min-score`` fails with one
line while the lake has no scores, and needs ``--score-model`` when several CLAP
models scored the lake (one threshold never mixes two models).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from soundlake.catalog import schema, snapshots, sql
from soundlake.catalog.lake import Lake
from soundlake.core.errors import UserError
from soundlake.core.splits import SPLIT_HASH, split_of
from soundlake.core.storage import open_uri, os_error_problem, put_bytes
from soundlake.export import parquet_pages, screening, shards
from soundlake.stages.caption import captioner_ranking

FORMAT_VERSION = 1
_READ_CHUNK = 32  # samples read ahead per step while a shard is written
# One captioner ranking for the dataset view and exports.

# Per-sample metadata copied from the clips view into <key>.json.
_META = ("clip_id", "source", "source_id", "title", "url", "license", "uploader", "upload_date",
         "tags", "labels", "start_s", "duration_s", "content_s", "sample_rate", "channels",
         "src_sample_rate", "src_codec", "loudness_lufs", "audio_sha256", "run_id")


# ---- arguments -------------------------------------------------------------------------
@dataclass
class ExportArgs:
    out: str
    where: str | None = None
    caption: str = "preferred"            # preferred | all | <captioner>
    min_score: float | None = None
    score_model: str | None = None
    licenses: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)   # files of clip ids / source ids
    splits: dict[str, float] = field(default_factory=dict)  # e.g. {"valid": 0.01}; rest is train
    shard_size: int | None = 512 * 2**20  # bytes per shard, or
    shard_count: int | None = None        # samples per shard
    name: str | None = None
    dedup: str | None = None              # identity | fingerprint | semantic[:cos] | none; None: fingerprint if any
    exclude_eval_sets: list[str] = field(default_factory=list)   # eval set names, or ["all"]
    as_of: str | None = None              # a run, an export or an ISO time: export the lake as it was

    def identity(self) -> dict:
        """What must match for a re-run to resume (not the exclusion file paths: their content).
        The screening options appear only when given, so earlier exports keep their ids."""
        d = asdict(self)
        d["exclude"] = sorted(_exclusion_digest(p) for p in self.exclude)
        for key in ("dedup", "exclude_eval_sets", "as_of"):
            if not d[key]:
                del d[key]
        return d


def parse_size(text: str) -> int:
    """'512MB' / '1.5GiB' / '1000' -> bytes (K/M/G/T are powers of 1024, as in tar tools)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise UserError(f"--shard-size {text!r}: expected a size such as 512MB or 2GB")
    n = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))
    if n < 1:
        raise UserError(f"--shard-size {text!r} must be positive")
    return n


def parse_splits(text: str | None) -> dict[str, float]:
    """'valid=0.01,test=0.01' -> {'valid': 0.01, 'test': 0.01}; the rest goes to train."""
    if not text:
        return {}
    out: dict[str, float] = {}
    for item in text.split(","):
        name, _, frac = item.partition("=")
        name = name.strip()
        if not name or not name.replace("_", "").isalnum() or name == "train":
            raise UserError(f"--split {item!r}: expected name=fraction with a name other than train")
        try:
            out[name] = float(frac)
        except ValueError:
            raise UserError(f"--split {item!r}: {frac!r} is not a number") from None
        if not 0 <= out[name] <= 1:
            raise UserError(f"--split {item!r}: the fraction must be between 0 and 1")
    if sum(out.values()) > 1:
        raise UserError(f"--split {text!r}: fractions add up to more than 1")
    return out


def read_exclusions(path: str) -> list[str]:
    """One id per line (a clip id, a source id, or source:source_id); '#' starts a comment."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"--exclude {path}: {e.strerror or e}") from None
    ids = [ln.split("#", 1)[0].strip() for ln in lines]
    return sorted({i for i in ids if i})


def _exclusion_digest(path: str) -> str:
    return hashlib.sha256("\n".join(read_exclusions(path)).encode()).hexdigest()


# ---- selection --------------------------------------------------------------------------
@dataclass
class Sample:
    clip_id: str
    split: str
    json_bytes: bytes
    flac_bytes: int
    audio_sha256: str


@dataclass
class Plan:
    args: ExportArgs
    catalog: dict                  # the part files read, and their hash
    samples: list[Sample]
    dropped: dict[str, int]        # clips selected but left out, by reason
    shards: list[dict]             # {"name", "split", "start", "end"} over samples
    screening: dict = field(default_factory=dict)   # the manifest's dedup and eval_sets sections


def _has(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                            [name]).fetchall()[0][0])


def _columns(con, name: str) -> set[str]:
    return {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = ?", [name]).fetchall()}


def select(lake: Lake, args: ExportArgs, snap: screening.Snapshot
           ) -> tuple[pa.Table, dict[str, list[dict]], dict, dict[str, int], duckdb.DuckDBPyConnection]:
    """Run the selection: (clip rows, captions per clip, catalog state, dropped counts, the
    connection, which reads exactly that catalog state)."""
    if args.caption not in ("preferred", "all") and not args.caption.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"--caption {args.caption!r}: expected preferred, all or a captioner name")
    # Exactly the part files listed now (or as of --as-of): one catalog state even while a
    # curation job adds parts. Their versions go into the manifest and the exports record.
    hashed_tables = ["clips", "captions", "scores"] + (["embeddings", "fingerprints"] if snap.parts else [])
    read = hashed_tables + ["reviews"]   # reviews rank captions in the dataset view
    if args.as_of:
        at = sql.as_of_state(lake, args.as_of)
        state = {t: at.get(t, (None, [])) for t in read}
    else:
        state = {t: lake.state(t) for t in read}
    files = {t: ps for t, (_, ps) in state.items()}
    ranking = captioner_ranking()
    con = sql.connect(lake, parts={**files, **snap.parts}, ranking=ranking)   # + the dedup and eval-set snapshots
    # The catalog's identity: the parts of the tables a plain export has always hashed.
    hashed = {t: files[t] for t in hashed_tables}
    rel = {t: sorted(p[len(lake.root.rstrip("/")) + 1:] for p in ps) for t, ps in {**hashed, **snap.parts}.items()}
    catalog = {"parts": rel, "sha256": hashlib.sha256(json.dumps(rel, sort_keys=True).encode()).hexdigest(),
               "as_of": {t: v for t, (v, _) in state.items() if v is not None}
               | ({snapshots.KEY: snap.seq} if snap.seq is not None else {})}
    if not files.get("clips"):
        raise UserError(f"lake {lake.uri} has no clips to export")

    excluded: list[str] = sorted({i for p in args.exclude for i in read_exclusions(p)})
    con.register("_exclude", pa.table({"id": pa.array(excluded, pa.string())}))
    conds = ["TRUE"]
    if args.where:
        conds.append(f"({sql.where_expression(args.where)})")
    if args.licenses:
        con.register("_licenses", pa.table({"l": pa.array(args.licenses, pa.string())}))
        conds.append("license IN (SELECT l FROM _licenses)")
    # One row per clip id even if a clip was written twice (e.g. by two runs); excluded clips
    # are flagged, not filtered, so the one query also counts them. Only the columns the
    # samples' JSON needs.
    cols = ", ".join(dict.fromkeys((*_META, "meta_json", "flac_bytes")))
    try:
        clips = con.sql(f"""SELECT {cols}, (clip_id IN (SELECT id FROM _exclude)
                  OR coalesce(source_id, '') IN (SELECT id FROM _exclude)
                  OR coalesce(source || ':' || source_id, '') IN (SELECT id FROM _exclude)) AS _excluded
              FROM clips WHERE {' AND '.join(conds)}
              QUALIFY row_number() OVER (PARTITION BY clip_id ORDER BY created, run_id) = 1
              ORDER BY clip_id""").to_arrow_table()
    except duckdb.Error as e:
        raise UserError(f"--where: SQL error: {str(e).strip().splitlines()[0]}") from None
    excluded_rows = clips["_excluded"]
    dropped = {"excluded": pc.sum(excluded_rows).as_py() or 0}
    clips = clips.filter(pc.invert(excluded_rows)).drop_columns(["_excluded"])
    con.register("_sel", clips.select(["clip_id"]))

    # Captions of the selected clips, distinct texts, in policy order (best first).
    caps_sql = f"""SELECT c.clip_id, c.captioner, min(c.model_id) AS model_id, c.text,
                          min({sql.ranking_sql(ranking)}) AS rank
                   FROM captions c JOIN _sel USING (clip_id) WHERE c.text IS NOT NULL AND c.text <> ''
                   GROUP BY c.clip_id, c.captioner, c.text"""
    first = "FALSE"
    if args.caption == "preferred" and args.min_score is None and _has(con, "dataset") and "caption" in _columns(con, "dataset"):
        # The catalog's own notion of the preferred caption wins when it exists.
        caps_sql = f"""SELECT x.*, (x.text IS NOT DISTINCT FROM d.caption) AS _pref FROM ({caps_sql}) x
                   LEFT JOIN (SELECT clip_id, any_value(caption) AS caption FROM dataset GROUP BY clip_id) d
                   ON d.clip_id = x.clip_id"""
        first = "_pref"
    else:
        caps_sql = f"SELECT *, FALSE AS _pref FROM ({caps_sql})"
    caps_sql = f"""SELECT clip_id, captioner, model_id, text, row_number() OVER
                   (ORDER BY clip_id, {first} DESC, rank, captioner, text) AS ord FROM ({caps_sql})"""
    cols = ["clip_id", "captioner", "model_id", "text", "ord"]
    params: list = []
    if args.min_score is not None:
        if not _has(con, "scores") or not files.get("scores"):
            raise UserError("--min-score needs CLAP scores, and this lake has none yet: "
                            "run a scoring stage first")
        # The CLAP model column: clap_model_id (soundlake.stages.clap) or model_id.
        mcol = "clap_model_id" if "clap_model_id" in _columns(con, "scores") else "model_id"
        model = args.score_model
        models = [r[0] for r in con.execute(f"SELECT DISTINCT {mcol} FROM scores ORDER BY 1").fetchall()]
        if model is None:
            if len(models) != 1:
                raise UserError(f"--min-score needs --score-model: the scores table holds {len(models)} "
                                f"CLAP models ({', '.join(map(str, models[:5]))})")
            model = args.score_model = models[0]
        elif model not in models:
            raise UserError(f"--score-model {model!r} has no scores in this lake "
                            f"(it has: {', '.join(map(str, models[:5])) or 'none'})")
        # Scores are per (clip, caption text, CLAP model); a caption scored twice keeps its best.
        caps_sql = f"""SELECT x.*, s.score FROM ({caps_sql}) x LEFT JOIN (
                   SELECT clip_id, caption_text, max(score) AS score FROM scores WHERE {mcol} = ?
                   GROUP BY clip_id, caption_text) s
                   ON s.clip_id = x.clip_id AND s.caption_text = x.text"""
        cols.append("score")
        params.append(model)
    order = "ord"
    if args.min_score is not None and args.caption == "preferred":
        # Rank by the threshold's own model (as the dataset view's score policy does with the
        # newest model), so choosing and thresholding never mix two CLAP models.
        order = "clip_id, score DESC NULLS LAST, ord"
    rows = con.execute(f"SELECT * FROM ({caps_sql}) ORDER BY {order}", params).fetchall()
    captions: dict[str, list[dict]] = {}
    for r in rows:
        d = dict(zip(cols, r))
        d.pop("ord")
        captions.setdefault(d.pop("clip_id"), []).append(d)
    return clips, captions, catalog, dropped, con


def apply_policy(caps: list[dict], policy: str, min_score: float | None) -> list[dict]:
    """The captions a clip exports under a policy (best first); [] drops the clip.

    ``caps`` come in preference order: the ``dataset`` view's caption first, or, with a
    score threshold, the best caption by the threshold's CLAP model. The threshold then
    applies to what the policy chose (``all``: to each caption)."""
    if policy == "preferred":
        chosen = caps[:1]
    elif policy == "all":
        chosen = list(caps)
    else:
        chosen = [c for c in caps if c["captioner"] == policy]
    if min_score is not None:
        chosen = [c for c in chosen if c.get("score") is not None and c["score"] >= min_score]
    return chosen


def _sample_json(row: dict, caps: list[dict], split: str, score_model: str | None) -> bytes:
    meta = {k: row.get(k) for k in _META}
    meta["split"] = split
    meta["caption"] = caps[0]["text"]
    meta["captions"] = [c["text"] for c in caps]
    meta["caption_info"] = [{k: c.get(k) for k in ("captioner", "model_id", "text")} for c in caps]
    if score_model is not None:
        meta["scores"] = [{"text": c["text"], "model_id": score_model, "score": c.get("score")} for c in caps]
    if row.get("meta_json"):
        try:
            meta["source_meta"] = json.loads(row["meta_json"])
        except ValueError:
            meta["source_meta"] = row["meta_json"]
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str,
                      separators=(",", ":")).encode("utf-8")


def _tar_bytes(n: int) -> int:
    return 512 + -(-n // 512) * 512


def plan_export(lake: Lake | str, args: ExportArgs) -> Plan:
    """Select, apply the policies and cut the selection into shards (no audio is read)."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    if (args.shard_size is None) == (args.shard_count is None):
        raise UserError("give exactly one of --shard-size and --shard-count")
    snap = screening.pinned_snapshot(lake, sql.snapshot_seq(lake, args.as_of, sql.recorded_versions(lake, args.as_of))
                                      if args.as_of else snapshots.NOW)
    clips, captions, catalog, dropped, con = select(lake, args, snap)
    dropped["no_caption"] = 0
    chosen = []
    for row in clips.to_pylist():
        caps = apply_policy(captions.get(row["clip_id"], []), args.caption, args.min_score)
        if not caps:
            dropped["no_caption"] += 1
            continue
        chosen.append((row, caps))
    try:
        screen = screening.screen(con, snap, [row["clip_id"] for row, _ in chosen], args.dedup,
                                  args.exclude_eval_sets)
    finally:
        sql.close(con)
    dropped.update(screen.dropped)
    samples: list[Sample] = []
    for row, caps in chosen:
        if row["clip_id"] in screen.drop:
            continue
        split = split_of(row["clip_id"], args.splits)
        samples.append(Sample(row["clip_id"], split, _sample_json(row, caps, split, args.score_model),
                              int(row["flac_bytes"] or 0), row["audio_sha256"]))
    if not samples:
        raise UserError(f"the selection is empty ({', '.join(f'{k} {v}' for k, v in dropped.items())} dropped)")
    plan_shards: list[dict] = []
    order = ["train", *args.splits]
    by_split: dict[str, list[int]] = {s: [] for s in order}
    for i, s in enumerate(samples):
        by_split[s.split].append(i)
    ordered: list[Sample] = []
    for split in order:
        idx = by_split[split]
        start, size, index = len(ordered), 0, 0
        for i in idx:
            s = samples[i]
            n = _tar_bytes(len(s.json_bytes)) + _tar_bytes(s.flac_bytes)
            full = (args.shard_count is not None and len(ordered) - start >= args.shard_count) or \
                   (args.shard_size is not None and size and size + n > args.shard_size)
            if full:
                plan_shards.append({"name": f"{split}-{index:06d}.tar", "split": split,
                                    "start": start, "end": len(ordered)})
                start, size, index = len(ordered), 0, index + 1
            ordered.append(s)
            size += n
        if len(ordered) > start:
            plan_shards.append({"name": f"{split}-{index:06d}.tar", "split": split,
                                "start": start, "end": len(ordered)})
    return Plan(args, catalog, ordered, dropped, plan_shards, screen.manifest)


# ---- writing --------------------------------------------------------------------------------
@dataclass
class ExportResult:
    export_id: str
    out: str
    clips: int
    shards: int
    written: int               # shards written by this call
    kept: int                  # finished shards found and verified
    bytes: int
    splits: dict[str, int]
    dropped: dict[str, int]
    manifest_sha256: str
    recorded: bool
    screening: dict = field(default_factory=dict)   # the manifest's dedup and eval_sets sections


def _audio_locator(lake: Lake, files: list[str]) -> dict[str, list[str]]:
    """clip_id -> the part files holding it (usually one; a clip written twice has two)."""
    t = pads.dataset(files, filesystem=lake.fs, format="parquet").to_table(columns=["clip_id", "__filename"])
    out: dict[str, list[str]] = {}
    for cid, f in zip(t["clip_id"].to_pylist(), t["__filename"].to_pylist()):
        out.setdefault(cid, []).append(f)
    return out


class _AudioReader:
    """The FLAC bytes of one shard's clips, per part file (read once, kept for the next chunks).

    Local parts whose ``flac`` column is stored uncompressed PLAIN (how the lake writes it)
    give :class:`shards.FileSlice` ranges, found from the page headers: the tar writer reads
    them straight into its reused buffer. Other parts (object stores, other layouts) are
    read with pyarrow, the most recent ones kept up to ``cache_bytes``; a small cache lets
    the allocator hand freed buffers back to the next reads, as fresh memory (page faults)
    costs more than the reads themselves."""

    def __init__(self, lake: Lake, where: dict[str, list[str]], cache_bytes: int = 64 * 2**20):
        self.lake, self.where, self.cache_bytes = lake, where, cache_bytes
        self.cache: OrderedDict[str, dict[str, tuple[str, shards.FileSlice | memoryview]]] = OrderedDict()
        self.size = 0

    def _part(self, path: str) -> dict[str, tuple[str, shards.FileSlice | memoryview]]:
        if path in self.cache:
            self.cache.move_to_end(path)
            return self.cache[path]
        f = pq.ParquetFile(path) if self.lake.is_local else pq.ParquetFile(self.lake.fs.open_input_file(path))
        with f:
            ids = f.read(columns=["clip_id", "audio_sha256"])
            ranges = None
            if self.lake.is_local:
                fd = os.open(path, os.O_RDONLY)
                try:
                    ranges = parquet_pages.value_ranges(fd, f.metadata, "flac")
                finally:
                    os.close(fd)
            if ranges is not None:
                # By path: a part is never rewritten once committed (unique name, atomic rename).
                audio: list = [shards.FileSlice(path, off, n) for off, n in ranges]
            else:
                # Zero-copy views into the Arrow buffer: the bytes go from Parquet to the tar untouched.
                flac = f.read(columns=["flac"]).column("flac").combine_chunks()
                offsets = np.frombuffer(flac.buffers()[1], dtype=np.int64)[flac.offset: flac.offset + len(flac) + 1]
                data = memoryview(flac.buffers()[2]) if flac.buffers()[2] is not None else memoryview(b"")
                audio = [data[offsets[i]: offsets[i + 1]] for i in range(len(flac))]
                self.size += len(data)
        part: dict[str, tuple[str, shards.FileSlice | memoryview]] = {}
        for cid, sha, a in zip(ids["clip_id"].to_pylist(), ids["audio_sha256"].to_pylist(), audio):
            part.setdefault(cid, (sha, a))
        self.cache[path] = part
        while self.size > self.cache_bytes and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.size -= sum(len(a) for _, a in old.values() if isinstance(a, memoryview))
        return part

    def read(self, samples: list[Sample]) -> dict[str, shards.FileSlice | memoryview]:
        out: dict[str, shards.FileSlice | memoryview] = {}
        for s in samples:
            for path in self.where.get(s.clip_id, []):
                sha, flac = self._part(path).get(s.clip_id, (None, None))
                if sha == s.audio_sha256:
                    break
            else:
                raise UserError(f"the lake changed under the export: the audio of {s.clip_id} is gone or "
                                "different; re-run the export")
            out[s.clip_id] = flac
        return out


def export_id_of(args: ExportArgs, catalog_sha: str, out: str) -> str:
    ident = json.dumps({"args": args.identity(), "catalog": catalog_sha, "out": out,
                        "format": FORMAT_VERSION}, sort_keys=True)
    return "exp-" + hashlib.sha256(ident.encode()).hexdigest()[:16]


def run_export(lake: Lake | str, args: ExportArgs, wait: bool = False,
               on_shard: Callable[[dict, int, int], None] | None = None,
               extra_fields: Callable[[str, dict], dict[str, bytes]] | None = None) -> ExportResult:
    """Plan and write an export; resumes a killed one with the same arguments.

    ``extra_fields(clip_id, sample_json) -> {ext: bytes}`` adds members such as
    ``latents.npy`` to each sample (they must be deterministic to keep shards identical).
    ``on_shard(shard, done, total)`` reports progress."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    # Locating each clip's audio needs only the clips part list, and the writer's buffers
    # need touching once: both happen on a second thread while the selection runs.
    clip_parts = lake.parts("clips")
    with ThreadPoolExecutor(max_workers=1) as pool:
        early = pool.submit(lambda: (_audio_locator(lake, clip_parts) if clip_parts else {}, shards.TarWriter()))
        try:
            plan = plan_export(lake, args)
        except BaseException:
            if early.exception() is None:
                early.result()[1].close()
            raise
    located, writer = early.result()
    planned = [lake.path(p) for p in plan.catalog["parts"]["clips"]]
    if sorted(planned) != sorted(clip_parts):  # a part was committed in between
        located = _audio_locator(lake, planned)
    with writer:
        return _write_export(lake, args, plan, _AudioReader(lake, located), writer, wait, on_shard, extra_fields)


def _write_export(lake: Lake, args: ExportArgs, plan: Plan, reader: _AudioReader, writer: shards.TarWriter,
                  wait: bool, on_shard, extra_fields) -> ExportResult:
    fs, root = open_uri(args.out)
    out_uri = args.out if "://" in args.out else root
    fs.create_dir(root, recursive=True)
    eid = export_id_of(args, plan.catalog["sha256"], out_uri)
    manifest_path = f"{root.rstrip('/')}/manifest.json"
    previous = shards.read_manifest(args.out)
    if previous is not None and previous.get("export_id") != eid:
        raise UserError(f"{args.out} holds another export ({previous.get('export_id')}, other arguments or "
                        "catalog state); choose a new --out or delete it")
    done = {s["name"]: s for s in (previous or {}).get("shards", [])}
    manifest = {
        "format": "soundlake-webdataset", "format_version": FORMAT_VERSION, "export_id": eid,
        "name": args.name, "out": out_uri, "lake": lake.uri, "status": "incomplete",
        "created": (previous or {}).get("created") or datetime.now(timezone.utc).isoformat(),
        "query": {"where": args.where, "licenses": args.licenses, "caption": args.caption,
                  "min_score": args.min_score, "score_model": args.score_model,
                  "exclude": [{"file": p, "sha256": _exclusion_digest(p), "ids": len(read_exclusions(p))}
                              for p in args.exclude],
                  "order": "clip_id", "splits": args.splits, "split_hash": SPLIT_HASH},
        "args": args.identity(), "catalog": plan.catalog, "dropped": plan.dropped,
        "captioner_priority": list(captioner_ranking()), "shards": [], **plan.screening,
    }
    # Which shards need writing: a finished shard is kept when its sha256 still matches.
    todo = []
    for sh in plan.shards:
        prev = done.get(sh["name"])
        sh["path"] = f"{root.rstrip('/')}/{sh['name']}"
        keep = prev is not None and prev.get("count") == sh["end"] - sh["start"] and _verified(fs, sh["path"], prev)
        sh["kept"] = prev if keep else None
        if not keep:
            todo.append(sh)
    # Object stores: one reader thread fetches audio two chunks ahead while the current chunk
    # is written (reads and writes release the GIL); it alone touches the reader's cache.
    # Chunks, not whole shards, so reading and writing overlap inside a shard too. Local
    # parts only need their page headers read: inline, as hand-offs between threads cost
    # more than that on a busy machine.
    prefetch = None if lake.is_local else ThreadPoolExecutor(max_workers=1)
    jobs = [(sh["name"], plan.samples[a: min(a + _READ_CHUNK, sh["end"])])
            for sh in todo for a in range(sh["start"], sh["end"], _READ_CHUNK)]
    futures: dict[int, Future] = {}

    def submit(j: int) -> None:
        if j < len(jobs) and j not in futures:
            if prefetch is not None:
                futures[j] = prefetch.submit(reader.read, jobs[j][1])
            else:
                futures[j] = Future()
                futures[j].set_result(reader.read(jobs[j][1]))

    submit(0)
    submit(1)
    cursor = [0]  # next job to write
    written = kept = 0
    hashing: list[tuple[dict, shards.ShardInfo]] = []  # written shards whose sha256 may still be running

    def record(sh: dict, info: shards.ShardInfo) -> None:
        manifest["shards"].append({"name": sh["name"], "split": sh["split"], "count": info.count,
                                   "bytes": info.bytes, "sha256": info.sha256,
                                   "first": plan.samples[sh["start"]].clip_id,
                                   "last": plan.samples[sh["end"] - 1].clip_id})

    try:
        for n, sh in enumerate(plan.shards):
            if sh["kept"] is not None:
                manifest["shards"].append(sh["kept"])
                kept += 1
            else:
                def gen(name=sh["name"]):
                    while cursor[0] < len(jobs) and jobs[cursor[0]][0] == name:
                        j = cursor[0]
                        audio = futures.pop(j).result()
                        submit(j + 2)
                        cursor[0] += 1
                        for s in jobs[j][1]:
                            fields = {"flac": audio[s.clip_id], "json": s.json_bytes}
                            if extra_fields is not None:
                                fields.update(extra_fields(s.clip_id, json.loads(s.json_bytes)))
                            yield shards.tar_key(s.clip_id), fields
                hashing.append((sh, shards.write_shard(fs, sh["path"], gen(), writer)))
                written += 1
            # A written shard enters the manifest once its sha256 is known: the newest one is
            # still being hashed while the next shard is written, so nothing waits per shard.
            while len(hashing) > 1 or (hashing and n == len(plan.shards) - 1):
                record(*hashing.pop(0))
            # The manifest is the record of finished shards: rewrite it after each one. Atomic
            # (tmp + rename) without an fsync, which can wait for the disk to take the shards
            # written so far: after a power loss, resume re-checks each shard's sha256 anyway.
            # Only the final manifest is synced.
            put_bytes(fs, manifest_path, _dumps(manifest), sync=False)
            if on_shard:
                on_shard(sh, n + 1, len(plan.shards))
    finally:
        for f in futures.values():
            f.cancel()
        if prefetch is not None:
            prefetch.shutdown(wait=True)
    order = {sh["name"]: i for i, sh in enumerate(plan.shards)}
    manifest["shards"].sort(key=lambda e: order[e["name"]])
    splits: dict[str, int] = {}
    for s in plan.samples:
        splits[s.split] = splits.get(s.split, 0) + 1
    manifest.update(status="complete", clips=len(plan.samples), splits=splits,
                    bytes=sum(s["bytes"] for s in manifest["shards"]))
    data = _dumps(manifest)
    put_bytes(fs, manifest_path, data)
    msha = hashlib.sha256(data).hexdigest()
    try:
        recorded = _record(lake, eid, args, out_uri, plan, manifest, msha, wait)
    except OSError as e:
        problem = os_error_problem(e)
        if problem is None:
            raise
        raise UserError(f"the export is complete in {out_uri} ({len(plan.shards)} shards and manifest.json), but "
                        f"recording it in lake {lake.uri} failed: {problem[0]}; to record it, run the same command "
                        "again with a writable lake (finished shards are checked and kept, not rewritten)") from None
    return ExportResult(eid, out_uri, len(plan.samples), len(plan.shards), written, kept,
                        manifest["bytes"], splits, plan.dropped, msha, recorded, plan.screening)


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")


def _verified(fs, path: str, entry: dict) -> bool:
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File or info.size != entry.get("bytes"):
        return False
    return shards.sha256_file(fs, path) == entry.get("sha256")


def _recorded(lake: Lake, eid: str) -> bool:
    return eid in set(lake.read("exports", ["export_id"])["export_id"].to_pylist())


def _record(lake: Lake, eid: str, args: ExportArgs, out: str, plan: Plan, manifest: dict,
            msha: str, wait: bool) -> bool:
    """Write the export and its members to the lake (once per export id), in one journaled
    commit: a kill in between leaves neither visible, and the next writer finishes it."""
    if _recorded(lake, eid):
        return False
    run_id = f"export-{eid[4:]}-{uuid.uuid4().hex[:6]}"
    shard_of = {}
    for sh in plan.shards:
        for s in plan.samples[sh["start"]: sh["end"]]:
            shard_of[s.clip_id] = sh["name"]
    with lake.lock(run_id, wait=wait):
        if _recorded(lake, eid):
            return False   # the lock finished a record a killed export had begun
        members = lake.write_part("export_members", pa.table({
            "export_id": pa.array([eid] * len(plan.samples), pa.string()),
            "clip_id": [s.clip_id for s in plan.samples],
            "split": [s.split for s in plan.samples],
            "shard": [shard_of[s.clip_id] for s in plan.samples]}, schema=schema.EXPORT_MEMBERS), run_id, commit=False)
        record = lake.write_part("exports", pa.table({
            "export_id": [eid], "name": [args.name or os.path.basename(out.rstrip("/"))], "out": [out],
            "created": pa.array([datetime.now(timezone.utc)], schema.TS),
            "args_json": [json.dumps(args.identity(), sort_keys=True)],
            "catalog_sha256": [plan.catalog["sha256"]], "manifest_sha256": [msha],
            "clips": [len(plan.samples)], "shards": [len(plan.shards)], "bytes": [manifest["bytes"]],
            "splits_json": [json.dumps(manifest["splits"], sort_keys=True)],
            "as_of": [json.dumps(plan.catalog["as_of"], sort_keys=True)]}, schema=schema.EXPORTS), run_id,
            commit=False)
        lake.commit({"export_members": [members] if members else [], "exports": [record]}, run_id)
    return True
