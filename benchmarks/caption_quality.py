"""Caption quality on held-out synth clips: the in-house autocap vs the template captioner.

Trains ``soundlake.models.captioners.autocap_train.train_autocap`` (which first trains the in-house CLAP
it uses, frozen, as its audio encoder) on N synth clips (seed 1, indices 0..N-1) with their
ground-truth captions and labels as metadata (random field dropout), then captions clips it
never saw (indices from 200000 on) and scores each captioner against the ground truth:

  * template, run without metadata (``caption.use_metadata: false``: label names only);
  * autocap from the audio alone (every metadata field left empty);
  * autocap with the clip's labels inside <LABELS> … </LABELS> (as the curate stage runs it).

Metrics: BLEU-1/4, ROUGE-L, CIDEr-D, MiniLM similarity, SPIDEr-style (soundlake.models.caption_metrics),
and class accuracy: the share of clips whose caption names exactly the scene's sound classes
(``caption_mentions``). Target: autocap from audio alone >= 0.8, and above the template on the
caption metrics.

Usage: python benchmarks/caption_quality.py [--train 600 --eval 200 --phase2-epochs 20 --out DIR]
(``--quick``: 16 training clips, 4 held-out, 4 validation, one epoch of each training step).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import figure, parse_args

from soundlake.models.caption_metrics import caption_scores
from soundlake.models.captioners.autocap import AutocapConfig
from soundlake.models.captioners.autocap_train import (
    AutocapTrainConfig,
    CaptionItem,
    train_autocap,
)
from soundlake.models.captioners.template import template_caption
from soundlake.sources.synth import caption_mentions, synth_clip

SEED = 1
VAL0, TEST0 = 100_000, 200_000   # held-out index ranges: never seen in training
FIGURES = ("autocap_vs_template", "autocap_class_accuracy")
USES_RAY = False  # tests/test_benchmarks.py runs its quick run beside one that does


def scenes(start: int, n: int, duration: float, sr: int):
    out = []
    for i in range(start, start + n):
        scene, audio = synth_clip(SEED, i, duration, sr)
        out.append((scene, CaptionItem(np.asarray(audio, np.float32), scene.caption, {"labels": scene.labels})))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--val", type=int, default=64, help="validation clips (per-epoch validation loss)")
    ap.add_argument("--clap-epochs", type=int, default=12)
    ap.add_argument("--bart-epochs", type=int, default=AutocapTrainConfig.bart_epochs,
                    help="denoising pretraining of the from-config BART")
    ap.add_argument("--phase1-epochs", "--stage1-epochs", dest="phase1_epochs", type=int, default=2,
                    help="BART frozen (AutoCap's stage 1)")
    ap.add_argument("--phase2-epochs", "--stage2-epochs", dest="phase2_epochs", type=int, default=20,
                    help="BART trains too (AutoCap's stage 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="keep the trained model here")
    args = parse_args(ap, dict(train=16, eval=4, val=4, clap_epochs=1, bart_epochs=1, phase1_epochs=1,
                               phase2_epochs=1))
    torch.set_num_threads(args.threads)
    sr, duration = 16000, 10.0

    t0 = time.perf_counter()
    train, val, test = scenes(0, args.train, duration, sr), scenes(VAL0, args.val, duration, sr), \
        scenes(TEST0, args.eval, duration, sr)
    print(f"synth: {args.train} training clips, {args.eval} held-out clips (10 s, {sr} Hz) in "
          f"{time.perf_counter() - t0:.0f} s; {len({s.caption for s, _ in train})} distinct training captions")

    out = args.out or Path(tempfile.mkdtemp(prefix="caption_quality_")) / "autocap"
    tcfg = AutocapTrainConfig(clap_epochs=args.clap_epochs, bart_epochs=args.bart_epochs,
                              phase1_epochs=args.phase1_epochs, phase2_epochs=args.phase2_epochs)
    res = train_autocap([it for _, it in train], out, AutocapConfig(), tcfg, val=[it for _, it in val])
    last = res["history"][-1]
    print(f"trained CLAP ({args.clap_epochs} epochs) + autocap ({args.phase1_epochs} + {args.phase2_epochs} epochs) "
          f"in {res['train_seconds']:.0f} s on {args.threads} thread(s); final loss {last['loss']:.3f}, "
          f"val loss {last['val_loss']:.3f}")
    model = res["model"]

    refs = [[s.caption] for s, _ in test]
    audio = [it.audio for _, it in test]
    t1 = time.perf_counter()
    runs = {
        "template (no metadata)": [template_caption(f"synth:{s.source_id}:0", s.labels, use_metadata=False) or ""
                                   for s, _ in test],
        "autocap (audio only)": model.caption(audio, None),
        "autocap (+ labels)": model.caption(audio, [it.meta for _, it in test]),
    }
    caption_s = time.perf_counter() - t1
    from soundlake.models.text import load_text_encoder

    encoder = load_text_encoder()
    cols = ["bleu_1", "bleu_4", "rouge_l", "cider_d", "meteor", "sbert_sim", "spider_style"]   # meteor: nan without Java
    print(f"\n{'captioner':24s} " + " ".join(f"{c:>12s}" for c in cols + ["class_acc"]))
    scores = {}
    for name, cands in runs.items():
        m = caption_scores(cands, refs, encoder)
        m["class_acc"] = float(np.mean([caption_mentions(c) == set(s.labels) for c, (s, _) in zip(cands, test)]))
        scores[name] = m
        print(f"{name:24s} " + " ".join(f"{m.get(c, float('nan')):12.3f}" for c in cols + ["class_acc"]))
    print("\nexamples (reference | template | autocap audio only):")
    for i in range(3):
        print(f"  {refs[i][0]} | {runs['template (no metadata)'][i]} | {runs['autocap (audio only)'][i]}")

    t, a = scores["template (no metadata)"], scores["autocap (audio only)"]
    better = [c for c in cols if a[c] > t[c]]
    ratios = ", ".join(f"{c} {a[c] / t[c]:.2f}x" if t[c] > 0 else f"{c} {a[c]:.3f} vs 0" for c in cols)
    print()
    figure("autocap_vs_template", f"autocap (audio only) / template (no metadata): {ratios}; autocap is better on "
           f"{len(better)}/{len(cols)} metrics")
    figure("autocap_class_accuracy", f"class accuracy, autocap from audio alone: {a['class_acc']:.3f} (target >= 0.8: "
           f"{'met' if a['class_acc'] >= 0.8 else 'MISSED'}); captioning {len(audio) * 2} clips took {caption_s:.1f} s")
    if args.quick and args.out is None:  # a smoke test's model is not worth keeping
        shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
