"""DC-LDM's acoustic encoder: an autoregressive transformer that predicts audio tokens from text.

AudioGen's shape at CPU size: a transformers GPT-2 decoder whose cross-attention reads the
frozen text encoder's states (projected to its width), predicting the tokenizer's codes
(:mod:`.tokens`) frame after frame, every level of a frame in turn (the flattened residual
order; position p may only emit codes of level p mod levels). Its output decoded back to
continuous latents is E_t2a, the DiT's second condition stream; decoded further through the
VAE to audio and encoded again it is the paper's second option, E'_t2a.

Sampling is seeded by the caption (sha256), so a caption's prediction is the same in
`soundlake ar-encode` (precomputed for training) and in `generate`; a trained folder loads as
``model_folder.AcousticEncoder``.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ARConfig:
    levels: int = 4
    codes: int = 256
    frames: int = 20           # latent tokens per prediction (the training crop's)
    text_dim: int = 384
    hidden: int = 128
    depth: int = 4
    heads: int = 4
    dropout: float = 0.1
    temperature: float = 1.0
    top_k: int = 50            # sample from the k likeliest codes (AudioGen samples top-k too)

    @property
    def length(self) -> int:
        return self.frames * self.levels

    @classmethod
    def from_dict(cls, d: dict) -> "ARConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AR config keys {unknown} (known: {sorted(known)})")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class AcousticAR(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.cfg = cfg
        self.bos = cfg.levels * cfg.codes
        self.text_proj = nn.Linear(cfg.text_dim, cfg.hidden)
        self.gpt = GPT2LMHeadModel(GPT2Config(
            vocab_size=self.bos + 1, n_positions=cfg.length + 1, n_embd=cfg.hidden, n_layer=cfg.depth,
            n_head=cfg.heads, add_cross_attention=True, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, bos_token_id=self.bos, eos_token_id=self.bos, tie_word_embeddings=False))
        # position p emits only codes of its level: a [length, vocab] additive mask
        level = torch.arange(cfg.length) % cfg.levels
        allowed = (torch.arange(self.bos + 1)[None] // cfg.codes) == level[:, None]
        self.register_buffer("level_mask", torch.where(allowed, 0.0, float("-inf")), persistent=False)

    def flat(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, frames, levels] codes -> [B, length] vocabulary ids (level l's codes at l * codes)."""
        offset = torch.arange(self.cfg.levels, device=codes.device) * self.cfg.codes
        return (codes + offset).flatten(1)

    def logits(self, ids: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Next-code logits for every position of ``ids`` ([B, n], BOS first), level-masked."""
        out = self.gpt(input_ids=ids, encoder_hidden_states=self.text_proj(text),
                       encoder_attention_mask=text_mask.long()).logits
        return out + self.level_mask[: ids.shape[1]]

    def loss(self, codes: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy of the codes [B, frames, levels] given the text."""
        target = self.flat(codes)
        bos = torch.full((len(target), 1), self.bos, dtype=torch.long, device=target.device)
        logits = self.logits(torch.cat([bos, target[:, :-1]], 1), text, text_mask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    @torch.no_grad()
    def sample(self, text: torch.Tensor, text_mask: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Codes [B, frames, levels], one draw per row from its own seeded generator (top-k,
        temperature). The whole prefix is re-read each step: at these lengths that costs less
        than it saves, and the result does not depend on a cache's bookkeeping."""
        cfg = self.cfg
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        ids = torch.full((len(seeds), 1), self.bos, dtype=torch.long, device=text.device)
        for _ in range(cfg.length):
            logits = self.logits(ids, text, text_mask)[:, -1].double() / max(cfg.temperature, 1e-6)
            if cfg.top_k:
                kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            cdf = logits.softmax(-1).cumsum(-1).cpu()
            u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
            nxt = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(cdf.shape[-1] - 1)
            ids = torch.cat([ids, nxt.to(ids.device)], 1)
        offset = torch.arange(cfg.levels, device=ids.device) * cfg.codes
        return ids[:, 1:].reshape(len(seeds), cfg.frames, cfg.levels) - offset


def caption_seed(caption: str) -> int:
    """A caption's sampling seed: the same caption gets the same prediction everywhere."""
    return int.from_bytes(hashlib.sha256(caption.encode()).digest()[:7], "big")
