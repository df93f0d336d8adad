"""Loading a CLAP model: the backend detected from the path, behind one interface.

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

The windowing policy, zero-shot scoring and the backend protocol live in
:mod:`soundlake.models.clap.windowing`; each backend is a module of its own
(:mod:`~soundlake.models.clap.hf`, :mod:`~soundlake.models.clap.laion`,
:mod:`~soundlake.models.clap.inhouse`). A new backend is a class with the
``ClapBackend`` attributes in a module of this folder, named in :func:`load_clap`.

Backends:

* ``hf``: a transformers ``ClapModel`` folder (or hub id, e.g. laion/larger_clap_general)
  with its ``ClapFeatureExtractor`` and tokenizer.
* ``laion``: a laion-clap ``.pt``/``.ckpt`` checkpoint; needs ``pip install soundlake[laion]``.
* ``soundlake``: the in-house model (``soundlake.models.clap.inhouse``), a folder with
  ``soundlake_clap.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from soundlake.models.clap.hf import HFClap
from soundlake.models.clap.inhouse import INHOUSE_CONFIG, InHouseClap
from soundlake.models.clap.laion import LaionClap
from soundlake.models.clap.windowing import ClapBackend

BACKENDS = ("hf", "laion", "soundlake")


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
        return InHouseClap.load(model, device=device, hop_s=hop_s)
    raise ValueError(f"unknown CLAP backend {backend!r}; expected one of {BACKENDS}")
