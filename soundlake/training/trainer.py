"""Train the waveform VAE and the DiT from shards on Ray Train (TorchTrainer).

    spec = load_train_spec("dit", shards="./shards/v1-latents", vae="runs/vae", out="runs/dit")
    summary = train(spec)          # resumes from the newest checkpoint in runs/dit/ray_train

A spec (YAML, validated; ``--set key=value`` overrides) names the model config, the
training settings and one or more **stages**, each naming its shards. The DiT stages
follow EzAudio's recipe: ``masked`` (masked-modeling pretraining without text: a random
25-100 % span of latent frames noised, the rest given clean), then ``text`` stages (e.g.
CLAP-filtered synthetic captions, then a human-caption subset).

Workers: ``workers`` Ray Train workers (CPU by default; ``use_gpu`` and the cluster's
nodes from the spec), DDP across them; each reads its share of the shards through the
export loader (:mod:`soundlake.training.data`; split by rank and DataLoader worker).

Checkpoints (every ``checkpoint_every`` steps and at the end) hold the full state: model,
optimizer, EMA, step, stage and the spec itself (rank 0), and each rank's data position
(epoch and batches read in it; every epoch's order is seeded, so the position restores it
exactly) and RNG states; the learning-rate schedule (warm-up, then constant or cosine per stage) is a
function of the step. Ray Train keeps them under ``<out>/ray_train`` and a re-run with the
same ``--out`` resumes from the newest one. ``init`` starts from another model's weights
only. Rank 0 appends the loss and throughput to ``<out>/train_log.csv`` (and TensorBoard
when asked); at the end the driver writes the model folder (:mod:`.bundle`) into ``<out>``.
``<out>`` must be a folder every worker and the driver can reach (local, or shared on a
cluster), as Ray Train's storage path is.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from soundlake.errors import UserError

RUN_NAME = "ray_train"
LOG = "train_log.csv"
PROGRESS = "progress.json"
STATE = "state.pt"


# ---------------------------------------------------------------------- spec

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageSpec(_Section):
    name: str = "main"
    shards: str = Field(..., description="export folder/URI (its manifest), or a brace pattern of .tar paths")
    split: str | None = Field("train", description="the export split to read (None = all)")
    steps: int = Field(..., ge=1)
    mode: Literal["text", "masked"] = Field("text", description="dit: text-conditioned, or masked pretraining")
    lr: float | None = Field(None, gt=0, description="this stage's peak learning rate (default: lr)")


class TrainSpec(_Section):
    kind: Literal["vae", "dit"]
    out: str
    config: str = Field(..., description="model config: a bundled name (vae-tiny, dit-tiny, ...) or a YAML path")
    overrides: dict[str, Any] = Field(default_factory=dict, description="model config keys to change")
    vae: str | None = Field(None, description="dit: the trained VAE folder whose latents the shards hold")
    text_encoder: str | None = Field(None, description="dit: transformers encoder folder (default: MiniLM)")
    extra_clap: str | None = Field(None, description="dit, GenAu dual encoder: a CLAP model whose text embedding "
                                                     "of the caption is a second text condition")
    cond2: Literal["latents"] | None = Field(None, description="dit, DC-LDM second stream: 'latents' = the clip's "
                                                               "VAE latents pooled to cond2_frames (an acoustic "
                                                               "sequence; at generation: a reference clip's)")
    cond2_frames: int = Field(16, ge=1, description="length of the second stream")
    stages: list[StageSpec] = Field(..., min_length=1)
    batch_size: int = Field(16, ge=1, description="per worker")
    seconds: float = Field(2.0, gt=0, description="training crop length in seconds")
    lr: float = Field(3e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear warm-up at the start of every stage")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    cond_drop: float = Field(0.1, ge=0, le=1, description="dit: condition dropout for classifier-free guidance")
    mask_frac: tuple[float, float] = Field((0.25, 1.0), description="dit masked stages: span fraction range")
    ema: float | None = Field(None, gt=0, lt=1, description="EMA decay (e.g. 0.999); the saved model is the EMA")
    seed: int = 0
    init: str | None = Field(None, description="weights-only start: a model folder of the same kind")
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    tensorboard: bool = Field(False, description="also log to <out>/tensorboard")
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: its CPUs)")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per worker")
    shuffle: int = Field(256, ge=0, description="shuffle buffer (samples)")
    resample: bool = Field(False, description="draw shards with replacement (fewer shards than readers)")
    data: Literal["shards", "memory"] = Field("shards", description="memory: batches held in RAM (benchmarks)")
    ray_address: str | None = None
    ray_num_cpus: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "dit" and not self.vae:
            raise ValueError("vae: a DiT trains on VAE latents; give the VAE folder (--vae runs/vae)")
        if self.kind == "vae" and any(s.mode == "masked" for s in self.stages):
            raise ValueError("stages: mode 'masked' is for the DiT")
        if "://" in self.out:
            raise ValueError("out: a local or shared folder (Ray Train's storage), not a URI")
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def load_train_spec(kind: str, spec: str | None = None, sets: list[str] | None = None, **given) -> TrainSpec:
    """A spec from a YAML file (optional), then the command's options (``given``, None = unset),
    then ``--set key=value`` overrides; one-line errors naming the key."""
    from soundlake.pipelines.spec import _set, describe_error, parse_override, read_yaml_mapping

    raw: dict = {}
    if spec:
        if not Path(spec).is_file():
            raise UserError(f"--spec {spec}: no such file")
        raw = read_yaml_mapping(Path(spec), f"--spec {spec}")
    raw["kind"] = kind
    shards, steps = given.pop("shards", None), given.pop("steps", None)
    if shards is not None or steps is not None:
        if len(raw.get("stages") or [{}]) > 1:
            raise UserError("--shards/--steps set a single stage; this spec has several (edit its stages)")
        stage = dict((raw.get("stages") or [{}])[0])
        stage.update({k: v for k, v in (("shards", shards), ("steps", steps)) if v is not None})
        raw["stages"] = [stage]
    defaults = _config_defaults(raw.get("config") or given.get("config"), kind)
    raw = {**defaults, **raw}
    raw.update({k: v for k, v in given.items() if v is not None})
    for text in sets or []:
        _set(raw, *parse_override(text))
    try:
        return TrainSpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"train spec: {describe_error(e.errors()[0])}") from None


def _config_defaults(config: str | None, kind: str) -> dict:
    """Training defaults from the model config's ``train:`` section (DiT configs have one)."""
    from soundlake.training.vae import read_config

    config = config or ("vae-tiny" if kind == "vae" else "dit-tiny")
    try:
        train = dict(read_config(config).get("train") or {})
    except FileNotFoundError:
        raise UserError(f"config {config!r}: no such bundled config or file "
                        "(bundled: vae-tiny, vae-ezaudio, dit-tiny, dit-L, dit-XL)") from None
    allowed = set(TrainSpec.model_fields)
    return {"config": config, **{k: v for k, v in train.items() if k in allowed}}


# ---------------------------------------------------------------------- plan (driver)

def _stage_urls(stage: StageSpec) -> list[str]:
    from soundlake.training.data import shard_urls

    try:
        urls = shard_urls(stage.shards, split=stage.split)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"stage {stage.name}: cannot read shards {stage.shards}: {e}") from None
    if not urls:
        raise UserError(f"stage {stage.name}: {stage.shards} has no shards of split {stage.split!r}")
    return urls


def make_plan(spec: TrainSpec) -> dict:
    """Everything the workers need, resolved once on the driver (shard lists, configs)."""
    from soundlake.training.encode import FORMAT, _read_manifest
    from soundlake.training.vae import VAEConfig, read_config

    plan: dict = {"stages": [_stage_urls(s) for s in spec.stages]}
    if spec.kind == "vae":
        try:
            plan["vae_config"] = VAEConfig.from_dict({**read_config(spec.config), **spec.overrides}).to_dict()
        except (ValueError, TypeError) as e:
            raise UserError(f"config {spec.config}: {e}") from None
        return plan
    from soundlake.training.bundle import read_meta
    from soundlake.training.dit import DiTConfig

    vae_meta = read_meta(spec.vae, "vae")
    raw = read_config(spec.config)
    plan["vae_config"] = vae_meta["config"]
    plan["schedule"] = raw.get("schedule", {})
    try:
        model = {**raw.get("model", {}), **spec.overrides, "in_channels": vae_meta["config"]["latent_dim"],
                 "cond_dim": _text_dim(spec.text_encoder)}
        if spec.extra_clap:
            from soundlake.models.clap import load_clap

            model["cond_extra_dim"] = load_clap(spec.extra_clap).dim
        if spec.cond2:
            model["cond2_dim"] = vae_meta["config"]["latent_dim"]
            model.setdefault("cross_attn2_blocks", list(range(3, int(model.get("depth", 12)), 4)) or [0])
        cfg = DiTConfig.from_dict(model)
    except (ValueError, TypeError) as e:
        raise UserError(f"config {spec.config}: {e}") from None
    plan["dit_config"] = cfg.to_dict()
    from soundlake.models.text import weights_sha256

    vae_sha = weights_sha256(Path(spec.vae) / "model.safetensors")
    stats = None
    for stage in spec.stages:
        if stage.shards.endswith(".tar") or "{" in stage.shards:
            raise UserError(f"stage {stage.name}: give the latent shard folder (its manifest has the latent "
                            "statistics), not a list of tars")
        m = _read_manifest(stage.shards)
        if m is None or m.get("format") != FORMAT:
            raise UserError(f"stage {stage.name}: {stage.shards} holds no latents; "
                            f"run `soundlake encode --vae {spec.vae} --shards <export> --out <folder>` first")
        if m["vae"]["weights_sha256"] != vae_sha:
            raise UserError(f"stage {stage.name}: {stage.shards} was encoded by another VAE than {spec.vae}")
        stats = stats or m["latents"]
    plan["latents"] = {"mean": stats["mean"], "std": stats["std"], "rate": stats["rate"]}
    return plan


def _text_dim(path: str | None) -> int:
    """The text encoder's width, from its config alone (no weights loaded on the driver)."""
    from transformers import AutoConfig

    from soundlake.models.text import minilm_path

    try:
        c = AutoConfig.from_pretrained(str(path or minilm_path()), local_files_only=True)
    except OSError as e:
        raise UserError(f"text_encoder {path}: not a transformers model folder ({e})") from None
    return int(getattr(c, "hidden_size", None) or c.d_model)


# ---------------------------------------------------------------------- tasks (workers)

def _lr_at(spec: TrainSpec, stage: int, step_in_stage: int) -> float:
    st = spec.stages[stage]
    peak = st.lr or spec.lr
    if spec.warmup_steps and step_in_stage < spec.warmup_steps:
        return peak * (step_in_stage + 1) / spec.warmup_steps
    if spec.lr_schedule == "cosine":
        span = max(1, st.steps - spec.warmup_steps)
        pos = min(1.0, (step_in_stage - spec.warmup_steps) / span)
        return peak * 0.5 * (1 + math.cos(math.pi * pos))
    return peak


class VaeTask:
    def __init__(self, spec: TrainSpec, plan: dict, device):
        from soundlake.training.vae import VAEConfig, WaveVAE, build_discriminator

        self.spec, self.device = spec, device
        self.cfg = VAEConfig.from_dict(plan["vae_config"])
        self.model = WaveVAE(self.cfg).to(device)
        self.disc = build_discriminator(self.cfg)
        self.disc = self.disc.to(device) if self.disc is not None else None
        samples = max(1, round(spec.seconds * self.cfg.sample_rate / self.cfg.hop)) * self.cfg.hop
        self.loader_kw = {"seconds": samples / self.cfg.sample_rate, "sample_rate": self.cfg.sample_rate}

    def extra_modules(self) -> dict:
        return {"disc": self.disc} if self.disc is not None else {}

    def prepare(self, batch) -> tuple[Any, int]:
        wav = batch.audio.mean(dim=1, keepdim=True).to(self.device)  # mono [B, 1, T]
        return wav, wav.shape[0]

    def step(self, model, opt, extra_opts, wav, stage: StageSpec) -> dict:
        from soundlake.training.vae import vae_train_step

        return vae_train_step(model, opt, wav, self.cfg, self.disc, extra_opts.get("disc"), self.spec.grad_clip)


class DitTask:
    def __init__(self, spec: TrainSpec, plan: dict, device):
        from soundlake.training.conditioning import TextConditioner
        from soundlake.training.diffusion import Schedule
        from soundlake.training.dit import DiT, DiTConfig

        self.spec, self.device = spec, device
        self.text = TextConditioner(spec.text_encoder, device=str(device))
        self.model = DiT(DiTConfig.from_dict(plan["dit_config"])).to(device)
        self.schedule = Schedule(**plan["schedule"])
        self.mean, self.std = plan["latents"]["mean"], plan["latents"]["std"]
        self.loader_kw = {"latent_frames": max(1, round(spec.seconds * plan["latents"]["rate"]))}
        self._cache: dict[str, Any] = {}
        self.clap = None
        if spec.extra_clap:
            from soundlake.models.clap import load_clap

            self.clap = load_clap(spec.extra_clap, device=str(device))

    def extra_modules(self) -> dict:
        return {}

    def _encode(self, captions: list[str]):
        """Text tokens for a batch; the frozen encoder's output is cached per caption."""
        import torch

        from soundlake.training.conditioning import Condition

        new = sorted({c for c in captions if c not in self._cache})
        if new:
            if len(self._cache) > 50_000:
                self._cache.clear()
            hidden, mask = self.text.encode(new)
            extra = self.clap.embed_text(new) if self.clap is not None else [None] * len(new)
            for c, h, m, e in zip(new, hidden, mask, extra):
                self._cache[c] = (h[m].clone(), None if e is None else torch.as_tensor(e))
        seqs = [self._cache[c][0] for c in captions]
        n = max(s.shape[0] for s in seqs)
        ctx = torch.zeros(len(seqs), n, seqs[0].shape[1])
        mask = torch.zeros(len(seqs), n, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ctx[i, :len(s)], mask[i, :len(s)] = s, True
        extra = torch.stack([self._cache[c][1] for c in captions]) if self.clap is not None else None
        return Condition(ctx, mask, extra).to(self.device)

    def prepare(self, batch) -> tuple[Any, int]:
        x0 = ((batch.latents - self.mean) / self.std).transpose(1, 2).to(self.device)  # [B, F, C]
        return (x0, batch.captions), x0.shape[0]

    def step(self, model, opt, extra_opts, item, stage: StageSpec) -> dict:
        import torch

        from soundlake.training.bundle import pool_frames
        from soundlake.training.diffusion import diffusion_train_step

        x0, captions = item
        masked = stage.mode == "masked"
        cond = None if masked else self._encode(captions)
        if cond is not None and self.spec.cond2 == "latents":
            cond.context2 = pool_frames(x0, self.spec.cond2_frames)
            cond.mask2 = torch.ones(cond.context2.shape[:2], dtype=torch.bool, device=x0.device)
        return diffusion_train_step(model, opt, x0, cond, self.schedule, masked=masked,
                                    cond_drop=self.spec.cond_drop, grad_clip=self.spec.grad_clip,
                                    mask_frac=tuple(self.spec.mask_frac))


@dataclass
class Position:
    step: int = 0          # optimisation steps done
    stage: int = 0
    epoch: int = 0         # of the current stage's shards
    batch: int = 0         # batches read in that epoch

    def stage_start(self, spec: TrainSpec) -> int:
        return sum(s.steps for s in spec.stages[:self.stage])


def _batches(spec: TrainSpec, plan: dict, task, stage: int, epoch: int, skip: int, memory_cache: dict):
    """Yield (epoch, batches read in it, batch) from ``skip`` batches into ``epoch`` of ``stage``,
    exactly as an uninterrupted run reads them: each epoch's order is seeded by (seed, stage, epoch)."""
    import torch

    from soundlake.training.data import make_dataset

    while True:
        urls = plan["stages"][stage]
        seed = spec.seed * 1_000_003 + stage * 10_007 + epoch
        ds = make_dataset(urls, batch_size=spec.batch_size, shuffle=spec.shuffle, seed=seed,
                          resample=spec.resample, partial=False, caption="random", crop="random", **task.loader_kw)
        if spec.data == "memory":  # benchmarks: the same batches, read once, then from RAM
            key = (stage, 0)
            if key not in memory_cache:
                memory_cache[key] = [b for _, b in zip(range(64), ds)]
            it = iter(memory_cache[key])
        elif spec.loader_workers:
            it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=spec.loader_workers,
                                                  generator=torch.Generator().manual_seed(seed)))
        else:
            it = iter(ds)
        got = 0
        for i, batch in enumerate(it):
            got += 1
            if i >= skip:  # resuming inside an epoch: re-read up to the saved position
                yield epoch, i + 1, batch
        if got == 0:
            raise UserError(f"stage {spec.stages[stage].name}: no full batch of {spec.batch_size} in its shards")
        epoch, skip = epoch + 1, 0


def _save_state(folder: Path, model, opt, extra: dict, extra_opts: dict, ema, pos: Position,
                spec: TrainSpec, plan: dict, history: list[dict]) -> None:
    import torch

    torch.save({
        "model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
        "extra": {k: m.state_dict() for k, m in extra.items()},
        "extra_optimizers": {k: o.state_dict() for k, o in extra_opts.items()},
        "ema": ema.state_dict() if ema is not None else None,
        "position": vars(pos), "spec": spec.model_dump(mode="json"), "plan": plan, "history": history[-2000:],
        "lr_schedule": {"kind": spec.lr_schedule, "warmup_steps": spec.warmup_steps, "per_stage": True},
    }, folder / STATE)


def _unwrap(model):
    return getattr(model, "module", model)


def _make_optimizer(params, spec: TrainSpec):
    import torch

    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.99))


def train_loop(config: dict) -> None:
    """The per-worker loop (Ray Train calls it on every worker)."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    spec = TrainSpec.model_validate(config["spec"])
    plan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.threads or max(1, int(spec.cpus_per_worker)))
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    task = (VaeTask if spec.kind == "vae" else DitTask)(spec, plan, device)
    extra = task.extra_modules()
    opt = _make_optimizer(task.model.parameters(), spec)
    extra_opts = {k: _make_optimizer(m.parameters(), spec) for k, m in extra.items()}
    ema = AveragedModel(task.model, multi_avg_fn=get_ema_multi_avg_fn(spec.ema), use_buffers=True) \
        if spec.ema else None
    pos, history = Position(), []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st = torch.load(Path(d) / STATE, map_location=device, weights_only=False)
            mine = Path(d) / f"rank-{rank}.pt"  # this worker's data position and RNG states
            rs = torch.load(mine if mine.exists() else Path(d) / "rank-0.pt", weights_only=False)
        task.model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        for k, m in extra.items():
            m.load_state_dict(st["extra"][k])
            extra_opts[k].load_state_dict(st["extra_optimizers"][k])
        if ema is not None and st["ema"] is not None:
            ema.load_state_dict(st["ema"])
        pos, history = Position(**rs["position"]), st["history"]
        torch.set_rng_state(rs["rng"])
        random.setstate(rs["py_rng"])
    else:
        if spec.init:
            from soundlake.training.bundle import load_weights, read_meta

            read_meta(spec.init, spec.kind)
            task.model.load_state_dict(load_weights(spec.init, device))
            if ema is not None:
                ema.module.load_state_dict(task.model.state_dict())
        torch.manual_seed(spec.seed + 7919 * rank)  # different noise per rank
        random.seed(spec.seed + rank)
    if pos.step >= spec.total_steps:
        ray.train.report({"step": pos.step, "done": True})
        return
    model = ray.train.torch.prepare_model(task.model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else task.model
    out = Path(spec.out)
    logger = _Logger(out, pos.step, spec) if rank == 0 else None
    memory: dict = {}
    t_last, n_last = time.perf_counter(), 0
    window: list[dict] = []
    batches = _batches(spec, plan, task, pos.stage, pos.epoch, pos.batch, memory)
    t_data = 0.0
    while pos.step < spec.total_steps:
        t0 = time.perf_counter()
        epoch, read, batch = next(batches)
        item, n = task.prepare(batch)
        t_data += time.perf_counter() - t0
        stage = spec.stages[pos.stage]
        lr = _lr_at(spec, pos.stage, pos.step - pos.stage_start(spec))
        for o in [opt, *extra_opts.values()]:
            for g in o.param_groups:
                g["lr"] = lr
        logs = task.step(model, opt, extra_opts, item, stage)
        if ema is not None:
            ema.update_parameters(task.model)
        pos.epoch, pos.batch, pos.step = epoch, read, pos.step + 1
        n_last += n * world
        window.append(logs)
        boundary = pos.step == pos.stage_start(spec) + stage.steps
        if boundary and pos.stage + 1 < len(spec.stages):  # next stage: its own shards from the start
            pos.stage, pos.epoch, pos.batch = pos.stage + 1, 0, 0
            batches = _batches(spec, plan, task, pos.stage, 0, 0, memory)
        if pos.step % spec.log_every == 0 or pos.step == spec.total_steps or boundary:
            dt = time.perf_counter() - t_last
            row = {"step": pos.step, "stage": stage.name, "lr": lr, "samples_per_s": n_last / max(dt, 1e-9),
                   "data_s": t_data, "seconds": dt, "time": time.time()}
            for k in window[0]:
                if isinstance(window[0][k], (int, float)):
                    row[k] = sum(w[k] for w in window) / len(window)
            history.append(row)
            if logger:
                logger.write(row, spec.total_steps)
            window, t_last, n_last, t_data = [], time.perf_counter(), 0, 0.0
        if pos.step % spec.checkpoint_every == 0 or pos.step == spec.total_steps:
            metrics = {"step": pos.step, "loss": history[-1].get("loss") if history else None}
            # Every rank saves its own data position and RNG states (ranks read different
            # shards); rank 0 also the model and optimizers. Ray Train merges the folders.
            with tempfile.TemporaryDirectory() as d:
                torch.save({"position": vars(pos), "rng": torch.get_rng_state(), "py_rng": random.getstate()},
                           Path(d) / f"rank-{rank}.pt")
                if rank == 0:
                    _save_state(Path(d), model, opt, extra, extra_opts, ema, pos, spec, plan, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"step-{pos.step:08d}")
    if logger:
        logger.close()


class _Logger:
    """Rank 0's CSV log (rows past a resumed checkpoint are dropped first), optional
    TensorBoard, and a small progress file the driver's progress bar reads."""

    FIELDS = ["step", "stage", "loss", "lr", "samples_per_s", "data_s", "seconds", "time"]

    def __init__(self, out: Path, start_step: int, spec: TrainSpec):
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.progress = out / LOG, out / PROGRESS
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.fields = None
        self.rows = rows
        self.tb = None
        if spec.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("tensorboard: `pip install tensorboard` to log to TensorBoard") from None
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict, total: int) -> None:
        if self.fields is None:
            self.fields = self.FIELDS + sorted(k for k in row if k not in self.FIELDS)
            old = self.rows
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, self.fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, row["step"])
        tmp = self.progress.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": row["step"], "total": total, "loss": row.get("loss"),
                                   "samples_per_s": row["samples_per_s"], "stage": row["stage"]}))
        os.replace(tmp, self.progress)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------- driver

@dataclass
class TrainSummary:
    out: str
    kind: str
    steps: int
    resumed_from: int
    elapsed_s: float
    ray_startup_s: float
    samples_per_s: float
    final_loss: float | None
    checkpoint: str
    history: list[dict] = field(default_factory=list)


def _latest_step(out: Path) -> int:
    try:
        return int(json.loads((out / PROGRESS).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def _absolute_paths(spec: TrainSpec) -> TrainSpec:
    def local(p: str | None) -> str | None:
        return p if p is None or "://" in p else str(Path(p).expanduser().resolve())

    stages = [s.model_copy(update={"shards": local(s.shards)}) for s in spec.stages]
    clap = spec.extra_clap  # a folder, or a cached hub id left as it is
    clap = local(clap) if clap and Path(clap).expanduser().exists() else clap
    return spec.model_copy(update={"out": local(spec.out), "vae": local(spec.vae), "init": local(spec.init),
                                   "text_encoder": local(spec.text_encoder), "extra_clap": clap,
                                   "stages": stages})


def train(spec: TrainSpec, on_progress: Callable[[dict], None] | None = None) -> TrainSummary:
    """Run (or resume) training on Ray Train, then write the model folder into ``spec.out``."""
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from soundlake.pipelines.runner import init_ray
    from soundlake.pipelines.spec import RaySpec
    from soundlake.training.bundle import copy_model, save_model

    spec = _absolute_paths(spec)  # workers run in other folders (and on other nodes)
    out = Path(spec.out)
    plan = make_plan(spec)
    out.mkdir(parents=True, exist_ok=True)
    started_at = _latest_step(out)
    # Worker and controller logs stay in Ray's log files: the progress bar and the summary report.
    ray_s = init_ray(RaySpec(address=spec.ray_address, num_cpus=spec.ray_num_cpus), log_to_driver=False)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"spec": spec.model_dump(mode="json"), "plan": plan},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.cpus_per_worker}),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(out),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=0)))
    stop = threading.Event()

    def poll():
        last = None
        while not stop.wait(0.5):
            try:
                p = json.loads((out / PROGRESS).read_text())
            except (OSError, ValueError):
                continue
            if p != last and on_progress:
                on_progress(p)
                last = p

    t0 = time.perf_counter()
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; show its last line
        msg = str(e).strip().splitlines()
        user = [line for line in msg if "UserError" in line]
        raise UserError(f"training failed: {(user or msg or [type(e).__name__])[-1]}") from e
    finally:
        stop.set()
        th.join()
    elapsed = time.perf_counter() - t0
    if result.checkpoint is None:
        raise UserError(f"training produced no checkpoint under {out / RUN_NAME}")
    with result.checkpoint.as_directory() as d:
        st = torch.load(Path(d) / STATE, map_location="cpu", weights_only=False)
    weights = st["model"]
    if st.get("ema"):
        weights = {k[len("module."):]: v for k, v in st["ema"].items() if k.startswith("module.")}
    task_plan = st["plan"]
    meta = {"train": {"step": st["position"]["step"], "spec": st["spec"], "ema": spec.ema,
                      "checkpoint": str(result.checkpoint.path)}}
    if spec.kind == "vae":
        meta["config"] = task_plan["vae_config"]
    else:
        if spec.text_encoder:
            text_meta = {"path": str(Path(spec.text_encoder).resolve())}
        else:
            text_meta = {"path": None, "model": "all-MiniLM-L6-v2"}
        meta |= {"config": task_plan["dit_config"], "schedule": task_plan["schedule"] or {},
                 "latents": task_plan["latents"], "text": text_meta,
                 "conditioning": {"extra_clap": spec.extra_clap, "cond2": spec.cond2,
                                  "cond2_frames": spec.cond2_frames}}
        from soundlake.training.diffusion import Schedule

        meta["schedule"] = Schedule(**meta["schedule"]).meta()
        copy_model(spec.vae, out / "vae")
    save_model(out, spec.kind, weights, meta)
    history = st["history"]
    losses = [h["loss"] for h in history[-1:] if h.get("loss") is not None]
    rates = [h["samples_per_s"] for h in history if h["step"] > started_at]
    return TrainSummary(str(out), spec.kind, st["position"]["step"], started_at, elapsed, ray_s,
                        sum(rates) / len(rates) if rates else 0.0,
                        losses[0] if losses else None, str(result.checkpoint.path), history)

