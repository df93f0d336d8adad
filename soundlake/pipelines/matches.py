"""Matches between clips, and between clips and evaluation items, at the three levels of sameness.

    identity     the same recording: Freesound id, or YouTube id with overlapping ranges (SQL)
    fingerprint  the same audio content: Chromaprint fingerprints matched through an index
    semantic     the same-sounding content: CLAP embedding cosine at or above a threshold

Each function reads an open catalog connection (:func:`soundlake.catalog.sql.connect`) and
returns Arrow rows; :mod:`soundlake.pipelines.dedup` and :mod:`soundlake.pipelines.eval_sets`
write them as snapshots. Nothing here reads audio.
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from soundlake.catalog.identity import identity_leakage_sql, identity_pairs_sql
from soundlake.catalog.schema import DUPLICATE_GROUPS, DUPLICATES, LEAKAGE
from soundlake.catalog.sql import execute_arrow
from soundlake.dedup.detail import Detail
from soundlake.stages.dedup import group_members

LEVELS = ("identity", "fingerprint", "semantic")


def identity_pairs(con) -> list[tuple[str, str, float, str]]:
    """(clip_a, clip_b, score, method) of clips from the same recording."""
    t = execute_arrow(con, identity_pairs_sql())
    return list(zip(*(t[c].to_pylist() for c in ("clip_a", "clip_b", "score", "method")))) if t.num_rows else []


_LATER_COLUMNS = {"env": "TINYINT[]", "contour": "TINYINT[]", "pitch": "SMALLINT[]"}


def later_columns(con, table: str) -> str:
    """``env, contour, pitch``, each a typed NULL where the table's parts lack it: fingerprints
    written before envelopes or detail were kept have none, and match without that check."""
    cols = {r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()}
    return ", ".join(c if c in cols else f"NULL::{t} AS {c}" for c, t in _LATER_COLUMNS.items())


def _arrays(t: pa.Table, column: str) -> list[np.ndarray | None]:
    """A list column as one numpy view per row (None where NULL): a fingerprint's detail holds
    thousands of values, which Python ints would multiply in memory many times over."""
    arr = t[column].combine_chunks()
    values, offsets = arr.values.to_numpy(zero_copy_only=False), arr.offsets.to_numpy()
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(arr))]


def _fingerprint_rows(t: pa.Table) -> Iterator[tuple[np.ndarray, np.ndarray | None, Detail | None]]:
    """(fingerprint, envelope, detail) of each row of a query selecting ``fp`` and :func:`later_columns`."""
    for fp, env, contour, pitch in zip(*(_arrays(t, c) for c in ("fp", "env", "contour", "pitch"))):
        yield fp, env, (None if contour is None or pitch is None else Detail(contour, pitch))


def clip_fingerprint_index(con, fingerprinter: str):
    """A :class:`FingerprintIndex` of the clips fingerprinted by ``fingerprinter`` (empty
    fingerprints left out), with their loudness envelopes and detail."""
    from soundlake.dedup.fingerprint import FingerprintIndex

    t = execute_arrow(con, f"""SELECT f.clip_id, f.fp, {later_columns(con, 'fingerprints')} FROM fingerprints f
                               JOIN (SELECT DISTINCT clip_id FROM clips) USING (clip_id)
                               WHERE f.fingerprinter = ? AND len(f.fp) > 0 ORDER BY f.clip_id""", [fingerprinter])
    index = FingerprintIndex()
    for clip, (fp, env, detail) in zip(t["clip_id"].to_pylist(), _fingerprint_rows(t)):
        index.add(clip, fp, env, detail)
    return index


def fingerprint_pairs(index, threshold: float, fingerprinter: str) -> list[tuple[str, str, float, str]]:
    return [(min(a, b), max(a, b), float(s), fingerprinter) for a, b, s in index.pairs(threshold)]


def newest_clap_model(con, model_id: str | None = None) -> tuple[str, str] | None:
    """(model_id, model_hash) of the newest embeddings (of ``model_id`` when given), or None."""
    where = "WHERE model_id = ?" if model_id else ""
    rows = con.execute(f"""SELECT model_id, model_hash FROM embeddings {where} GROUP BY ALL
                           ORDER BY max(created) DESC LIMIT 1""", [model_id] if model_id else []).fetchall()
    return (rows[0][0], rows[0][1]) if rows else None


_EMBEDDINGS = """SELECT e.clip_id, e.embedding::FLOAT[] AS v FROM embeddings e
                 JOIN (SELECT DISTINCT clip_id FROM clips) USING (clip_id)
                 WHERE e.model_id = ? AND e.model_hash IS NOT DISTINCT FROM ? ORDER BY e.clip_id"""


def clip_embedding_ids(con, model: tuple[str, str]) -> list[str]:
    """The ids of the clips embedded by ``model``, in the order :func:`clip_embedding_blocks` gives them."""
    return [r[0] for r in con.execute(f"SELECT clip_id FROM ({_EMBEDDINGS})", list(model)).fetchall()]


def clip_embedding_blocks(con, model: tuple[str, str], block: int = 65536) -> Iterator[np.ndarray]:
    """The clips' embeddings by ``model``, L2-normalised, as [<= block, dim] float32 blocks
    streamed from DuckDB (memory: one block, never the whole table)."""
    cur = con.cursor()   # its own statement, so the caller's connection stays free
    try:
        rel = cur.sql(_EMBEDDINGS, params=list(model))
        reader = rel.to_arrow_reader(block) if hasattr(rel, "to_arrow_reader") else rel.fetch_record_batch(block)
        for batch in reader:   # DuckDB 2.x / 1.x
            if batch.num_rows:
                v = np.asarray(batch.column(1).flatten(), dtype=np.float32).reshape(batch.num_rows, -1)
                yield normalised(v)
    finally:
        cur.close()


def normalised(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def semantic_pairs(ids: list[str], vectors: Iterable[np.ndarray], threshold: float, model_id: str) -> list[tuple]:
    from soundlake.dedup.neighbors import semantic_pairs as neighbours

    if len(ids) < 2:
        return []
    return [(min(a, b), max(a, b), float(s), model_id) for a, b, s in neighbours(ids, vectors, threshold)]


# ---- rows -------------------------------------------------------------------------------------
def duplicate_rows(level: str, pairs: list[tuple], run_id: str, now: datetime,
                   model_hash: str | None = None) -> pa.Table:
    n = len(pairs)
    return pa.table({
        "clip_a": [p[0] for p in pairs], "clip_b": [p[1] for p in pairs], "level": [level] * n,
        "score": pa.array([p[2] for p in pairs], pa.float32()), "method": [p[3] for p in pairs],
        "model_hash": pa.array([model_hash] * n, pa.string()), "run_id": [run_id] * n,
        "created": pa.array([now] * n, DUPLICATES.field("created").type)}, schema=DUPLICATES)


def group_rows(con, level: str, pairs: list[tuple], run_id: str, now: datetime) -> pa.Table:
    """One row per clip in a group of ``level`` (connected components of ``pairs``), its
    representative marked ``kept``; the group id names the level and the kept clip."""
    groups = group_members(con, [(p[0], p[1]) for p in pairs])
    rows = [{"group_id": f"{level}:{kept}", "clip_id": c, "level": level, "kept": c == kept,
             "size": len(members), "run_id": run_id, "created": now}
            for kept, members in groups for c in members]
    return pa.Table.from_pylist(rows, schema=DUPLICATE_GROUPS)


def group_counts(pairs: list[tuple]) -> dict[str, int]:
    """{"pairs", "groups", "clips": clips in a group, "removable": clips a dedup would drop}."""
    from soundlake.dedup.groups import connected_groups

    comps: dict = defaultdict(set)
    for clip, g in connected_groups([(p[0], p[1]) for p in pairs]).items():
        comps[g].add(clip)
    clips = sum(len(m) for m in comps.values())
    return {"pairs": len(pairs), "groups": len(comps), "clips": clips, "removable": clips - len(comps)}


def leakage_rows(level: str, matches: list[tuple], run_id: str, now: datetime) -> pa.Table:
    """``matches``: (clip_id, eval_set, item_id, score, method)."""
    n = len(matches)
    cols = list(zip(*matches)) if matches else [[]] * 5
    return pa.table({"clip_id": list(cols[0]), "eval_set": list(cols[1]), "item_id": list(cols[2]),
                     "level": [level] * n, "score": pa.array(list(cols[3]), pa.float32()),
                     "method": list(cols[4]), "run_id": [run_id] * n,
                     "created": pa.array([now] * n, LEAKAGE.field("created").type)}, schema=LEAKAGE)


# ---- leakage into evaluation sets ----------------------------------------------------------------
def identity_leakage(con) -> list[tuple]:
    t = execute_arrow(con, identity_leakage_sql())
    return list(zip(*(t[c].to_pylist() for c in ("clip_id", "eval_set", "item_id", "score", "method")))) \
        if t.num_rows else []


def fingerprint_leakage(con, index, fingerprinter: str, threshold: float) -> list[tuple]:
    """Lake clips whose fingerprint matches a fingerprinted eval item's (same fingerprinter)."""
    t = execute_arrow(con, f"""SELECT name, item_id, fp, {later_columns(con, 'eval_set_items')} FROM eval_set_items
                               WHERE fingerprinter = ? AND len(fp) > 0""", [fingerprinter])
    out = []
    for name, item, (fp, env, detail) in zip(t["name"].to_pylist(), t["item_id"].to_pylist(), _fingerprint_rows(t)):
        for clip, score in index.query(fp, threshold, env, detail):
            out.append((clip, name, item, float(score), fingerprinter))
    return out


def semantic_leakage(con, ids: list[str], model: tuple[str, str], threshold: float) -> list[tuple]:
    """Lake clips whose embedding has cosine >= threshold with an eval item embedded by the same
    model (the items against each streamed block of clips: memory stays flat)."""
    t = execute_arrow(con, """SELECT name, item_id, embedding FROM eval_set_items
                              WHERE clap_model_id = ? AND clap_model_hash IS NOT DISTINCT FROM ?
                                AND embedding IS NOT NULL""", list(model))
    if not t.num_rows or not ids:
        return []
    items = normalised(np.asarray(t["embedding"].to_pylist(), dtype=np.float32))
    names, item_ids = t["name"].to_pylist(), t["item_id"].to_pylist()
    out, start = [], 0
    for block in clip_embedding_blocks(con, model):
        sims = items @ block.T
        for i, j in zip(*np.nonzero(sims >= threshold)):
            out.append((ids[start + j], names[i], item_ids[i], float(sims[i, j]), model[0]))
        start += len(block)
    return out
