"""Caption commands: `recaption`, `evaluate captions`, `train clap`, `train captioner`, `convert autocap`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from soundlake.cli.main import (
    CATALOG,
    CURATE,
    LAKE,
    VERBOSE,
    app,
    as_user_error,
    console,
    convert_app,
    evaluate_app,
    stdout,
    train_app,
)
from soundlake.core.errors import UserError


@app.command(rich_help_panel=CURATE)
def recaption(
    lake: str = LAKE,
    captioner: str = typer.Option("qwen", help="The audio captioner (qwen: Qwen2-Audio)."),
    model: str = typer.Option(..., help="Folder of a Qwen2-Audio checkpoint (base or instruct)."),
    refine: Optional[str] = typer.Option(None, help="Folder of a text LLM (causal LM with a chat template) that "
                                         "rewrites each caption with the clip's title, tags and labels."),
    where: Optional[str] = typer.Option(None, help="SQL condition on clips (c.*), e.g. \"c.source = 'audioset'\"."),
    prompt_version: Optional[str] = typer.Option(None, help="qwen-base-v1 | qwen-instruct-v1 (default: from the "
                                                 "folder name)."),
    batch_size: int = typer.Option(8, help="Clips per model call."),
    num_gpus: float = typer.Option(0.0, help="GPUs per model actor."),
    concurrency: int = typer.Option(1, help="Actors per model."),
    limit: Optional[int] = typer.Option(None, help="Caption at most this many clips."),
    num_cpus: Optional[int] = typer.Option(None, help="Local Ray: CPUs to use."),
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster."),
    wait: bool = typer.Option(False, help="Wait for another job writing the lake instead of refusing."),
    catalog: str | None = CATALOG,   # read through SOUNDLAKE_CATALOG
    verbose: bool = VERBOSE,
):
    """Caption clips already in the lake with an audio LLM (and refine them with a text LLM).

    Writes the new captions to the lake's captions table as one run. Resumable: clips that
    already have this captioner's caption (same model and prompt version) are skipped. Refined
    captions are linted; failures land in `failures`."""
    from soundlake.core.ray_env import RaySpec
    from soundlake.pipelines.recaption import RecaptionArgs
    from soundlake.pipelines.recaption import recaption as run_recaption

    if captioner != "qwen":
        raise UserError(f"--captioner {captioner!r}: only qwen is available (autocap: soundlake train captioner)")
    args = RecaptionArgs(model=model, refine=refine, where=where, prompt_version=prompt_version,
                         batch_size=batch_size, num_gpus=num_gpus, concurrency=concurrency, limit=limit)
    with as_user_error(ValueError, OSError):
        s = run_recaption(lake, args, RaySpec(num_cpus=num_cpus, address=address), wait=wait)
    console.print(f"run {s.run_id} {s.status}: {s.inputs_total} clips to caption · "
                  + (" · ".join(f"{k} {v}" for k, v in sorted(s.rows.items())) or "nothing new")
                  + f" · {s.elapsed_s:.1f} s (+ {s.ray_startup_s:.1f} s Ray start-up)", highlight=False)


@evaluate_app.command("captions")
def evaluate_captions_cmd(
    lake: str = LAKE,
    references: str = typer.Option("reference", help="'reference' (all reference captions) or a reference "
                                   "model id such as human or synth-v1."),
    where: Optional[str] = typer.Option(None, help="SQL condition on clips, e.g. \"source = 'synth'\"."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the scores as JSON here."),
):
    """Score each captioner's captions against the lake's reference captions.

    BLEU-1/4, ROUGE-L, CIDEr-D, METEOR (with Java and the meteor extra), MiniLM embedding
    similarity and a SPIDEr-style mean (CIDEr-D with the similarity, not SPICE) per captioner, printed as a table on stdout (and written as JSON to --out)."""
    from soundlake.models.caption_eval import evaluate_captions

    res = evaluate_captions(lake, references, where)
    t = Table(title=f"captions vs {references} references", title_justify="left")
    cols = ["bleu_1", "bleu_4", "rouge_l", "cider_d", "meteor", "sbert_sim", "spider_style"]
    skipped = {m.get("meteor_skipped") for m in res.values()} - {None}
    cols = [c for c in cols if c != "meteor" or not skipped]
    for c in ["captioner", "clips"] + cols:
        t.add_column(c)
    for name, m in res.items():
        t.add_row(name, str(m["n"]), *[f"{m[c]:.3f}" for c in cols])
    stdout.print(t)
    for why in skipped:
        console.print(f"METEOR skipped: {why}", highlight=False)
    if output:
        output.write_text(json.dumps(res, indent=2))
        console.print(f"wrote {output}")


# Options shared by the commands that train on the lake's (audio, caption) pairs.
CAPTIONER = typer.Option("reference", help="Train on this captioner's captions.")
WHERE = typer.Option(None, help="SQL condition on clips (c.*), e.g. \"c.source = 'synth'\".")
HOLDOUT = typer.Option(0.1, help="Fraction of clips held out for validation: the bottom of the same stable "
                       "u = sha256(clip_id) range that exports' held-out splits use.")


@train_app.command("clap")
def train_clap_cmd(
    lake: str = LAKE,
    out: Path = typer.Option(..., "--out", "-o", help="Folder to save the model in (loadable by clap.model)."),
    captioner: str = CAPTIONER, where: Optional[str] = WHERE, holdout: float = HOLDOUT,   # which pairs
    epochs: int = typer.Option(30, help="Training epochs."),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(2e-3),
    dim: int = typer.Option(256, help="Shared embedding size."),
    seed: int = typer.Option(0),
):
    """Train the in-house CLAP on the lake's clips and captions into the folder --out.

    Frozen MiniLM text tower (offline) + a log-mel CNN audio encoder, contrastive loss.
    Prints validation retrieval each epoch; the folder loads as clap.model (scoring, metrics)."""
    from rich.progress import Progress

    from soundlake.catalog.training_pairs import load_pairs
    from soundlake.models.clap.inhouse import ClapTrainConfig, train_clap

    cfg = ClapTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, dim=dim, seed=seed)
    train, held = load_pairs(lake, cfg.sample_rate, captioner=captioner, where=where, holdout=holdout)
    console.print(f"training on {len(train)} clips, validating on {len(held)} (lake {lake})")
    with Progress(console=console) as progress:
        task = progress.add_task("epochs", total=epochs)

        def report(row):
            progress.update(task, advance=1)
            extra = " ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("epoch", "seconds")
                             and isinstance(v, float))
            progress.console.print(f"epoch {row['epoch']:3d}  {extra}", highlight=False)

        res = train_clap([a for _, a, _ in train], [c for _, _, c in train], out, cfg, progress=report,
                         val=([a for _, a, _ in held], [c for _, _, c in held]) if len(held) >= 2 else None)
    console.print(f"saved {out} in {res['train_seconds']:.0f} s · checkpoint {res['identity'].get('checkpoint_sha256')}"
                  f"\nuse it: soundlake curate demo --lake {lake} --set clap.model={out}", highlight=False)


@train_app.command("captioner")
def train_captioner_cmd(
    lake: str = LAKE,
    out: Path = typer.Option(..., "--out", "-o", help="Folder to save the model in (loadable by caption.autocap_model)."),
    captioner: str = CAPTIONER, where: Optional[str] = WHERE, holdout: float = HOLDOUT,   # which pairs
    clap: Optional[Path] = typer.Option(None, help="In-house CLAP folder used (frozen) as the audio encoder; "
                                        "default: train one on the same pairs first."),
    clap_epochs: int = typer.Option(12, help="Epochs of that CLAP, when --clap is not given."),
    phase1_epochs: int = typer.Option(2, "--stage1-epochs", help="AutoCap's stage 1: BART frozen; Q-Former, "
                                      "projections, tag tokens train."),
    phase2_epochs: int = typer.Option(14, "--stage2-epochs", help="AutoCap's stage 2: BART trains too, except its "
                                      "token embeddings."),
    batch_size: int = typer.Option(32),
    field_dropout: float = typer.Option(0.5, help="Chance of leaving each metadata field empty in training."),
    bart: Optional[Path] = typer.Option(None, help="A pretrained BART folder (its tokenizer too); default: a small "
                                        "BART from a config with a WordPiece vocabulary trained on the captions."),
    tokenizer: str = typer.Option("train", help="train (WordPiece on the training texts) or minilm (the MiniLM "
                                  "vocabulary shipped offline); ignored with --bart."),
    seed: int = typer.Option(0),
):
    """Train the in-house autocap captioner on the lake's clips, captions and metadata into the folder --out.

    AutoCap architecture: Q-Former over frozen audio frames, CLAP token, tagged metadata, BART;
    trained in two phases (AutoCap's stages 1 and 2). Prints the loss and validation metrics each epoch; the folder loads
    as caption.autocap_model."""
    from rich.progress import Progress

    from soundlake.catalog.training_pairs import clip_metadata, load_pairs
    from soundlake.models.captioners.autocap import AutocapConfig
    from soundlake.models.captioners.autocap_train import (
        AutocapTrainConfig,
        CaptionItem,
        train_autocap,
    )

    if tokenizer not in ("train", "minilm"):
        raise UserError(f"--tokenizer {tokenizer!r}: expected train or minilm")
    cfg = AutocapConfig(bart=str(bart) if bart else None, tokenizer="bart" if bart else tokenizer)
    tcfg = AutocapTrainConfig(phase1_epochs=phase1_epochs, phase2_epochs=phase2_epochs, batch_size=batch_size,
                              field_dropout=field_dropout, clap_epochs=clap_epochs, seed=seed)
    with as_user_error(ValueError):
        rate = 16000
        if clap:
            from soundlake.models.captioners.autocap import ClapAudio

            rate = ClapAudio(clap).sample_rate
        train, held = load_pairs(lake, rate, captioner=captioner, where=where, holdout=holdout)
        meta = clip_metadata(lake, [c for c, _, _ in train + held])
    items = [CaptionItem(a, t, meta.get(c, {})) for c, a, t in train]
    val = [CaptionItem(a, t, meta.get(c, {})) for c, a, t in held]
    console.print(f"training on {len(items)} clips, validating on {len(val)} (lake {lake})")
    total = phase1_epochs + phase2_epochs + (0 if clap else clap_epochs) + (0 if bart else tcfg.bart_epochs)
    with Progress(console=console) as progress:
        task = progress.add_task("epochs", total=total)

        def report(row):   # CLAP epochs, BART denoising epochs, then phase 1 and 2 epochs
            progress.update(task, advance=1)
            if "clap_epoch" in row:
                name, num = "clap epoch", row["clap_epoch"]
            elif "bart_epoch" in row:
                name, num = "bart denoising epoch", row["bart_epoch"]
            else:
                name, num = f"phase {row['phase']} epoch", row["epoch"]
            extra = " ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and "seconds" not in k)
            progress.console.print(f"{name} {num:3d}  {extra}", highlight=False)

        with as_user_error(ValueError):
            res = train_autocap(items, out, cfg, tcfg, clap=clap, val=val or None, progress=report)
    model = res["model"]
    console.print(f"saved {out} in {res['train_seconds']:.0f} s · checkpoint {model.model_hash}\n"
                  f"use it: soundlake curate demo --lake {lake} --set 'caption.captioners=[template,autocap]' "
                  f"--set caption.autocap_model={out}", highlight=False, markup=False)


@convert_app.command("autocap")
def convert_autocap_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="GenAU's released AutoCap checkpoint (autocap-full.ckpt)."),
    yaml_file: Path = typer.Option(..., "--yaml", help="Its settings file (autocap-full.yaml)."),
    bart: Optional[Path] = typer.Option(None, help="Folder of facebook/bart-base (config.json + tokenizer files); "
                                        "needed unless it is in the local Hugging Face cache."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (loadable by caption.autocap_model)."),
):
    """Convert the released AutoCap (HTS-AT encoder, laion-CLAP, Q-Former, BART) into an autocap folder at --out.

    Every checkpoint tensor is placed or accounted for (duplicates, constants, unused classification
    heads); the STFT kernels, mel filters and resampler kernel are checked against their formulas."""
    from soundlake.models.captioners.autocap_release import convert_released

    with console.status("reading and mapping the checkpoint"), as_user_error(ValueError):
        folder, report = convert_released(ckpt, yaml_file, out, bart=bart)
    console.print(f"wrote {folder}: {report.summary()}\n"
                  f"use it: soundlake curate demo --lake ./lake --set 'caption.captioners=[template,autocap]' "
                  f"--set caption.autocap_model={folder}", highlight=False, markup=False)
