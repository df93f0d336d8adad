"""Turn a pipeline spec into one streaming Ray Data DAG and run it into the lake.

    inputs (small rows, listed on the driver)
      -> segment (tasks)  -> model stages (actor pools)  -> write (tasks: Parquet parts)
      -> per-block summaries (counts, part names) back to the driver

Audio never reaches the driver: the write step, running in the workers, is the only
consumer of the FLAC bytes. Resume is a query: inputs whose clips or failures are
already committed are not listed again.
"""
from __future__ import annotations

import json
import socket
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import duckdb
import pyarrow as pa

from soundlake.catalog import delta, schema, snapshots
from soundlake.catalog.lake import Lake
from soundlake.catalog.schema import INPUT_SCHEMA
from soundlake.catalog.sql import SKIP_REASONS_SQL, connect, execute_arrow, parquet_list, source_sql
from soundlake.core.errors import SKIP_REASONS, UserError
from soundlake.core.fingerprints import code_version
from soundlake.core.ray_env import data_context, init_ray, joins_cluster
from soundlake.core.storage import storage_error
from soundlake.pipelines.probe import probe_nodes
from soundlake.pipelines.retry import inputs_table
from soundlake.pipelines.spec import PipelineSpec
from soundlake.sources.base import get_source
from soundlake.stages.base import Stage
from soundlake.stages.caption import CAPTIONERS, CaptionerStage
from soundlake.stages.segment import SegmentStage

SUMMARY = pa.schema([
    ("source_ids", pa.list_(pa.string())),
    ("clips", pa.int64()),
    ("failed_inputs", pa.int64()),
    ("errors_json", pa.string()),
    ("skipped_json", pa.string()),     # skipped inputs per reason (policy decisions)
    ("parts", pa.list_(pa.string())),
    ("flac_bytes", pa.int64()),
    ("tables_json", pa.string()),      # rows written per table
    ("write_error", pa.string()),      # a storage problem the user can fix (full disk...), as one line
])


@dataclass
class RunSummary:
    run_id: str
    pipeline: str
    lake: str
    inputs_total: int = 0          # inputs the source listed
    inputs_skipped: int = 0        # already committed (resume)
    inputs_done: int = 0           # processed in this run
    clips: int = 0
    failed_inputs: int = 0
    errors: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)   # inputs left out by policy, per reason
    flac_bytes: int = 0
    parts: list[str] = field(default_factory=list)
    ray_startup_s: float = 0.0
    elapsed_s: float = 0.0
    non_audio_skipped: int = 0
    rows: Counter = field(default_factory=Counter)   # rows written per table
    notes: list[str] = field(default_factory=list)
    status: str = "running"

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def counts(self) -> dict:
        return {"inputs_total": self.inputs_total, "inputs_skipped": self.inputs_skipped,
                "inputs_done": self.inputs_done, "clips": self.clips, "failed_inputs": self.failed_inputs,
                "errors": dict(self.errors), "skipped": dict(self.skipped), "flac_bytes": self.flac_bytes, "rows": dict(self.rows),
                "ray_startup_s": round(self.ray_startup_s, 3), "elapsed_s": round(self.elapsed_s, 3)}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def list_inputs(spec: PipelineSpec) -> tuple[list[dict], int]:
    rows, skipped = get_source(spec.source.kind).list_inputs(spec)
    return (rows[: spec.source.limit] if spec.source.limit else rows), skipped


DONE_TABLES = ("clips", "failures", "skipped")   # an input with a row in any of them is done


def pending_inputs(lake: Lake, rows: list[dict]) -> list[dict]:
    """The listed ``rows`` whose input has no committed clip, failure or skip yet.

    The resume check is an anti-join in DuckDB over the parts' (source, source_id) columns:
    the committed keys stay inside DuckDB's join and never become a Python set. Every
    version of these tables has both columns, so a local lake's parts are read without
    ``union_by_name``: DuckDB matches the two columns by name in each file instead of first
    unifying every file's whole schema (at 20,000 parts: 1.8 s and 180 MB instead of 3.2 s
    and 1.5 GB, benchmarks/catalog_scale.py)."""
    if not rows or not lake.exists():
        return rows
    listed = pa.table({"i": pa.array(range(len(rows)), pa.int64()),
                       "source": pa.array([r["source"] for r in rows], pa.string()),
                       "source_id": pa.array([r["source_id"] for r in rows], pa.string())})
    con = duckdb.connect(":memory:")
    try:
        con.register("listed", listed)
        done = []
        for table in DONE_TABLES:
            files = lake.parts(table)
            if files and lake.is_local:
                done.append(f"SELECT source, source_id FROM read_parquet({parquet_list(files)})")
            elif files:
                done.append(f"SELECT source, source_id FROM {source_sql(con, lake, table, files)}")
        if not done:
            return rows
        keep = con.execute(f"""SELECT l.i FROM listed l ANTI JOIN ({" UNION ALL ".join(done)}) d
                               ON d.source = l.source AND d.source_id = l.source_id""").fetchnumpy()["i"]
    finally:
        con.close()
    keep.sort()
    return [rows[i] for i in keep.tolist()]


def move_policy_failures(lake: Lake, run_id: str) -> int:
    """Lakes written before ``skipped`` existed recorded policy decisions (too short, silent...)
    as failures: record each such input as skipped once (the views ignore those failure rows)."""
    if not lake.parts("failures"):
        return 0
    moved = execute_arrow(connect(lake), f"""
        SELECT f.source, f.source_id, f.clip_id, f.stage, f.error AS reason, f.message, f.time FROM failures f
        WHERE f.error IN ({SKIP_REASONS_SQL})
          AND NOT EXISTS (SELECT 1 FROM skipped s WHERE s.source = f.source AND s.source_id = f.source_id)
        QUALIFY row_number() OVER (PARTITION BY f.source, f.source_id ORDER BY f.time DESC) = 1""")
    if moved.num_rows:
        moved = moved.append_column("setting", pa.array([SKIP_REASONS[r] for r in moved["reason"].to_pylist()]))
        moved = moved.append_column("run_id", pa.array([run_id] * moved.num_rows, pa.string()))
        lake.write_part("skipped", moved.select(schema.SKIPPED.names).cast(schema.SKIPPED), run_id)
    return moved.num_rows


def build_stages(spec: PipelineSpec, run_id: str) -> list[Stage]:
    from soundlake.stages.clap import EmbedStage, ScoreStage

    active = spec.active_stages()
    first: Stage = SegmentStage(spec.segment, run_id)
    if get_source(spec.source.kind).fetch:
        # Remote media: download and segment in one task, on the worker's local disk.
        from soundlake.stages.download import DownloadStage

        first = DownloadStage(spec.source.kind, spec.download, spec.freesound.api_url, run_id, first)
    stages: list[Stage] = [first]
    if "caption" in active:
        stages += [CAPTIONERS[name].stage.from_spec(spec.caption, run_id) for name in spec.caption.captioners]
    if "embed" in active:
        stages.append(EmbedStage(spec.clap, run_id, tag="tag" in active))
    if "score" in active:
        stages.append(ScoreStage(spec.clap, run_id))
    return stages


# ---- the functions Ray runs in its workers ---------------------------------------
_WORKER_STAGES: dict[str, Stage] = {}


def _task_fn(stage: Stage, key: str) -> Callable[[pa.Table], pa.Table]:
    def run(batch: pa.Table) -> pa.Table:
        # Each task unpickles its own copy: keep the first one per worker process,
        # so setup() runs once per worker, not per batch.
        live = _WORKER_STAGES.get(key)
        if live is None:
            live = _WORKER_STAGES[key] = stage
            live.setup()
        return live.process(batch)
    return run


class _ActorStage:
    def __init__(self, stage: Stage):
        self.stage = stage
        stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.stage.process(batch)


def write_block(batch: pa.Table, lake_uri: str, run_id: str, stages: list[Stage]) -> pa.Table:
    """Write one block's rows into the lake's tables; return a small summary row."""
    import pyarrow.compute as pc

    lake = Lake(lake_uri)
    if not lake.holds_lock(run_id):
        # Fencing: a task of a killed run that outlives its driver must not commit
        # parts behind the back of the run that now owns the lake.
        return SUMMARY.empty_table()
    tables: dict[str, list[pa.Table]] = {}
    for stage in stages:
        for name, t in stage.tables(batch).items():
            tables.setdefault(name, []).append(t)
    # Failures first, clips last (Lake.commit keeps that order): an input counts as done once
    # its clips part is committed.
    order = sorted(tables, key=lambda n: (n == "clips", n))
    parts, rows, write_error = [], {}, None
    try:
        for name in order:
            data = pa.concat_tables(tables[name])
            rel = lake.write_part(name, data, run_id, commit=False)   # the driver commits it
            if rel:
                parts.append(rel)
                rows[name] = data.num_rows
    except OSError as e:
        # Returned, not raised: Ray Data would wrap the exception and lose its errno.
        err = storage_error(e, f"lake {lake_uri}")
        if err is None:
            raise
        write_error = str(err)
    failed = batch.filter(pc.equal(batch["status"], "failed"))
    skipped = batch.filter(pc.equal(batch["status"], "skipped"))
    clips = pa.concat_tables(tables["clips"]) if "clips" in tables else None
    return pa.Table.from_pylist([{
        "source_ids": sorted(set(batch["source_id"].to_pylist())) if "source_id" in batch.column_names else [],
        "clips": rows.get("clips", 0), "failed_inputs": failed.num_rows,
        "errors_json": json.dumps(Counter(failed["error"].to_pylist())),
        "skipped_json": json.dumps(Counter(skipped["error"].to_pylist())), "parts": parts,
        "tables_json": json.dumps(rows), "write_error": write_error,
        "flac_bytes": int(pc.sum(clips["flac_bytes"]).as_py() or 0) if clips is not None else 0,
    }], schema=SUMMARY)


def build_dataset(rows: list[dict], stages: list[Stage], spec: PipelineSpec, lake_uri: str, run_id: str):
    import ray.data

    data_context()
    per_task = spec.ray.inputs_per_task
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    blocks = [table.slice(i, per_task) for i in range(0, table.num_rows, per_task)]
    return map_and_write(ray.data.from_arrow(blocks), stages, lake_uri, run_id)


def consume(ds, summary: RunSummary, t0: float, on_progress, lake: Lake,
            before_commit: Callable[[], None] | None = None) -> None:
    """Drain a dataset of write summaries into the run summary (small rows only), committing
    each block's parts as its summary arrives: only parts whose task reported back count, so a
    retried task's first attempt, or a task of a killed run, never shows in the lake.
    ``before_commit`` runs before each commit (the run's lazy start record)."""
    seen: set[str] = set()
    base = summary.inputs_done
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    try:
        for batch in batches:
            recs = batch.to_pylist()
            written: dict[str, list[str]] = {}
            for rec in recs:
                for rel in rec["parts"]:
                    written.setdefault(rel.split("/", 1)[0], []).append(rel)
            if written:
                if before_commit:
                    before_commit()
                lake.commit(written, summary.run_id)
            for rec in recs:
                seen.update(rec["source_ids"])
                summary.clips += rec["clips"]
                summary.failed_inputs += rec["failed_inputs"]
                summary.errors.update(json.loads(rec["errors_json"]))
                summary.skipped.update(json.loads(rec["skipped_json"]))
                summary.rows.update(json.loads(rec["tables_json"] or "{}"))
                summary.parts.extend(rec["parts"])
                summary.flac_bytes += rec["flac_bytes"]
                if rec["write_error"]:
                    raise UserError(rec["write_error"])
            if summary.clips or summary.failed_inputs or summary.skipped:
                summary.inputs_done = base + len(seen)
            summary.elapsed_s = time.perf_counter() - t0
            if on_progress:
                on_progress(summary)
    finally:
        # Stop the stream now (Ray Data cancels its tasks), not when the generator is collected.
        close = getattr(batches, "close", None)
        if close:
            close()


def backfill_datasets(spec: PipelineSpec, lake: Lake, run_id: str, stages: list[Stage]):
    """Model stages for clips already in the lake (added to a lake curated without them).

    Yields (name, dataset of write summaries). Embeddings/tags: clips without an
    embedding from this model (audio read by the workers from the clip parts).
    Model captioners (autocap): clips without their caption from this model, checkpoint and prompt version.
    Scores: captions without a score from this model (needs only text + stored embeddings).
    """

    by_name = {s.name: s for s in stages}
    if "embed" in by_name and lake.parts("clips"):
        need = {r[0] for r in connect(lake).execute(
            """SELECT clip_id FROM clips WHERE clip_id NOT IN
               (SELECT clip_id FROM embeddings WHERE model_id = ?)""", [spec.clap.model]).fetchall()}
        if need:
            clips = lake_clips_dataset(lake, need, ["clip_id", "source_id", "flac"])
            yield "embed", map_and_write(clips, [by_name["embed"]], lake.uri, run_id)
    for stage in stages:
        identity = stage.backfill_identity() if isinstance(stage, CaptionerStage) else None
        if identity is None or not lake.parts("clips"):
            continue
        need = {r[0] for r in connect(lake).execute(
            """SELECT clip_id FROM clips c WHERE NOT EXISTS (SELECT 1 FROM captions k WHERE k.clip_id = c.clip_id
               AND k.captioner = ? AND k.model_id = ? AND k.model_hash = ? AND k.prompt_version = ?)
               AND NOT EXISTS (SELECT 1 FROM failures f WHERE f.clip_id = c.clip_id AND f.stage = ?)""",
            [stage.captioner, *identity, stage.name]).fetchall()}
        if need:
            clips = lake_clips_dataset(lake, need, list(stage.backfill_columns))
            yield stage.name, map_and_write(clips, [stage], lake.uri, run_id)
    if "score" in by_name and lake.parts("captions"):
        table = execute_arrow(connect(lake),
            """SELECT c.clip_id, c.clip_id AS source_id, e.embedding::FLOAT[] AS clap_embedding,
                      list({'captioner': c.captioner, 'model_id': c.model_id, 'text': c.text}) AS new_captions
               FROM captions c JOIN embeddings e ON e.clip_id = c.clip_id AND e.model_id = $m
               WHERE NOT EXISTS (SELECT 1 FROM scores s WHERE s.clip_id = c.clip_id AND s.captioner = c.captioner
                                 AND s.caption_text = c.text AND s.clap_model_id = $m)
               GROUP BY ALL ORDER BY c.clip_id""", {"m": spec.clap.model})
        if table.num_rows:
            import ray.data

            data_context()
            table = table.append_column("status", pa.array(["ok"] * table.num_rows))
            table = table.append_column("error", pa.nulls(table.num_rows, pa.string()))
            blocks = [table.slice(i, 256) for i in range(0, table.num_rows, 256)]
            yield "score", map_and_write(ray.data.from_arrow(blocks), [by_name["score"]], lake.uri, run_id)


def lake_clips_dataset(lake: Lake, need: set[str], columns: list[str]):
    """The clips in ``need`` (with ``columns`` from their parts, e.g. the FLAC bytes), read by
    the workers one part per task, as flow rows (status ok)."""
    import ray
    import ray.data

    data_context()
    need_ref = ray.put(sorted(need))
    lake_uri = lake.uri

    def read_part(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        fs = Lake(lake_uri).fs
        wanted = pa.array(ray.get(need_ref))
        tables = []
        for path in batch["path"].to_pylist():
            t = pq.read_table(path, filesystem=fs, columns=columns)
            tables.append(t.filter(pc.is_in(t["clip_id"], value_set=wanted)))
        keep = pa.concat_tables(tables)
        keep = keep.append_column("status", pa.array(["ok"] * keep.num_rows, pa.string()))
        return keep.append_column("error", pa.nulls(keep.num_rows, pa.string()))

    files = lake.parts("clips")
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))
    return ds.map_batches(read_part, batch_format="pyarrow", batch_size=1)


def map_stage(ds, stage: Stage, run_id: str):
    """``ds`` through one stage: an actor pool for model stages, tasks for the rest."""
    res = stage.resources()
    if stage.uses_actors:
        return ds.map_batches(_ActorStage, fn_constructor_args=(stage,), batch_size=res.batch_size,
                              batch_format="pyarrow", num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                              concurrency=res.concurrency or 1)
    return ds.map_batches(_task_fn(stage, f"{run_id}:{stage.name}"), batch_size=res.batch_size,
                          batch_format="pyarrow", num_cpus=res.num_cpus, zero_copy_batch=True)


def map_and_write(ds, stages: list[Stage], lake_uri: str, run_id: str):
    """``ds`` through ``stages``, each block's rows then written to the lake by the workers;
    the result is a dataset of small write summaries (see :func:`consume`)."""
    for stage in stages:
        ds = map_stage(ds, stage, run_id)
    return ds.map_batches(write_block, fn_args=(lake_uri, run_id, stages), batch_size=None,
                          batch_format="pyarrow", num_cpus=1, zero_copy_batch=True)


def record_run(lake: Lake, pipeline: str, config_json: str, summary: RunSummary, started: datetime,
               ended: datetime | None, read_as_of: dict[str, int], wrote_as_of: dict[str, int] | None) -> None:
    row = {"run_id": summary.run_id, "pipeline": pipeline, "status": summary.status,
           "config_json": config_json, "code_version": code_version(), "host": socket.gethostname(),
           "started": started, "ended": ended, "counts_json": json.dumps(summary.counts()),
           "parts": summary.parts, "read_as_of": json.dumps(read_as_of, sort_keys=True),
           "wrote_as_of": None if wrote_as_of is None else json.dumps(wrote_as_of, sort_keys=True)}
    lake.write_part("runs", pa.Table.from_pylist([row], schema=schema.RUNS), summary.run_id)


def lake_versions(lake: Lake) -> dict[str, int]:
    """Every logged table's version and the snapshot tables' seq: what ``--as-of`` reads."""
    return {**delta.versions(lake), **snapshots.versions(lake)}


@contextmanager
def recorded_run(lake: Lake, pipeline: str, config_json: str, summary: RunSummary, eager: bool = True):
    """Write the run's start record, then its end record with the final status, whatever happens;
    both name the table versions it started from, the end record those it left (``--as-of RUN``).

    Yields ``start()``, which writes the start record once: with ``eager=False`` the caller
    calls it before its first commit, so a run that finds nothing to do adds one record only."""
    started = datetime.now(timezone.utc)
    read = lake_versions(lake)
    begun = []

    def start() -> None:
        if not begun:
            begun.append(True)
            record_run(lake, pipeline, config_json, summary, started, None, read, None)

    if eager:
        start()
    try:
        yield start
        summary.status = "finished"
    except BaseException:
        summary.status = "interrupted"
        raise
    finally:
        record_run(lake, pipeline, config_json, summary, started, datetime.now(timezone.utc), read,
                   lake_versions(lake))


def run_pipeline(spec: PipelineSpec, lake_uri: str, wait: bool = False,
                 on_start: Callable[[RunSummary], None] | None = None,
                 on_progress: Callable[[RunSummary], None] | None = None,
                 rows: list[dict] | None = None, compact: bool = False) -> RunSummary:
    """Run ``spec`` into the lake. ``rows`` (retry-failed) replaces the source listing
    and is processed even though those inputs have committed failures. ``compact``: rewrite
    the tables' small parts into large ones at the end (``soundlake compact``), lock still held."""
    lake = Lake(lake_uri)
    run_id = new_run_id()
    summary = RunSummary(run_id=run_id, pipeline=spec.name, lake=lake.uri)
    with lake.lock(run_id, wait=wait):
        lake.clean_tmp()
        move_policy_failures(lake, run_id)
        retry = rows is not None
        if not retry:
            rows, summary.non_audio_skipped = list_inputs(spec)
        summary.inputs_total = len(rows)
        todo = rows if retry else pending_inputs(lake, rows)
        summary.inputs_skipped = len(rows) - len(todo)
        if todo:
            # The listed inputs, so that `retry-failed` can rebuild them later.
            lake.write_part("inputs", inputs_table(todo, run_id), run_id)
        with recorded_run(lake, spec.name, spec.model_dump_json(), summary, eager=bool(todo)) as start:
            if on_start:
                on_start(summary)
            t0 = time.perf_counter()
            # Ray first: stages may create shared actors (the per-host rate limiter).
            if todo or {"embed", "score"} & set(spec.active_stages()) or any(CAPTIONERS[n].stage.uses_actors for n in spec.caption.captioners):
                summary.ray_startup_s = init_ray(spec.ray)
                if joins_cluster(spec.ray):
                    probe_nodes(lake, todo)   # every node reaches the lake and the inputs, or one line
                t0 = time.perf_counter()
            stages = build_stages(spec, run_id)
            try:
                if todo:
                    consume(build_dataset(todo, stages, spec, lake.uri, run_id), summary, t0, on_progress, lake)
                for name, ds in backfill_datasets(spec, lake, run_id, stages):
                    summary.notes.append(f"{name}: existing clips brought up to date")
                    consume(ds, summary, t0, on_progress, lake, before_commit=start)
            except BaseException:
                # Tasks still writing when the run stops (a full disk, Ctrl-C) would leave
                # half-written parts behind: let them end, then remove what remains.
                lake.clean_tmp(run_id, settle_s=10)
                raise
            skipped = [s for s in spec.stages if s not in spec.active_stages()]
            if skipped:
                summary.notes.append(f"stages {', '.join(skipped)} skipped: set clap.model to run them")
            summary.elapsed_s = time.perf_counter() - t0
        orphans = delta.remove_orphans(lake, run_id)
        if orphans:
            summary.notes.append(f"removed {orphans} parts of tasks that never reported back (Ray redid them)")
        if compact:
            for table, before, after in delta.compact_all(lake, run_id):
                summary.notes.append(f"compacted {table}: {before} parts -> {after}")
    return summary
