"""CLAP embedding throughput on CPU: batch 1/8/32, and the pipeline's overhead vs a bare loop.

Side by side in one run, on the same clips and the same (in-house, untrained: speed does
not depend on the weights) model:

  * bare loop: decode the stored FLAC, resample, ``model.embed_audio`` in batches;
  * soundlake: the `embed` stage run by `soundlake curate` over a lake that already holds
    the clips (Ray Data actor, Parquet in and out), Ray start-up reported separately.

Usage: python benchmarks/clap_throughput.py [--clips 480] (``--quick``: 8 clips)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import figure, parse_args, ray_sets

from soundlake.catalog.sql import fetchall
from soundlake.core import audio as audio_io
from soundlake.models.clap.inhouse import ClapNet, ClapTrainConfig, save_clap
from soundlake.models.clap.load import load_clap
from soundlake.models.text import load_text_encoder
from soundlake.pipelines.runner import run_pipeline
from soundlake.pipelines.spec import load_spec
from soundlake.testing import make_corpus

FIGURES = ("clap_pipeline_steady", "clap_pipeline_vs_bare")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=480)
    args = parse_args(ap, dict(clips=8))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = ClapTrainConfig()
        text = load_text_encoder()
        torch.manual_seed(0)
        save_clap(ClapNet(cfg, text.dim), cfg, text, tmp / "clap")
        make_corpus(tmp / "corpus", args.clips, seconds=10.0, sr=16000, formats=("flac",))
        lake = str(tmp / "lake")
        base = [f"source.input={tmp / 'corpus'}", "segment.sample_rate=16000", "segment.policy=first",
                *ray_sets(num_cpus=2), "ray.inputs_per_task=8"]
        run_pipeline(load_spec("local", sets=base), lake)
        flacs = [f for (f,) in fetchall(lake, "SELECT flac FROM audio ORDER BY clip_id")]
        model = load_clap(str(tmp / "clap"))
        print(f"{len(flacs)} clips of 10 s, in-house CLAP (dim {model.dim}), 1 torch thread")

        def decode(f):
            a, sr = audio_io.decode_flac(f)
            return audio_io.resample(a.mean(axis=1, keepdims=True), sr, model.sample_rate)[:, 0]

        speeds = {}
        for bs in (1, 8, 32):
            t0 = time.perf_counter()
            for i in range(0, len(flacs), bs):
                model.embed_audio([decode(f) for f in flacs[i:i + bs]])
            speeds[bs] = len(flacs) / (time.perf_counter() - t0)
            print(f"bare loop, batch {bs:2d}: {speeds[bs]:6.1f} clips/s")

        spec = load_spec("local", sets=base + ["stages=[segment,embed]", f"clap.model={tmp / 'clap'}",
                                                "clap.batch_size=32", "clap.num_cpus=1"])
        marks = []  # (time, embeddings written so far) at each finished block

        def progress(summary):
            marks.append((time.perf_counter(), summary.rows.get("embeddings", 0)))

        t0 = time.perf_counter()
        s = run_pipeline(spec, lake, on_progress=progress)
        total = time.perf_counter() - t0
        whole = s.rows["embeddings"] / total
        (t1, n1), (t2, n2) = marks[0], marks[-1]
        steady = (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan")  # nan: one block only (tiny runs)
        print(f"soundlake embed stage, whole job : {whole:6.1f} clips/s "
              f"({total:.1f} s: Ray start-up {s.ray_startup_s:.1f} s, actor start-up and first block "
              f"{t1 - t0 - s.ray_startup_s:.1f} s)")
        figure("clap_pipeline_steady", f"soundlake embed stage, after the first block: {steady:6.1f} clips/s "
               f"({len(marks)} blocks)")
        figure("clap_pipeline_vs_bare", f"pipeline / bare loop (steady state, batch 8 blocks): "
               f"{steady / speeds[8]:.2f}x  (overhead {100 * (1 - steady / speeds[8]):.0f}%)")


if __name__ == "__main__":
    main()
