"""Generator commands: `train vae`, `train vocoder`, `train dit`, `encode` and `generate`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from soundlake.cli.main import MODELS, VERBOSE, app, as_user_error, console, train_app
from soundlake.core.errors import UserError

SPEC_HELP = "YAML train spec (settings and phases); options and --set override it."
SET_HELP = "Override a spec key: key=value, e.g. --set lr=1e-4 --set overrides.depth=6. Repeatable."


def run_training(kind: str, spec_file: Optional[Path], sets: List[str], **given) -> None:
    """`train vae` / `train dit`: load the spec, train on Ray Train with a progress bar, print a summary."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from soundlake.generation.train.specs import load_train_spec
    from soundlake.generation.train.trainer import train

    spec = load_train_spec(kind, str(spec_file) if spec_file else None, sets, **given)
    if spec.eval_sets:   # refuse now, before Ray starts (train() checks again for API callers)
        from soundlake.generation.train.leakage import check_eval_sets

        for phase in spec.phases:
            problems = check_eval_sets(phase.shards, spec.eval_sets, spec.allow_leakage)["problems"]
            console.print(f"[yellow]--allow-leakage[/]: {'; '.join(problems)} (recorded in the model folder)"
                          if problems else f"eval sets {', '.join(spec.eval_sets)}: no leakage in {phase.shards}",
                          highlight=False)
    what = {"dit": None, "ar": "codes"}.get(kind, "recon")
    phases = " → ".join(f"{s.name} ({what or s.mode}, {s.steps} steps, {s.shards}"
                        + (f" split {s.split}" if s.split != "train" else "") + ")"
                        for s in spec.phases)
    console.print(f"train {kind} · config {spec.config} · {spec.workers} worker(s) × batch {spec.batch_size} · "
                  f"{spec.seconds:g} s crops · phases: {phases} · out {spec.out}", highlight=False)
    progress = Progress(TextColumn(f"[bold]train {kind}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
    task = progress.add_task(kind, total=spec.total_steps, info="starting Ray Train…")

    def on_progress(p):
        loss = f"loss {p['loss']:.4f}" if p.get("loss") is not None else ""
        progress.update(task, completed=p["step"],
                        info=f"{p['phase']} · {loss} · {p['samples_per_s']:.1f} samples/s")
    with progress:
        s = train(spec, on_progress)
    t = Table(title=f"train {kind} done", show_header=False, title_justify="left")
    t.add_row("steps", f"{s.steps}" + (f" (resumed at {s.resumed_from})" if s.resumed_from else ""))
    t.add_row("speed", f"{s.samples_per_s:.1f} samples/s over {s.elapsed_s:.1f} s (+ {s.ray_startup_s:.1f} s Ray start-up)")
    if s.final_loss is not None:
        t.add_row("final loss", f"{s.final_loss:.4f} (last log row; the curve: {s.out}/train_log.csv)")
    t.add_row("model", s.out)
    t.add_row("checkpoint", s.checkpoint)
    t.add_row("next", {"vae": f"soundlake encode --vae {s.out} --shards <export> --out <latents>",
                       "vocoder": f"soundlake train dit --vae <mel VAE> --vocoder {s.out} --shards <latents> ...",
                       "ar": f"soundlake ar-encode --ar {s.out} --shards <latents> --out <encodings>"}.get(
        kind, f"soundlake generate --model {s.out} \"a high beep repeats\" --out beep.wav"))
    console.print(t)


# Options shared by `train vae` and `train dit` (None: the spec's value).
RUN_OUT = typer.Option(None, "--out", "-o", help="Run folder: checkpoints, log and the model.")
BATCH_SIZE = typer.Option(None, help="Clips per step per worker.")
SECONDS = typer.Option(None, help="Crop length in seconds.")
WORKERS = typer.Option(None, help="Ray Train workers (DDP); 0 runs the loop in this process "
                       "(Ray Train's local mode: no worker start-up, for debugging and small runs).")
GPU = typer.Option(None, "--gpu/--cpu", help="One GPU per worker.")
ADDRESS = typer.Option(None, help="Join a running Ray cluster (e.g. auto or ray://host:10001; default: "
                       "RAY_ADDRESS, else a local Ray).")
LR = typer.Option(None, help="Peak learning rate.")
STEPS = typer.Option(None, help="Optimisation steps.")
AUDIO_SHARDS = typer.Option(None, help="Export folder (or URI) with audio shards.")
EVAL_SETS = typer.Option(None, "--eval-sets", help="Comma-separated eval set names (soundlake eval-sets list): refuse "
                         "shards whose export leaks into them or did not check them.")
ALLOW_LEAKAGE = typer.Option(False, "--allow-leakage", help="Train on such shards anyway; recorded in the model "
                             "folder's metadata (eval_sets).")


def eval_set_names(text: Optional[str]) -> Optional[list]:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


@train_app.command("vae")
def train_vae_cmd(
    shards: Optional[str] = AUDIO_SHARDS,
    out: Optional[str] = RUN_OUT,
    config: Optional[str] = typer.Option(None, help="Model config: vae-tiny (CPU, default), vae-ezaudio; the mel "
                                         "path: mel-vae-tiny, mel-vae-tiny-2d (CPU), mel-vae (GenAu sizes); or a YAML."),
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = BATCH_SIZE, seconds: Optional[float] = SECONDS, lr: Optional[float] = LR,
    workers: Optional[int] = WORKERS, gpu: Optional[bool] = GPU, address: Optional[str] = ADDRESS,
    eval_sets: Optional[str] = EVAL_SETS, allow_leakage: bool = ALLOW_LEAKAGE,
    spec: Optional[Path] = typer.Option(None, help=SPEC_HELP),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    verbose: bool = VERBOSE,
):
    """Train a VAE on Ray Train from exported audio shards: the waveform VAE, or the mel VAE
    (a mel-vae config: log-mel in, 1D or 2D latents out).

    Writes checkpoints, train_log.csv and the model folder to --out; resumes from the newest
    checkpoint there."""
    run_training("vae", spec, set_, shards=shards, out=out, config=config, steps=steps, batch_size=batch_size,
                 seconds=seconds, lr=lr, workers=workers, use_gpu=gpu, ray_address=address,
                 eval_sets=eval_set_names(eval_sets), allow_leakage=allow_leakage or None)


@train_app.command("dit")
def train_dit_cmd(
    shards: Optional[str] = typer.Option(None, help="Latent shards written by `soundlake encode`."),
    vae: Optional[str] = typer.Option(None, help="The VAE folder that encoded them."),
    out: Optional[str] = RUN_OUT,
    config: Optional[str] = typer.Option(None, help="Model config: dit-tiny (CPU, default), dit-L, dit-XL, or a YAML."),
    steps: Optional[int] = typer.Option(None, help="Optimisation steps (one text-conditioned phase)."),
    batch_size: Optional[int] = BATCH_SIZE, seconds: Optional[float] = SECONDS, lr: Optional[float] = LR,
    text_encoder: Optional[str] = typer.Option(None, help="transformers encoder folder (e.g. FLAN-T5); default MiniLM."),
    init: Optional[str] = typer.Option(None, help="Start from this DiT folder's weights (weights only)."),
    vocoder: Optional[str] = typer.Option(None, help="Mel VAEs: a vocoder folder (soundlake train vocoder) to copy "
                                          "into the model folder; generate then uses it instead of Griffin-Lim."),
    ar_encodings: Optional[str] = typer.Option(None, help="DC-LDM: the AR model's predictions (soundlake ar-encode) "
                                               "as a second condition stream; implies --cond2 ar."),
    cond2: Optional[str] = typer.Option(None, help="DC-LDM second stream: ar (the AR model's prediction from the "
                                        "caption) or latents (the clip's own latents: a reference-clip extension)."),
    workers: Optional[int] = WORKERS, gpu: Optional[bool] = GPU, address: Optional[str] = ADDRESS,
    eval_sets: Optional[str] = EVAL_SETS, allow_leakage: bool = ALLOW_LEAKAGE,
    spec: Optional[Path] = typer.Option(None, help=SPEC_HELP + " Phases: masked pretraining, text, fine-tuning."),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    verbose: bool = VERBOSE,
):
    """Train the EzAudio-style DiT on VAE latent shards on Ray Train (v-prediction, condition dropout for CFG).

    Writes checkpoints, train_log.csv and the model folder to --out; resumes from the newest
    checkpoint there. The model folder holds its VAE, so `soundlake generate --model OUT` needs
    nothing else."""
    run_training("dit", spec, set_, shards=shards, vae=vae, out=out, config=config, steps=steps,
                 batch_size=batch_size, seconds=seconds, lr=lr, text_encoder=text_encoder, init=init, vocoder=vocoder,
                 ar_encodings=ar_encodings, cond2=cond2, workers=workers, use_gpu=gpu, ray_address=address,
                 eval_sets=eval_set_names(eval_sets), allow_leakage=allow_leakage or None)


@train_app.command("vocoder")
def train_vocoder_cmd(
    shards: Optional[str] = AUDIO_SHARDS,
    config: Optional[str] = typer.Option(None, help="Model config: vocoder-tiny (CPU, default), vocoder (Vocos "
                                         "sizes), or a YAML."),
    vae: Optional[str] = typer.Option(None, help="A mel VAE folder whose log-mel front end the vocoder reads "
                                      "(default: the config's, which the bundled mel-vae configs share)."),
    out: Optional[str] = RUN_OUT,
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = BATCH_SIZE, seconds: Optional[float] = SECONDS, lr: Optional[float] = LR,
    workers: Optional[int] = WORKERS, gpu: Optional[bool] = GPU, address: Optional[str] = ADDRESS,
    spec: Optional[Path] = typer.Option(None, help=SPEC_HELP),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    verbose: bool = VERBOSE,
):
    """Train the Vocos-style vocoder (log-mel -> waveform) of the mel path on Ray Train.

    Optional: without one, generate inverts a mel VAE's log-mels with Griffin-Lim. Copy it into
    a DiT's folder with `soundlake train dit --vocoder OUT`."""
    run_training("vocoder", spec, set_, shards=shards, out=out, vae=vae, config=config, steps=steps,
                 batch_size=batch_size, seconds=seconds, lr=lr, workers=workers, use_gpu=gpu, ray_address=address)


@app.command(rich_help_panel=MODELS)
def encode(
    vae: str = typer.Option(..., help="Trained VAE folder (soundlake train vae)."),
    shards: str = typer.Option(..., help="Export folder (or URI) with audio shards."),
    out: str = typer.Option(..., "--out", "-o", help="Folder (or URI) for the latent shards."),
    split: Optional[str] = typer.Option(None, help="Only this split (default: all)."),
    batch_size: int = typer.Option(16, help="Clips per VAE call."),
    concurrency: int = typer.Option(1, help="VAE actors."),
    num_gpus: float = typer.Option(0.0, help="GPUs per actor."),
    keep_audio: bool = typer.Option(False, help="Keep each sample's FLAC beside its latents."),
    num_cpus: Optional[int] = typer.Option(None, help="Local Ray: CPUs to use."),
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster."),
    verbose: bool = VERBOSE,
):
    """Pre-encode audio shards into VAE latent shards with Ray Data, for `soundlake train dit`.

    Writes one latent shard per audio shard and a manifest.json (with the latents' mean and std)
    to --out. Resumable: finished shards are kept; exits 1 when a shard failed (re-run to retry)."""
    from rich.progress import Progress

    from soundlake.core.ray_env import RaySpec, init_ray
    from soundlake.generation.train.encode import encode_shards

    init_ray(RaySpec(address=address, num_cpus=num_cpus))
    with Progress(console=console) as progress:
        task = progress.add_task("encode", total=None)

        def on_shard(row, done, total):
            progress.update(task, completed=done, total=total)
            if row["error"]:
                progress.console.print(f"[red]failed[/] {row['name']}: {row['error']}", highlight=False)
        r = encode_shards(vae, shards, out, split=split, batch_size=batch_size, concurrency=concurrency,
                          num_gpus=num_gpus, keep_audio=keep_audio, on_shard=on_shard)
    console.print(f"encoded {r.written} shards ({r.kept} already done) · {r.samples} samples · latent mean "
                  f"{r.mean:.4f} std {r.std:.4f} · {r.elapsed_s:.1f} s · {r.out}/manifest.json", highlight=False)
    if r.failed:
        console.print("[red]failed shards[/] (re-run to retry): " + "; ".join(r.failed), highlight=False)
        raise typer.Exit(1)


def audio_cache(gen, model: str, sampler: str, steps: int, delta: float, max_reuse: int | None):
    """AudioCache on ``gen``'s DiT with the calibration profile saved beside the model."""
    from soundlake.generation.inference.audiocache import AudioCache
    from soundlake.generation.inference.evaluate import Sampling, load_profile

    profile = load_profile(gen, Sampling(steps=steps, sampler=sampler))
    if profile is None:
        raise UserError(f"--cache-delta needs a calibration profile of this model for --sampler {sampler} and "
                        f"--steps {steps}: run `soundlake calibrate-cache --model {model} --prompts PROMPTS.txt "
                        f"--sampler {sampler} --steps {steps}` first")
    return AudioCache(gen.dit, profile, delta=delta, max_reuse=max_reuse, sampler=sampler)


@app.command(rich_help_panel=MODELS)
def generate(
    prompts: List[str] = typer.Argument(..., help="One or more text prompts."),
    model: str = typer.Option(..., help="Trained DiT folder (soundlake train dit)."),
    out: Path = typer.Option(Path("generated.wav"), "--out", "-o", help="WAV path (NAME-<i>.wav for several prompts); "
                             "a .json sidecar records every setting."),
    seconds: float = typer.Option(10.0, help="Length of the audio."),
    steps: int = typer.Option(100, help="Sampler steps."),
    sampler: str = typer.Option("ddim", help="ddim | euler | dpmpp_2m | dpmpp_3m_sde | heun"),
    cfg: float = typer.Option(5.0, help="Classifier-free guidance scale (1 = off)."),
    rescale: float = typer.Option(0.75, help="CFG rescale φ (0 = off)."),
    rescale_axis: str = typer.Option("all", help="Std axis of the rescale: all (EzAudio) | time (stable-audio-tools)."),
    seed: int = typer.Option(0),
    sparse_attention: str = typer.Option("none", help="none | litefocus (sparse self-attention for long audio)."),
    ratio: float = typer.Option(0.1, help="litefocus: the fraction r of all keys drawn once per attention call "
                                "that every query also attends to (cross-frequency compensation)."),
    window: Optional[int] = typer.Option(None, help="litefocus on 1D latents (no frequency rows): local band in "
                                         "tokens (default: the training crop's)."),
    exact_short: bool = typer.Option(False, "--exact-short", help="litefocus on a 2D latent grid: exact attention "
                                     "up to the training length (the paper sparsifies at every length)."),
    reference: Optional[Path] = typer.Option(None, help="Extension: a reference clip's latents as the second "
                                             "condition stream (a DiT trained with cond2: latents, or instead of "
                                             "the AR prediction of a cond2: ar one)."),
    source: Optional[str] = typer.Option(None, help="Dataset-ID: generate in the style of this source "
                                         "(audioset, vggsound, freesound, synth, local...: the model's "
                                         "vocabulary); default unknown."),
    griffin_lim: bool = typer.Option(False, "--griffin-lim", help="Mel VAEs: invert the log-mel with Griffin-Lim "
                                     "even when the model folder has a vocoder."),
    cache_delta: float = typer.Option(0.0, help="AudioCache threshold δ (0 = off; the paper uses 0.3): reuse a "
                                      "layer's output until its accumulated change reaches δ. Needs the profile "
                                      "`soundlake calibrate-cache` saves beside the model for this --sampler and --steps."),
    max_reuse: Optional[int] = typer.Option(None, help="AudioCache: recompute a layer after this many reuses in a "
                                            "row (a soundlake extension, not in the paper; off by default)."),
):
    """Generate audio from text with a trained DiT and its VAE.

    Writes one WAV per prompt to --out, each with a .json sidecar of every setting (model,
    sampler, seed, sparse attention...)."""
    from contextlib import nullcontext

    from rich.progress import Progress

    from soundlake.core.audio import read_mono
    from soundlake.generation.model_folder import Generator, write_audio

    if sparse_attention not in ("none", "litefocus"):
        raise UserError(f"--sparse-attention {sparse_attention!r}: expected none or litefocus")
    if cache_delta < 0 or (max_reuse is not None and max_reuse < 0):
        raise UserError("--cache-delta and --max-reuse must be >= 0")
    with as_user_error(ValueError):
        gen = Generator.load(model, griffin_lim=griffin_lim)
        cache = audio_cache(gen, model, sampler, steps, cache_delta, max_reuse) if cache_delta > 0 else None
        ref = None if reference is None else read_mono(reference, gen.sample_rate)
        ctx, geometry = nullcontext(), None
        if sparse_attention == "litefocus":
            from soundlake.generation.inference.evaluate import attach_litefocus, litefocus_geometry

            geometry = litefocus_geometry(gen, window, None, seconds, exact_short)
            ctx = attach_litefocus(gen, geometry, ratio, seed)
        with Progress(console=console) as progress, ctx, cache or nullcontext(), \
                cache.run(steps) if cache else nullcontext():
            task = progress.add_task("sampling", total=steps)
            res = gen.generate(prompts, seconds=seconds, steps=steps, sampler=sampler, cfg=cfg, rescale=rescale,
                               rescale_axis=rescale_axis, seed=seed, reference=ref, source=source,
                               callback=lambda i, t, x: progress.update(task, completed=i + 1))
        if geometry is not None:
            res.meta |= {"sparse_attention": "litefocus", "ratio": ratio, **geometry._asdict()}
        if cache is not None:
            res.meta["audiocache"] = {"delta": cache_delta, "max_reuse": max_reuse, **cache.stats()}
        paths = write_audio(res, out)
    for p in paths:
        inverted = f"; log-mel inverted by {gen.inversion}" if gen.inversion else ""
        console.print(f"wrote {p} ({seconds:g} s at {res.sample_rate} Hz{inverted}; settings in {p.name}.json)",
                      highlight=False)
