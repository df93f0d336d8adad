"""The lake: a root folder (or object-store URI) of Parquet part files, one folder per table.

Writes are atomic: a part is written under a ``.tmp`` name and renamed (on object
stores a single PUT is atomic already), and it counts once committed into its table's log
(:mod:`soundlake.catalog.delta`), which is what readers list. A writer lock
(:mod:`soundlake.catalog.locks`) keeps a second writer out. A lake path that is empty (it
would mean the current folder) or a file is refused in one line.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from soundlake.catalog import schema
from soundlake.core.errors import UserError
from soundlake.core.storage import atomic_output, check_folder, is_local, open_uri

# Binary columns already compressed (FLAC) gain nothing from a second codec.
_UNCOMPRESSED = {"flac"}


def leaf_paths(field: pa.Field, prefix: str = "") -> list[str]:
    """The Parquet column paths under ``field``: per-column writer options are keyed by these
    (a list's values are ``name.list.element``; keyed by ``name`` alone they get no codec)."""
    name, t = prefix + field.name, field.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return leaf_paths(t.value_field.with_name("element"), name + ".list.")
    if pa.types.is_struct(t):
        return [p for child in t for p in leaf_paths(child, name + ".")]
    return [name]


@dataclass
class Lake:
    uri: str
    fs: pafs.FileSystem = field(init=False, repr=False)
    root: str = field(init=False)
    held: object = field(init=False, default=None, repr=False)   # the writer lock while lock() holds it

    def __post_init__(self):
        check_folder(self.uri, "--lake")  # not empty (the current folder), not a file
        self.fs, self.root = open_uri(self.uri)

    @property
    def is_local(self) -> bool:
        return is_local(self.fs)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def create(self) -> None:
        self.fs.create_dir(self.root, recursive=True)

    # ---- parts -------------------------------------------------------------
    def write_part(self, table: str, data: pa.Table, run_id: str, commit: bool = True) -> str | None:
        """Write one part file atomically and (``commit``) commit it; returns its path relative
        to the root. Workers pass ``commit=False``: the driver commits what they return."""
        if data.num_rows == 0:
            return None
        name = f"part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
        rel = f"{table}/{name}"
        final = self.path(rel)
        self.fs.create_dir(self.path(table), recursive=True)
        leaves = [p for f in data.schema for p in leaf_paths(f)]
        compression = {c: ("none" if c in _UNCOMPRESSED else "zstd") for c in leaves}
        # Dictionaries for flat columns only: on list values (embeddings, fingerprints) they
        # cost write time and come out larger.
        with atomic_output(self.fs, final) as out:
            pq.write_table(data, out, compression=compression,
                           use_dictionary=[c for c in data.column_names if c not in _UNCOMPRESSED])
        if commit:
            self.commit({table: [rel]}, run_id)
        return rel

    def commit(self, parts: dict[str, list[str]], run_id: str) -> None:
        """Make written parts ({table: relative paths}) visible, one commit per table, the
        anchor (``clips``, ``exports``) last and under a journal (:func:`delta.begin`): a reader
        sees all of them or none, even if the driver dies in between."""
        from soundlake.catalog import delta

        if self.held is not None:
            self.held.check()   # a lock that a catalog lost (its server restarted) must not go on committing
        tables = sorted((t for t in parts if parts[t] and delta.uses_log(t)), key=delta.commit_order)
        journal = delta.begin(self, {t: parts[t] for t in tables}, run_id) if len(tables) > 1 else None
        for table in tables:
            delta.commit(self, table, sorted(parts[table]), run_id)
        if journal:
            delta.end(self, journal)

    def parts(self, table: str) -> list[str]:
        """The table's visible part files: those its log lists (every part in its folder when
        it has no log yet, as an earlier soundlake wrote it, and for the snapshot tables)."""
        return self.state(table)[1]

    def state(self, table: str) -> tuple[int | None, list[str]]:
        """(log version, visible parts) from one read of the table's log (no log: None)."""
        from soundlake.catalog import delta

        if delta.uses_log(table) and delta.has_log(self, table):
            version, files = delta.state(self, table)
            hidden = delta.unfinished(self, table)
            return version, [p for p in files if p not in hidden]
        return None, self.glob_parts(table)

    def glob_parts(self, table: str) -> list[str]:
        """Every part file in the table's folder, committed or not."""
        sel = pafs.FileSelector(self.path(table), allow_not_found=True)
        return sorted(i.path for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """Read a whole table with pyarrow (small tables: runs, failures, ids)."""
        files = self.parts(table)
        base = schema.TABLES.get(table)
        if not files:
            empty = base.empty_table() if base is not None else pa.table({})
            return empty.select(columns) if columns else empty
        tables = [pq.read_table(f, filesystem=self.fs, columns=columns) for f in files]
        return pa.concat_tables(tables, promote_options="permissive")

    def tmp_files(self, run_id: str | None = None) -> list[str]:
        """Half-written parts (of one run, or of any)."""
        if not self.is_local or not self.exists():
            return []
        prefix = f"part-{run_id}-" if run_id else ""
        return [os.path.join(dirpath, f) for dirpath, _, files in os.walk(self.root) for f in files
                if f.startswith(prefix) and (f.endswith(".parquet.tmp") or f.endswith(".tar.tmp"))]

    def clean_tmp(self, run_id: str | None = None, settle_s: float = 0.0) -> int:
        """Remove half-written parts left by a killed run (call with the lock held).

        ``settle_s``: a failed run's tasks may still be writing (cancelled or finishing) when
        its driver stops: give them that long to end on their own before removing the rest."""
        deadline = time.monotonic() + settle_s
        while self.tmp_files(run_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        removed = 0
        for path in self.tmp_files(run_id):
            try:
                os.remove(path)
                removed += 1
            except FileNotFoundError:  # renamed or removed by its writer meanwhile
                pass
        return removed

    @contextmanager
    def lock(self, run_id: str, wait: bool = False, poll: float = 1.0):
        """Hold the lake's write lock. A second writer waits (``wait``) or gets a clear refusal.

        Locally an ``flock`` on ``<lake>/_lock``, or a lock in the lake's catalog
        (:mod:`soundlake.catalog.locks`; an object-store lake must name one): either way a
        killed holder never leaves the lake locked.
        """
        from soundlake.catalog import delta, locks

        lk = locks.lock_for(self, locks.catalog_for(self))
        self.create()
        holder = f"run {run_id} (pid {os.getpid()} on {socket.gethostname()})"
        try:
            while (busy := lk.try_acquire(run_id, holder)) is not None:
                if not wait:
                    raise UserError(f"lake {self.uri} is busy: {busy} is writing to it; "
                                    "wait for it to finish, or pass --wait to queue behind it")
                time.sleep(poll)
            locks.record(self)
            delta.prepare(self, run_id)
            self.held = lk
            yield
        finally:
            self.held = None
            lk.release()

    def holds_lock(self, run_id: str) -> bool:
        """Does run_id own the lake now? Asked by a run's tasks, which must not write for a run
        that lost the lake. (Catalog lakes: always yes; there the driver, which commits, holds
        the lock, and a killed driver commits nothing.)"""
        from soundlake.catalog import locks

        if not self.is_local or locks.catalog_for(self):
            return True
        try:
            with open(self.path("_lock"), encoding="utf-8", errors="replace") as f:
                return f"run {run_id} " in f.read()
        except OSError:
            return False

    def is_locked(self) -> bool:
        from soundlake.catalog import locks

        uri = locks.catalog_for(self)
        if uri is None:   # an object-store lake without a catalog has no lock to hold
            return self.is_local and locks.FileLock(self.path("_lock")).is_held()
        return locks.lock_for(self, uri).is_held()
