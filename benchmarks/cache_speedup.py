"""AudioCache and LiteFocus on the project's own trained DiT: speed vs quality, side by side.

One run measures, on the same prompts and the same seeded noise, interleaved batch by batch
(``soundlake.generation.inference.evaluate``, what ``soundlake evaluate --model`` runs):

* uncached sampling vs AudioCache at each δ (default 0.1-0.4) at the training length:
  wall-time speed-up, layer evaluations cut, FD and CLAP score (and KL, IS in the report);
  plus a "floor" run that reuses every layer except at the first and last step, which
  measures the part of a step caching cannot remove;
* where the calibration profile's change rates land against the paper's Fig. 3 (spread
  across prompts; which blocks are active early, mid-way and late);
* full vs LiteFocus sparse self-attention at 2x, 4x and 8x the training length: self-attention
  time speed-up, wall speed-up, FD vs full attention; and AudioCache (δ = 0.3) with LiteFocus
  together (target >= 3x wall at 4x). On the default mel model (a 2D latent
  grid) LiteFocus is the paper's same-frequency focus + cross-frequency compensation; on a
  1D model (``--vae-config vae-tiny``, the earlier table) the local-window pattern.

Quality is measured against held-out synth clips (the reference set) with a CLAP model and
the synth classes as zero-shot labels. The model: ``--model DIR`` (a DiT folder from
``soundlake train dit``), or, without it, one trained here with the project's trainer on
synth data (see ``train_models``; the VAE: ``--vae-config``, default ``mel-vae-tiny-2d``,
inverted by Griffin-Lim). The CLAP: ``--clap DIR``, or one trained here on synth clips.
Targets: at δ = 0.3 layer evaluations cut >= 2x and wall time >= 2.35x (the paper's 2.35x on
Stable Audio Open) with FD within +3 % and CLAP within 0.01 of uncached; self-attention >= 1.5x faster at 4x the training length and
>= 1.9x at 8x with FD no worse than +10 %.

Run: ``python benchmarks/cache_speedup.py [--model runs/dit] [--clap models/clap] [--prompts 16]``
(``--quick``: a tiny random DiT folder on a 2D mel VAE instead of training one, a CLAP
trained 1 epoch on 8 clips, 2 prompts, 4 steps of --sampler (default DPM++ 3M SDE, the
paper's), δ = 0.3 only).
The figure line "cache_targets" is printed when δ = 0.3 is among ``--deltas`` (it is by default).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from common import figure, init_ray, parse_args

from soundlake.generation.inference.evaluate import (
    EvalPrompt,
    EvalSettings,
    Sampling,
    calibrate_cache,
    evaluate_generation,
    fig3_comparison,
    fig3_text,
    sparse_geometry,
    training_seconds,
)
from soundlake.generation.inference.metrics import (
    ClapFunctions,
    clap_score_audio,
    fd_audio,
)
from soundlake.generation.model_folder import Generator
from soundlake.models.clap.load import load_clap
from soundlake.sources.synth import BASE_CLASSES, synth_clip

SEED = 7
REF0, CAL0 = 300_000, 400_000  # synth index ranges of the reference and calibration sets
FLOOR = 1e9  # a δ no accumulated change reaches: every layer reused except at the first and last step
FIGURES = ("cache_targets", "cache_floor", "cache_fig3", "sparse_litefocus", "sparse_targets")


def synth_prompts(folder: Path, n: int, seconds: float, sr: int) -> list[EvalPrompt]:
    """Held-out synth scenes of the training length, written as WAV references."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = []
    for i in range(REF0, REF0 + n):
        scene, audio = synth_clip(SEED, i, seconds, sr)
        path = folder / f"ref{i}.wav"
        sf.write(path, np.asarray(audio, np.float32).reshape(-1), sr)
        prompts.append(EvalPrompt(scene.caption, path))
    return prompts


def train_clap_on_synth(out: Path, seconds: float, n: int = 1000, epochs: int = 20) -> Path:
    from soundlake.models.clap.inhouse import ClapTrainConfig, train_clap

    cfg = ClapTrainConfig(epochs=epochs, window_s=seconds, batch_size=32)
    scenes = [synth_clip(1, i, seconds, cfg.sample_rate) for i in range(n)]
    train_clap((np.asarray(a, np.float32).reshape(-1) for _, a in scenes), [s.caption for s, _ in scenes], out, cfg)
    return out


def train_models(work: Path, clips: int = 256, vae_steps: int = 400, dit_steps: int = 600,
                 vae_config: str = "mel-vae-tiny-2d", seconds: float = 1.28) -> Path:
    """The project's own pipeline on synth data: synth clips exported as shards, the VAE
    (``vae_config``, half-length crops), its latents, then dit-tiny (12 blocks, ``seconds``
    crops), each on Ray Train / Ray Data like `soundlake train vae|dit` and `encode`."""
    from soundlake.generation.train.encode import encode_shards
    from soundlake.generation.train.specs import load_train_spec
    from soundlake.generation.train.trainer import train
    from soundlake.testing import make_synth_export

    t0 = time.perf_counter()
    init_ray(num_cpus=2, log_to_driver=False)  # or join the test session's Ray (SOUNDLAKE_TEST_RAY_ADDRESS)
    shards = make_synth_export(work / "synth", clips, seconds=seconds, sr=16000, shard_count=4)
    train(load_train_spec("vae", shards=str(shards), out=str(work / "vae"), config=vae_config, steps=vae_steps,
                          batch_size=8, seconds=seconds / 2, sets=["lr=1e-3", f"checkpoint_every={vae_steps}"]))
    encode_shards(str(work / "vae"), str(shards), str(work / "latents"))
    train(load_train_spec("dit", shards=str(work / "latents"), vae=str(work / "vae"), out=str(work / "dit"),
                          steps=dit_steps, batch_size=16, seconds=seconds, sets=[f"checkpoint_every={dit_steps}"]))
    print(f"trained here: {clips} synth clips, VAE {vae_steps} steps, DiT {dit_steps} steps in "
          f"{time.perf_counter() - t0:.0f} s")
    return work / "dit"


def attention_kernels(n: int, geometry, ratio: float, batch: int, heads: int, head_dim: int,
                      reps: int = 5) -> tuple[float, float, float]:
    """(full ms, sparse ms, share of the key pairs the sparse kernel visits) for one
    self-attention call of the model's shape with LiteFocus as ``evaluate`` attaches it (the
    focus pattern on a 2D grid, else the window one with a band of a quarter of ``n``), the
    two timed alternately (median of ``reps``)."""
    import torch.nn.functional as F

    from soundlake.generation.inference.litefocus import FocusAttention, SparseAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g) for _ in range(3))
    if geometry.pattern == "focus":
        sparse = FocusAttention(geometry.freq_bins, ratio)
        visited = sparse.visited_fraction(n)
    else:
        w = n // 4
        sparse = SparseAttention(window=w, ratio=ratio, chunk=max(16, w // 2), min_tokens=w)
        visited = sum(len(c.queries) * len(c.keys) for c in sparse.plan(n)) / n ** 2
    times = {"full": [], "sparse": []}
    for _ in range(reps + 1):  # the first round warms up
        for name, fn in (("full", F.scaled_dot_product_attention), ("sparse", sparse)):
            t0 = time.perf_counter()
            fn(q, k, v)
            times[name].append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times["full"][1:])), 1e3 * float(np.median(times["sparse"][1:])), visited


def pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / abs(b):+.1f}%" if b else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a trained DiT folder (default: train one here)")
    ap.add_argument("--clap", type=Path, help="a CLAP folder (default: train a small in-house one on synth clips)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts for the cache rows")
    ap.add_argument("--sparse-prompts", type=int, default=8, help="prompts for the sparse-attention rows")
    ap.add_argument("--calibrate", type=int, default=8, help="calibration prompts")
    ap.add_argument("--steps", type=int, default=100, help="sampler steps of the cache rows")
    ap.add_argument("--sparse-steps", type=int, default=25, help="sampler steps of the sparse-attention rows (at 8x "
                    "the training length a step costs ~30x one at the training length)")
    ap.add_argument("--sampler", default="dpmpp_3m_sde", help="the sampler of the cache rows (AudioCache's "
                    "paper: DPM++ 3M SDE, 100 steps); ddim | euler | dpmpp_2m | dpmpp_3m_sde | heun")
    ap.add_argument("--deltas", default="0.1,0.2,0.3,0.4")
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sparse-batch-size", type=int, default=2,
                    help="prompts per call at 4x length (small: several batches interleave full and sparse)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other load)")
    ap.add_argument("--work", type=Path, help="folder for models, references and reports (default: a temp dir)")
    ap.add_argument("--train-clips", type=int, default=256, help="without --model: synth clips to train on")
    ap.add_argument("--vae-steps", type=int, default=400, help="without --model")
    ap.add_argument("--dit-steps", type=int, default=600, help="without --model")
    ap.add_argument("--clap-clips", type=int, default=1000, help="without --clap: synth clips to train a CLAP on")
    ap.add_argument("--clap-epochs", type=int, default=20, help="without --clap")
    ap.add_argument("--vae-config", default="mel-vae-tiny-2d", help="without --model: the VAE (mel-vae-tiny-2d: "
                    "a 2D mel grid, LiteFocus's same-frequency focus; vae-tiny: the waveform VAE, 1D latents)")
    ap.add_argument("--seconds", type=float, default=1.28, help="without --model: the DiT's training crop "
                    "(1.28 s: 32 latent frames x 8 frequency rows on mel-vae-tiny-2d)")
    args = parse_args(ap, dict(prompts=2, sparse_prompts=2, calibrate=2, steps=4, sparse_steps=4, deltas="0.3",
                               batch_size=2,
                               sparse_batch_size=2, clap_clips=8,
                               clap_epochs=1))
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="cache_speedup_"))
    work.mkdir(parents=True, exist_ok=True)

    if args.model is None and args.quick:
        # A smoke test of the measuring code: training a DiT on Ray Train costs a minute here,
        # and a random one exercises every sampling path just the same.
        from soundlake.testing import make_tiny_generator

        args.model = make_tiny_generator(work / "dit", depth=4, hidden=32, train_seconds=0.64, vae="mel2d")
    model = args.model or train_models(work, args.train_clips, args.vae_steps, args.dit_steps, args.vae_config,
                                       args.seconds)
    gen = Generator.load(model)
    T = training_seconds(gen) or 10.0
    t0 = time.perf_counter()
    clap_dir = args.clap or train_clap_on_synth(work / "clap", T, args.clap_clips, args.clap_epochs)
    clap_s = time.perf_counter() - t0 if args.clap is None else 0.0
    labels = [c.replace("_", " ") for c in BASE_CLASSES]
    clap = ClapFunctions.of(load_clap(str(clap_dir)), labels)
    prompts = synth_prompts(work / "refs", max(args.prompts, args.sparse_prompts), T, clap.sample_rate)
    sampling = Sampling(steps=args.steps, sampler=args.sampler, batch_size=args.batch_size)

    t0 = time.perf_counter()
    cal = [synth_clip(SEED, i, T, 8000)[0].caption for i in range(CAL0, CAL0 + args.calibrate)]
    profile = calibrate_cache(gen, cal, sampling, T)
    cal_s = time.perf_counter() - t0
    deltas = [float(d) for d in args.deltas.split(",")]
    label_set = ("synth classes", labels)
    rep = evaluate_generation(gen, prompts[:args.prompts], sampling, EvalSettings(deltas + [FLOOR], T), clap,
                              label_set, profile, profile_source=f"calibrated here on {len(cal)} synth prompts")
    rep.write(work / "report-cache")
    sparse = evaluate_generation(gen, prompts[:args.sparse_prompts],
                                 Sampling(steps=args.sparse_steps, sampler=args.sampler,
                                          batch_size=args.sparse_batch_size),
                                 EvalSettings([], 4 * T, sparse_ratio=args.ratio, durations=[2 * T, 4 * T, 8 * T],
                                              sparse_with_delta=0.3), clap, label_set, profile)
    sparse.write(work / "report-sparse")
    (work / "results.json").write_text(json.dumps({"cache": rep.to_dict(), "sparse": sparse.to_dict()},
                                                  indent=2, default=str))

    m = rep.meta
    print(f"model {model}: {m['blocks']} blocks, trained {m['model_step']} steps on {T:g} s crops · "
          f"{m['prompts']} prompts of {T:g} s · {args.sampler} {args.steps} steps, CFG {sampling.cfg} · "
          f"torch {args.threads} thread(s)")
    print(f"reference: {m['prompts']} held-out synth clips · CLAP {clap_dir} "
          f"({'trained here in %.0f s' % clap_s if clap_s else 'given'}) at {clap.sample_rate} Hz · "
          f"calibration: {len(cal)} prompts in {cal_s:.0f} s")
    rows = {r["setting"]: r for r in rep.rows}
    base = rows["uncached"]
    refs = [sf.read(p.reference, dtype="float32")[0] for p in prompts[:args.prompts]]
    caps = [p.caption for p in prompts[:args.prompts]]
    with torch.no_grad():  # the VAE's own ceiling: references encoded and decoded
        recon = gen.decode(gen.vae.encode(torch.from_numpy(np.stack(refs))[:, None]).mode())
    ref_clap = clap_score_audio(refs, caps, clap.embed_audio, clap.embed_text, clap.sample_rate).value
    rec_clap = clap_score_audio(list(recon), caps, clap.embed_audio, clap.embed_text, clap.sample_rate).value
    rec_fd = fd_audio(list(recon), refs, clap.embed_audio, clap.sample_rate).value
    print(f"scale: CLAP score of the references with their own captions {ref_clap:.3f}; the VAE's reconstructions "
          f"of them: CLAP {rec_clap:.3f}, FD {rec_fd:.3f} vs the references")
    print(f"{'setting':<10} {'speed-up':>8} {'layer evals':>12} {'FD':>18} {'CLAP':>17} {'drift':>7} {'FD vs exact':>11}")
    for r in rep.rows:
        name = "floor" if r["delta"] == FLOOR else r["setting"]
        fd = f"{r['fd']:.3f}" + ("" if r is base else f" ({pct(r['fd'], base['fd'])})")
        cs = f"{r['clap']:.3f}" + ("" if r is base else f" ({r['clap'] - base['clap']:+.3f})")
        print(f"{name:<10} {r['speedup']:>7.2f}x {r['layer_cut']:>11.2f}x {fd:>18} {cs:>17} "
              f"{100 * r['latent_drift']:>6.1f}% {r['fd_exact']:>11.3f}")
    figure("cache_fig3", f"{args.sampler} {args.steps} steps, {len(cal)} prompts, {m['blocks']} blocks: "
           + fig3_text(fig3_comparison(profile)).removeprefix("Fig. 3: "))
    sp_meta = sparse.meta["sparse"]
    by_len = {}
    for r in sparse.rows:  # per duration: full, litefocus, and AudioCache δ=0.3 + litefocus ("both")
        kind = "full" if not r["ratio"] else ("both" if r["delta"] is not None else "lite")
        by_len.setdefault(r["seconds"], {})[kind] = r
    setup = (f"same-frequency focus on {sp_meta['freq_bins']} frequency rows" if sp_meta["pattern"] == "focus" else
             f"local band {sp_meta['window_frames']} tokens")
    figure("sparse_litefocus", f"litefocus r={args.ratio:g}, {setup}, every block: " + " · ".join(
        f"{sec / T:g}x training ({sec:g} s, {d['lite']['frames']} tokens): attention "
        f"{d['lite']['attention_speedup']:.2f}x, wall {d['lite']['speedup']:.2f}x, FD {d['lite']['fd']:.3f} vs full "
        f"{d['full']['fd']:.3f} ({pct(d['lite']['fd'], d['full']['fd'])}), CLAP {d['lite']['clap']:.3f} vs "
        f"{d['full']['clap']:.3f}, drift {100 * d['lite']['latent_drift']:.1f}%; with AudioCache δ=0.3 too: wall "
        f"{d['both']['speedup']:.2f}x, FD {pct(d['both']['fd'], d['full']['fd'])}, CLAP "
        f"{d['both']['clap'] - d['full']['clap']:+.3f}" for sec, d in sorted(by_len.items())))

    # what limits the speed-ups: the part of a run caching cannot remove; attention's share
    # and how its kernels scale with length
    floor = rows[f"δ={FLOOR:g}"]
    q = floor["layer_computed"] / floor["layer_total"]
    f = max(0.0, (1 / floor["speedup"] - q) / (1 - q))  # wall = f + (1 - f) * computed fraction
    figure("cache_floor", f"limits: with every layer reused but the first and last step (floor) the run is "
           f"{floor['speedup']:.2f}x faster, so {100 * f:.0f}% of the wall time is outside the cached layers (norms, "
           f"modulation, skips, embeddings, VAE decode, text encoder)")
    cfg = gen.dit.cfg
    rows_b = min(args.sparse_prompts, args.sparse_batch_size) * 2  # CFG doubles the batch
    geometry = sparse_geometry(gen, EvalSettings([], T))
    full4 = by_len[4 * T]["full"]
    print(f"self-attention is {100 * full4['attention_s'] / full4['wall_s']:.0f}% of the full-attention wall time "
          f"at {4 * T:g} s")
    for mult in (4, 8):
        n = gen.frames(mult * T)
        full_ms, sparse_ms, visited = attention_kernels(n, geometry, args.ratio, rows_b, cfg.heads,
                                                        cfg.hidden // cfg.heads)
        print(f"attention kernel, {mult}x training ({n} tokens), batch {rows_b}: full {full_ms:.1f} ms, "
              f"{geometry.pattern} {sparse_ms:.1f} ms ({full_ms / sparse_ms:.2f}x), visiting at most "
              f"{100 * visited:.0f}% of the key pairs")
    t = rows.get("δ=0.3")
    if t is not None:
        best = 1 / (f + (1 - f) / t["layer_cut"])
        checks = [("layer evals", t["layer_cut"] >= 2, f"{t['layer_cut']:.2f}x", ">= 2x"),
                  ("wall", t["speedup"] >= 2.35, f"{t['speedup']:.2f}x (floor model: {best:.2f}x)", ">= 2.35x"),
                  ("FD", t["fd"] <= 1.03 * base["fd"], pct(t["fd"], base["fd"]), "<= +3%"),
                  ("CLAP", abs(t["clap"] - base["clap"]) <= 0.01, f"{t['clap'] - base['clap']:+.3f}", "within 0.01")]
        figure("cache_targets", "targets δ=0.3: " + " · ".join(f"{n} {v} ({goal}: {'met' if ok else 'MISSED'})"
                                                               for n, ok, v, goal in checks))
    sp = []
    for mult, goal in ((4, 1.5), (8, 1.9)):
        d = by_len[mult * T]
        sp += [(f"{mult}x attention", d["lite"]["attention_speedup"] >= goal, f"{d['lite']['attention_speedup']:.2f}x",
                f">= {goal}x"),
               (f"{mult}x FD", d["lite"]["fd"] <= 1.10 * d["full"]["fd"], pct(d["lite"]["fd"], d["full"]["fd"]),
                "<= +10%")]
    both = by_len[4 * T]["both"]
    sp.append(("4x cache+sparse wall", both["speedup"] >= 3.0, f"{both['speedup']:.2f}x", ">= 3x"))
    figure("sparse_targets", "targets sparse: " + " · ".join(f"{n} {v} ({goal}: {'met' if ok else 'MISSED'})"
                                                            for n, ok, v, goal in sp))
    if args.quick and args.work is None:  # a smoke test's models and reports are not worth keeping
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"reports: {work / 'report-cache' / 'report.html'}, {work / 'report-sparse' / 'report.html'}")


if __name__ == "__main__":
    main()
