"""Conditions for the DiT: text token sequences, a GenAu extra vector, a DC-LDM second stream.

A ``Condition`` holds raw (un-projected) encoder outputs; the DiT projects each stream to
its width (``DiTConfig.cond_dim`` / ``cond_extra_dim`` / ``cond2_dim``), so encoders can
be swapped without touching the model code:

* ``context [B, T, Dc]`` + ``mask [B, T]`` (True = real token): text tokens from
  ``TextConditioner`` — the offline MiniLM (``soundlake.models.text.TextEncoder``, default)
  or any transformers encoder by path (FLAN-T5 via ``T5EncoderModel``, BERT-likes via
  ``AutoModel``);
* ``extra [B, De]`` (GenAu dual encoder): a second sentence vector (e.g. a CLAP text
  embedding) that the DiT projects and prepends to the text as one extra token;
* ``context2 [B, S, D2]`` + ``mask2`` (DC-LDM): any per-clip sequence (VAE latents of a
  reference clip [B, F, C], CLAP embeddings...) that ``cross_attn2`` in chosen blocks reads;
* ``source [B]`` (GenAu dataset-ID): ids in the model's ``sources`` vocabulary
  (:mod:`soundlake.generation.dataset_id`); None = unknown. Only passed to the model when set.

The null ("unconditional") condition is not built here: the DiT owns learned null tokens
and replaces a row's streams with them when that row's ``drop`` flag is set (see dit.py).

Public API::

    Condition(context, mask, extra=None, context2=None, mask2=None, source=None)
        .batch_size, .to(device), .repeat(n), Condition.cat([a, b]) (pads sequences),
        .as_kwargs() -> dict for DiT.forward
    TextConditioner(path=None, kind="auto", device="cpu", max_tokens=None)
        .dim, .identity, .encode(texts) -> (hidden [B,T,D], mask [B,T])
    build_condition(texts, text, extra_fn=None, context2=None, mask2=None) -> Condition
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F


def _pad_seq(x: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, n - x.shape[1])) if x.shape[1] < n else x


def _pad_mask(m: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(m, (0, n - m.shape[1]), value=False) if m.shape[1] < n else m


@dataclass
class Condition:
    context: torch.Tensor                  # [B, T, Dc]
    mask: torch.Tensor                     # [B, T] bool, True = real token
    extra: torch.Tensor | None = None      # [B, De]
    context2: torch.Tensor | None = None   # [B, S, D2]
    mask2: torch.Tensor | None = None      # [B, S] bool
    source: torch.Tensor | None = None     # [B] long, dataset-ID

    def __post_init__(self):
        self.mask = self.mask.bool()
        if self.context2 is not None and self.mask2 is None:
            self.mask2 = torch.ones(self.context2.shape[:2], dtype=torch.bool, device=self.context2.device)

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def to(self, device) -> "Condition":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Condition(mv(self.context), mv(self.mask), mv(self.extra), mv(self.context2), mv(self.mask2),
                         mv(self.source))

    def repeat(self, n: int) -> "Condition":
        rp = lambda t: None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
        return Condition(rp(self.context), rp(self.mask), rp(self.extra), rp(self.context2), rp(self.mask2),
                         rp(self.source))

    @staticmethod
    def cat(conds: list["Condition"]) -> "Condition":
        """Concatenate along the batch, padding token sequences (masked out) to a common length."""
        n = max(c.context.shape[1] for c in conds)
        ctx = torch.cat([_pad_seq(c.context, n) for c in conds])
        mask = torch.cat([_pad_mask(c.mask, n) for c in conds])
        extra = torch.cat([c.extra for c in conds]) if conds[0].extra is not None else None
        ctx2 = mask2 = None
        if conds[0].context2 is not None:
            s = max(c.context2.shape[1] for c in conds)
            ctx2 = torch.cat([_pad_seq(c.context2, s) for c in conds])
            mask2 = torch.cat([_pad_mask(c.mask2, s) for c in conds])
        source = torch.cat([c.source for c in conds]) if conds[0].source is not None else None
        return Condition(ctx, mask, extra, ctx2, mask2, source)

    def as_kwargs(self) -> dict:
        kw = {"context": self.context, "context_mask": self.mask, "extra": self.extra,
              "context2": self.context2, "context2_mask": self.mask2}
        if self.source is not None:  # only models built with a sources vocabulary take it
            kw["source"] = self.source
        return kw


class TextConditioner:
    """Frozen text encoder returning token states and padding mask.

    ``path=None`` -> the offline all-MiniLM-L6-v2 (``soundlake.models.text``). A path to a
    transformers folder -> that encoder; T5-family configs (FLAN-T5, as EzAudio uses) load
    with ``T5EncoderModel`` so the decoder weights are never built.
    """

    def __init__(self, path: str | Path | None = None, device: str = "cpu", max_tokens: int | None = None):
        self.device = torch.device(device)
        if path is None:
            from soundlake.models.text import TextEncoder

            enc = TextEncoder(device=device)
            self.tokenizer, self.model = enc.tokenizer, enc.model
            self.identity = dict(enc.identity)
            self.max_tokens = max_tokens or 256
        else:
            from transformers import (
                AutoConfig,
                AutoModel,
                AutoTokenizer,
                T5EncoderModel,
            )

            path = Path(path)
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            cls = T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else AutoModel
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = cls.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
            self.identity = {"model": path.name, "path": str(path), "class": cls.__name__}
            self.max_tokens = max_tokens or getattr(self.tokenizer, "model_max_length", 512)
            self.max_tokens = min(self.max_tokens, 512)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim: int = int(getattr(self.model.config, "hidden_size", None) or self.model.config.d_model)
        self.identity["dim"] = self.dim

    @torch.no_grad()  # not inference_mode: its tensors could not feed the DiT's trainable projections
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state.float(), batch["attention_mask"].bool()


def build_condition(texts: list[str], text: TextConditioner,
                    extra_fn: Callable[[list[str]], torch.Tensor] | None = None,
                    context2: torch.Tensor | None = None, mask2: torch.Tensor | None = None) -> Condition:
    """Encode captions (and optionally a GenAu extra vector and a DC-LDM stream) into a Condition.

    ``extra_fn(texts) -> [B, De]`` is e.g. a CLAP text tower's ``encode``; ``context2`` is
    whatever per-clip sequence the data loader provides (e.g. reference-clip latents [B, F, C]).
    """
    hidden, mask = text.encode(texts)
    extra = None
    if extra_fn is not None:
        extra = torch.as_tensor(extra_fn(list(texts)), dtype=torch.float32, device=hidden.device)
    return Condition(hidden, mask, extra, context2, mask2)


__all__ = ["Condition", "TextConditioner", "build_condition"]
