"""The ``laion`` CLAP backend: a laion-clap ``.pt``/``.ckpt`` checkpoint (``pip install soundlake[laion]``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from soundlake.models.clap.windowing import Windowing, embed_windowed, normalise

LAION_INSTALL = (
    "the 'laion' CLAP backend needs laion-clap: `pip install 'soundlake[laion]'` "
    "(it pins numpy<2, and its constructor loads `roberta-base` from the Hugging Face hub, "
    "so that tokenizer must be reachable or already cached)"
)


class LaionClap:
    """A laion-clap checkpoint (``.pt``/``.ckpt``), through ``laion_clap.CLAP_Module``.

    Architecture is read from the checkpoint: fusion if it holds fusion weights, HTSAT-base
    if its patch embedding has 128 channels (else HTSAT-tiny). laion-clap's fused models
    mark one random clip per batch as "longer" when none is; we therefore feed fused
    models one window per call, which makes that choice fixed.
    """

    def __init__(self, path: str | Path, device: str = "cpu", hop_s: float | None = None, batch_size: int = 8):
        try:
            import laion_clap
        except ImportError as e:
            raise ImportError(LAION_INSTALL) from e
        from soundlake.core.fingerprints import weights_sha256

        path = Path(path)
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)  # a trusted, user-named checkpoint
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        self.fusion = any("fusion_model" in k for k in sd)
        proj = [v for k, v in sd.items() if k.endswith("audio_branch.patch_embed.proj.weight")]
        amodel = "HTSAT-base" if proj and proj[0].shape[0] == 128 else "HTSAT-tiny"
        del ckpt, sd
        self.module = laion_clap.CLAP_Module(enable_fusion=self.fusion, amodel=amodel, device=device)
        self.module.load_ckpt(str(path))
        self.module.eval()
        self.sample_rate = 48000
        self.windowing = Windowing(self.sample_rate, 10.0, hop_s, pad="repeatpad")
        self.dim = 512
        self.logit_scale = float(self.module.model.logit_scale_t.detach().exp())
        self.batch_size = 1 if self.fusion else batch_size
        self.identity = {
            "backend": "laion",
            "model": str(path),
            "checkpoint_sha256": weights_sha256(path),
            "amodel": amodel,
            **self.windowing.identity,
            "fusion": self.fusion,
        }

    @torch.inference_mode()
    def _embed_windows(self, windows: np.ndarray) -> np.ndarray:
        # laion-clap quantises to int16 itself when given numpy input
        return np.asarray(self.module.get_audio_embedding_from_data(x=windows, use_tensor=False))

    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray:
        return embed_windowed(clips, self.windowing, self._embed_windows, self.batch_size, self.dim)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        if len(texts) == 1:  # laion's tokenizer squeezes a batch of one away
            return normalise(np.asarray(self.module.get_text_embedding(texts * 2))[:1])
        return normalise(np.asarray(self.module.get_text_embedding(texts)))
