"""Loader throughput: soundlake.generation.train.data with 0/1/2 DataLoader workers vs a bare loop.

Exports N ten-second clips to shards, then reads them all, side by side in one run:

* baseline: the bare ``tarfile`` module + ``soundfile`` decode of every .flac member
  (and ``json.loads`` of every .json), in-process;
* the loader (safe tar reading, shuffle buffer, decode, crop to 10 s, caption choice,
  batching of 16) with 0, 1 and 2 DataLoader workers.

Prints samples/s of each and its ratio to the baseline (median of the rounds; the order
of the variants rotates from round to round).
Run: ``python benchmarks/loader_throughput.py [--clips 200]`` (``--quick``: 16 clips, 2 rounds).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import figure, parse_args  # noqa: E402
from export_throughput import build  # noqa: E402

from soundlake.export.exporter import ExportArgs, run_export  # noqa: E402
from soundlake.generation.train.data import make_loader, shard_urls  # noqa: E402

WORKERS = (0, 1, 2)
FIGURES = ("loader_0_workers", "loader_1_workers", "loader_2_workers")
USES_RAY = False  # tests/test_benchmarks.py runs its quick run beside one that does


def bare(urls: list[str]) -> int:
    n = 0
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                data = tar.extractfile(m).read()
                if m.name.endswith(".flac"):
                    sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
                    n += 1
                elif m.name.endswith(".json"):
                    json.loads(data)
    return n


def loader(urls: list[str], workers: int) -> int:
    dl = make_loader(urls, batch_size=16, num_workers=workers, seconds=10.0, shuffle=100)
    return sum(len(b) for b in dl)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    a = parse_args(ap, dict(clips=16, rounds=2))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lake, _, _ = build(root, a.clips)
        run_export(lake, ExportArgs(out=str(root / "shards"), shard_count=max(1, a.clips // 8), shard_size=None))
        urls = shard_urls(str(root / "shards"))
        print(f"{a.clips} clips of 10 s in {len(urls)} shards")
        runs: dict[str, list[float]] = {}
        steps = [("bare tarfile + soundfile", lambda: bare(urls)),
                 *[(f"loader, {w} workers", (lambda w=w: loader(urls, w))) for w in WORKERS]]
        for r in range(a.rounds):
            # A different order each round: on a shared machine no variant always runs first.
            for name, fn in steps[r % len(steps):] + steps[: r % len(steps)]:
                t = time.perf_counter()
                n = fn()
                assert n == a.clips, (name, n)
                runs.setdefault(name, []).append(n / (time.perf_counter() - t))
        base = statistics.median(runs["bare tarfile + soundfile"])
        print(f"{steps[0][0]:26s} {base:8.1f} samples/s   {1:5.2f}x")
        for w, (name, _) in zip(WORKERS, steps[1:]):
            m = statistics.median(runs[name])
            figure(f"loader_{w}_workers", f"{name:26s} {m:8.1f} samples/s   {m / base:5.2f}x")


if __name__ == "__main__":
    main()
