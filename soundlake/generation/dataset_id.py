"""Dataset-ID conditioning (GenAu): the clip's source as a learned embedding.

A backbone built with a ``sources`` vocabulary (model config key; recorded in the model
folder with the rest of the config) adds ``source_embed[id]`` to the global condition (the
timestep embedding that drives AdaLN). Id 0 is always ``unknown``: what ``generate`` uses
unless ``--source NAME`` says otherwise, what a clip whose source is not in the vocabulary
trains as, and what a fraction ``source_drop`` of the training clips is trained as, so
the unknown row learns the average style.

    check_vocab(["unknown", "audioset", ...])          # ValueError unless "unknown" first, no repeats
    source_id("vggsound", vocab) -> int                # None -> 0; a name not in vocab -> ValueError
    source_ids(metas, vocab) -> LongTensor [B]         # training: each sample json's "source"
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

UNKNOWN = "unknown"
# The lake's registered source kinds (soundlake.sources), in a fixed order: a model folder's
# ids must not move when a new kind is registered, so configs list them explicitly.
DEFAULT_SOURCES = [UNKNOWN, "audioset", "vggsound", "freesound", "synth", "local"]


def check_vocab(vocab: Sequence[str]) -> list[str]:
    vocab = list(vocab)
    if not vocab or vocab[0] != UNKNOWN:
        raise ValueError(f"sources: the dataset-ID vocabulary must start with {UNKNOWN!r} (id 0), got {vocab}")
    if len(set(vocab)) != len(vocab) or not all(isinstance(v, str) and v for v in vocab):
        raise ValueError(f"sources: names must be distinct non-empty strings, got {vocab}")
    return vocab


def source_id(name: str | None, vocab: Sequence[str]) -> int:
    """The id of a source name given by a user (None or "" = unknown)."""
    if not name:
        return 0
    try:
        return list(vocab).index(name)
    except ValueError:
        raise ValueError(f"source {name!r} is not in this model's dataset-ID vocabulary "
                         f"({', '.join(vocab)})") from None


def source_ids(metas: Iterable[dict], vocab: Sequence[str]) -> torch.Tensor:
    """Ids of the samples' ``source`` fields (the export's sample json); unlisted -> unknown."""
    index = {name: i for i, name in enumerate(vocab)}
    return torch.tensor([index.get((m or {}).get("source") or UNKNOWN, 0) for m in metas], dtype=torch.long)


__all__ = ["DEFAULT_SOURCES", "UNKNOWN", "check_vocab", "source_id", "source_ids"]
