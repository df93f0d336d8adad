"""autocap captioning throughput on CPU: captions/s per core at batch 1/8/32, and the Ray stage's overhead.

Side by side in one run, on the same clips and the same model (the in-house autocap, briefly
trained on synth clips so that captions have their real length; pass --model to use another):

  * bare loop, one torch thread (= one core): decode the stored FLAC, resample, ``Autocap.caption``
    in batches of 1, 8 and 32 (beam search, the model's beams);
  * soundlake: the autocap caption stage run by `soundlake curate` over a lake that already holds
    the clips (Ray Data actor pool of one 1-CPU actor, batch 8, Parquet in and out), Ray start-up
    reported separately.

Usage: python benchmarks/caption_throughput.py [--clips 192] [--model DIR]
(``--quick``: 4 clips; the model trained on 4 clips for one epoch of each step).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import figure, parse_args, ray_sets

from soundlake.catalog.sql import fetchall
from soundlake.core import audio as audio_io
from soundlake.models.captioners.autocap import Autocap, AutocapConfig
from soundlake.models.captioners.autocap_train import (
    AutocapTrainConfig,
    CaptionItem,
    train_autocap,
)
from soundlake.pipelines.runner import run_pipeline
from soundlake.pipelines.spec import load_spec
from soundlake.sources.synth import synth_clip

FIGURES = ("autocap_pipeline_steady", "autocap_pipeline_vs_bare")


def quick_model(out: Path, clips: int = 300, clap_epochs: int = 4, phase2_epochs: int = 8,
                bart_epochs: int = AutocapTrainConfig.bart_epochs) -> Path:
    items = []
    for i in range(clips):
        scene, audio = synth_clip(7, i, 10.0, 16000)
        items.append(CaptionItem(np.asarray(audio, np.float32), scene.caption, {"labels": scene.labels}))
    train_autocap(items, out, AutocapConfig(), AutocapTrainConfig(clap_epochs=clap_epochs, bart_epochs=bart_epochs,
                                                                  phase1_epochs=1, phase2_epochs=phase2_epochs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=192)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--train-clips", type=int, default=300, help="without --model: synth clips to train one on")
    ap.add_argument("--clap-epochs", type=int, default=4, help="without --model")
    ap.add_argument("--bart-epochs", type=int, default=AutocapTrainConfig.bart_epochs, help="without --model")
    ap.add_argument("--phase2-epochs", type=int, default=8, help="without --model")
    args = parse_args(ap, dict(clips=4, train_clips=4, clap_epochs=1, bart_epochs=1, phase2_epochs=1))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model_dir = args.model or quick_model(tmp / "autocap", args.train_clips, args.clap_epochs, args.phase2_epochs,
                                              args.bart_epochs)
        if not args.model:
            print(f"trained a small autocap on {args.train_clips} synth clips in {time.perf_counter() - t0:.0f} s")
        lake = str(tmp / "lake")
        base = [f"source.count={args.clips}", "source.seed=11", *ray_sets(num_cpus=2), "ray.inputs_per_task=8"]
        run_pipeline(load_spec("demo", sets=base + ["stages=[segment]"]), lake)
        flacs = [f for (f,) in fetchall(lake, "SELECT flac FROM audio ORDER BY clip_id")]
        model = Autocap.load(model_dir)
        print(f"{len(flacs)} clips of 10 s, autocap {sum(p.numel() for p in model.net.parameters()) / 1e6:.1f} M "
              f"parameters + its CLAP encoder, {model.cfg.num_beams} beams, 1 torch thread")

        def decode(f):
            a, sr = audio_io.decode_flac(f)
            return audio_io.resample(a.mean(axis=1, keepdims=True), sr, model.sample_rate)[:, 0]

        speeds, words = {}, []
        for bs in (1, 8, 32):
            t0 = time.perf_counter()
            for i in range(0, len(flacs), bs):
                texts = model.caption([decode(f) for f in flacs[i:i + bs]])
                words += [len(t.split()) for t in texts]
            speeds[bs] = len(flacs) / (time.perf_counter() - t0)
            print(f"bare loop, batch {bs:2d}: {speeds[bs]:6.1f} captions/s per core")
        print(f"(mean caption length {np.mean(words):.1f} words)")

        spec = load_spec("demo", sets=base + ["stages=[segment,caption]", "caption.captioners=[autocap]",
                                              f"caption.autocap_model={model_dir}", "caption.autocap_batch_size=8"])
        marks = []  # (time, captions written so far) at each finished block

        def progress(summary):
            marks.append((time.perf_counter(), summary.rows.get("captions", 0)))

        t0 = time.perf_counter()
        s = run_pipeline(spec, lake, on_progress=progress)
        total = time.perf_counter() - t0
        whole = s.rows["captions"] / total
        (t1, n1), (t2, n2) = marks[0], marks[-1]
        steady = (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan")  # nan: one block only (tiny runs)
        print(f"soundlake autocap stage, whole job : {whole:6.1f} captions/s ({total:.1f} s: Ray start-up "
              f"{s.ray_startup_s:.1f} s, actor start-up and first block {t1 - t0 - s.ray_startup_s:.1f} s)")
        figure("autocap_pipeline_steady", f"soundlake autocap stage, after the first block: {steady:6.1f} captions/s "
               f"(1 actor, 1 CPU; {len(marks)} blocks)")
        figure("autocap_pipeline_vs_bare", f"pipeline / bare loop (steady state, batch 8): {steady / speeds[8]:.2f}x  "
               f"(overhead {100 * (1 - steady / speeds[8]):.0f}%)")


if __name__ == "__main__":
    main()
