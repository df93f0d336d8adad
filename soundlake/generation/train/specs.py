"""Train specs for `soundlake train vae|dit`, and the plan the driver resolves from one.

A spec (YAML, ``--spec``) holds every training setting and one or more **phases**, each
naming its shards; command options and ``--set key=value`` override it, and every
validation error is one line naming the key. :func:`make_plan` resolves, once on the
driver, what every worker needs: shard lists per phase, model configs (the DiT's input
and condition widths from its VAE and encoders) and the latent statistics.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from soundlake.core.config import Section
from soundlake.core.errors import UserError


class PhaseSpec(Section):
    name: str = "main"
    shards: str = Field(..., description="export folder/URI (its manifest), or a brace pattern of .tar paths")
    split: str | None = Field("train", description="the export split to read (None = all)")
    steps: int = Field(..., ge=1)
    mode: Literal["text", "masked"] = Field("text", description="dit: text-conditioned, or masked pretraining")
    lr: float | None = Field(None, gt=0, description="this phase's peak learning rate (default: lr)")
    data: Literal["shards", "memory"] | None = Field(None, description="this phase's data mode (default: data)")


class TrainSpec(Section):
    kind: Literal["vae", "dit", "vocoder", "ar"]
    out: str
    config: str = Field(..., description="model config: a bundled name (vae-tiny, dit-tiny, ...) or a YAML path")
    overrides: dict[str, Any] = Field(default_factory=dict, description="model config keys to change")
    vae: str | None = Field(None, description="dit: the trained VAE folder whose latents the shards hold; "
                                              "vocoder (optional): the mel VAE whose log-mel front end it reads")
    vocoder: str | None = Field(None, description="dit on mel-VAE latents: a trained vocoder folder, copied into "
                                                  "the model folder (generate uses it instead of Griffin-Lim)")
    text_encoder: str | None = Field(None, description="dit: transformers encoder folder (default: MiniLM)")
    extra_clap: str | None = Field(None, description="dit, GenAu dual encoder: a CLAP model whose text embedding "
                                                     "of the caption is a second text condition")
    cond2: Literal["ar", "latents"] | None = Field(None, description="dit, DC-LDM second stream: 'ar' = the AR "
                                                   "model's prediction from the caption (precomputed by `soundlake "
                                                   "ar-encode`, folder in ar_encodings); 'latents' = the clip's own VAE "
                                                   "latents (leaks the target: a reference-clip extension)")
    cond2_frames: int = Field(16, ge=1, description="length of the second stream")
    primary: Literal["text", "ar"] = Field("text", description="dit: the main cross-attention's condition; 'ar' = "
                                           "the AR encoding instead of the text (DC-LDM Table 1's 'LDM w/ AG')")
    ar_encodings: str | None = Field(None, description="dit with cond2 or primary 'ar': the `soundlake ar-encode` "
                                     "folder of the AR model's predictions for the shards' captions")
    tokens: str | None = Field(None, description="ar: the tokenizer folder (soundlake train tokens)")
    backbone: Literal["dit", "fit"] | None = Field(None, description="dit: the backbone, EzAudio-DiT or GenAu's FIT "
                                                   "(default: the config's model.backbone, else dit)")
    source_drop: float = Field(0.1, ge=0, le=1, description="dit, dataset-ID (a config with sources): fraction of "
                                                            "clips trained as 'unknown', the id generate defaults to")
    phases: list[PhaseSpec] = Field(..., min_length=1)
    batch_size: int = Field(16, ge=1, description="per worker")
    seconds: float = Field(2.0, gt=0, description="training crop length in seconds")
    lr: float = Field(3e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear warm-up at the start of every phase")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    cond_drop: float = Field(0.1, ge=0, le=1, description="dit: condition dropout for classifier-free guidance")
    mask_frac: tuple[float, float] = Field((0.25, 1.0), description="dit masked modelling: share of the frames "
                                           "noised, per row (EzAudio: 25-100 %)")
    mask_min_span_s: float = Field(0.2, gt=0, description="dit masked modelling: noised spans last at least this "
                                   "long (EzAudio: 0.2 s)")
    text_partial_mask: float = Field(0.25, ge=0, le=1, description="dit text phases: share of the rows partly "
                                     "masked, the others fully noised (EzAudio's stage 2, from its released "
                                     "configs' mae_prob; 0: plain text training)")
    ema: float | None = Field(None, gt=0, lt=1, description="EMA decay (e.g. 0.999); the saved model is the EMA")
    seed: int = 0
    init: str | None = Field(None, description="weights-only start: a model folder of the same kind")
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    tensorboard: bool = Field(False, description="also log to <out>/tensorboard")
    workers: int = Field(1, ge=0, description="Ray Train workers (DDP); 0: Ray Train's local mode, the loop "
                         "runs in this process (no Ray workers to start; for debugging and small runs)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: its CPUs)")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per worker")
    shuffle: int = Field(256, ge=0, description="shuffle buffer (samples)")
    resample: bool = Field(False, description="draw shards with replacement (fewer shards than readers)")
    data: Literal["shards", "memory"] = Field("shards", description="memory: batches held in RAM (benchmarks)")
    ray_address: str | None = None
    ray_num_cpus: int | None = Field(None, ge=1)
    eval_sets: list[str] = Field(default_factory=list, description="refuse shards whose export leaks into these "
                                 "eval sets (or did not check them)")
    allow_leakage: bool = Field(False, description="train on such shards anyway (recorded in the model folder)")

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "dit" and not self.vae:
            raise ValueError("vae: a DiT trains on VAE latents; give the VAE folder (--vae runs/vae)")
        if self.kind == "ar" and not self.tokens:
            raise ValueError("tokens: the AR model predicts a tokenizer's codes; give its folder (--tokens runs/tokens)")
        if self.ar_encodings and self.cond2 is None and self.primary != "ar":
            self.cond2 = "ar"   # the encodings' default use: DC-LDM's second stream
        if (self.cond2 == "ar" or self.primary == "ar") and not self.ar_encodings:
            raise ValueError("ar_encodings: cond2/primary 'ar' reads the AR model's predictions; run `soundlake "
                             "ar-encode --ar <ar model> --shards <latents> --out <folder>` and give that folder")
        if self.kind != "dit" and any(s.mode == "masked" for s in self.phases):
            raise ValueError("phases: mode 'masked' is for the DiT")
        if "://" in self.out:
            raise ValueError("out: a local or shared folder (Ray Train's storage), not a URI")
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.phases)


def load_train_spec(kind: str, spec: str | None = None, sets: list[str] | None = None, **given) -> TrainSpec:
    """A spec from a YAML file (optional), then the command's options (``given``, None = unset),
    then ``--set key=value`` overrides; one-line errors naming the key."""
    from soundlake.core.config import read_yaml_mapping, validate_with_sets

    raw: dict = {}
    if spec:
        if not Path(spec).is_file():
            raise UserError(f"--spec {spec}: no such file")
        raw = read_yaml_mapping(Path(spec), f"--spec {spec}")
    raw["kind"] = kind
    shards, steps, split = given.pop("shards", None), given.pop("steps", None), given.pop("split", None)
    if shards is not None or steps is not None or split is not None:
        if len(raw.get("phases") or [{}]) > 1:
            raise UserError("--shards/--steps/--split set a single phase; this spec has several (edit its phases)")
        phase = dict((raw.get("phases") or [{}])[0])
        phase.update({k: v for k, v in (("shards", shards), ("steps", steps), ("split", split)) if v is not None})
        raw["phases"] = [phase]
    defaults = _config_defaults(raw.get("config") or given.get("config"), kind)
    raw = {**defaults, **raw}
    raw.update({k: v for k, v in given.items() if v is not None})
    return validate_with_sets(TrainSpec, raw, sets, "train spec")


def _config_defaults(config: str | None, kind: str) -> dict:
    """Training defaults from the model config's ``train:`` section (DiT configs have one)."""
    from soundlake.generation.vae import CONFIG_DIR, read_config

    config = config or {"vae": "vae-tiny", "vocoder": "vocoder-tiny", "ar": "ar-tiny"}.get(kind, "dit-tiny")
    try:
        train = dict(read_config(config).get("train") or {})
    except FileNotFoundError:
        bundled = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise UserError(f"config {config!r}: no such bundled config or file (bundled: {bundled})") from None
    allowed = set(TrainSpec.model_fields)
    return {"config": config, **{k: v for k, v in train.items() if k in allowed}}


def _phase_urls(phase: PhaseSpec) -> list[str]:
    from soundlake.generation.train.data import shard_urls

    try:
        urls = shard_urls(phase.shards, split=phase.split)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"phase {phase.name}: cannot read shards {phase.shards}: {e}") from None
    if not urls:
        raise UserError(f"phase {phase.name}: {phase.shards} has no shards of split {phase.split!r}")
    return urls


def make_plan(spec: TrainSpec) -> dict:
    """Everything the workers need, resolved once on the driver (shard lists, configs)."""
    from soundlake.export.shards import read_manifest
    from soundlake.generation.mel_vae import is_mel, latent_geometry, vae_config
    from soundlake.generation.model_folder import check_vocoder, read_meta
    from soundlake.generation.train.encode import FORMAT
    from soundlake.generation.vae import model_keys, read_config

    plan: dict = {"phases": [_phase_urls(s) for s in spec.phases]}
    if spec.eval_sets:
        from soundlake.generation.train.leakage import check_eval_sets

        plan["eval_sets"] = [check_eval_sets(s.shards, spec.eval_sets, spec.allow_leakage) for s in spec.phases]
    if spec.kind == "vae":
        try:
            plan["vae_config"] = vae_config({**model_keys(spec.config), **spec.overrides}).to_dict()
        except (ValueError, TypeError) as e:
            raise UserError(f"config {spec.config}: {e}") from None
        return plan
    if spec.kind == "vocoder":
        from soundlake.generation.vocoder import VocoderConfig

        raw = {**model_keys(spec.config), **spec.overrides}
        if spec.vae:  # the mel VAE's own front end: the two cannot disagree
            vae_cfg = read_meta(spec.vae, "vae")["config"]
            if not is_mel(vae_cfg):
                raise UserError(f"--vae {spec.vae}: a waveform VAE decodes audio itself; a vocoder pairs with a mel VAE")
            raw["mel"] = vae_cfg["mel"]
        try:
            plan["vocoder_config"] = VocoderConfig.from_dict(raw).to_dict()
        except (ValueError, TypeError) as e:
            raise UserError(f"config {spec.config}: {e}") from None
        return plan

    if spec.kind == "ar":
        _check_ar_shards(spec)
        return plan | ar_plan(spec)
    vae_meta = read_meta(spec.vae, "vae")
    geometry = latent_geometry(vae_meta["config"])   # token width, and frequency rows per frame (2D mel)
    if spec.vocoder:
        if not is_mel(vae_meta["config"]):
            raise UserError(f"vocoder {spec.vocoder}: {spec.vae} is a waveform VAE (it decodes audio itself)")
        check_vocoder(spec.vocoder, vae_meta["config"]["mel"])
    raw = read_config(spec.config)
    plan["vae_config"] = vae_meta["config"]
    plan["schedule"] = raw.get("schedule", {})
    plan["dit_config"] = dit_model_config(spec, raw, geometry["channels"], geometry["grid_freq"])
    from soundlake.core.fingerprints import weights_sha256

    vae_sha = weights_sha256(Path(spec.vae) / "model.safetensors")
    stats = None
    for phase in spec.phases:
        if phase.shards.endswith(".tar") or "{" in phase.shards:
            raise UserError(f"phase {phase.name}: give the latent shard folder (its manifest has the latent "
                            "statistics), not a list of tars")
        m = read_manifest(phase.shards)
        if m is None or m.get("format") != FORMAT:
            raise UserError(f"phase {phase.name}: {phase.shards} holds no latents; "
                            f"run `soundlake encode --vae {spec.vae} --shards <export> --out <folder>` first")
        if m["vae"]["weights_sha256"] != vae_sha:
            raise UserError(f"phase {phase.name}: {phase.shards} was encoded by another VAE than {spec.vae}")
        stats = stats or m["latents"]
    plan["latents"] = {"mean": stats["mean"], "std": stats["std"], "rate": stats["rate"],
                       "grid_freq": geometry["grid_freq"]}
    if spec.ar_encodings:
        plan["ar"] = _check_ar_encodings(spec, vae_sha)
    return plan


def _check_ar_shards(spec: TrainSpec) -> None:
    """The AR model's shards must hold latents of the VAE its tokenizer was fitted on."""
    from soundlake.export.shards import read_manifest
    from soundlake.generation.model_folder import read_meta

    lat = read_meta(spec.tokens, "tokens")["latents"]
    for phase in spec.phases:
        m = read_manifest(phase.shards) or {}
        if m.get("vae", {}).get("weights_sha256") != lat["vae_sha256"]:
            raise UserError(f"phase {phase.name}: {phase.shards} holds latents of another VAE than the tokenizer "
                            f"{spec.tokens} was fitted on")


def ar_plan(spec: TrainSpec) -> dict:
    """The AR model's config (codebook sizes from the tokenizer, frames from the crop), the
    tokenizer's latent statistics and the crop in latent frames."""
    from soundlake.generation.ar import ARConfig
    from soundlake.generation.model_folder import read_meta
    from soundlake.generation.vae import model_keys

    tok = read_meta(spec.tokens, "tokens")
    lat = tok["latents"]
    frames = max(1, round(spec.seconds * lat["rate"]))
    try:
        cfg = ARConfig.from_dict({**model_keys(spec.config), **spec.overrides, "levels": tok["config"]["levels"],
                                  "codes": tok["config"]["codes"], "frames": frames * int(lat["grid_freq"]),
                                  "text_dim": _text_dim(spec.text_encoder)})
    except (ValueError, TypeError) as e:
        raise UserError(f"config {spec.config}: {e}") from None
    return {"ar_config": cfg.to_dict(), "latents": {k: lat[k] for k in ("mean", "std", "rate", "grid_freq")},
            "latent_frames": frames}


def _check_ar_encodings(spec: TrainSpec, vae_sha: str) -> dict:
    """The ar-encode folder's identity, after checking it is usable: made from latents of this
    VAE, by an AR model that never trained on the clips this DiT trains on (the AR model's
    predictions must be predictions, not memories of the target)."""
    from soundlake.generation.train.ar_encode import read_encodings_manifest

    m = read_encodings_manifest(spec.ar_encodings)
    if m["ar"]["vae_sha256"] != vae_sha:
        raise UserError(f"ar_encodings {spec.ar_encodings}: its AR model's tokenizer was fitted on another VAE's "
                        f"latents than {spec.vae}")
    for phase in spec.phases:
        shards = phase.shards if "://" in phase.shards else str(Path(phase.shards).resolve())
        for p in m["ar"]["phases"]:   # the same folder, and splits that overlap (None: all of them)
            if p["shards"] == shards and (None in (p["split"], phase.split) or p["split"] == phase.split):
                raise UserError(f"phase {phase.name}: the AR model behind {spec.ar_encodings} trained on split "
                                f"{p['split']!r} of {phase.shards}, which this phase reads; train the DiT on clips "
                                "it never saw (export --split ar=0.3: the AR model reads split 'ar', the DiT 'train')")
    return {"encodings": spec.ar_encodings, "via": m["via"], "model": m["ar"]}


def dit_model_config(spec: TrainSpec, raw: dict, latent_dim: int, grid_freq: int = 1) -> dict:
    """The backbone's config dict (with its ``backbone`` key) for a DiT spec: the config's model
    keys, the spec's overrides and backbone, the widths of the latents and the encoders, and
    for the DiT the latent grid's frequency rows (2D RoPE; the FIT's positions stay 1D)."""
    from soundlake.generation.backbones import (
        backbone_config,
        backbone_name,
        config_dict,
    )

    try:
        model = {**raw.get("model", {}), **spec.overrides, "in_channels": latent_dim,
                 "cond_dim": _text_dim(spec.text_encoder)}
        if spec.backbone:
            model["backbone"] = spec.backbone
        if backbone_name(model) == "dit":
            model["grid_freq"] = grid_freq
        if spec.extra_clap:
            from soundlake.models.clap.load import load_clap

            model["cond_extra_dim"] = load_clap(spec.extra_clap).dim
        if spec.primary == "ar":
            model["cond_dim"] = latent_dim
        if spec.cond2:
            model["cond2_dim"] = latent_dim
            # DC-LDM's best placement: the first down block and the last up block (CA-DOWN#1 & CA-UP#1)
            model.setdefault("cross_attn2_blocks", sorted({0, int(model.get("depth", 12)) - 1}))
        return config_dict(backbone_config(model))
    except (ValueError, TypeError) as e:
        raise UserError(f"config {spec.config}: {e}") from None


def _text_dim(path: str | None) -> int:
    """The text encoder's width, from its config alone (no weights loaded on the driver)."""
    from transformers import AutoConfig

    from soundlake.models.text import minilm_path

    try:
        c = AutoConfig.from_pretrained(str(path or minilm_path()), local_files_only=True)
    except OSError as e:
        raise UserError(f"text_encoder {path}: not a transformers model folder ({e})") from None
    return int(getattr(c, "hidden_size", None) or c.d_model)


def absolute_paths(spec: TrainSpec) -> TrainSpec:
    """Local paths made absolute: workers run in other folders (and on other nodes)."""
    def local(p: str | None) -> str | None:
        return p if p is None or "://" in p else str(Path(p).expanduser().resolve())

    phases = [s.model_copy(update={"shards": local(s.shards)}) for s in spec.phases]
    clap = spec.extra_clap  # a folder, or a cached hub id left as it is
    clap = local(clap) if clap and Path(clap).expanduser().exists() else clap
    return spec.model_copy(update={"out": local(spec.out), "vae": local(spec.vae), "init": local(spec.init),
                                   "tokens": local(spec.tokens), "ar_encodings": local(spec.ar_encodings),
                                   "vocoder": local(spec.vocoder),
                                   "text_encoder": local(spec.text_encoder), "extra_clap": clap,
                                   "phases": phases})
