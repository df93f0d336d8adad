"""DC-LDM's acoustic condition: `train tokens`, `train ar` and `ar-encode`.

    soundlake export --lake ./lake --out shards/v1 --split ar=0.3     # the AR model's clips: split 'ar'
    soundlake encode --vae runs/mel-vae --shards shards/v1 --out shards/v1-mel
    soundlake train tokens --latents shards/v1-mel --out runs/tokens
    soundlake train ar --tokens runs/tokens --shards shards/v1-mel --out runs/ar
    soundlake ar-encode --ar runs/ar --shards shards/v1-mel --out shards/v1-ar
    soundlake train dit --vae runs/mel-vae --shards shards/v1-mel --ar-encodings shards/v1-ar --out runs/dcldm
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from soundlake.cli.generate import (
    ADDRESS,
    BATCH_SIZE,
    LR,
    RUN_OUT,
    SET_HELP,
    SPEC_HELP,
    STEPS,
    WORKERS,
    run_training,
)
from soundlake.cli.main import MODELS, VERBOSE, app, console, train_app

SPLIT_AR = typer.Option("ar", help="The export split the tokenizer and the AR model read (export --split ar=0.3); "
                        "the DiT trains on 'train', so the AR model never saw its clips.")


@train_app.command("tokens")
def train_tokens_cmd(
    latents: str = typer.Option(..., help="Latent shards written by `soundlake encode`."),
    out: str = typer.Option(..., "--out", "-o", help="Tokenizer folder."),
    split: str = SPLIT_AR,
    levels: int = typer.Option(4, min=1, max=16, help="Residual levels (codebooks)."),
    codes: int = typer.Option(256, min=2, max=4096, help="Codes per level."),
    iters: int = typer.Option(20, min=1, help="k-means iterations per level."),
    max_vectors: int = typer.Option(200_000, min=1, help="Latent vectors sampled for the fit."),
    verbose: bool = VERBOSE,
):
    """Fit the audio tokenizer of the DC-LDM path: a residual vector quantiser over VAE latents
    (k-means per level on the residual), so that an AR model can predict discrete audio tokens.

    Prints the relative reconstruction error after each level."""
    from soundlake.generation.train.tokens import train_tokens

    r = train_tokens(latents, out, split=split, levels=levels, codes=codes, iters=iters, max_vectors=max_vectors)
    errs = " → ".join(f"{e:.3f}" for e in r.error_by_level)
    console.print(f"tokenizer {r.levels} levels × {r.codes} codes on {r.vectors} latent vectors of {r.clips} clips "
                  f"(split {split}) · relative error by level {errs} · {r.elapsed_s:.1f} s · {r.out}", highlight=False)
    console.print(f"next: soundlake train ar --tokens {r.out} --shards {latents} --out <ar>", highlight=False)


@train_app.command("ar")
def train_ar_cmd(
    tokens: Optional[str] = typer.Option(None, help="Tokenizer folder (soundlake train tokens)."),
    shards: Optional[str] = typer.Option(None, help="Latent shards (the tokenizer's VAE)."),
    split: Optional[str] = typer.Option(None, help="Export split to read (default: ar)."),
    out: Optional[str] = RUN_OUT,
    config: Optional[str] = typer.Option(None, help="Model config: ar-tiny (CPU, default) or a YAML."),
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = BATCH_SIZE,
    seconds: Optional[float] = typer.Option(None, help="Crop length in seconds = the prediction's length."),
    lr: Optional[float] = LR,
    text_encoder: Optional[str] = typer.Option(None, help="transformers encoder folder (default MiniLM)."),
    workers: Optional[int] = WORKERS, address: Optional[str] = ADDRESS,
    spec: Optional[Path] = typer.Option(None, help=SPEC_HELP),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    verbose: bool = VERBOSE,
):
    """Train the AudioGen-style AR model on Ray Train: a GPT-2 decoder cross-attending to the
    caption's text states, predicting the tokenizer's codes of the clip.

    Writes checkpoints, train_log.csv and the model folder (with its tokenizer and VAE) to --out;
    resumes from the newest checkpoint there."""
    run_training("ar", spec, set_, tokens=tokens, shards=shards, split=split or ("ar" if not spec else None),
                 out=out, config=config, steps=steps, batch_size=batch_size, seconds=seconds, lr=lr,
                 text_encoder=text_encoder, workers=workers, ray_address=address)


@app.command("ar-encode", rich_help_panel=MODELS)
def ar_encode_cmd(
    ar: str = typer.Option(..., help="AR model folder (soundlake train ar)."),
    shards: str = typer.Option(..., help="Latent shards whose captions to predict."),
    out: str = typer.Option(..., "--out", "-o", help="Folder (or URI) for the encodings."),
    via: str = typer.Option("tokens", help="tokens: the codes decoded by the tokenizer (DC-LDM's E_t2a); vae: "
                            "decoded to audio by the VAE and encoded again (E'_t2a)."),
    split: Optional[str] = typer.Option(None, help="Only this split's captions (default: all)."),
    batch_size: int = typer.Option(32, min=1, help="Captions per AR call."),
    verbose: bool = VERBOSE,
):
    """Precompute the AR model's acoustic encoding for every caption of the latent shards, for
    `soundlake train dit --ar-encodings OUT`.

    One Parquet part per shard and a manifest.json; resumable: finished parts are kept."""
    from rich.progress import Progress

    from soundlake.core.errors import UserError
    from soundlake.generation.train.ar_encode import ar_encode

    if via not in ("tokens", "vae"):
        raise UserError(f"--via {via!r}: expected tokens or vae")
    with Progress(console=console) as progress:
        task = progress.add_task("ar-encode", total=None)
        r = ar_encode(ar, shards, out, via=via, split=split, batch_size=batch_size,
                      on_part=lambda part, done, total: progress.update(task, completed=done, total=total))
    console.print(f"ar-encode: {r.written} parts written ({r.kept} already done) · {r.captions} distinct captions "
                  f"predicted · via {via} · {r.elapsed_s:.1f} s · {r.out}/manifest.json", highlight=False)
