"""Semantic near-duplicates: every pair of embeddings with cosine >= a threshold, through faiss.

An inverted file whose boundary vectors are spilled into a second list (as SPANN does):
faiss k-means (``faiss.Kmeans``, on a random sample) cuts the unit vectors into cells, each
vector is listed in its ``spill`` nearest cells (a faiss flat search over the centroids), and
each cell is then searched exactly: one faiss flat range search, a matrix product, of the
vectors whose nearest cell it is against every vector listed there. Two vectors are compared
when the nearest cell of one is among the ``spill`` nearest of the other; at high thresholds
near-duplicates share their nearest cell, so few are missed (``benchmarks/dedup.py`` measures
the recall against exact search), and every score is an exact float32 cosine. A cell search
runs at matrix-product speed: about 7 times as many comparisons a second here as faiss's
``IndexIVFFlat.range_search``, which scans its lists one query at a time (1,000,000 x 512-d:
~115 CPU-s against ~400 estimated).

Memory: the vectors as float32 (4 bytes a dimension a vector: this is the index), the
cell numbers, one cell's candidates and 12 bytes a pair found. ``vectors`` may be one array
or an iterable of row blocks, read once. Small collections (and ``exact=True``) are compared
all against all, a block of queries at a time.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import numpy as np

FLAT_BELOW = 20_000      # vectors: under this, all against all is as fast as making cells
TRAIN_PER_CELL = 32      # k-means sample: this many vectors a cell, drawn at random
KMEANS_ROUNDS = 10
SPILL = 2                # cells each vector is listed in


def _blocks(vectors: np.ndarray | Iterable[np.ndarray], block: int) -> Iterator[np.ndarray]:
    if isinstance(vectors, np.ndarray):
        if vectors.ndim != 2:
            raise ValueError(f"semantic_pairs: vectors must be a 2-D array, got shape {vectors.shape}")
        for start in range(0, len(vectors), block):
            yield vectors[start:start + block]
    else:
        for part in vectors:
            part = np.asarray(part)
            if part.ndim != 2:
                raise ValueError(f"semantic_pairs: each block of vectors must be 2-D, got shape {part.shape}")
            yield part


def _unit_rows(parts: Iterator[np.ndarray], n: int) -> np.ndarray:
    """The rows of all blocks, normalised, in one float32 array (a zero row stays zero)."""
    x: np.ndarray | None = None
    filled = 0
    for part in parts:
        if x is None:
            x = np.empty((n, part.shape[1]), np.float32)
        if part.shape[1] != x.shape[1]:
            raise ValueError(f"semantic_pairs: vectors of dimension {part.shape[1]} after {x.shape[1]}")
        if filled + len(part) > n:
            raise ValueError(f"semantic_pairs: {n} ids but {filled + len(part) + sum(map(len, parts))} vectors")
        rows = np.asarray(part, np.float32)
        if not np.isfinite(rows).all():
            raise ValueError("semantic_pairs: vectors contain NaN or infinity")
        norm = np.linalg.norm(rows, axis=1, keepdims=True)
        x[filled:filled + len(part)] = rows / np.where(norm > 0, norm, 1.0)
        filled += len(part)
    if filled != n:
        raise ValueError(f"semantic_pairs: {n} ids but {filled} vectors")
    return x if x is not None else np.zeros((0, 0), np.float32)


def _range(index, queries: np.ndarray, query_pos: np.ndarray, base_pos: np.ndarray, threshold: float):
    """(lower, higher) positions and cosines of the pairs >= threshold between queries and index."""
    radius = float(np.nextafter(np.float32(threshold), np.float32(-1)))   # faiss keeps scores > radius
    lims, dist, found = index.range_search(queries, radius)
    q = np.repeat(query_pos, np.diff(lims).astype(np.int64))
    t = base_pos[found]
    keep = (dist >= threshold) & (q != t)
    return np.minimum(q, t)[keep], np.maximum(q, t)[keep], dist[keep]


def _all_against_all(x: np.ndarray, threshold: float, block: int):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    pos = np.arange(len(x))
    for start in range(0, len(x), block):
        yield _range(index, x[start:start + block], pos[start:start + block], pos, threshold)


def _cells(x: np.ndarray, threshold: float, nlist: int, spill: int, block: int):
    import faiss

    kmeans = faiss.Kmeans(x.shape[1], nlist, niter=KMEANS_ROUNDS, spherical=True, seed=1234,
                          max_points_per_centroid=TRAIN_PER_CELL, min_points_per_centroid=1)
    kmeans.train(x)
    spill = min(spill, nlist)
    near = np.empty((len(x), spill), np.int64)
    for start in range(0, len(x), block):
        near[start:start + block] = kmeans.index.search(x[start:start + block], spill)[1]
    listed = np.argsort(near.ravel(), kind="stable")     # (vector, rank) entries, cell by cell
    bounds = np.searchsorted(near.ravel()[listed], np.arange(nlist + 1))
    for cell in range(nlist):
        entries = listed[bounds[cell]:bounds[cell + 1]]
        if entries.size < 2:
            continue
        members, nearest = entries // spill, entries % spill == 0
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x[members])
        queries = members[nearest]
        yield _range(index, x[queries], queries, members, threshold)


def semantic_pairs(ids: Sequence[str], vectors: np.ndarray | Iterable[np.ndarray], threshold: float, *,
                   block: int = 65536, exact: bool = False, nlist: int | None = None,
                   spill: int = SPILL) -> Iterator[tuple[str, str, float]]:
    """Every pair of rows whose cosine is >= ``threshold``, once, as (a, b, cosine) with a < b.

    ``vectors[i]`` (or the i-th row over the blocks) is the embedding of ``ids[i]``.
    ``exact=True`` compares all pairs (tests, recall); ``nlist`` sets the number of cells
    (default ``2 * sqrt(n)``, which balances listing against searching) and ``spill`` how many
    each vector is listed in. The search runs when this is called (bad input raises here);
    the pairs are then yielded."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"semantic_pairs: threshold must be in (0, 1], got {threshold}")
    if block < 1 or spill < 1:
        raise ValueError(f"semantic_pairs: block and spill must be >= 1, got {block} and {spill}")
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("semantic_pairs: ids are not unique")
    x = _unit_rows(_blocks(vectors, block), n)
    cells = 0 if exact else (nlist or (0 if n < FLAT_BELOW else int(2 * math.sqrt(n))))
    found = _all_against_all(x, threshold, block) if cells <= 1 else _cells(x, threshold, cells, spill, block)
    codes, scores = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for lo, hi, score in found:
        codes.append(lo * n + hi)
        scores.append(score)
    del x
    code, first = np.unique(np.concatenate(codes), return_index=True)   # a pair found twice counts once
    return _named(ids, code, np.concatenate(scores)[first], n)


def _named(ids: Sequence[str], code: np.ndarray, score: np.ndarray, n: int) -> Iterator[tuple[str, str, float]]:
    for c, s in zip(code.tolist(), score.tolist()):
        a, b = ids[c // n], ids[c % n]
        yield (a, b, s) if a < b else (b, a, s)
