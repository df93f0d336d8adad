"""The one split function: every clip has a stable number u in [0, 1) from its id alone.

Exports fill their held-out splits upward from 0 (``valid=0.01,test=0.01``: valid is
u < 0.01, test 0.01 <= u < 0.02, train the rest), and the models trained in-process
(CLAP, autocap) hold out the clips with u < their hold-out fraction. So the two are
nested, never crossed: with a hold-out no larger than an export's held-out splits, every
clip a model validates on is outside that export's train split; with a larger one, every
clip of the export's held-out splits is outside the model's training data. Adding clips
never moves another clip.
"""
from __future__ import annotations

import hashlib

SPLIT_HASH = "sha256(clip_id)[:8] / 2**64"   # recorded in export manifests


def split_fraction(clip_id: str) -> float:
    """u in [0, 1): the first 8 bytes of sha256(clip_id), big-endian, over 2**64."""
    return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "big") / 2**64


def split_of(clip_id: str, splits: dict[str, float]) -> str:
    """The clip's split: the first of ``splits`` (in order) whose range holds u; else ``train``."""
    u = split_fraction(clip_id)
    edge = 0.0
    for name, frac in splits.items():
        edge += frac
        if u < edge:
            return name
    return "train"


def in_holdout(clip_id: str, holdout: float) -> bool:
    """Is the clip in a model's hold-out of fraction ``holdout`` (the bottom of the u range)?"""
    return split_fraction(clip_id) < holdout
