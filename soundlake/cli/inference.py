"""Cached-inference commands: `calibrate-cache`, and `evaluate` run without a subcommand.

The logic lives in :mod:`soundlake.generation.inference.evaluate`; here: options, progress and tables.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from soundlake.cli.main import (
    EVALUATE,
    app,
    as_user_error,
    console,
    evaluate_app,
    stdout,
)
from soundlake.core.errors import UserError

SAMPLING_HELP = {"steps": "Sampler steps (a profile is per sampler and step count).",
                 "sampler": "ddim | euler | dpmpp_2m | dpmpp_3m_sde | heun.", "cfg": "Classifier-free guidance scale.",
                 "rescale": "CFG rescale phi.", "rescale_axis": "CFG rescale std axis: all | time.",
                 "seconds": "Clip length in seconds (default: the model's training length, else 10).",
                 "device": "cpu, cuda, cuda:1 ..."}


def floats(text: str, option: str) -> list[float]:
    """A comma-separated option value as numbers, or a one-line error naming the option."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated numbers like 0,0.1,0.2") from None


def sampling_args(steps: int, sampler: str, cfg: float, rescale: float, rescale_axis: str, seed: int,
                  batch_size: int = 8):
    """The sampling options, checked, as an evaluate.Sampling."""
    from soundlake.generation.diffusion import RESCALE_AXES, SAMPLERS
    from soundlake.generation.inference.evaluate import Sampling

    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if rescale_axis not in RESCALE_AXES:
        raise UserError(f"--rescale-axis {rescale_axis!r}: expected one of {', '.join(RESCALE_AXES)}")
    return Sampling(steps=steps, sampler=sampler, cfg=cfg, rescale=rescale, rescale_axis=rescale_axis,
                    seed=seed, batch_size=batch_size)


def steps_progress(quiet: bool):
    """A progress bar counting model steps (on stderr)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("model steps"), TimeRemainingColumn(), console=console, disable=quiet)


@app.command("calibrate-cache", rich_help_panel=EVALUATE)
def calibrate_cache_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="A trained DiT folder (soundlake train dit)."),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="Calibration captions: a text file (one per line) "
                                 "or a .jsonl with \"caption\"."),
    steps: int = typer.Option(100, min=1, help=SAMPLING_HELP["steps"]),
    sampler: str = typer.Option("ddim", help=SAMPLING_HELP["sampler"]),
    cfg: float = typer.Option(5.0, help=SAMPLING_HELP["cfg"]),
    rescale: float = typer.Option(0.75, help=SAMPLING_HELP["rescale"]),
    rescale_axis: str = typer.Option("all", help=SAMPLING_HELP["rescale_axis"]),
    seconds: Optional[float] = typer.Option(None, min=0.01, help=SAMPLING_HELP["seconds"]),
    limit: Optional[int] = typer.Option(None, min=1, help="Calibrate on at most this many prompts."),
    seed: int = typer.Option(0, help="Noise seed of the first prompt (prompt i uses seed + i)."),
    plot: Optional[Path] = typer.Option(None, help="PNG of the change-rate curves (default: beside the profile)."),
    device: str = typer.Option("cpu", help=SAMPLING_HELP["device"]),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Measure each DiT layer's change rate per sampling step, for AudioCache.

    Samples the prompts once (AudioCache Eq. 1), saves the profile beside the model
    (audiocache_<sampler>_<steps>.json) with a PNG of the curves, and prints a summary with the
    planned cut per threshold. `soundlake evaluate --model` (and cached generation) use that
    profile: a layer is recomputed once its accumulated change reaches delta."""
    import time

    from soundlake.generation.inference.audiocache import profile_path
    from soundlake.generation.inference.evaluate import (
        calibrate_cache,
        change_rate_png,
        fig3_comparison,
        fig3_text,
        planned_fraction,
        profile_summary,
        read_prompts,
        training_seconds,
    )
    from soundlake.generation.model_folder import Generator

    sampling = sampling_args(steps, sampler, cfg, rescale, rescale_axis, seed)
    captions = [p.caption for p in read_prompts(prompts)][:limit]
    gen = Generator.load(model, device=device)
    seconds = seconds or training_seconds(gen) or 10.0
    t0 = time.perf_counter()
    with steps_progress(quiet) as progress:
        task = progress.add_task("calibrating", total=len(captions) * steps)
        prof = calibrate_cache(gen, captions, sampling, seconds, lambda n, _: progress.advance(task, n))
    elapsed = time.perf_counter() - t0
    path = profile_path(model, sampler, steps)
    plot = plot or path.with_suffix(".png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot.write_bytes(change_rate_png(prof))
    summ = profile_summary(prof)
    t = Table(title=f"AudioCache profile · {model}", show_header=False, title_justify="left")
    t.add_row("calibrated", f"{summ['layers']} layers ({summ['blocks']} blocks × self_attn, cross_attn, ff) · "
              f"{steps} {sampler} steps · {len(captions)} prompts of {seconds:g} s · {elapsed:.0f} s")
    for kind, rate in summ["mean_rate"].items():
        t.add_row(f"{kind}", f"mean change {rate:.4f} per step (max {summ['max_rate'][kind]:.4f}), "
                  f"{summ['total_change'][kind]:.2f} over the run")
    t.add_row("Fig. 3", fig3_text(fig3_comparison(prof)).removeprefix("Fig. 3: "))
    t.add_row("planned cut", " · ".join(f"δ={d:g}: {1 / planned_fraction(prof, prof.steps, d):.2f}x"
                                        for d in (0.1, 0.2, 0.3, 0.4)) + " fewer layer evaluations")
    t.add_row("profile", str(path))
    t.add_row("plot", str(plot))
    t.add_row("next", f"soundlake evaluate --model {model} --prompts {prompts} --steps {steps} "
              f"--cache-delta 0,0.1,0.2,0.3,0.4 --clap CLAP --out reports/cache")
    stdout.print(t)


EVALUATE_HELP = (
    "Measure quality and speed: of generation (run without a subcommand), or of captions "
    "(`soundlake evaluate captions`).\n\n"
    "Without a subcommand (`soundlake evaluate --model runs/dit --prompts eval.jsonl --clap CLAP`): generate "
    "the prompt set uncached, with AudioCache at each --cache-delta, and with full vs --sparse-attention at "
    "each of --durations; measure wall time, layer evaluations, FD, KL, IS and CLAP score; write a report "
    "(report.md, report.html with plots, report.json) to --out and print its table.")


def paper_extractors(panns: Optional[Path], vggish: Optional[Path], pca: Optional[Path], device: str):
    """`--panns` / `--vggish` as the evaluation's PaperExtractors (weights from paths, never downloaded)."""
    from soundlake.generation.inference.evaluate import PaperExtractors

    if pca is not None and vggish is None:
        raise UserError("--vggish-pca needs --vggish WEIGHTS")
    ex = PaperExtractors()
    if panns is not None:
        from soundlake.models.extractors.panns import PannsMetrics

        ex.panns = PannsMetrics.load(panns, device)
    if vggish is not None:
        from soundlake.models.extractors.vggish import VggishMetrics

        ex.vggish = VggishMetrics.load(vggish, pca, device)
    return ex


@evaluate_app.callback(invoke_without_command=True, no_args_is_help=True, help=EVALUATE_HELP)
def evaluate_generation_cmd(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A trained DiT folder (soundlake train dit)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", "-p", help="A .jsonl ({\"caption\": ..., "
                                           "\"audio\": reference clip, optional}) or a text file of captions."),
    steps: int = typer.Option(100, min=1, help=SAMPLING_HELP["steps"]),
    cache_delta: str = typer.Option("0,0.1,0.2,0.3,0.4", help="AudioCache thresholds to run (comma-separated; "
                                    "'' for none). The uncached run is always made."),
    sparse_attention: Optional[str] = typer.Option(None, help="litefocus: add full vs sparse self-attention rows."),
    ratio: float = typer.Option(0.1, min=0.0, max=1.0, help="Sparse attention: the fraction r of all keys drawn "
                                "once per call (cross-frequency compensation)."),
    exact_short: bool = typer.Option(False, "--exact-short", help="Sparse attention on a 2D latent grid: exact "
                                     "attention up to the training length (the paper sparsifies at every length)."),
    durations: Optional[str] = typer.Option(None, help="Sparse attention: clip lengths in seconds (default: "
                                            "--seconds and 4x the training length)."),
    sparse_with_delta: Optional[float] = typer.Option(None, min=0.0, help="Sparse attention: also a row per "
                                                      "duration with AudioCache at this δ and LiteFocus together."),
    seconds: Optional[float] = typer.Option(None, min=0.01, help=SAMPLING_HELP["seconds"]),
    sampler: str = typer.Option("ddim", help=SAMPLING_HELP["sampler"]),
    cfg: float = typer.Option(5.0, help=SAMPLING_HELP["cfg"]),
    rescale: float = typer.Option(0.75, help=SAMPLING_HELP["rescale"]),
    rescale_axis: str = typer.Option("all", help=SAMPLING_HELP["rescale_axis"]),
    max_reuse: Optional[int] = typer.Option(None, min=0, help="AudioCache: at most this many reuses in a row."),
    clap: Optional[Path] = typer.Option(None, help="CLAP for FD/KL/IS/CLAP score: an in-house folder (soundlake "
                                        "train clap), a ClapModel folder or a laion-clap .pt."),
    labels: str = typer.Option("audioset", help="Zero-shot classes for KL and IS: audioset, or a text file "
                               "(one label per line)."),
    panns: Optional[Path] = typer.Option(None, help="A PANNs CNN14 16 kHz checkpoint (Cnn14_16k_mAP=0.438.pth): "
                                         "adds FD, KL and IS on its features, as the papers report them."),
    vggish: Optional[Path] = typer.Option(None, help="VGGish weights (torchvggish's vggish-10086976.pth): adds FAD."),
    vggish_pca: Optional[Path] = typer.Option(None, help="VGGish PCA parameters (vggish_pca_params-970ea276.pth): "
                                              "FAD on post-processed embeddings, as the FAD reference."),
    batch_size: int = typer.Option(8, min=1, help="Prompts per sampling call."),
    seed: int = typer.Option(0, help="Noise seed (batch i uses seed + i; the same noise for every setting)."),
    out_dir: Path = typer.Option(Path("reports/cache"), "--out", "-o", help="Report folder."),
    device: str = typer.Option("cpu", help=SAMPLING_HELP["device"]),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    if ctx.invoked_subcommand is not None:
        return
    from soundlake.generation.inference.evaluate import (
        EvalSettings,
        calibrate_cache,
        evaluate_generation,
        fmt_metric,
        load_profile,
        model_steps,
        read_prompts,
        training_seconds,
    )
    from soundlake.generation.inference.metrics import ClapFunctions
    from soundlake.generation.model_folder import Generator
    from soundlake.models.clap.load import load_clap
    from soundlake.stages.clap import resolve_labels

    if model is None or prompts is None:
        raise UserError("give --model DIT and --prompts FILE (or a subcommand, e.g. `soundlake evaluate captions`)")
    if clap is None:
        raise UserError("--clap PATH is needed for FD/KL/IS/CLAP: train one with `soundlake train clap`")
    if sparse_attention not in (None, "litefocus"):
        raise UserError(f"--sparse-attention {sparse_attention!r}: the only method is litefocus")
    sampling = sampling_args(steps, sampler, cfg, rescale, rescale_axis, seed, batch_size)
    deltas = floats(cache_delta, "--cache-delta")
    if any(d < 0 for d in deltas):
        raise UserError(f"--cache-delta {cache_delta!r}: thresholds must be >= 0")
    with as_user_error(ValueError, FileNotFoundError):
        items = read_prompts(prompts)
        label_set = resolve_labels(labels)
        clap_fns = ClapFunctions.of(load_clap(str(clap), device=device), label_set[1])
        extractors = paper_extractors(panns, vggish, vggish_pca, device)
    gen = Generator.load(model, device=device)
    seconds = seconds or training_seconds(gen) or 10.0
    durs = floats(durations, "--durations") if durations else [seconds, 4 * (training_seconds(gen) or seconds)]
    settings = EvalSettings(deltas=deltas, seconds=seconds, durations=durs, max_reuse=max_reuse,
                            sparse_ratio=ratio if sparse_attention else None, exact_short=exact_short,
                            sparse_with_delta=sparse_with_delta if sparse_attention else None)
    with steps_progress(quiet) as progress:
        profile, source = load_profile(gen, sampling), "loaded from beside the model"
        if profile is None and (deltas or settings.sparse_with_delta is not None):
            source = f"calibrated now on the {len(items)} evaluation prompts (no matching profile beside the model)"
            task = progress.add_task("calibrating", total=len(items) * steps)
            profile = calibrate_cache(gen, [p.caption for p in items], sampling, seconds,
                                      lambda n, _: progress.advance(task, n))
        task = progress.add_task("evaluating", total=model_steps(settings, sampling, len(items)))
        rep = evaluate_generation(gen, items, sampling, settings, clap_fns, label_set, profile,
                                  lambda n, what: progress.update(task, advance=n, description=what),
                                  profile_source=source, extractors=extractors)
    paths = rep.write(out_dir)
    t = Table(title=f"cached inference · {model} · {len(items)} prompts · {steps} {sampler} steps · "
              f"reference: {'audio' if items[0].reference else 'uncached outputs'}", title_justify="left")
    for c in ("setting", "speed-up", "layers cut", "attn speed-up", "FD", "KL", "IS", "CLAP"):
        t.add_column(c, no_wrap=c == "setting")
    for r in rep.rows:
        t.add_row(r["setting"], f"{r['speedup']:.2f}x", f"{r['layer_cut']:.2f}x",
                  f"{r['attention_speedup']:.2f}x" if r["group"] == "sparse" else "",
                  *[fmt_metric(r[k], f) for k, f in (("fd", ".3f"), ("kl", ".3f"), ("is", ".2f"), ("clap", ".3f"))])
    stdout.print(t)
    console.print(f"wrote {', '.join(str(p) for p in paths if p.suffix != '.png')} (+ plots)", highlight=False)
