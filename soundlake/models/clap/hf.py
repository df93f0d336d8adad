"""The ``hf`` CLAP backend: a transformers ``ClapModel`` folder (or a hub id already in the
local cache, e.g. laion/larger_clap_general) with its ``ClapFeatureExtractor`` and tokenizer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from soundlake.models.clap.windowing import Windowing, embed_windowed, normalise


def _hub_or_local_dir(model: str) -> Path | None:
    p = Path(model)
    if p.is_dir():
        return p
    try:  # a hub id already in the local cache (we never download)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        return None


class HFClap:
    """transformers ``ClapModel`` + ``ClapFeatureExtractor`` + tokenizer.

    The feature extractor only ever receives audio of exactly ``max_length_s`` seconds,
    so neither its random crop (``rand_trunc``) nor its random fusion chunks act, and we
    set ``is_longer`` to False for every window ourselves: the extractor marks one random
    clip per batch as "longer" when none is, which would make fused models depend on the
    batch. (False is what upstream laion-clap uses at inference for clips <= 10 s.)
    """

    def __init__(self, model: str | Path, device: str = "cpu", hop_s: float | None = None, batch_size: int = 8):
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        self.device = torch.device(device)
        self.model = ClapModel.from_pretrained(str(model)).to(self.device).eval()
        self.feature_extractor = ClapFeatureExtractor.from_pretrained(str(model))
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        fe = self.feature_extractor
        self.sample_rate = int(fe.sampling_rate)
        self.fusion = bool(self.model.config.audio_config.enable_fusion)
        self.windowing = Windowing(self.sample_rate, float(fe.max_length_s), hop_s, pad="repeatpad")
        if self.windowing.window != fe.nb_max_samples:
            raise ValueError("window length does not match the feature extractor's max length")
        self.dim = int(self.model.config.projection_dim)
        self.logit_scale = float(self.model.logit_scale_t.detach().exp())
        self.batch_size = batch_size
        self.max_text_tokens = 77  # laion-clap's text length
        from soundlake.core.fingerprints import weight_files, weights_sha256

        local = _hub_or_local_dir(str(model))
        sha = weights_sha256(weight_files(local)) if local is not None else None
        self.identity = {
            "backend": "hf",
            "model": str(model),
            "checkpoint_sha256": sha,
            **self.windowing.identity,
            "fusion": self.fusion,
            "is_longer": False,
        }

    @torch.inference_mode()
    def _embed_windows(self, windows: np.ndarray) -> np.ndarray:
        feats = self.feature_extractor(
            list(windows.astype(np.float64)),
            sampling_rate=self.sample_rate,
            truncation="fusion" if self.fusion else "rand_trunc",  # exact-length input: no crop either way
            padding="repeatpad",
            return_tensors="np",
        )
        x = torch.from_numpy(np.asarray(feats["input_features"], dtype=np.float32)).to(self.device)
        is_longer = torch.zeros((len(windows), 1), dtype=torch.bool, device=self.device)
        out = self.model.get_audio_features(input_features=x, is_longer=is_longer)
        return out.pooler_output.float().cpu().numpy()

    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray:
        return embed_windowed(clips, self.windowing, self._embed_windows, self.batch_size, self.dim)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 64):
            tok = self.tokenizer(
                list(texts[i : i + 64]), padding=True, truncation=True,
                max_length=self.max_text_tokens, return_tensors="pt",
            ).to(self.device)
            tok.pop("token_type_ids", None)
            out.append(self.model.get_text_features(**tok).pooler_output.float().cpu().numpy())
        return normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)
