"""Mel inversion side by side: Griffin-Lim (librosa, no training) against the small trained
Vocos-style vocoder, and what the mel VAE's reconstruction costs on top.

Trains ``vocoder-tiny`` (and the mel VAE ``--vae-config``, default ``mel-vae-tiny``, unless
``--vae-budget 0``) in this process on random crops of synth clips for a budget of CPU
seconds each (one torch thread; CPU time, so other load on the machine does not shrink it:
the figures say what one core gives), then inverts the log-mels of held-out synth clips
(another seed, never trained on) both ways and scores each result against the real clip:

* LSD: log-spectral distance in dB (per frame the RMS over frequency of the power spectra's
  dB difference, mean over frames; lower is better);
* MRSTFT: multi-resolution STFT distance (spectral convergence + log-magnitude L1 over
  FFT sizes 2048..128; lower is better).

With the VAE, the same two scores for the whole decode path of the mel generator (log-mel
-> VAE latents -> VAE reconstruction -> each inverter) and the VAE's log-mel L1 error in dB.
Griffin-Lim is 32 iterations after librosa's NNLS mel-to-linear inversion.

* class accuracy: ``--class-clips`` single-event held-out clips per synth class, inverted each
  way (and through the VAE), classified by a scoring CLAP trained here on other single-event
  clips (generation_quality's ``Scorer``: one text prototype per class); the real clips'
  accuracy is the ceiling.

    python benchmarks/mel_inversion.py [--budget 300] [--vae-budget 300] [--vae-config mel-vae-tiny-2d]

(``--quick``: 2-second budgets, 2 held-out clips of 0.64 s: a smoke test.)
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

from soundlake.generation.mel import griffin_lim, log_spectral_distance, mrstft_distance
from soundlake.generation.mel_vae import MelVAE, MelVAEConfig, mel_vae_train_step
from soundlake.generation.vae import read_config
from soundlake.generation.vocoder import Vocoder, VocoderConfig, vocoder_train_step
from soundlake.models.clap.inhouse import ClapTrainConfig, train_clap
from soundlake.sources.synth import BASE_CLASSES, plan_scene, render_scene, synth_clip

CLASS_SEED, CLAP_SEED = 31, 32   # single-event clips: the held-out ones, the scoring CLAP's

FIGURES = ("griffin_lim", "vocoder", "vocoder_vs_griffin_lim", "mel_vae", "class_accuracy")
USES_RAY = False  # tests/test_benchmarks.py runs its quick run beside one that does


class Crops:
    """Random fixed-length crops of synth clips (seed 0), a batch at a time."""

    def __init__(self, clips: int, seconds: float, sr: int, seed: int = 0):
        self.clips = [synth_clip(seed, i, duration=seconds, sample_rate=sr)[1] for i in range(clips)]
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int, samples: int) -> torch.Tensor:
        out = []
        for _ in range(size):
            c = self.clips[self.rng.integers(len(self.clips))]
            s = self.rng.integers(len(c) - samples + 1)
            out.append(c[s: s + samples])
        return torch.from_numpy(np.stack(out))[:, None]


def train_for(model, step_fn, cfg, crops: Crops, budget_s: float, batch: int, samples: int, lr: float) -> tuple[int, dict]:
    """Optimisation steps until ``budget_s`` of this process's CPU time is spent (at least one
    step): CPU time, not wall time, so that other load on a shared machine does not shrink it."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99))
    t0, steps, logs = time.process_time(), 0, {}
    while steps == 0 or time.process_time() - t0 < budget_s:
        logs = step_fn(model, opt, crops.batch(batch, samples), cfg)
        steps += 1
    return steps, logs


def scores(wav: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    return log_spectral_distance(wav, ref), mrstft_distance(wav, ref)


def single_events(seed: int, per_class: int, seconds: float, sr: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``per_class`` single-event synth clips of each class: (audio [N, T], captions, class index)."""
    scenes = [(c, plan_scene(seed, k, seconds, classes=[cls])) for c, cls in enumerate(BASE_CLASSES)
              for k in range(per_class)]
    audio = np.stack([np.asarray(render_scene(s, sr), np.float32).reshape(-1) for _, s in scenes])
    return audio, [s.caption for _, s in scenes], np.array([c for c, _ in scenes])


def class_accuracy(a, sr: int, spec, vocoder, vae) -> str:
    """Real, Griffin-Lim, vocoder (and VAE -> each) class accuracy on single-event clips."""
    from generation_quality import Scorer  # the scoring CLAP's class prototypes

    audio, caps, _ = single_events(CLAP_SEED, a.clap_per_class, a.seconds, sr)
    clap = train_clap(list(audio), caps, a.work / "clap", ClapTrainConfig(epochs=a.clap_epochs, window_s=a.seconds,
                                                                         batch_size=32, dim=64))["model"]
    scorer = Scorer(clap, a.seconds)
    held, _, truth = single_events(CLASS_SEED, a.class_clips, a.seconds, sr)
    held = held[:, : held.shape[1] // (4 * spec.hop) * 4 * spec.hop]
    ref = torch.from_numpy(held)
    with torch.no_grad():
        mels = vocoder.mel(ref)
        ways = {"real": held, "Griffin-Lim": griffin_lim(mels, spec), "vocoder": vocoder(mels).numpy()}
        if vae is not None:
            recon = vae.decode(vae.encode(ref[:, None]).mean)
            ways |= {"VAE -> Griffin-Lim": griffin_lim(recon, spec), "VAE -> vocoder": vocoder(recon).numpy()}
    acc = {k: float((scorer.classes(scorer.embed(list(w))) == truth).mean()) for k, w in ways.items()}
    return " · ".join(f"{k} {v:.2f}" for k, v in acc.items()) + f" ({len(truth)} single-event clips, chance 0.10)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=300.0, help="vocoder training, CPU seconds")
    ap.add_argument("--vae-budget", type=float, default=300.0, help="mel VAE training, CPU seconds (0: skip)")
    ap.add_argument("--vae-config", default="mel-vae-tiny", help="mel-vae-tiny (1D) or mel-vae-tiny-2d")
    ap.add_argument("--clips", type=int, default=64, help="training clips (4 s each)")
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=2.56, help="held-out clip length")
    ap.add_argument("--crop", type=float, default=1.28, help="training crop, seconds")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--class-clips", type=int, default=10, help="held-out single-event clips per class (class accuracy)")
    ap.add_argument("--clap-per-class", type=int, default=60, help="the scoring CLAP's training clips per class")
    ap.add_argument("--clap-epochs", type=int, default=40)
    ap.add_argument("--work", type=Path, help="folder for the scoring CLAP (default: a temp dir)")
    a = parse_args(ap, dict(budget=2.0, vae_budget=2.0, clips=4, held_out=2, seconds=0.64, crop=0.64, batch_size=2,
                            class_clips=1, clap_per_class=2, clap_epochs=1))
    keep = a.work is not None
    a.work = a.work or Path(tempfile.mkdtemp(prefix="mel_inversion_"))
    try:
        run(a)
    finally:
        if not keep:
            shutil.rmtree(a.work, ignore_errors=True)


def run(a) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    voc_cfg = VocoderConfig.from_yaml("vocoder-tiny")
    spec = voc_cfg.mel
    sr = spec.sample_rate
    crops = Crops(a.clips, 4.0, sr)
    n = int(round(a.crop * sr)) // (4 * spec.hop) * 4 * spec.hop   # whole latent frames
    held = np.stack([synth_clip(1, i, duration=a.seconds, sample_rate=sr)[1] for i in range(a.held_out)])
    held = held[:, : held.shape[1] // (4 * spec.hop) * 4 * spec.hop]
    ref = torch.from_numpy(held)

    vocoder = Vocoder(voc_cfg)
    v_steps, _ = train_for(vocoder, vocoder_train_step, voc_cfg, crops, a.budget, a.batch_size, n,
                           read_config("vocoder-tiny")["train"]["lr"])
    vocoder.eval()
    with torch.no_grad():
        mels = vocoder.mel(ref)
        t0 = time.process_time()
        voc = vocoder(mels).numpy()
        voc_s = time.process_time() - t0
    t0 = time.process_time()
    gl = griffin_lim(mels, spec)
    gl_s = time.process_time() - t0
    audio_s = held.size / sr
    print(f"{a.held_out} held-out synth clips of {held.shape[1] / sr:.2f} s at {sr} Hz; vocoder-tiny trained "
          f"{v_steps} steps in {a.budget:g} CPU s (1 thread, batch {a.batch_size} x {n / sr:.2f} s crops of "
          f"{a.clips} clips)")
    gl_lsd, gl_mr = scores(gl, held)
    v_lsd, v_mr = scores(voc, held)
    figure("griffin_lim", f"Griffin-Lim (32 iterations): LSD {gl_lsd:.2f} dB · MRSTFT {gl_mr:.3f} · "
           f"{audio_s / gl_s:.1f} s of audio per CPU second")
    figure("vocoder", f"vocoder-tiny ({v_steps} steps, {a.budget:g} CPU s): LSD {v_lsd:.2f} dB · MRSTFT {v_mr:.3f} · "
           f"{audio_s / voc_s:.1f} s of audio per CPU second")
    figure("vocoder_vs_griffin_lim", f"vocoder / Griffin-Lim: LSD ratio {v_lsd / gl_lsd:.2f}x · MRSTFT ratio "
           f"{v_mr / gl_mr:.2f}x (below 1: the vocoder is closer to the real clip)")

    if a.vae_budget <= 0:
        figure("mel_vae", "skipped (--vae-budget 0)")
        figure("class_accuracy", class_accuracy(a, sr, spec, vocoder, None))
        return
    vae_cfg = MelVAEConfig.from_yaml(a.vae_config)
    vae = MelVAE(vae_cfg)
    m_steps, _ = train_for(vae, mel_vae_train_step, vae_cfg, crops, a.vae_budget, a.batch_size, n,
                           read_config(a.vae_config)["train"]["lr"])
    vae.eval()
    with torch.no_grad():
        recon = vae.decode(vae.encode(ref[:, None]).mean)
        l1_db = float((recon - mels).abs().mean()) * 20 / np.log(10)
        via_voc = vocoder(recon).numpy()
    via_gl = griffin_lim(recon, spec)
    r_gl, r_voc = scores(via_gl, held), scores(via_voc, held)
    figure("mel_vae", f"{a.vae_config} ({m_steps} steps, {a.vae_budget:g} CPU s): log-mel L1 {l1_db:.2f} dB · through "
           f"Griffin-Lim LSD {r_gl[0]:.2f} dB MRSTFT {r_gl[1]:.3f} · through the vocoder LSD {r_voc[0]:.2f} dB "
           f"MRSTFT {r_voc[1]:.3f}")
    figure("class_accuracy", class_accuracy(a, sr, spec, vocoder, vae))


if __name__ == "__main__":
    main()
