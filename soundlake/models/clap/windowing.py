"""The windowing policy every CLAP backend shares, and zero-shot scoring.

Windowing (recorded in each backend's ``identity``): a clip longer than the model window
is cut into windows starting every ``hop_s`` (default: the window, i.e. no overlap) plus
one last window aligned to the clip's end; a clip no longer than the window is padded to
it (``repeatpad``: tiled whole copies then zeros, as laion-clap trains; ``zero``: zeros
only; an empty clip becomes silence). Each window is embedded and L2-normalised, the clip
vector is the mean of the window vectors, L2-normalised again (every window counts
equally, whatever its raw norm). The model only ever sees inputs of exactly one window,
so no random crop or fusion choice happens inside it, and windows are embedded
independently of each other, so a clip's vector does not depend on what else is in the
batch (up to float noise, ~1e-6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np

POOLING = "mean_of_normalised_windows"


@runtime_checkable
class ClapBackend(Protocol):
    sample_rate: int
    dim: int
    logit_scale: float
    identity: dict

    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray: ...

    def embed_text(self, texts: list[str]) -> np.ndarray: ...


# ---------------------------------------------------------------- windowing


@dataclass(frozen=True)
class Windowing:
    """How a clip of any length becomes fixed-length model windows."""

    sample_rate: int
    window_s: float
    hop_s: float | None = None  # None: hop = window (no overlap)
    pad: str = "repeatpad"      # "repeatpad" | "zero"

    def __post_init__(self):
        if self.pad not in ("repeatpad", "zero"):
            raise ValueError(f"pad must be 'repeatpad' or 'zero', not {self.pad!r}")
        if self.window_s <= 0 or (self.hop_s is not None and self.hop_s <= 0):
            raise ValueError("window_s and hop_s must be positive")

    @property
    def window(self) -> int:
        return int(round(self.window_s * self.sample_rate))

    @property
    def hop(self) -> int:
        return int(round((self.hop_s or self.window_s) * self.sample_rate))

    def starts(self, n: int) -> list[int]:
        """Window start samples for a clip of ``n`` samples (last one aligned to the end)."""
        w = self.window
        if n <= w:
            return [0]
        starts = list(range(0, n - w, self.hop))
        starts.append(n - w)
        return starts

    def pad_to_window(self, clip: np.ndarray) -> np.ndarray:
        w, n = self.window, len(clip)
        if n >= w:
            return clip[:w]
        if n == 0:
            return np.zeros(w, dtype=np.float32)
        if self.pad == "repeatpad":
            clip = np.tile(clip, w // n)
        return np.pad(clip, (0, w - len(clip)))

    def windows(self, clip: np.ndarray) -> np.ndarray:
        """[W, window] float32 windows of one mono clip."""
        clip = np.asarray(clip, dtype=np.float32)
        if clip.ndim != 1:
            raise ValueError(f"expected a mono 1-D clip, got shape {clip.shape}")
        if len(clip) <= self.window:
            return self.pad_to_window(clip)[None]
        return np.stack([clip[s : s + self.window] for s in self.starts(len(clip))])

    @property
    def identity(self) -> dict:
        return {
            "sample_rate": self.sample_rate,
            "window_s": self.window_s,
            "hop_s": self.hop_s or self.window_s,
            "pad": self.pad,
            "pooling": POOLING,
        }


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embed_windowed(
    clips: list[np.ndarray],
    windowing: Windowing,
    embed_windows: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 16,
    dim: int = 0,
) -> np.ndarray:
    """Embed clips of any length through ``embed_windows`` ([B, window] -> [B, D]).

    Windows of all clips are flattened into batches of ``batch_size``; the clip vector is
    the re-normalised mean of its normalised window vectors.
    """
    per_clip = [windowing.windows(c) for c in clips]
    if not per_clip:
        return np.zeros((0, dim), dtype=np.float32)
    flat = np.concatenate(per_clip)
    vecs = np.concatenate(
        [normalise(embed_windows(flat[i : i + batch_size])) for i in range(0, len(flat), batch_size)]
    )
    out, i = [], 0
    for w in per_clip:
        out.append(vecs[i : i + len(w)].mean(0))
        i += len(w)
    return normalise(np.stack(out))


def zero_shot(audio_emb: np.ndarray, label_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    """Softmax over labels of ``logit_scale * cos(audio, label)``: probabilities [N, L]."""
    logits = float(logit_scale) * (normalise(audio_emb) @ normalise(label_emb).T)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def label_prompts(labels: list[str], template: str = "the sound of {label}") -> list[str]:
    """Text prompts for zero-shot tagging, one per label."""
    return [template.format(label=label) for label in labels]
