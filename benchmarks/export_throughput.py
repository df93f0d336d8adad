"""Export throughput vs plain `tar` of the same FLAC bytes, measured side by side.

Builds a lake of N ten-second clips (segment stage, no Ray), writes the same FLAC bytes
as files, then per round runs both, in alternating order so that neither always runs
second: the `soundlake` export (selection, shards written atomically with their sha256,
manifest after every shard, catalog record) and `tar cf` of the FLAC folder. Both read
from the page cache and write to the same disk. Prints MB/s and the ratio (per round,
then the median), and the CPU seconds each used (user + system: on a loaded machine the
wall-clock ratio follows them). Run: ``python benchmarks/export_throughput.py [--clips 1000 --rounds 5]``
(``--quick``: 16 clips, 2 rounds).
"""
from __future__ import annotations

import argparse
import hashlib
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from common import figure, parse_args

from soundlake.catalog.lake import Lake
from soundlake.export.exporter import ExportArgs, plan_export, run_export
from soundlake.sources.base import input_row
from soundlake.stages.base import FLOW
from soundlake.stages.segment import SegmentSpec, SegmentStage, segment_tables
from soundlake.testing import tone_mix, write_audio

FIGURES = ("export_vs_tar", "export_writing_vs_tar", "export_vs_tar_sha256")
USES_RAY = False  # tests/test_benchmarks.py runs its quick run beside one that does


def build(root: Path, n: int, sr: int = 32000) -> tuple[Lake, Path, int]:
    lake = Lake(str(root / "lake"))
    stage = SegmentStage(SegmentSpec(sample_rate=sr, window=10.0, loudness=False), "bench")
    flac_dir = root / "flac"
    flac_dir.mkdir(parents=True)
    for start in range(0, n, 50):
        rows = []
        for i in range(start, min(n, start + 50)):
            src = write_audio(root / "src" / f"{i}.wav", tone_mix(10.0, sr, i), sr)
            rows += stage.segment_one(input_row(source="bench", source_id=f"b{i:05d}", uri=str(src),
                                                license="CC0", ref_caption=f"tone {i}", ref_caption_model="x"))
        t = segment_tables(pa.Table.from_pylist(rows, schema=FLOW))
        lake.write_part("clips", t["clips"], "bench")
        lake.write_part("captions", t["captions"], "bench")
        for cid, data in zip(t["clips"]["clip_id"].to_pylist(), t["clips"]["flac"].to_pylist()):
            (flac_dir / (cid.replace(":", "_") + ".flac")).write_bytes(data)
    total = sum(p.stat().st_size for p in flac_dir.iterdir())
    return lake, flac_dir, total


def _sha256(path: Path) -> str:
    """hashlib's sha256 of a file through one reused 1 MiB buffer: what the export must
    compute over every byte it writes."""
    h, buf = hashlib.sha256(), memoryview(bytearray(2**20))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    a = parse_args(ap, dict(clips=16, rounds=2))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lake, flac_dir, total = build(root, a.clips)
        mb = total / 1e6
        print(f"{a.clips} clips, {mb:.1f} MB of FLAC")
        ours, writing, plain, sha, hashed, cpu_ours, cpu_tar = [], [], [], [], [], [], []
        for r in range(a.rounds):
            out, tar_out = root / f"shards{r}", root / f"plain{r}.tar"

            def export() -> None:
                t = time.perf_counter()
                plan_export(lake, ExportArgs(out=str(out), shard_size=16 * 2**20))
                times["plan"] = time.perf_counter() - t
                c, t = _cpu(resource.RUSAGE_SELF), time.perf_counter()
                run_export(lake, ExportArgs(out=str(out), shard_size=16 * 2**20, name=f"bench{r}"))
                times["export"], times["export_cpu"] = time.perf_counter() - t, _cpu(resource.RUSAGE_SELF) - c

            def tar() -> None:
                c, t = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
                subprocess.run(["tar", "cf", str(tar_out), "-C", str(flac_dir), "."], check=True)
                times["tar"], times["tar_cpu"] = time.perf_counter() - t, _cpu(resource.RUSAGE_CHILDREN) - c
                subprocess.run(["sha256sum", str(tar_out)], check=True, capture_output=True)
                times["tar_hash"] = time.perf_counter() - t

            times: dict[str, float] = {}
            for step in ((export, tar) if r % 2 == 0 else (tar, export)):
                step()
            ours.append(times["tar"] / times["export"])
            if times["export"] > times["plan"]:  # tiny runs: the selection alone may take longer
                writing.append(times["tar"] / (times["export"] - times["plan"]))
            hashed.append(times["tar_hash"] / times["export"])
            plain.append(mb / times["tar"])
            t = time.perf_counter()
            _sha256(tar_out)
            sha.append(mb / (time.perf_counter() - t))
            cpu_ours.append(times["export_cpu"])
            cpu_tar.append(times["tar_cpu"])
            shutil.rmtree(out)
            tar_out.unlink()
        med = statistics.median
        print(f"plain tar: {med(plain):.0f} MB/s; sha256 alone (hashlib) of its output: {med(sha):.0f} MB/s "
              f"(medians of {a.rounds}); ratios are per round, then the median")
        figure("export_vs_tar", f"export / tar                           : {med(ours):.2f}x  (target >= 0.8x)")
        figure("export_writing_vs_tar", f"export without the one-off selection    : "
               f"{med(writing) if writing else float('nan'):.2f}x  (shard writing: read parts, tar, sha256, manifest)")
        figure("export_vs_tar_sha256", f"export / (tar + sha256sum of the tar)   : {med(hashed):.2f}x  "
               "(the baseline doing the hashing too)")
        print(f"CPU seconds: export {med(cpu_ours):.2f} (selection, copies, sha256 on a second thread), "
              f"tar {med(cpu_tar):.2f}")


if __name__ == "__main__":
    main()
