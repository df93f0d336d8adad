"""Snapshot tables: replaced as a whole, atomically, through one small pointer file.

The parts of a snapshot table (``schema.SNAPSHOT_TABLES``: duplicates, groups, eval sets,
leakage) are written like any part, but a reader sees only the parts that
``<lake>/_snapshots.json`` lists for the table. :func:`commit` rewrites that file in one
atomic write, so a query sees the old snapshot or the new one, never half of each, and
several tables committed together change together. A commit deletes the parts that neither
the new nor the previous snapshot lists (a killed run's leftovers, older snapshots): an
export that pinned the previous snapshot still finds its files.

Commit with the lake lock held (one writer); readers need no lock.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow.fs as pafs

from soundlake.catalog.lake import Lake
from soundlake.core.storage import put_bytes

POINTER = "_snapshots.json"


def read_pointer(lake: Lake) -> dict[str, dict]:
    """{table: {"parts": [relative paths], "previous": [...], "run_id", "created", "meta"}}."""
    path = lake.path(POINTER)
    if lake.fs.get_file_info(path).type == pafs.FileType.NotFound:   # (object stores: no FileNotFoundError)
        return {}
    with lake.fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def table_info(lake: Lake, table: str) -> dict | None:
    """The newest snapshot of ``table`` (its parts, run, time and meta), or None if it has none."""
    return read_pointer(lake).get(table)


def table_parts(lake: Lake, table: str) -> list[str]:
    """The part files (full paths) of ``table``'s newest snapshot; [] when it has none."""
    info = table_info(lake, table)
    return [lake.path(p) for p in (info or {}).get("parts", [])]


def commit(lake: Lake, tables: dict[str, list[str]], run_id: str, meta: dict[str, dict] | None = None) -> None:
    """Make ``tables`` ({table: relative part paths, as :meth:`Lake.write_part` returns}) the
    newest snapshots, all at once; ``meta`` ({table: dict}) is stored beside each."""
    pointer = read_pointer(lake)
    now = datetime.now(timezone.utc).isoformat()
    for table, parts in tables.items():
        old = pointer.get(table, {})
        pointer[table] = {"parts": sorted(parts), "previous": old.get("parts", []), "run_id": run_id,
                          "created": now, "meta": (meta or {}).get(table, {})}
    put_bytes(lake.fs, lake.path(POINTER), json.dumps(pointer, indent=1, sort_keys=True).encode("utf-8"))
    for table in tables:
        live = {lake.path(p) for p in pointer[table]["parts"] + pointer[table]["previous"]}
        for path in lake.glob_parts(table):
            if path not in live:
                try:
                    lake.fs.delete_file(path)
                except FileNotFoundError:
                    pass
