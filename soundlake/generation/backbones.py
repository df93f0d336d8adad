"""The diffusion backbones `soundlake train dit` can train, chosen by a config's ``backbone`` key.

Both take the same forward arguments and return a v prediction [B, F, C] (dit.py), so the
objectives, samplers, guidance, AudioCache and LiteFocus work with either:

* ``dit`` (default, and what model folders without the key hold): EzAudio-DiT, dit.py;
* ``fit``: GenAu's FIT (local attention in groups, global latent tokens), fit.py.

    cfg = backbone_config({"backbone": "fit", **model_keys})   # DiTConfig | FITConfig
    model = build_backbone(meta["config"])                      # a model folder's config
    config_dict(cfg) -> {"backbone": "fit", ...}                # what the model folder records
"""
from __future__ import annotations

from torch import nn

BACKBONES = ("dit", "fit")


def _classes(name: str):
    if name == "dit":
        from soundlake.generation.dit import DiT, DiTConfig

        return DiT, DiTConfig
    if name == "fit":
        from soundlake.generation.fit import FIT, FITConfig

        return FIT, FITConfig
    raise ValueError(f"backbone {name!r}: expected one of {', '.join(BACKBONES)}")


def backbone_name(d: dict) -> str:
    return d.get("backbone") or "dit"


def backbone_config(d: dict):
    """The config object of ``d``'s backbone (ValueError names an unknown backbone or key)."""
    return _classes(backbone_name(d))[1].from_dict(d)


def config_dict(cfg) -> dict:
    return {"backbone": cfg.BACKBONE, **cfg.to_dict()}


def build_backbone(d: dict) -> nn.Module:
    model_cls, cfg_cls = _classes(backbone_name(d))
    return model_cls(cfg_cls.from_dict(d))


__all__ = ["BACKBONES", "backbone_config", "backbone_name", "build_backbone", "config_dict"]
