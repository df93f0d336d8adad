"""Snapshot tables: replaced as a whole, atomically, through one small pointer file.

The parts of a snapshot table (``schema.SNAPSHOT_TABLES``: duplicates, groups, eval sets,
leakage) are written like any part, but a reader sees only the parts that
``<lake>/_snapshots.json`` lists for the table. :func:`commit` rewrites that file in one
atomic write, so a query sees the old snapshot or the new one, never half of each, and
several tables committed together change together.

Each commit has a sequence number (``seq``, in the pointer beside each table it committed)
and leaves the pointer as it made it in ``<lake>/_snapshots/<seq>.json``, with its time: that
history is what ``--as-of`` reads (runs and exports record the ``seq`` they saw under
:data:`KEY`). A commit deletes only the parts no history entry lists (a killed run's
leftovers); :func:`vacuum` removes entries older than its cutoff, all but the newest, and
then the parts none of the rest lists.

Commit with the lake lock held (one writer); readers need no lock.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow.fs as pafs

from soundlake.catalog.lake import Lake
from soundlake.catalog.schema import SNAPSHOT_TABLES
from soundlake.core.errors import UserError
from soundlake.core.storage import put_bytes

POINTER = "_snapshots.json"
HISTORY = "_snapshots"   # folder: <seq>.json per commit
KEY = "_snapshots"       # the snapshot seq's entry in a run's or an export's recorded versions
NOW = "now"              # pointer_at: the current pointer


def read_pointer(lake: Lake) -> dict[str, dict]:
    """{table: {"parts": [relative paths], "previous": [...], "seq", "run_id", "created", "meta"}}."""
    path = lake.path(POINTER)
    if lake.fs.get_file_info(path).type == pafs.FileType.NotFound:   # (object stores: no FileNotFoundError)
        return {}
    with lake.fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def version(lake: Lake, pointer: dict | None = None) -> int | None:
    """The seq of the newest commit (None: none since snapshots kept a history)."""
    seqs = [e["seq"] for e in (read_pointer(lake) if pointer is None else pointer).values() if "seq" in e]
    return max(seqs) if seqs else None


def versions(lake: Lake) -> dict[str, int]:
    """{:data:`KEY`: seq} to record beside the tables' versions ({} before the first commit)."""
    seq = version(lake)
    return {} if seq is None else {KEY: seq}


def _entry(seq: int) -> str:
    return f"{seq:08d}.json"


def history(lake: Lake) -> list[dict]:
    """Every kept history entry ({"seq", "created", "run_id", "pointer"}), oldest first."""
    sel = pafs.FileSelector(lake.path(HISTORY), allow_not_found=True)
    out = []
    for info in lake.fs.get_file_info(sel):
        if info.base_name.endswith(".json"):
            with lake.fs.open_input_stream(info.path) as f:
                out.append(json.loads(f.read().decode("utf-8")))
    return sorted(out, key=lambda e: e["seq"])


def pointer_at(lake: Lake, seq: int | str | None) -> dict[str, dict]:
    """The pointer as commit ``seq`` left it (:data:`NOW`: the current one; None: no snapshot yet)."""
    if seq == NOW:
        return read_pointer(lake)
    if seq is None:
        return {}
    try:
        with lake.fs.open_input_stream(lake.path(HISTORY, _entry(seq))) as f:
            return json.loads(f.read().decode("utf-8"))["pointer"]
    except FileNotFoundError:
        raise _vacuumed(seq) from None


def _vacuumed(seq: int) -> UserError:
    return UserError(f"the dedup and eval-set snapshots of that instant (seq {seq}) were removed by "
                     "`soundlake vacuum`: --as-of can reach back only as far as its --older-than kept")


def seq_as_of(lake: Lake, when: datetime) -> int | str | None:
    """The seq current at ``when`` (None: no snapshot yet then). A lake whose snapshots were
    committed before they kept a history has only the current one (:data:`NOW`)."""
    entries = history(lake)
    if not entries:
        return NOW
    before = [e["seq"] for e in entries if datetime.fromisoformat(e["created"]) <= when]
    if before:
        return max(before)
    if entries[0]["seq"] > 1:   # what was current then went with the entries vacuum removed
        raise _vacuumed(entries[0]["seq"] - 1)
    return None


def table_info(lake: Lake, table: str) -> dict | None:
    """The newest snapshot of ``table`` (its parts, run, time and meta), or None if it has none."""
    return read_pointer(lake).get(table)


def table_parts(lake: Lake, table: str) -> list[str]:
    """The part files (full paths) of ``table``'s newest snapshot; [] when it has none."""
    info = table_info(lake, table)
    return [lake.path(p) for p in (info or {}).get("parts", [])]


def state(lake: Lake, seq: int | str | None) -> dict[str, tuple[int | None, list[str]]]:
    """{snapshot table: (seq, full paths)} as commit ``seq`` left them (see :func:`pointer_at`)."""
    pointer = pointer_at(lake, seq)
    number = version(lake, pointer) if seq == NOW else seq
    return {t: (number, [lake.path(p) for p in pointer[t]["parts"]]) if t in pointer else (None, [])
            for t in SNAPSHOT_TABLES}


def commit(lake: Lake, tables: dict[str, list[str]], run_id: str, meta: dict[str, dict] | None = None) -> None:
    """Make ``tables`` ({table: relative part paths, as :meth:`Lake.write_part` returns}) the
    newest snapshots, all at once; ``meta`` ({table: dict}) is stored beside each."""
    pointer = read_pointer(lake)
    seq = (version(lake, pointer) or 0) + 1
    now = datetime.now(timezone.utc).isoformat()
    for table, parts in tables.items():
        old = pointer.get(table, {})
        pointer[table] = {"parts": sorted(parts), "previous": old.get("parts", []), "seq": seq, "run_id": run_id,
                          "created": now, "meta": (meta or {}).get(table, {})}
    # The history entry first: a crash before the pointer leaves an entry that the next
    # commit, numbering from the pointer, overwrites.
    lake.fs.create_dir(lake.path(HISTORY), recursive=True)
    put_bytes(lake.fs, lake.path(HISTORY, _entry(seq)), json.dumps(
        {"seq": seq, "created": now, "run_id": run_id, "pointer": pointer}, sort_keys=True).encode("utf-8"))
    put_bytes(lake.fs, lake.path(POINTER), json.dumps(pointer, indent=1, sort_keys=True).encode("utf-8"))
    _delete_unlisted(lake, tables, [pointer] + [e["pointer"] for e in history(lake)])


def _delete_unlisted(lake: Lake, tables, pointers: list[dict]) -> int:
    """Delete the parts of ``tables`` that none of ``pointers`` lists (now or as previous)."""
    deleted = 0
    for table in tables:
        live = {lake.path(p) for ptr in pointers for p in ptr.get(table, {}).get("parts", [])
                + ptr.get(table, {}).get("previous", [])}
        for path in lake.glob_parts(table):
            if path not in live:
                try:
                    lake.fs.delete_file(path)
                    deleted += 1
                except FileNotFoundError:
                    pass
    return deleted


def vacuum(lake: Lake, older_than_hours: float) -> int:
    """Forget history entries older than the cutoff (never the newest) and delete the parts
    that no kept entry lists; returns the part files deleted."""
    cutoff = datetime.now(timezone.utc) - timedelta(hours=older_than_hours)
    entries = history(lake)
    for e in entries[:-1]:
        if datetime.fromisoformat(e["created"]) < cutoff:
            lake.fs.delete_file(lake.path(HISTORY, _entry(e["seq"])))
    kept = [e["pointer"] for e in history(lake)]
    return _delete_unlisted(lake, SNAPSHOT_TABLES, [read_pointer(lake)] + kept) if entries else 0
