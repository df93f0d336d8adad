"""DC-LDM's Table 1 on synth clips: text only, the AR encoding only, and both (two placements of
the extra cross-attention), with FD, KL, CLAP score and class accuracy.

Everything is trained here, on single-event synth clips ``--seconds`` long, split by the
package's one split function into: held-out real clips (``--eval-frac``), the scoring CLAP's
clips (``--clap-frac``), the AR model's clips (``--ar-frac``: the tokenizer and the AR model
see only these, as AudioGen was pretrained elsewhere) and the diffusion models' clips (the
rest). In order, each for a budget of CPU seconds of this process:

* the scoring CLAP (in-house) and the mel VAE (``mel-vae-tiny`` at width 64), as
  ``generation_quality.py`` trains them;
* the tokenizer (``soundlake train tokens``' fit: residual k-means over the AR clips' latents)
  and the AR model (``ar-tiny``, the trainer's objective) on the AR clips;
* the AR model's predictions for every caption the DiTs train on or are prompted with
  (what ``soundlake ar-encode`` precomputes);
* four ``dit-tiny`` DiTs on the diffusion clips, the rows of the paper's Table 1:
  ``text`` (LDM w/ T5; MiniLM offline), ``AR only`` (LDM w/ AG: the AR encoding replaces the
  text), ``text + AR @ first block`` (CA-DOWN#1) and ``text + AR @ first & last`` (CA-DOWN#1 &
  CA-UP#1, the paper's best); ``--with-vae-encoding`` adds E'_t2a (the AR prediction decoded to
  audio and encoded again by the VAE) at first & last.

Each DiT generates, through ``Generator`` as ``soundlake generate`` does (text -> AR -> diffusion),
one clip for each of ``--per-class`` held-out real clips per class, prompted with that clip's
caption. Scores, from the scoring CLAP: FD against the held-out clips; KL between the class
distributions (softmax of the cosines to the class prototypes at temperature ``--kl-temp``) of
each real clip and its generated clip (AudioLDM's paired KL, with the CLAP as the classifier);
CLAP score with the prompt; class accuracy.

    python benchmarks/dual_conditioning.py [--dit-budget 220 --ar-budget 150]   # about 28 minutes

(``--quick``: a 150-scene lake, 1-second budgets: a smoke test.)
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from common import figure, parse_args
from generation_quality import (
    CPU,
    IN_MEMORY,
    TEXT,
    Scorer,
    add_generator_args,
    confusion,
    encode,
    fit,
    generate,
    normalise,
    safe_fd,
    split_clips,
    train_dit,
    train_vae,
    write_report,
)

from soundlake.core.fingerprints import weights_sha256
from soundlake.generation.mel_vae import latent_geometry
from soundlake.generation.model_folder import AcousticEncoder, copy_model, read_meta, save_model
from soundlake.generation.tokens import fit_rvq, latent_tokens, rvq_errors
from soundlake.generation.train.objectives import OBJECTIVES
from soundlake.generation.train.specs import ar_plan, load_train_spec
from soundlake.generation.train.tokens import save_tokenizer
from soundlake.generation.vae import read_config
from soundlake.models.clap.inhouse import ClapTrainConfig, train_clap
from soundlake.sources.synth import BASE_CLASSES

FIGURES = ("tokenizer", "ar_model", "table1", "best_placement")
USES_RAY = False


def train_tokenizer(vae_dir: Path, audio: np.ndarray, out: Path, a, stats: dict) -> str:
    z = encode(vae_dir, audio).numpy()
    geo = latent_geometry(read_meta(vae_dir, "vae")["config"])
    x = np.concatenate([latent_tokens(c, geo["grid_freq"], stats["mean"], stats["std"]) for c in z])
    rvq = fit_rvq(x, a.levels, min(a.codes, len(x)), iters=20)
    errs = rvq_errors(rvq, x)
    save_tokenizer(out, rvq, {"latents": {"shards": IN_MEMORY, "split": "ar", **stats,
                                          "vae": str(vae_dir), "vae_sha256": weights_sha256(vae_dir / "model.safetensors")},
                              "train": {"clips": len(z), "vectors": len(x), "relative_error_by_level": errs}})
    return (f"{rvq.levels} levels x {rvq.codes} codes on {len(x)} latent vectors of {len(z)} AR clips; relative "
            "error by level " + " -> ".join(f"{e:.3f}" for e in errs))


def train_ar(vae_dir: Path, tokens: Path, audio: np.ndarray, captions: list[str], out: Path, rng, a) -> str:
    """The AR model on the AR clips, with `train ar`'s objective and plan, saved as `train ar` saves it."""
    torch.manual_seed(0)
    z = encode(vae_dir, audio)
    spec = load_train_spec("ar", shards=IN_MEMORY, steps=1, out=str(out), tokens=str(tokens), seconds=a.seconds,
                           batch_size=a.ar_batch, sets=[f"lr={a.ar_lr}"])
    plan = ar_plan(spec)
    obj = OBJECTIVES["ar"](spec, plan, CPU)

    def draw(b: int):
        idx = rng.integers(len(captions), size=b)
        return SimpleNamespace(latents=z[torch.from_numpy(idx)][..., :plan["latent_frames"]],
                               captions=[captions[i] for i in idx])

    weights, steps, loss = fit(obj, spec, draw, a.ar_budget)
    save_model(out, "ar", weights, {"config": plan["ar_config"], "latents": plan["latents"], "text": dict(TEXT),
                                    "train": {"step": steps, "cpu_s": a.ar_budget,
                                              "phases": [{"shards": IN_MEMORY, "split": "ar"}]}})
    copy_model(tokens, out / "tokens")
    copy_model(vae_dir, out / "vae")
    uniform = np.log(plan["ar_config"]["codes"])
    return (f"ar-tiny: {steps} steps in {a.ar_budget:g} CPU s (batch {a.ar_batch}, {plan['ar_config']['frames'] * plan['ar_config']['levels']} "
            f"codes per clip), loss {loss:.3f} per code (uniform: {uniform:.3f})")


def kl_paired(real: np.ndarray, gen: np.ndarray, protos: np.ndarray, temp: float) -> float:
    """Mean KL(p_real || p_gen) over pairs, p = softmax(cos(embedding, class prototypes) / temp)."""
    def probs(e):
        logits = normalise(e) @ protos.T / temp
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)
    p, q = probs(real), probs(gen)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=5000, help="synth scenes in the lake (about half are single events)")
    ap.add_argument("--seconds", type=float, default=1.28, help="clip length = training crop = generated length")
    ap.add_argument("--eval-frac", type=float, default=0.1)
    ap.add_argument("--clap-frac", type=float, default=0.25)
    ap.add_argument("--ar-frac", type=float, default=0.25, help="the tokenizer's and the AR model's clips")
    ap.add_argument("--clap-epochs", type=int, default=40)
    ap.add_argument("--clap-dim", type=int, default=64)
    ap.add_argument("--vae-budget", type=float, default=300.0, help="mel VAE, CPU seconds")
    ap.add_argument("--vae-channels", type=int, default=64)
    ap.add_argument("--levels", type=int, default=4, help="tokenizer levels")
    ap.add_argument("--codes", type=int, default=256, help="tokenizer codes per level")
    ap.add_argument("--ar-budget", type=float, default=150.0, help="AR model, CPU seconds")
    ap.add_argument("--ar-batch", type=int, default=32)
    ap.add_argument("--ar-lr", type=float, default=1e-3)
    ap.add_argument("--dit-budget", type=float, default=220.0, help="each DiT, CPU seconds")
    ap.add_argument("--with-vae-encoding", action="store_true", help="also E'_t2a (AR -> VAE audio -> VAE) at "
                                                                     "first & last")
    add_generator_args(ap)
    ap.add_argument("--per-class", type=int, default=20, help="held-out clips (and generations) per class")
    ap.add_argument("--kl-temp", type=float, default=0.1, help="softmax temperature of the class distributions")
    ap.add_argument("--work", type=Path, help="folder for the lake, models and report (default: a temp dir)")
    a = parse_args(ap, dict(clips=150, eval_frac=0.25, clap_frac=0.25, ar_frac=0.25, clap_epochs=1, clap_dim=8,
                            vae_budget=1.0, codes=8, levels=2, ar_budget=1.0, dit_budget=1.0, per_class=1,
                            steps=2, gen_batch=10, ar_batch=8))
    torch.set_num_threads(a.threads)
    work = a.work or Path(tempfile.mkdtemp(prefix="dual_conditioning_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()

    parts = split_clips(work / "synth", a, {"ar": a.ar_frac})
    ev, cl, arp, tr = parts["eval"], parts["clap"], parts["ar"], parts["train"]
    print(f"synth lake of {a.clips} scenes of {a.seconds:g} s; single-event clips: {len(tr)} train the DiTs, "
          f"{len(arp)} the tokenizer and the AR model, {len(cl)} the scoring CLAP, {len(ev)} held out", flush=True)
    # the prompts: up to per_class held-out clips of each class, each prompting with its own caption
    picked = [i for c in range(len(BASE_CLASSES)) for i in [j for j, r in enumerate(ev) if r[2] == c][:a.per_class]]
    ev_audio = np.stack([ev[i][0] for i in picked])
    prompts, truth = [ev[i][1] for i in picked], np.array([ev[i][2] for i in picked])

    clap = train_clap((r[0] for r in cl), [r[1] for r in cl], work / "clap",
                      ClapTrainConfig(epochs=a.clap_epochs, window_s=a.seconds, batch_size=32, dim=a.clap_dim))["model"]
    scorer = Scorer(clap, a.seconds)
    real_emb = scorer.embed(ev_audio)
    real_acc = float((scorer.classes(real_emb) == truth).mean())
    real_clap = scorer.text_score(real_emb, prompts)

    tr_audio, tr_caps = np.stack([r[0] for r in tr]), [r[1] for r in tr]
    ar_audio, ar_caps = np.stack([r[0] for r in arp]), [r[1] for r in arp]
    vae_dir = work / "mel-vae"
    print("mel VAE " + train_vae("mel-vae-tiny", np.concatenate([tr_audio, ar_audio]), a.vae_budget, vae_dir, rng,
                                 [f"overrides.channels={a.vae_channels}"]), flush=True)
    z = encode(vae_dir, tr_audio)  # the DiTs' normalisation, shared by the tokenizer (as `encode`'s manifest is)
    geo = latent_geometry(read_meta(vae_dir, "vae")["config"])
    stats = {"mean": float(z.mean()), "std": float(z.std(unbiased=False)), "rate": geo["rate"],
             "grid_freq": geo["grid_freq"]}
    t0 = time.process_time()
    tok_info = train_tokenizer(vae_dir, ar_audio, work / "tokens", a, stats)
    figure("tokenizer", f"{tok_info} ({time.process_time() - t0:.0f} CPU s)")
    ar_info = train_ar(vae_dir, work / "tokens", ar_audio, ar_caps, work / "ar", rng, a)
    figure("ar_model", ar_info)

    encoder = AcousticEncoder(work / "ar")
    wanted = sorted(set(tr_caps) | set(prompts))
    t0 = time.perf_counter()
    tables = {"tokens": dict(zip(wanted, encoder.encode(wanted)[1]))}
    if a.with_vae_encoding:
        tables["vae"] = dict(zip(wanted, encoder.encode(wanted, via="vae")[1]))
    print(f"AR predictions for {len(wanted)} distinct captions ({time.perf_counter() - t0:.0f} s)", flush=True)

    last = int(read_config("dit-tiny")["model"]["depth"]) - 1
    rows = {"text (LDM w/ T5)": ((), None),
            "AR only (LDM w/ AG)": (("primary=ar",), "tokens"),
            "text + AR @ first block (CA-DOWN#1)": (("overrides.cross_attn2_blocks=[0]",), "tokens"),
            "text + AR @ first & last (CA-DOWN#1 & CA-UP#1)": ((f"overrides.cross_attn2_blocks=[0,{last}]",), "tokens")}
    if a.with_vae_encoding:
        rows["text + AR via VAE @ first & last (AG_VAE)"] = ((f"overrides.cross_attn2_blocks=[0,{last}]",), "vae")
    results, mats, report = {}, {}, [tok_info, ar_info]
    for name, (sets, via) in rows.items():
        t0 = time.perf_counter()
        folder = work / f"dit-{len(results)}"
        if via and "primary=ar" not in sets:
            sets = ("cond2=ar", *sets)
        info = train_dit("dit-tiny", vae_dir, tr_audio, tr_caps, a.dit_budget, folder, rng, a, sets=sets,
                         ar=(work / "ar", tables[via], via) if via else None)
        emb = scorer.embed(generate(folder, prompts, a))
        pred = scorer.classes(emb)
        r = results[name] = {"fd": safe_fd(emb, real_emb), "kl": kl_paired(real_emb, emb, scorer.protos, a.kl_temp),
                             "clap": scorer.text_score(emb, prompts), "acc": float((pred == truth).mean())}
        mats[f"{name} ({len(prompts)} generated)"] = confusion(truth, pred)
        report.append(f"{name}: {info}; FD {r['fd']:.3f}, KL {r['kl']:.3f}, CLAP {r['clap']:.3f}, class accuracy "
                      f"{r['acc']:.2f} ({time.perf_counter() - t0:.0f} s)")
        print(report[-1], flush=True)

    table = "\n".join(f"  {n:<50} FD {r['fd']:7.3f}  KL {r['kl']:6.3f}  CLAP {r['clap']:6.3f}  acc {r['acc']:.2f}"
                      for n, r in results.items())
    figure("table1", f"{len(prompts)} prompts (held-out captions), {a.seconds:g} s, DDIM {a.steps}, CFG {a.cfg:g}; "
           f"real held-out clips: CLAP {real_clap:.3f}, acc {real_acc:.2f}\n{table}")
    both = {n: r for n, r in results.items() if n.startswith("text + AR @")}
    best = min(both, key=lambda n: both[n]["fd"])
    base = results["text (LDM w/ T5)"]
    figure("best_placement", f"{best}: FD {both[best]['fd']:.3f} vs text only {base['fd']:.3f}, KL "
           f"{both[best]['kl']:.3f} vs {base['kl']:.3f}, class accuracy {both[best]['acc']:.2f} vs {base['acc']:.2f}")
    report.append(f"total {time.perf_counter() - t_start:.0f} s")
    write_report(work / "report.html", report, mats)
    print(f"total {time.perf_counter() - t_start:.0f} s; report: {work / 'report.html'}")
    if a.quick and a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
