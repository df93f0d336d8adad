"""Generation quality of the mel path: does a generator trained for minutes on a CPU make the
sound class its prompt names? Mel-VAE DiT and mel-VAE FIT side by side (``--with-waveform``:
and today's waveform-VAE DiT), scored by a CLAP that none of them saw the clips of.

Everything is trained here, in this process, on synth clips of one event each, ``--seconds``
long (the training crop; a synth lake written through the real stages, no Ray). The lake's
clips are split by the package's one split function (``load_pairs(holdout=...)``, then
``split_of`` on the held-out part): ``--eval-frac`` of them are the held-out real clips that
nothing trains on, the next ``--clap-frac`` train the scoring CLAP, the rest train the
generators. Models, in order, each for a budget of CPU seconds of this process (one torch
thread by default; CPU time, so other load on a shared machine does not shrink it):

* the scoring CLAP (``train_clap``, the in-house trainer; ``--clap-epochs`` epochs);
* the mel VAE (``mel-vae-tiny`` at width ``--vae-channels`` 64, not 32: measured at 90 CPU s,
  width 32 reconstructs held-out clips to 0.40-0.47 class accuracy (a hum, a siren or a
  chirp comes back as a beep), width 64 to 0.65), then a DiT (``dit-tiny``) and a FIT
  (``fit-tiny``) on its latents, at ``--lr`` 1e-3 (the configs' rates are for long runs).
  They train with the trainer's own objectives (``soundlake.generation.train.
  objectives``, the steps ``soundlake train`` runs on Ray Train) stepped in this process, and
  are saved as the model folders ``soundlake train`` writes; ``Generator`` loads those as
  ``soundlake generate`` does, so the clips scored are what ``generate`` makes (Griffin-Lim
  inversion, and ``--source synth`` for the FIT's dataset-ID).

Scores (CLAP zero-shot classes: a class's text prototype is the mean CLAP text embedding of
the captions of single-event synth scenes of that class; a clip's class is the nearest
prototype; chance is 0.1):

* VAE reconstruction of ``--recon-clips`` held-out clips: log-spectral distance and class
  accuracy (target >= 0.9 for the mel VAE); the real clips' own accuracy is the ceiling;
* generation at the training length, ``--per-class`` prompts for each class (captions of
  single-event synth scenes of that class): class accuracy (target >= 0.7), CLAP score with
  the prompt relative to the real held-out clips' with their own captions (target >= 0.7x),
  FD against the held-out clips next to the FD between two halves of them (the floor);
* confusion matrices (prompted class x CLAP class) in ``<work>/report.html``.

    python benchmarks/generation_quality.py [--vae-budget 360 --dit-budget 270 --fit-budget 270]
        [--with-waveform] [--work DIR]      # about 25 minutes on one core

(``--quick``: a 100-scene lake, 1-second budgets, one clip per class: a smoke test.)
``--classify WAV... --clap DIR`` only says which class a CLAP hears in each file (the demo
uses it on its generated clip) and whether that is the class its sidecar's prompt names.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from common import figure, parse_args

from soundlake.catalog.training_pairs import load_pairs
from soundlake.core.splits import split_of
from soundlake.generation.diffusion import Schedule
from soundlake.generation.inference.metrics import clap_score, frechet_distance
from soundlake.generation.mel import griffin_lim, log_spectral_distance
from soundlake.generation.mel_vae import is_mel, latent_geometry, vae_config
from soundlake.generation.model_folder import (
    Generator,
    copy_model,
    load_vae,
    read_meta,
    save_model,
)
from soundlake.generation.train.objectives import OBJECTIVES
from soundlake.generation.train.specs import dit_model_config, load_train_spec
from soundlake.generation.vae import model_keys, read_config
from soundlake.models.clap.inhouse import ClapTrainConfig, train_clap
from soundlake.models.clap.windowing import normalise
from soundlake.sources.synth import BASE_CLASSES, caption_mentions, plan_scene
from soundlake.testing import make_synth_lake

FIGURES = ("scoring_clap", "vae_reconstruction", "generated_class_accuracy", "clap_score", "fd")
USES_RAY = False  # tests/test_benchmarks.py runs its quick run beside one that does
SR = 16000
FRAME = 640            # samples: a whole latent frame of both VAEs (mel hop 160 x 4, waveform hop 320)
LAKE_SEED, PROMPT_SEED, PROTOTYPE_SEED = 11, 12, 13
PROTOTYPE_CAPTIONS = 30  # scenes per class whose captions make its text prototype
IN_MEMORY = "(in memory)"  # the spec's shards: batches come from this process, not from shards
TEXT = {"path": None, "model": "all-MiniLM-L6-v2"}  # what `train dit` records for the default text encoder
CPU = torch.device("cpu")


# ------------------------------------------------------------------ data

def split_clips(root: Path, a, more: dict[str, float] | None = None) -> dict[str, list[tuple[np.ndarray, str, int]]]:
    """The lake's single-event clips as (audio, caption, class index), split by the one split
    function: eval (u < eval_frac), clap (the next clap_frac), then ``more`` in order, train (the rest)."""
    lake = make_synth_lake(root, a.clips, seconds=a.seconds, sr=SR, seed=LAKE_SEED, silence_dbfs=-90)
    splits = {"eval": a.eval_frac, "clap": a.clap_frac, **(more or {})}
    train, held = load_pairs(lake, SR, where="len(labels) = 1", holdout=sum(splits.values()))
    n = int(round(a.seconds * SR)) // FRAME * FRAME
    parts: dict[str, list] = {name: [] for name in [*splits, "train"]}
    for name, rows in (("train", train), (None, held)):
        for clip_id, audio, caption in rows:
            part = name or split_of(clip_id, splits)
            (cls,) = caption_mentions(caption)
            parts[part].append((audio[:n], caption, BASE_CLASSES.index(cls)))
    return parts


def prompts_per_class(per_class: int, seconds: float, seed: int = PROMPT_SEED) -> tuple[list[str], np.ndarray]:
    """``per_class`` captions naming each class (single-event synth scenes of that class)."""
    prompts, truth = [], []
    for c, cls in enumerate(BASE_CLASSES):
        prompts += [plan_scene(seed, k, seconds, classes=[cls]).caption for k in range(per_class)]
        truth += [c] * per_class
    return prompts, np.array(truth)


# ------------------------------------------------------------------ training

def fit(objective, spec, draw, budget_s: float) -> tuple[dict, int, float]:
    """Step the trainer's objective until ``budget_s`` CPU seconds are spent (at least one step):
    AdamW as ``soundlake train`` builds it, linear warm-up then a constant rate, the EMA
    weights when the spec keeps an EMA. Returns (weights, steps, mean loss of the last 50)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.99))

    model = objective.model
    opt, extra = adamw(model), {k: adamw(m) for k, m in objective.extra_modules().items()}
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(spec.ema), use_buffers=True) if spec.ema else None
    steps, losses, t0 = 0, [], time.process_time()
    while steps == 0 or time.process_time() - t0 < budget_s:
        lr = spec.lr * min(1.0, (steps + 1) / spec.warmup_steps) if spec.warmup_steps else spec.lr
        for o in (opt, *extra.values()):
            for g in o.param_groups:
                g["lr"] = lr
        item, _ = objective.prepare(draw(spec.batch_size))
        losses.append(objective.step(model, opt, extra, item, spec.phases[0])["loss"])
        if ema is not None:
            ema.update_parameters(model)
        steps += 1
    return (ema.module if ema is not None else model).state_dict(), steps, float(np.mean(losses[-50:]))


def train_vae(config: str, audio: np.ndarray, budget: float, out: Path, rng, sets: list[str]) -> str:
    torch.manual_seed(0)
    spec = load_train_spec("vae", config=config, shards=IN_MEMORY, steps=1, out=str(out), sets=sets)
    plan = {"vae_config": vae_config({**model_keys(config), **spec.overrides}).to_dict()}
    obj = OBJECTIVES["vae"](spec, plan, CPU)
    n = int(round(obj.loader_kw["seconds"] * SR))

    def draw(b: int):  # random crops of random clips
        idx, start = rng.integers(len(audio), size=b), rng.integers(audio.shape[1] - n + 1, size=b)
        crops = np.stack([audio[i, s:s + n] for i, s in zip(idx, start)])
        return SimpleNamespace(audio=torch.from_numpy(crops)[:, None])

    weights, steps, loss = fit(obj, spec, draw, budget)
    save_model(out, "vae", weights, {"config": plan["vae_config"], "latents": latent_geometry(plan["vae_config"]),
                                     "train": {"step": steps, "spec": spec.model_dump(mode="json"), "cpu_s": budget}})
    return (f"{' '.join([config, *sets])}: {steps} steps in {budget:g} CPU s "
            f"(batch {spec.batch_size} x {n / SR:.2f} s), loss {loss:.3f}")


def encode(vae_dir: Path, audio: np.ndarray) -> torch.Tensor:
    """Posterior means, stored as latent shards hold them: [N, C (x frequency rows), frames]."""
    vae, _ = load_vae(vae_dir)
    with torch.no_grad():
        return torch.cat([vae.encode(torch.from_numpy(audio[i:i + 32])[:, None]).mean.flatten(1, -2)
                          for i in range(0, len(audio), 32)])


def train_dit(config: str, vae_dir: Path, audio: np.ndarray, captions: list[str], budget: float, out: Path,
              rng, a, sets: tuple[str, ...] = (), ar: tuple[Path, dict, str] | None = None) -> str:
    """A DiT (or FIT) on the clips' latents for ``budget`` CPU s, saved as `train dit` saves it.
    ``ar``: (AR model folder, caption -> predicted encoding, its --via) for DC-LDM's conditions
    (``sets`` choose cond2 / primary / the blocks), read from memory as `ar-encode`'s folder would be."""
    from soundlake.generation.train.ar_encode import EncodingTable

    torch.manual_seed(0)
    z = encode(vae_dir, audio)
    extra, sets = " ".join(sets), [*(f"{k}={v}" for k, v in (("lr", a.lr), ("ema", a.ema), ("warmup_steps", a.warmup))
                                     if v is not None), *sets]
    spec = load_train_spec("dit", config=config, shards=IN_MEMORY, steps=1, out=str(out), vae=str(vae_dir),
                           seconds=a.seconds, batch_size=a.batch_size, sets=sets,
                           ar_encodings=IN_MEMORY if ar else None)
    geo = latent_geometry(read_meta(vae_dir, "vae")["config"])
    raw = read_config(config)
    plan = {"dit_config": dit_model_config(spec, raw, geo["channels"], geo["grid_freq"]),
            "schedule": raw.get("schedule", {}),
            # one mean and std over all latent values, as `soundlake encode` measures them
            "latents": {"mean": float(z.mean()), "std": float(z.std(unbiased=False)), "rate": geo["rate"],
                        "grid_freq": geo["grid_freq"]}}
    obj = OBJECTIVES["dit"](spec, plan, CPU)
    conditioning = {"extra_clap": None, "cond2": spec.cond2, "cond2_frames": spec.cond2_frames,
                    "primary": spec.primary, "ar": None}
    if ar:
        obj.encodings = EncodingTable(ar[1], {})
        conditioning["ar"] = {"encodings": IN_MEMORY, "via": ar[2], "model": {"path": str(ar[0])}}
        copy_model(ar[0], out / "ar")

    def draw(b: int):
        idx = rng.integers(len(captions), size=b)
        return SimpleNamespace(latents=z[torch.from_numpy(idx)], captions=[captions[i] for i in idx],
                               meta=[{"source": "synth"}] * b)

    weights, steps, loss = fit(obj, spec, draw, budget)
    copy_model(vae_dir, out / "vae")
    save_model(out, "dit", weights, {
        "train": {"step": steps, "spec": spec.model_dump(mode="json"), "ema": spec.ema, "cpu_s": budget},
        "config": plan["dit_config"], "schedule": Schedule(**plan["schedule"]).meta(), "latents": plan["latents"],
        "text": dict(TEXT), "conditioning": conditioning})
    return (f"{config}{' ' + extra if extra else ''}: {steps} steps in {budget:g} CPU s (batch {spec.batch_size}, "
            f"lr {spec.lr:g}, ema {spec.ema}), loss {loss:.3f}")


# ------------------------------------------------------------------ audio out

def reconstruct(vae_dir: Path, audio: np.ndarray) -> np.ndarray:
    """Held-out clips through the VAE (posterior mean) and, for a mel VAE, Griffin-Lim."""
    vae, meta = load_vae(vae_dir)
    with torch.no_grad():
        out = vae.decode(vae.encode(torch.from_numpy(audio)[:, None]).mean)
    return griffin_lim(out, vae.cfg.mel) if is_mel(meta["config"]) else out[:, 0].numpy()


def generate(folder: Path, prompts: list[str], a) -> np.ndarray:
    """What ``soundlake generate`` makes for each prompt (dataset-ID ``synth`` when the model has one)."""
    gen = Generator.load(folder)
    source = "synth" if "synth" in gen.sources else None
    return np.concatenate([gen.generate(prompts[i:i + a.gen_batch], seconds=a.seconds, steps=a.steps, cfg=a.cfg,
                                        rescale=a.rescale, seed=i, source=source).audio
                           for i in range(0, len(prompts), a.gen_batch)])


# ------------------------------------------------------------------ scoring

class Scorer:
    """A CLAP with one text prototype per class: the mean of the normalised text embeddings of
    the distinct captions of ``PROTOTYPE_CAPTIONS`` single-event synth scenes of that class."""

    def __init__(self, clap, seconds: float):
        self.clap = clap
        caps, truth = prompts_per_class(PROTOTYPE_CAPTIONS, seconds, PROTOTYPE_SEED)
        protos = [normalise(clap.embed_text(sorted({t for t, k in zip(caps, truth) if k == c}))).mean(0)
                  for c in range(len(BASE_CLASSES))]
        self.protos = normalise(np.stack(protos))

    def embed(self, clips) -> np.ndarray:
        return self.clap.embed_audio([np.asarray(c, np.float32) for c in clips])

    def classes(self, emb: np.ndarray) -> np.ndarray:
        return np.argmax(normalise(emb) @ self.protos.T, axis=1)

    def text_score(self, emb: np.ndarray, texts: list[str]) -> float:
        return clap_score(emb, self.clap.embed_text(list(texts)))


def safe_fd(x: np.ndarray, y: np.ndarray) -> float:
    try:
        return frechet_distance(x, y)
    except ValueError:  # too few clips for a covariance (a quick run)
        return float("nan")


def confusion(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    m = np.zeros((len(BASE_CLASSES),) * 2, int)
    np.add.at(m, (truth, pred), 1)
    return m


def confusion_png(mats: dict[str, np.ndarray]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.replace("_", " ") for c in BASE_CLASSES]
    fig, axes = plt.subplots(1, len(mats), figsize=(5.2 * len(mats), 4.8), squeeze=False)
    for ax, (title, m) in zip(axes[0], mats.items()):
        rows = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for i, j in zip(*np.nonzero(m)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rows[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("CLAP class")
        ax.set_ylabel("prompted (or true) class")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(path: Path, lines: list[str], mats: dict[str, np.ndarray]) -> None:
    png = base64.b64encode(confusion_png(mats)).decode()
    body = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    path.write_text("<!doctype html><meta charset=utf-8><title>generation quality</title>"
                    "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}img{max-width:100%}</style>"
                    f"<h1>Generation quality</h1><ul>{body}</ul><h2>Confusion matrices</h2>"
                    f"<img alt='confusion matrices' src='data:image/png;base64,{png}'>", encoding="utf-8")


def classify_files(paths: list[Path], clap_dir: Path) -> None:
    import json

    import soundfile as sf
    import soxr

    from soundlake.models.clap.load import load_clap

    clap = load_clap(str(clap_dir))
    scorer = Scorer(clap, 10.0)
    names = [c.replace("_", " ") for c in BASE_CLASSES]
    for path in paths:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
        wav = soxr.resample(wav.mean(1), sr, clap.sample_rate) if sr != clap.sample_rate else wav.mean(1)
        cos = (normalise(scorer.embed([wav])) @ scorer.protos.T)[0]
        order = np.argsort(-cos)
        side = Path(f"{path}.json")
        prompt = json.loads(side.read_text()).get("prompt", "") if side.is_file() else ""
        said = sorted(BASE_CLASSES.index(c) for c in caption_mentions(prompt) if c in BASE_CLASSES)
        verdict = "" if not said else " (the prompt's class)" if order[0] in said else \
            f" (the prompt names {', '.join(names[c] for c in said)})"
        print(f"{path}: the CLAP hears {names[order[0]]}{verdict}; cosine " +
              ", ".join(f"{names[c]} {cos[c]:.2f}" for c in order[:3]))


# ------------------------------------------------------------------ main

def add_generator_args(ap: argparse.ArgumentParser) -> None:
    """The DiT / FIT training and sampling options (shared with dual_conditioning.py)."""
    ap.add_argument("--batch-size", type=int, default=16, help="DiT / FIT batch")
    ap.add_argument("--lr", type=float, default=1e-3, help="DiT / FIT learning rate (the configs': 3e-4, 5e-4, "
                    "for longer runs)")
    ap.add_argument("--ema", type=float, default=None, help="DiT / FIT EMA decay (default: none)")
    ap.add_argument("--warmup", type=int, default=None, help="DiT / FIT warm-up steps")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--rescale", type=float, default=0.75)
    ap.add_argument("--gen-batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other load)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=4000, help="synth scenes in the lake (about half are single events)")
    ap.add_argument("--seconds", type=float, default=1.28, help="clip length = training crop = generated length")
    ap.add_argument("--eval-frac", type=float, default=0.1, help="held-out real clips (split function's u below this)")
    ap.add_argument("--clap-frac", type=float, default=0.3, help="the scoring CLAP's clips (the next fraction)")
    ap.add_argument("--clap-epochs", type=int, default=40)
    ap.add_argument("--clap-dim", type=int, default=64, help="CLAP embedding width (FD over a few hundred clips)")
    ap.add_argument("--vae-budget", type=float, default=360.0, help="mel VAE, CPU seconds")
    ap.add_argument("--dit-budget", type=float, default=270.0, help="DiT on mel latents, CPU seconds")
    ap.add_argument("--fit-budget", type=float, default=270.0, help="FIT on mel latents, CPU seconds")
    ap.add_argument("--vae-channels", type=int, default=64, help="mel VAE width (mel-vae-tiny's is 32: too narrow "
                    "to keep a tone's pitch after a few CPU minutes)")
    ap.add_argument("--with-waveform", action="store_true", help="also today's waveform VAE (vae-tiny) + DiT")
    ap.add_argument("--wave-vae-budget", type=float, default=180.0)
    ap.add_argument("--wave-dit-budget", type=float, default=300.0)
    add_generator_args(ap)
    ap.add_argument("--per-class", type=int, default=20, help="generated clips per class")
    ap.add_argument("--recon-clips", type=int, default=100, help="held-out clips reconstructed by each VAE")
    ap.add_argument("--work", type=Path, help="folder for the lake, models and report (default: a temp dir)")
    ap.add_argument("--classify", type=Path, nargs="+", help="only name the class a CLAP (--clap) hears in these "
                                                             "WAV files, then exit")
    ap.add_argument("--clap", type=Path, help="with --classify: a CLAP folder (soundlake train clap)")
    a = parse_args(ap, dict(clips=100, eval_frac=0.3, clap_frac=0.3, clap_epochs=1, clap_dim=8,
                            vae_budget=1.0, dit_budget=1.0, fit_budget=1.0, wave_vae_budget=1.0,
                            wave_dit_budget=1.0, per_class=1, recon_clips=4, steps=2, gen_batch=10))
    torch.set_num_threads(a.threads)
    if a.classify:
        if a.clap is None:
            ap.error("--classify needs --clap DIR")
        return classify_files(a.classify, a.clap)
    work = a.work or Path(tempfile.mkdtemp(prefix="generation_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()

    parts = split_clips(work / "synth", a)
    ev, cl, tr = parts["eval"], parts["clap"], parts["train"]
    ev_audio, ev_caps, ev_cls = np.stack([r[0] for r in ev]), [r[1] for r in ev], np.array([r[2] for r in ev])
    tr_audio, tr_caps = np.stack([r[0] for r in tr]), [r[1] for r in tr]
    print(f"synth lake of {a.clips} scenes of {a.seconds:g} s ({time.perf_counter() - t_start:.0f} s); single-event "
          f"clips: {len(tr)} train the generators, {len(cl)} the scoring CLAP, {len(ev)} held out", flush=True)

    t0 = time.perf_counter()
    clap_cfg = ClapTrainConfig(epochs=a.clap_epochs, window_s=a.seconds, batch_size=32, dim=a.clap_dim)
    clap = train_clap((r[0] for r in cl), [r[1] for r in cl], work / "clap", clap_cfg)["model"]
    scorer = Scorer(clap, a.seconds)
    real_emb = scorer.embed(ev_audio)
    real_acc = float((scorer.classes(real_emb) == ev_cls).mean())
    real_clap = scorer.text_score(real_emb, ev_caps)
    floor = safe_fd(real_emb[0::2], real_emb[1::2])
    clap_s = time.perf_counter() - t0
    figure("scoring_clap", f"in-house CLAP ({a.clap_epochs} epochs on {len(cl)} clips, {clap_s:.0f} s): "
           f"class accuracy of the {len(ev)} held-out real clips {real_acc:.2f} (the ceiling), their CLAP score with "
           f"their own captions {real_clap:.3f}")

    vaes = {"mel": ("mel-vae-tiny", a.vae_budget, [f"overrides.channels={a.vae_channels}"])}
    gens = {"mel-VAE DiT": ("dit-tiny", "mel", a.dit_budget), "mel-VAE FIT": ("fit-tiny", "mel", a.fit_budget)}
    if a.with_waveform:
        vaes["waveform"] = ("vae-tiny", a.wave_vae_budget, [])
        gens["waveform-VAE DiT"] = ("dit-tiny", "waveform", a.wave_dit_budget)
    k = min(a.recon_clips, len(ev))
    report, mats, recon = [], {}, {}
    for name, (config, budget, sets) in vaes.items():
        t0 = time.perf_counter()
        info = train_vae(config, tr_audio, budget, work / f"{name}-vae", rng, sets)
        wav = reconstruct(work / f"{name}-vae", ev_audio[:k])
        pred = scorer.classes(scorer.embed(wav))
        recon[name] = (log_spectral_distance(wav, ev_audio[:k]), float((pred == ev_cls[:k]).mean()))
        mats[f"{name} VAE reconstruction ({k} held-out clips)"] = confusion(ev_cls[:k], pred)
        report.append(f"{name} VAE {info}; LSD {recon[name][0]:.2f} dB, class accuracy {recon[name][1]:.2f} "
                      f"({time.perf_counter() - t0:.0f} s)")
        print(report[-1], flush=True)

    prompts, truth = prompts_per_class(a.per_class, a.seconds)
    results = {}
    for name, (config, vae, budget) in gens.items():
        t0 = time.perf_counter()
        folder = work / name.replace(" ", "-")
        info = train_dit(config, work / f"{vae}-vae", tr_audio, tr_caps, budget, folder, rng, a)
        emb = scorer.embed(generate(folder, prompts, a))
        pred = scorer.classes(emb)
        results[name] = {"acc": float((pred == truth).mean()), "clap": scorer.text_score(emb, prompts),
                         "fd": safe_fd(emb, real_emb)}
        mats[f"{name} ({len(prompts)} generated)"] = confusion(truth, pred)
        r = results[name]
        report.append(f"{name}: {info}; class accuracy {r['acc']:.2f}, CLAP score {r['clap']:.3f}, FD {r['fd']:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)")
        print(report[-1], flush=True)

    def side(key: str, fmt) -> str:
        return " · ".join(f"{n} {fmt(r[key])}" for n, r in results.items())

    figure("vae_reconstruction", " · ".join(f"{n} VAE: LSD {lsd:.2f} dB, class accuracy {acc:.2f}"
                                            for n, (lsd, acc) in recon.items())
           + f" (real clips {real_acc:.2f}; target >= 0.9 for the mel VAE; {k} held-out clips)")
    figure("generated_class_accuracy", side("acc", lambda v: f"{v:.2f}") + f" (real clips {real_acc:.2f}, chance "
           f"{1 / len(BASE_CLASSES):.2f}; target >= 0.7; {a.per_class} clips per class, {a.seconds:g} s, "
           f"DDIM {a.steps} steps, CFG {a.cfg:g})")
    figure("clap_score", side("clap", lambda v: f"{v:.3f} ({v / real_clap:.2f}x real)")
           + f" (real held-out clips with their own captions {real_clap:.3f}; target >= 0.7x)")
    figure("fd", side("fd", lambda v: f"{v:.3f}") + f" vs the held-out real clips; floor (two halves of them) "
           f"{floor:.3f}")
    report += [f"real held-out clips: class accuracy {real_acc:.2f}, CLAP score {real_clap:.3f}, FD floor {floor:.3f}",
               f"total {time.perf_counter() - t_start:.0f} s"]
    write_report(work / "report.html", report, mats)
    print(f"total {time.perf_counter() - t_start:.0f} s; report: {work / 'report.html'}")
    mel = {n: r["acc"] for n, r in results.items() if n.startswith("mel")}
    best = max(mel, key=mel.get)
    print(f"best mel-path generator: {best}")
    if a.quick and a.work is None:  # a smoke test's lake and models are not worth keeping
        shutil.rmtree(work, ignore_errors=True)
    print(f"generated class accuracy, mel path: {mel[best]:.2f} (target >= 0.7)")


if __name__ == "__main__":
    main()
