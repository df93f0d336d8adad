"""The audio tokenizer of the DC-LDM path: a residual vector quantiser over VAE latents.

AudioGen's tokens come from a neural codec's residual VQ; here the "codec" is the project's
own VAE, so the tokenizer only quantises its latents: every latent token (one frame, or one
frame x frequency row of a 2D mel latent; normalised by the latent shards' mean and std) is
the sum of one code vector per level, each level's codebook fitted by k-means (faiss) to the
residual the levels above leave. ``decode(encode(x))`` approaches ``x`` as levels are added.

    soundlake train tokens --latents shards/demo-mel --split ar --out runs/tokens   (train/tokens.py)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RVQ:
    codebooks: np.ndarray   # [levels, codes, channels] float32

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def codes(self) -> int:
        return self.codebooks.shape[1]

    @property
    def channels(self) -> int:
        return self.codebooks.shape[2]

    def encode(self, x: np.ndarray) -> np.ndarray:
        """[..., C] vectors -> [..., levels] int64 codes (nearest code per level, greedily)."""
        flat = np.asarray(x, np.float32).reshape(-1, self.channels)
        residual, out = flat.copy(), np.zeros((len(flat), self.levels), np.int64)
        for lv, book in enumerate(self.codebooks):
            d = (residual ** 2).sum(1, keepdims=True) - 2 * residual @ book.T + (book ** 2).sum(1)[None]
            out[:, lv] = d.argmin(1)
            residual -= book[out[:, lv]]
        return out.reshape(*np.shape(x)[:-1], self.levels)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[..., levels] codes -> [..., C] vectors: the sum of each level's code vector."""
        codes = np.asarray(codes)
        return sum(self.codebooks[lv][codes[..., lv]] for lv in range(self.levels)).astype(np.float32)


def fit_rvq(vectors: np.ndarray, levels: int, codes: int, iters: int = 20, seed: int = 0) -> RVQ:
    """Codebooks by k-means on the residuals, level after level (faiss: fast, and flat in memory)."""
    import faiss

    x = np.ascontiguousarray(vectors, np.float32)
    if len(x) < codes:
        raise ValueError(f"{len(x)} latent vectors cannot fit {codes} codes: train on more clips or use fewer codes")
    books = []
    residual = x.copy()
    for lv in range(levels):
        km = faiss.Kmeans(x.shape[1], codes, niter=iters, seed=seed + lv, verbose=False, spherical=False,
                          max_points_per_centroid=max(256, len(x) // codes + 1))
        km.train(residual)
        book = km.centroids.astype(np.float32)
        books.append(book)
        residual -= book[RVQ(book[None]).encode(residual)[:, 0]]
    return RVQ(np.stack(books))


def latent_tokens(z: np.ndarray, grid_freq: int, mean: float, std: float) -> np.ndarray:
    """A latent shard's [C * grid_freq, F] array -> normalised tokens [F * grid_freq, C], the
    order the DiT reads them in (``mel_vae.to_tokens``)."""
    import torch

    from soundlake.generation.mel_vae import to_tokens

    t = torch.from_numpy(np.asarray(z, np.float32))[None]
    return ((to_tokens(t, grid_freq)[0] - mean) / std).numpy()


def rvq_errors(rvq: RVQ, x: np.ndarray) -> list[float]:
    """Relative squared error ||x - x_k||^2 / ||x||^2 of the reconstruction from the first k levels."""
    codes = rvq.encode(x)
    total, rec, out = float((x ** 2).sum()) or 1.0, np.zeros_like(x), []
    for lv in range(rvq.levels):
        rec = rec + rvq.codebooks[lv][codes[:, lv]]
        out.append(float(((x - rec) ** 2).sum()) / total)
    return out
