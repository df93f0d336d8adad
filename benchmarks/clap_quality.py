"""In-house CLAP quality on the synth corpus: retrieval, mismatch AUC, filter precision.

Trains ``soundlake.models.clap.inhouse`` on N synth clips (seed 1, indices 0..N-1), then
measures on clips it never saw (indices from 100000 on):

* text->audio retrieval over a held-out set of 200 clips: R@1 / R@5, where a hit is the
  paired clip ("strict") or any clip whose caption is identical ("caption");
* AUC of cos(audio, true caption) vs cos(audio, mismatched caption);
* a cosine-threshold filter with 30% of captions swapped for mismatched ones: the
  threshold maximises F1 on a validation split, precision/recall reported on the test split.

Only public functions are used. Run: ``python benchmarks/clap_quality.py [--train 1000 --epochs 20]``
(``--quick``: 16 training clips, 8 held-out, 1 epoch).
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

from soundlake.models.clap.inhouse import ClapTrainConfig, train_clap
from soundlake.models.clap.load import load_clap
from soundlake.sources.synth import mismatched_caption, synth_clip

SEED = 1
VAL0, TEST0 = 100_000, 200_000  # held-out index ranges: never seen in training
FIGURES = ("clap_retrieval_strict", "clap_retrieval_caption", "clap_mismatch_auc", "clap_filter")
USES_RAY = False  # tests/test_benchmarks.py runs its quick run beside one that does


def clips(start: int, n: int, duration: float, sr: int):
    scenes, audio = [], []
    for i in range(start, start + n):
        scene, a = synth_clip(SEED, i, duration, sr)
        scenes.append(scene)
        audio.append(np.asarray(a, dtype=np.float32).reshape(-1))
    return scenes, audio


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a true pair > score of a mismatched pair), ties count half."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def corrupt(scenes, frac: float, seed: int):
    """Captions with ``frac`` of them replaced by mismatched ones; returns (captions, is_true)."""
    rng = np.random.default_rng(seed)
    bad = np.zeros(len(scenes), bool)
    bad[rng.choice(len(scenes), int(round(frac * len(scenes))), replace=False)] = True
    caps = [mismatched_caption(s, seed * 7919 + i) if b else s.caption for i, (s, b) in enumerate(zip(scenes, bad))]
    return caps, ~bad


def pair_scores(clap, audio_emb, captions):
    return np.sum(audio_emb * clap.embed_text(captions), axis=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = parse_args(ap, dict(train=16, eval=8, epochs=1))
    torch.set_num_threads(args.threads)
    cfg = ClapTrainConfig(epochs=args.epochs, window_s=args.duration)
    sr = cfg.sample_rate

    t0 = time.perf_counter()
    tr_scenes, tr_audio = clips(0, args.train, args.duration, sr)
    va_scenes, va_audio = clips(VAL0, args.eval, args.duration, sr)
    te_scenes, te_audio = clips(TEST0, args.eval, args.duration, sr)
    print(f"synth: {args.train}+{2 * args.eval} clips in {time.perf_counter() - t0:.0f}s; "
          f"{len({s.caption for s in tr_scenes})} distinct training captions")

    out = args.out or Path(tempfile.mkdtemp(prefix="clap_quality_"))

    def show(row):
        print(f"  epoch {row['epoch']:3d} loss {row['loss']:.3f} val_loss {row.get('val_loss', 0):.3f} "
              f"val_r1 {row.get('val_r1', 0):.3f} scale {row['logit_scale']:.1f} {row['seconds']:.0f}s", flush=True)

    res = train_clap(tr_audio, [s.caption for s in tr_scenes], out, cfg, progress=show,
                     val=(va_audio, [s.caption for s in va_scenes]))
    print(f"training: {res['train_seconds']:.0f}s ({args.epochs} epochs, {args.train} clips, "
          f"{torch.get_num_threads()} thread(s)) -> {out}")

    clap = load_clap(str(out))
    te_a, va_a = clap.embed_audio(te_audio), clap.embed_audio(va_audio)
    te_caps = [s.caption for s in te_scenes]
    sim = clap.embed_text(te_caps) @ te_a.T                      # [text, audio]
    rank = np.argsort(-sim, axis=1)
    strict = rank == np.arange(len(te_caps))[:, None]
    same = np.array(te_caps, dtype=object)[rank] == np.array(te_caps, dtype=object)[:, None]
    for name, hit in (("strict", strict), ("caption", same)):
        figure(f"clap_retrieval_{name}", f"text->audio R@1 {hit[:, :1].any(1).mean():.3f}  "
               f"R@5 {hit[:, :5].any(1).mean():.3f}  ({name}, {len(te_caps)} clips)")

    pos = pair_scores(clap, te_a, te_caps)
    neg = pair_scores(clap, te_a, [mismatched_caption(s, 10_000 + i) for i, s in enumerate(te_scenes)])
    figure("clap_mismatch_auc", f"AUC true vs mismatched caption: {auc(pos, neg):.3f}  "
           f"(mean cos {pos.mean():.3f} vs {neg.mean():.3f})")

    va_caps, va_true = corrupt(va_scenes, 0.3, seed=1)
    te_caps30, te_true = corrupt(te_scenes, 0.3, seed=2)
    va_s, te_s = pair_scores(clap, va_a, va_caps), pair_scores(clap, te_a, te_caps30)
    best = (-1.0, 0.0)
    for thr in np.unique(va_s):
        keep = va_s >= thr
        tp = (keep & va_true).sum()
        f1 = 2 * tp / max(1, keep.sum() + va_true.sum())
        best = max(best, (f1, float(thr)))
    thr = best[1]
    keep = te_s >= thr
    prec = (keep & te_true).sum() / max(1, keep.sum())
    rec = (keep & te_true).sum() / max(1, te_true.sum())
    figure("clap_filter", f"filter (30% mismatched, threshold {thr:.3f} from val F1 {best[0]:.3f}): "
           f"precision {prec:.3f} recall {rec:.3f} kept {keep.sum()}/{len(keep)} (base precision {te_true.mean():.2f})")
    if args.quick and args.out is None:  # a smoke test's model is not worth keeping
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
