"""Commits: each lake table is a Delta table whose log lists the part files that count.

Workers write part files as before (``<lake>/<table>/part-*.parquet``, atomically), but a
part is visible only once the driver commits it into the table's log
(``<lake>/<table>/_delta_log``) with :func:`commit`: a retried task's parts, or those of a
task whose result never reached the driver, are never committed, so the lake cannot show a
block twice. The part files are committed where they lie, never rewritten (the ``flac`` column
stays uncompressed and PLAIN for the exports' page copy). Readers take a table's file list from
its log (:func:`committed`) and hand it to DuckDB.

Delta Lake through ``deltalake`` (delta-rs) rather than Iceberg through ``pyiceberg``: importing
deltalake takes ~0.1 s against ~1.4 s, so a ``soundlake sql`` process stays short; committing
files already written is one public call of ~10 ms (pyiceberg's ``add_files``: 70 ms to 1.5 s);
and on object stores delta-rs commits with conditional puts, so no catalog server is needed.

Delta commits one table at a time, so a block (clips with their captions, scores, ...) or an
export (``exports`` with its ``export_members``) spans several commits. The driver first writes
a journal naming all of them (``<lake>/_pending/*.json``), commits the anchor table (``clips``,
``exports``) last, then deletes the journal: while a journal's anchor is not committed, readers
leave out its other parts (:func:`unfinished`), and the next writer commits what a killed driver
left out (:func:`finish_pending`), so a reader never sees half of a block, and a re-run does not
redo it.

A table folder that holds parts but no log (a lake written by an earlier soundlake) reads as
before, every part counting, until its first commit: that commit adds the old parts too.
The snapshot tables (``schema.SNAPSHOT_TABLES``) keep their own pointer file
(:mod:`soundlake.catalog.snapshots`), which replaces several tables at once.
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from soundlake.catalog import schema

LOG = "_delta_log"
PENDING = "_pending"
ANCHORS = ("clips", "exports")   # committed last: the other rows of a block or an export count with them
# Checkpoints every 10 commits keep each commit and each file listing short. Removed files are
# not kept as tombstones in checkpoints: readers would load them all (20,000 after compacting
# 20,000 parts: ~0.2 s per command), and `vacuum` goes by --older-than and the current
# snapshot, not by tombstones.
RETENTION = {"delta.deletedFileRetentionDuration": "interval 0 seconds"}
CONFIGURATION = {"delta.checkpointInterval": "10", **RETENTION}


def uses_log(table: str) -> bool:
    return table not in schema.SNAPSHOT_TABLES


def table_uri(lake, table: str) -> str:
    path = lake.path(table)
    return path if lake.is_local else f"{lake.fs.type_name}://{path}"


def storage_options(lake) -> dict[str, str] | None:
    """Object-store settings for delta-rs, from the environment the lake's own filesystem reads."""
    if lake.is_local:
        return None
    keys = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")
    opts = {k: os.environ[k] for k in keys if os.environ.get(k)}
    endpoint = opts.get("AWS_ENDPOINT_URL_S3") or opts.get("AWS_ENDPOINT_URL") or ""
    if endpoint.startswith("http://"):
        opts["AWS_ALLOW_HTTP"] = "true"
    return opts


def logged_tables(lake) -> list[str]:
    return [t for t in schema.TABLES if uses_log(t) and has_log(lake, t)]


def has_log(lake, table: str) -> bool:
    return lake.fs.get_file_info(lake.path(table, LOG)).type == pafs.FileType.Directory


def _open(lake, table: str, version=None):
    from deltalake import DeltaTable

    return DeltaTable(table_uri(lake, table), version=version, storage_options=storage_options(lake))


def _paths(lake, table: str, dt) -> list[str]:
    """Full paths (as ``lake.fs`` names them) of the parts ``dt``'s version lists, sorted."""
    base = lake.path(table).rstrip("/") + "/"
    return sorted(base + f.split("/")[-1] for f in dt.file_uris())


def _transact(dt, actions: list, schema: pa.Schema, run_id: str, **meta: str) -> None:
    from deltalake import CommitProperties

    dt.create_write_transaction(actions, mode="append", schema=schema, commit_properties=CommitProperties(
        custom_metadata={"soundlake.run_id": run_id, **meta}))


def committed(lake, table: str, version: int | None = None) -> list[str]:
    """Full paths (as ``lake.fs`` names them) of the table's committed parts, sorted."""
    return state(lake, table, version)[1]


def state(lake, table: str, version: int | None = None) -> tuple[int, list[str]]:
    """(version, committed parts) of the table, now or at ``version``, from one read of its log."""
    dt = _open(lake, table, version)
    return dt.version(), _paths(lake, table, dt)


State = dict[str, tuple[int | None, list[str]]]   # {table: (version or None: no commit yet, parts)}


def state_at(lake, versions: dict[str, int]) -> State:
    """Every logged table at the versions a run or an export recorded (tables it did not
    know yet: empty)."""
    return {t: state(lake, t, versions[t]) if t in versions else (None, []) for t in logged_tables(lake)}


def state_as_of(lake, when) -> State:
    """Every logged table as of ``when`` (an aware datetime): the newest commit of each log at
    or before that instant (none yet: no parts)."""
    # By each commit's own recorded time, which `snapshots` shows: delta-rs' load_as_version
    # goes by the log files' mtimes, a few ms later on a busy machine.
    ms = when.timestamp() * 1000
    out = {}
    for table in logged_tables(lake):
        dt = _open(lake, table)
        before = [h["version"] for h in dt.history() if h["timestamp"] <= ms]
        if not before:
            out[table] = (None, [])   # before the log began
            continue
        dt.load_as_version(max(before))
        out[table] = (dt.version(), _paths(lake, table, dt))
    return out


def versions(lake) -> dict[str, int]:
    """{table: current version}: the instant a run or an export read or wrote, for ``--as-of``
    (with ``snapshots.versions`` for the snapshot tables)."""
    return {t: _open(lake, t).version() for t in logged_tables(lake)}


def last_commit(lake, table: str, run_id: str) -> int | None:
    """The version of ``run_id``'s last commit into ``table`` (None: it made none)."""
    return next((h["version"] for h in _open(lake, table).history() if h.get("soundlake.run_id") == run_id), None)


def history(lake) -> list[dict]:
    """The lake's commits by run, newest first: run id, the time of its last commit (UTC) and
    the tables it committed into (``sql --as-of`` takes either the run or the time)."""
    from datetime import datetime, timezone

    runs: dict[str, dict] = {}
    for table in logged_tables(lake):
        for h in _open(lake, table).history():
            run = h.get("soundlake.run_id")
            if run is None:
                continue
            when = datetime.fromtimestamp(h["timestamp"] / 1000, timezone.utc)
            r = runs.setdefault(run, {"run_id": run, "time": when, "tables": set()})
            r["time"] = max(r["time"], when)
            r["tables"].add(table)
    return sorted(runs.values(), key=lambda r: r["time"], reverse=True)


def compact(lake, table: str, run_id: str, target_bytes: int = 256 << 20) -> tuple[int, int]:
    """Rewrite the table's committed parts into parts of about ``target_bytes`` each, one group
    at a time (memory stays one group), and swap them in one commit of removes and adds: a
    reader sees the old parts or the new ones, each row once. The old files stay for
    ``--as-of`` until :func:`vacuum`. Returns (parts before, parts after)."""
    from datetime import datetime, timezone

    from deltalake.transaction import RemoveAction

    files = committed(lake, table)
    if len(files) < 2:
        return len(files), len(files)
    groups, size = [[]], 0
    for f in files:
        n = lake.fs.get_file_info(f).size
        if groups[-1] and size + n > target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += n
    new = []
    for group in groups:
        data = pa.concat_tables([pq.read_table(f, filesystem=lake.fs) for f in group], promote_options="permissive")
        new.append(lake.write_part(table, data, run_id, commit=False))
    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    actions = [RemoveAction(path=f.rsplit("/", 1)[-1], data_change=False, deletion_timestamp=now) for f in files]
    adds = [_add_action(lake, lake.path(rel), pq.read_metadata(lake.path(rel), filesystem=lake.fs)) for rel in new]
    for a in adds:
        a.data_change = False
    dt = _open(lake, table)
    _transact(dt, actions + adds, pa.schema(dt.schema().to_arrow()), run_id, **{"soundlake.op": "compact"})
    dt.update_incremental()
    if any(dt.metadata().configuration.get(k) != v for k, v in RETENTION.items()):
        dt.alter.set_table_properties(RETENTION)   # a table created before RETENTION was set
        dt.update_incremental()
    dt.create_checkpoint()   # readers start from the compacted list, without the removes
    return len(files), len(new)


def remove_orphans(lake, run_id: str) -> int:
    """Delete the parts ``run_id``'s tasks wrote that its driver never committed (a retried
    task's first attempt, on a node lost after it wrote): call once the run has ended, with
    the lake's lock held. No snapshot ever listed them, so no ``--as-of`` needs them."""
    removed = 0
    for table in logged_tables(lake):
        mine = [p for p in lake.glob_parts(table) if p.rsplit("/", 1)[-1].startswith(f"part-{run_id}-")]
        have = set(committed(lake, table)) if mine else set()
        for path in mine:
            if path not in have:
                lake.fs.delete_file(path)
                removed += 1
    return removed


def compact_all(lake, run_id: str, target_bytes: int = 256 << 20) -> list[tuple[str, int, int]]:
    """:func:`compact` every logged table; returns (table, parts before, after) of those it changed."""
    out = []
    for table in logged_tables(lake):
        before, after = compact(lake, table, run_id, target_bytes)
        if before != after:
            out.append((table, before, after))
    return out


def vacuum(lake, older_than_hours: int) -> int:
    """Delete the part files no current snapshot lists (compacted away, or written by a task
    whose result never reached its driver) once older than ``older_than_hours``; older
    snapshots that listed them can no longer be read. Returns the files deleted. Hold the
    lake's lock: a running job's parts are not committed yet."""
    deleted = 0
    for table in logged_tables(lake):
        deleted += len(_open(lake, table).vacuum(retention_hours=older_than_hours, dry_run=False,
                                                   enforce_retention_duration=False, full=True))
    return deleted


def _delta_type(t: pa.DataType) -> pa.DataType:
    """Delta has no unsigned integers: a uint32 column (fingerprints) is declared int64, which
    holds every value; the part files keep their own type."""
    if pa.types.is_unsigned_integer(t):
        return pa.int64()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(pa.field("element", _delta_type(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _delta_type(f.type)) for f in t])
    return t


def _delta_schema(arrow: pa.Schema) -> pa.Schema:
    return pa.schema([pa.field(f.name, _delta_type(f.type)) for f in arrow])


def _add_action(lake, path: str, meta: pq.FileMetaData):
    from deltalake.transaction import AddAction

    info = lake.fs.get_file_info(path)
    mtime = int(info.mtime.timestamp() * 1000) if info.mtime is not None else 0
    return AddAction(path=path.rsplit("/", 1)[-1], size=info.size, partition_values={}, modification_time=mtime,
                     data_change=True, stats=json.dumps({"numRecords": meta.num_rows}))


def commit(lake, table: str, parts: list[str], run_id: str) -> None:
    """Make ``parts`` (paths relative to the lake root, as :meth:`Lake.write_part` returns, all
    under ``table/``) visible in one commit. The first commit of a table creates its log with
    the parts already in the folder (an earlier soundlake's). New columns join the schema."""
    from deltalake import DeltaTable

    paths = [lake.path(p) for p in parts]
    fresh = not has_log(lake, table)
    if fresh:
        new = set(paths)
        paths = [p for p in lake.glob_parts(table) if p not in new] + paths
    metas = [pq.read_metadata(p, filesystem=lake.fs) for p in paths]
    arrow = _delta_schema(schema.TABLES[table]) if table in schema.TABLES else None
    for m in metas:
        arrow = _merge(arrow, _delta_schema(m.schema.to_arrow_schema()))
    if fresh:
        dt = DeltaTable.create(table_uri(lake, table), schema=arrow, configuration=CONFIGURATION,
                               storage_options=storage_options(lake))
    else:
        dt = _open(lake, table)
        have = set(dt.schema().to_arrow().names)
        missing = [f for f in arrow if f.name not in have]
        if missing:
            from deltalake import Field

            dt.alter.add_columns([Field.from_arrow(f) for f in missing])
            dt.update_incremental()
        arrow = _merge(pa.schema(dt.schema().to_arrow()), arrow)
    actions = [_add_action(lake, p, m) for p, m in zip(paths, metas)]
    if not actions:
        return
    _transact(dt, actions, arrow, run_id)


def commit_order(table: str) -> tuple[bool, str]:
    return table in ANCHORS, table


def begin(lake, parts: dict[str, list[str]], run_id: str) -> str:
    """Write the journal of a commit that spans ``parts``' tables (the anchor last, as
    :func:`commit_order` sorts them); returns its path, for :func:`end`."""
    import uuid

    from soundlake.core.storage import put_bytes

    last = max(parts, key=commit_order)
    path = lake.path(PENDING, f"{run_id}-{uuid.uuid4().hex[:12]}.json")
    lake.fs.create_dir(lake.path(PENDING), recursive=True)
    put_bytes(lake.fs, path, json.dumps({"run_id": run_id, "last": last, "parts": parts}).encode(), sync=False)
    return path


def end(lake, journal: str) -> None:
    lake.fs.delete_file(journal)


def pending(lake) -> list[dict]:
    """The journals of commits not yet finished (``path``, ``age_s``, ``last``, ``parts``)."""
    import time

    sel = pafs.FileSelector(lake.path(PENDING), allow_not_found=True)
    out = []
    for info in lake.fs.get_file_info(sel):
        if info.type != pafs.FileType.File or not info.path.endswith(".json"):
            continue
        try:
            with lake.fs.open_input_stream(info.path) as f:
                journal = json.loads(f.read())
        except FileNotFoundError:   # finished meanwhile
            continue
        age = time.time() - info.mtime.timestamp() if info.mtime is not None else 0.0
        out.append({**journal, "path": info.path, "age_s": age})
    return out


def _anchor_done(lake, journal: dict, committed_anchor: set[str] | None = None) -> bool:
    last = journal["last"]
    have = committed_anchor if committed_anchor is not None else set(committed(lake, last))
    return all(lake.path(p) in have for p in journal["parts"][last])


def unfinished(lake, table: str) -> set[str]:
    """Committed parts of ``table`` that a reader must leave out: those of an unfinished
    journal whose anchor is not committed yet (a kill, or a commit in progress)."""
    hidden = set()
    for journal in pending(lake):
        rels = journal["parts"].get(table)
        if rels and table != journal["last"] and not _anchor_done(lake, journal):
            hidden.update(lake.path(p) for p in rels)
    return hidden


def finish_pending(lake, run_id: str, min_age_s: float = 0.0) -> int:
    """Commit what each unfinished journal (older than ``min_age_s``) still lacks, anchor last,
    then delete it: the block or export its driver was killed in the middle of now counts
    once. Call with the lake's lock held. Returns the journals finished."""
    done = 0
    for journal in pending(lake):
        if journal["age_s"] < min_age_s:
            continue
        for table in sorted(journal["parts"], key=commit_order):
            have = set(committed(lake, table)) if has_log(lake, table) else set()
            todo = [p for p in journal["parts"][table] if lake.path(p) not in have]
            if todo:
                commit(lake, table, todo, run_id)
        end(lake, journal["path"])
        done += 1
    return done


def prepare(lake, run_id: str) -> None:
    """Give every table without a log one (holding the parts an earlier soundlake left in its
    folder), before a run's workers write: from then on a part counts only once committed.
    Finish the commits a killed driver left half done."""
    for table in schema.TABLES:
        if uses_log(table) and not has_log(lake, table):
            commit(lake, table, [], run_id)
    # Another writer may be mid-commit on an object store (no lock there): leave its journal alone.
    finish_pending(lake, run_id, min_age_s=0 if lake.is_local else 3600)


def _merge(a: pa.Schema | None, b: pa.Schema) -> pa.Schema:
    if a is None:
        return b
    names = set(a.names)
    return pa.schema(list(a) + [f for f in b if f.name not in names])
