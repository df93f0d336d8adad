"""Segment throughput: `soundlake curate` end to end vs a bare in-process loop.

Generates a mixed-format corpus (wav, flac, ogg, opus, mp3, m4a, webm) that yields
>= 1000 ten-second clips, then measures, side by side in one run:

  * bare:  one Python loop doing the same decode / resample / cut / levels / FLAC
           encode with the same libraries (soundfile, soxr, pyloudnorm, ffmpeg), no catalog;
  * soundlake with 1 CPU and with 2 CPUs: the whole job, Parquet catalog included,
    Ray start-up timed separately.

Prints clips/s and the ratios (targets: >= 0.75x bare at equal cores; 2 CPUs >= 1.6x 1 CPU).
Usage: python benchmarks/segment_throughput.py [--files 250] [--seconds 40]
(``--quick``: 7 files of 10 s, one per format. With SOUNDLAKE_TEST_RAY_ADDRESS set, both runs
join that Ray from this process instead of each starting one with 1 and 2 CPUs in a process of
its own: the CPU ratio then means nothing.)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyloudnorm
import soundfile as sf
import soxr
from common import figure, parse_args, ray_address

from soundlake.testing import make_corpus

FIGURES = ("segment_1cpu_vs_bare", "segment_2cpu_vs_1cpu")

RUN = """
import json, sys
from soundlake.pipelines.spec import load_spec
from soundlake.pipelines.runner import run_pipeline
spec = load_spec("local", sets=sys.argv[3:])
s = run_pipeline(spec, sys.argv[2])
print("counts:", json.dumps(s.counts()), flush=True)
"""


def bare_loop(files: list[Path], sr_out: int, window: float) -> int:
    """The honest baseline: the same work in a plain loop, one process."""
    clips = 0
    win = int(window * sr_out)
    for f in files:
        if f.suffix in (".m4a", ".webm"):
            probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                                    "stream=sample_rate,channels", "-of", "json", str(f)], capture_output=True, check=True)
            stream = json.loads(probe.stdout)["streams"][0]
            sr, ch = int(stream["sample_rate"]), int(stream["channels"])
            out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(f), "-map", "0:a:0", "-f", "f32le",
                                  "-acodec", "pcm_f32le", "-"], capture_output=True, check=True)
            audio = np.frombuffer(out.stdout, "<f4").reshape(-1, ch)
        else:
            audio, sr = sf.read(str(f), dtype="float32", always_2d=True)
        mono = audio.mean(axis=1, keepdims=True)
        y = soxr.resample(mono, sr, sr_out, quality="HQ")
        meter = pyloudnorm.Meter(sr_out)
        for a in range(0, len(y), win):
            chunk = y[a:a + win]
            if len(chunk) < sr_out:
                continue
            meter.integrated_loudness(chunk)
            np.sqrt(np.mean(chunk ** 2))
            if len(chunk) < win:
                chunk = np.pad(chunk, ((0, win - len(chunk)), (0, 0)))
            buf = io.BytesIO()
            sf.write(buf, chunk, sr_out, format="FLAC", subtype="PCM_16")
            clips += 1
    return clips


def run_soundlake(corpus: Path, lake: Path, cpus: int, sr_out: int) -> dict:
    sets = [f"source.input={corpus}", f"segment.sample_rate={sr_out}", f"ray.num_cpus={cpus}",
            "ray.object_store_mb=256", "ray.inputs_per_task=4"]
    t0 = time.perf_counter()
    if addr := ray_address():  # the test session's Ray: its CPUs are fixed, so no process of its own
        from soundlake.pipelines.runner import run_pipeline
        from soundlake.pipelines.spec import load_spec

        counts = run_pipeline(load_spec("local", sets=[*sets, f"ray.address={addr}"]), str(lake)).counts()
        return {**counts, "wall_s": time.perf_counter() - t0}
    out = subprocess.run([sys.executable, "-c", RUN, "x", str(lake), *sets], capture_output=True, text=True,
                         check=True, env={**os.environ, "RAY_ADDRESS": ""})
    # Ray may print its workers' output on stdout too, after ours
    counts = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("counts: "))[len("counts: "):])
    counts["wall_s"] = time.perf_counter() - t0
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=250)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--rate", type=int, default=32000)
    args = parse_args(ap, dict(files=7, seconds=10.0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        files = make_corpus(tmp / "corpus", args.files, seconds=args.seconds, sr=44100)
        print(f"corpus: {len(files)} files x {args.seconds:.0f} s, mixed formats, made in {time.perf_counter() - t0:.0f} s")

        t0 = time.perf_counter()
        n_bare = bare_loop(files, args.rate, 10.0)
        bare_s = time.perf_counter() - t0
        bare = n_bare / bare_s
        print(f"bare loop (1 process):     {n_bare} clips in {bare_s:6.1f} s = {bare:6.1f} clips/s")

        res = {}
        for cpus in (1, 2):
            c = run_soundlake(tmp / "corpus", tmp / f"lake{cpus}", cpus, args.rate)
            res[cpus] = c["clips"] / c["elapsed_s"]
            print(f"soundlake curate, {cpus} CPU{'s' if cpus > 1 else ' '}: {c['clips']} clips in {c['elapsed_s']:6.1f} s"
                  f" = {res[cpus]:6.1f} clips/s (+ Ray start-up {c['ray_startup_s']:.1f} s; process wall {c['wall_s']:.1f} s)")
        figure("segment_1cpu_vs_bare", f"ratio soundlake(1 CPU) / bare loop : {res[1] / bare:.2f}x  (target >= 0.75x)")
        figure("segment_2cpu_vs_1cpu", f"ratio soundlake 2 CPUs / 1 CPU     : {res[2] / res[1]:.2f}x  (target >= 1.6x)"
               + (f" (both joined the Ray at {ray_address()}: not a measurement)" if ray_address() else ""))


if __name__ == "__main__":
    main()
