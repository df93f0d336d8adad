"""Download + segment throughput on loopback, against a plain sequential yt-dlp loop.

A local HTTP media server serves N real 10 s AAC files; an AudioSet-format manifest
asks for the 6 s section [2, 8] of each. Measured side by side in one run:

* baseline: a bare sequential ``yt_dlp.YoutubeDL`` loop over the same URLs and
  sections (download only: no decode, no FLAC, no catalog);
* soundlake: ``run_pipeline`` (download with yt-dlp + segment + Parquet write) with
  1, 2, 4, 8 downloads in flight (``download.concurrency``), rate limit off.

Also reports bytes fetched from the server per clip, next to the clip's FLAC bytes
and the source file's bytes for the requested section (its share of the file).
Ray start-up is excluded (started once before timing). Bytes are what the server
wrote to its sockets (an upper bound: a client may hang up early).
Run: python benchmarks/download_throughput.py [N] [--concurrency 1 2 4 8] (default 12;
``--quick``: N = 2, 1 and 2 in flight)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import figure, init_ray, parse_args  # noqa: E402
from servers import MediaServer, make_media  # noqa: E402

START, END, SECONDS = 2.0, 8.0, 10.0
CONCURRENCY = (1, 2, 4, 8)
FIGURES = ("download_vs_baseline", "download_fetched_per_clip")


def baseline(server: MediaServer, ids: list[str], folder: Path) -> float:
    import yt_dlp
    from yt_dlp.utils import download_range_func

    t0 = time.perf_counter()
    for vid in ids:
        opts = {"format": "bestaudio/best", "outtmpl": str(folder / f"{vid}.%(ext)s"), "quiet": True,
                "no_warnings": True, "noprogress": True, "download_ranges": download_range_func(None, [(START, END)]),
                "force_keyframes_at_cuts": False, "logger": None}
        with yt_dlp.YoutubeDL(opts) as ydl:
            ydl.extract_info(server.url_template().format(ytid=vid), download=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=12, help="clips (sections) to download")
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY),
                    help="downloads in flight to try, one pipeline run each (1 is the reference)")
    a = parse_args(ap, dict(n=2, concurrency=[1, 2]))
    N, concurrency = a.n, sorted({1, *a.concurrency})
    import torch

    torch.set_num_threads(1)
    import ray

    from soundlake.catalog.sql import connect
    from soundlake.pipelines.runner import run_pipeline
    from soundlake.pipelines.spec import PipelineSpec

    work = Path(tempfile.mkdtemp(prefix="soundlake-dlbench-"))
    try:
        files = [make_media(work, f"m{i}", SECONDS, "m4a", 300.0 + 40 * i) for i in range(4)]
        ids = [f"v{i:02d}" for i in range(N)]
        man = work / "segments.csv"
        man.write_text("# a\n# b\n# YTID, start_seconds, end_seconds, positive_labels\n"
                       + "".join(f'{v}, {START:.3f}, {END:.3f}, "/m/09x0r"\n' for v in ids))
        t = time.perf_counter()
        init_ray(num_cpus=2, object_store_mb=200)
        print(f"ray start-up {time.perf_counter() - t:.1f} s (excluded)")
        with MediaServer() as server:
            for i, v in enumerate(ids):
                server.files[v] = files[i % len(files)]
            file_bytes = sum(files[i % len(files)].stat().st_size for i in range(N)) / N
            section_share = file_bytes * (END - START) / SECONDS
            (work / "base").mkdir()
            base_s = baseline(server, ids, work / "base")
            base_bytes = sum(h.nbytes for h in server.hits()) / N
            print(f"baseline: sequential yt-dlp loop, {N} sections: {base_s:.2f} s = {N / base_s:.2f} clips/s, "
                  f"{base_bytes / 1024:.1f} KiB fetched per clip")
            print(f"{'downloads in flight':>20} {'clips/s':>8} {'vs baseline':>11} {'KiB fetched/clip':>17} "
                  f"{'KiB FLAC/clip':>14}")
            rows = {}
            for conc in concurrency:
                server.clear()
                spec = PipelineSpec.model_validate({
                    "name": "bench", "source": {"kind": "audioset", "manifest": str(man)},
                    "segment": {"sample_rate": 32000, "window": END - START, "policy": "annotated"},
                    "download": {"url_template": server.url_template(), "rate_per_minute": {"*": 0},
                                 "concurrency": conc, "timeout_s": 30},
                    "stages": ["download", "segment"], "ray": {"inputs_per_task": N}})
                lake = work / f"lake{conc}"
                s = run_pipeline(spec, str(lake))
                assert s.clips == N, s.counts()
                fetched = sum(h.nbytes for h in server.hits()) / N
                flac = connect(str(lake)).execute("SELECT avg(flac_bytes) FROM clips").fetchone()[0]
                rate = s.clips / s.elapsed_s
                rows[conc] = (rate / (N / base_s), fetched)
                print(f"{conc:>20} {rate:>8.2f} {rate / (N / base_s):>10.2f}x {fetched / 1024:>17.1f} "
                      f"{flac / 1024:>14.1f}")
            print(f"source file: {file_bytes / 1024:.1f} KiB for {SECONDS:.0f} s; the requested {END - START:.0f} s "
                  f"section's share: {section_share / 1024:.1f} KiB")
            best = max(rows, key=lambda c: rows[c][0])
            figure("download_vs_baseline", f"soundlake / sequential yt-dlp loop: {rows[best][0]:.2f}x with {best} "
                   f"downloads in flight (the best of {', '.join(map(str, concurrency))}); {rows[1][0]:.2f}x with 1")
            figure("download_fetched_per_clip", f"{rows[best][1] / 1024:.1f} KiB fetched per clip with {best} in "
                   f"flight (baseline {base_bytes / 1024:.1f} KiB) for a {END - START:.0f} s section whose share "
                   f"of the file is {section_share / 1024:.1f} KiB")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
