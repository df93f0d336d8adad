"""`soundlake train tokens`: fit the residual-VQ tokenizer (:mod:`soundlake.generation.tokens`)
on a latent shard folder's split and write its model folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from soundlake.generation.tokens import RVQ, fit_rvq, latent_tokens, rvq_errors


def save_tokenizer(folder: str | Path, rvq: RVQ, meta: dict) -> Path:
    from soundlake.generation.model_folder import save_model

    return save_model(folder, "tokens", {"codebooks": torch.from_numpy(rvq.codebooks)},
                      {"config": {"levels": rvq.levels, "codes": rvq.codes, "channels": rvq.channels}, **meta})


@dataclass
class TokensResult:
    out: str
    clips: int
    vectors: int
    levels: int
    codes: int
    error_by_level: list[float]   # relative squared error of decode(encode(x)) keeping the first k levels
    elapsed_s: float


def shard_samples(url: str) -> list[tuple[str, dict[str, bytes]]]:
    """A shard's samples as (key, {extension: bytes}), in key order."""
    import tarfile

    from soundlake.core.storage import open_input

    members: dict[str, dict[str, bytes]] = {}
    with open_input(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if m.isfile():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return sorted(members.items())


def latent_manifest(shards: str) -> dict:
    """A latent shard folder's manifest (``soundlake encode``), or a UserError saying how to make one."""
    from soundlake.core.errors import UserError
    from soundlake.export.shards import read_manifest
    from soundlake.generation.train.encode import FORMAT

    manifest = read_manifest(shards)
    if manifest is None or manifest.get("format") != FORMAT:
        raise UserError(f"{shards} holds no latents; run `soundlake encode --vae <vae> --shards <export> "
                        f"--out {shards}` first")
    return manifest


def read_latent_clips(shards: str, split: str | None) -> tuple[list[np.ndarray], dict]:
    """Every clip of a latent shard folder's split: ([C*F', F] arrays, the manifest)."""
    import io

    from soundlake.generation.train.data import shard_urls

    manifest = latent_manifest(shards)
    arrays = [np.load(io.BytesIO(parts["latents.npy"]), allow_pickle=False).astype(np.float32)
              for url in shard_urls(shards, split=split) for _, parts in shard_samples(url)
              if "latents.npy" in parts]
    return arrays, manifest


def train_tokens(shards: str, out: str, *, split: str | None = "ar", levels: int = 4, codes: int = 256,
                 iters: int = 20, max_vectors: int = 200_000, seed: int = 0) -> TokensResult:
    """Fit the tokenizer on a latent shard folder's split and write its model folder."""
    import time

    from soundlake.core.errors import UserError

    t0 = time.perf_counter()
    arrays, manifest = read_latent_clips(shards, split)
    if not arrays:
        raise UserError(f"{shards}: no clips in split {split!r} (export with --split {split}=0.3, then encode)")
    stats, vae = manifest["latents"], manifest["vae"]
    grid = int(stats.get("grid_freq", 1))
    x = np.concatenate([latent_tokens(z, grid, stats["mean"], stats["std"]) for z in arrays])
    rng = np.random.default_rng(seed)
    if len(x) > max_vectors:
        x = x[rng.choice(len(x), max_vectors, replace=False)]
    try:
        rvq = fit_rvq(x, levels, codes, iters, seed)
    except ValueError as e:
        raise UserError(f"train tokens: {e}") from None
    errors = rvq_errors(rvq, x)
    save_tokenizer(out, rvq, {"latents": {"shards": str(Path(shards).resolve()) if "://" not in shards else shards,
                                          "split": split, "mean": stats["mean"], "std": stats["std"],
                                          "rate": stats["rate"], "grid_freq": grid,
                                          "vae": vae.get("path"), "vae_sha256": vae.get("weights_sha256")},
                              "train": {"clips": len(arrays), "vectors": len(x), "iters": iters,
                                        "relative_error_by_level": errors}})
    return TokensResult(out, len(arrays), len(x), levels, codes, errors, time.perf_counter() - t0)


