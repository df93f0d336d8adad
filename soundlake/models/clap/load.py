"""CLAP backends behind one interface, with deterministic windowing.

Public API::

    class ClapBackend(Protocol):
        sample_rate: int          # clips must be mono float32 at this rate (resample before)
        dim: int                  # embedding size
        logit_scale: float        # the model's own text-audio temperature (for zero_shot)
        identity: dict            # backend, model, checkpoint_sha256, sample_rate, window_s, hop_s, pad, pooling
        def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray   # [N, dim] float32, L2-normalised
        def embed_text(self, texts: list[str]) -> np.ndarray           # [N, dim] float32, L2-normalised

    load_clap(model, backend=None, device="cpu", hop_s=None) -> ClapBackend
    detect_backend(model) -> "hf" | "laion" | "soundlake"
    zero_shot(audio_emb, label_emb, logit_scale) -> np.ndarray     # softmax probabilities [N, L]
    label_prompts(labels, template="the sound of {label}") -> list[str]
    Windowing(sample_rate, window_s, hop_s=None, pad="repeatpad")  # the shared windowing policy
    embed_windowed(clips, windowing, embed_windows, batch_size=16, dim=0) -> np.ndarray

Backends:

* ``hf``: a transformers ``ClapModel`` folder (or hub id, e.g. laion/larger_clap_general)
  with its ``ClapFeatureExtractor`` and tokenizer.
* ``laion``: a laion-clap ``.pt``/``.ckpt`` checkpoint; needs ``pip install soundlake[laion]``.
* ``soundlake``: the in-house model (``soundlake.models.clap.inhouse``), a folder with
  ``soundlake_clap.json``.

Windowing policy (the same for every backend, recorded in ``identity``): a clip longer
than the model window is cut into windows starting every ``hop_s`` (default: the window,
i.e. no overlap) plus one last window aligned to the clip's end; a clip no longer than the
window is padded to it (``repeatpad``: tiled whole copies then zeros, as laion-clap trains;
``zero``: zeros only; an empty clip becomes silence). Each window is embedded and
L2-normalised, the clip vector is the mean of the window vectors, L2-normalised again
(every window counts equally, whatever its raw norm). The model only ever sees inputs of
exactly one window, so no random crop or fusion choice happens inside it, and windows are
embedded independently of each other, so a clip's vector does not depend on what else is
in the batch (up to float noise, ~1e-6).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BACKENDS = ("hf", "laion", "soundlake")
INHOUSE_CONFIG = "soundlake_clap.json"
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


def _normalise(x: np.ndarray) -> np.ndarray:
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
        [_normalise(embed_windows(flat[i : i + batch_size])) for i in range(0, len(flat), batch_size)]
    )
    out, i = [], 0
    for w in per_clip:
        out.append(vecs[i : i + len(w)].mean(0))
        i += len(w)
    return _normalise(np.stack(out))


# ---------------------------------------------------------------- scoring helpers


def zero_shot(audio_emb: np.ndarray, label_emb: np.ndarray, logit_scale: float) -> np.ndarray:
    """Softmax over labels of ``logit_scale * cos(audio, label)``: probabilities [N, L]."""
    logits = float(logit_scale) * (_normalise(audio_emb) @ _normalise(label_emb).T)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def label_prompts(labels: list[str], template: str = "the sound of {label}") -> list[str]:
    """Text prompts for zero-shot tagging, one per label."""
    return [template.format(label=label) for label in labels]


# ---------------------------------------------------------------- hf backend


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
        from soundlake.models.text import weight_files, weights_sha256

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
        return _normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)


# ---------------------------------------------------------------- laion backend

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
        from soundlake.models.text import weights_sha256

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
            return _normalise(np.asarray(self.module.get_text_embedding(texts * 2))[:1])
        return _normalise(np.asarray(self.module.get_text_embedding(texts)))


# ---------------------------------------------------------------- loading


def detect_backend(model: str | Path) -> str:
    """'soundlake' for an in-house folder, 'hf' for a ClapModel folder or hub id, 'laion' for a .pt/.ckpt."""
    p = Path(model)
    if p.is_file():
        if p.suffix in (".pt", ".ckpt", ".pth"):
            return "laion"
        raise ValueError(f"cannot tell the CLAP backend of file {p} (expected .pt/.ckpt)")
    if p.is_dir():
        if (p / INHOUSE_CONFIG).exists():
            return "soundlake"
        cfg = p / "config.json"
        if cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "clap":
            return "hf"
        raise ValueError(f"{p} is neither a soundlake CLAP ({INHOUSE_CONFIG}) nor a transformers ClapModel folder")
    if str(model).count("/") == 1 and not str(model).startswith((".", "/")):
        return "hf"  # a hub id such as laion/larger_clap_general (must be in the local cache)
    raise FileNotFoundError(f"CLAP model not found: {model}")


def load_clap(
    model: str | Path, backend: str | None = None, device: str = "cpu", hop_s: float | None = None
) -> ClapBackend:
    """Load a CLAP model; ``backend`` is detected from ``model`` when None."""
    backend = backend or detect_backend(model)
    if backend == "hf":
        return HFClap(model, device=device, hop_s=hop_s)
    if backend == "laion":
        return LaionClap(model, device=device, hop_s=hop_s)
    if backend == "soundlake":
        from soundlake.models.clap.inhouse import InHouseClap

        return InHouseClap.load(model, device=device, hop_s=hop_s)
    raise ValueError(f"unknown CLAP backend {backend!r}; expected one of {BACKENDS}")
