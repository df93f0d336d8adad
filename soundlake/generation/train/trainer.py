"""Train the VAEs (waveform or mel), the vocoder and the DiT from shards on Ray Train (TorchTrainer).

    spec = load_train_spec("dit", shards="./shards/v1-latents", vae="runs/vae", out="runs/dit")  # specs.py
    summary = train(spec)          # resumes from the newest checkpoint in runs/dit/ray_train

A spec (YAML, validated; ``--set key=value`` overrides) names the model config, the
training settings and one or more **phases**, each naming its shards. The DiT phases
follow EzAudio's recipe: ``masked`` (masked-modeling pretraining without text: a random
25-100 % span of latent frames noised, the rest given clean), then ``text`` phases (e.g.
CLAP-filtered synthetic captions, then a human-caption subset).

Workers: ``workers`` Ray Train workers (CPU by default; ``use_gpu`` and the cluster's
nodes from the spec), DDP across them; each reads its share of the shards through the
export loader (:mod:`soundlake.generation.train.data`; split by rank and DataLoader worker).
``workers: 0`` is Ray Train's local mode: the same loop in this process, no Ray started
(~15 s of controller and worker start-up saved per run on a 2-core machine); it writes and
resumes the same checkpoint folders.

Checkpoints (every ``checkpoint_every`` steps and at the end) hold the full state: model,
optimizer, EMA, step, phase and the spec itself (rank 0), and each rank's data position
(epoch and batches read in it; every epoch's order is seeded, so the position restores it
exactly) and RNG states; the learning-rate schedule (warm-up, then constant or cosine per phase) is a
function of the step. Ray Train keeps them under ``<out>/ray_train`` and a re-run with the
same ``--out`` resumes from the newest one. ``init`` starts from another model's weights
only. Rank 0 appends the loss and throughput to ``<out>/train_log.csv`` (and TensorBoard
when asked); at the end the driver writes the model folder (:mod:`soundlake.generation.model_folder`) into ``<out>``.
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
from typing import Callable

from soundlake.core.errors import UserError
from soundlake.core.storage import write_text
from soundlake.generation.train.objectives import OBJECTIVES
from soundlake.generation.train.specs import TrainSpec, absolute_paths, make_plan

RUN_NAME = "ray_train"
LOG = "train_log.csv"
PROGRESS = "progress.json"
STATE = "state.pt"


def _lr_at(spec: TrainSpec, phase: int, step_in_phase: int) -> float:
    st = spec.phases[phase]
    peak = st.lr or spec.lr
    if spec.warmup_steps and step_in_phase < spec.warmup_steps:
        return peak * (step_in_phase + 1) / spec.warmup_steps
    if spec.lr_schedule == "cosine":
        span = max(1, st.steps - spec.warmup_steps)
        pos = min(1.0, (step_in_phase - spec.warmup_steps) / span)
        return peak * 0.5 * (1 + math.cos(math.pi * pos))
    return peak


@dataclass
class Position:
    step: int = 0          # optimisation steps done
    phase: int = 0
    epoch: int = 0         # of the current phase's shards
    batch: int = 0         # batches read in that epoch

    def phase_start(self, spec: TrainSpec) -> int:
        return sum(s.steps for s in spec.phases[:self.phase])


def phase_batches(spec: TrainSpec, plan: dict, loader_kw: dict, phase: int, epoch: int, skip: int,
                  memory_cache: dict):
    """Yield (epoch, batches read in it, batch) from ``skip`` batches into ``epoch`` of ``phase``,
    exactly as an uninterrupted run reads them: each epoch's order is seeded by (seed, phase, epoch).
    ``loader_kw``: the objective's export loader options."""
    import torch

    from soundlake.generation.train.data import make_dataset

    mode = spec.phases[phase].data or spec.data
    while True:
        urls = plan["phases"][phase]
        seed = spec.seed * 1_000_003 + phase * 10_007 + epoch
        ds = make_dataset(urls, batch_size=spec.batch_size, shuffle=spec.shuffle, seed=seed,
                          resample=spec.resample, partial=False, caption="random", crop="random", **loader_kw)
        if mode == "memory":  # benchmarks: epoch 0's batches (64 at most), read once, then from RAM
            key = (phase, 0)
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
            raise UserError(f"phase {spec.phases[phase].name}: no full batch of {spec.batch_size} in its shards")
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
        "lr_schedule": {"kind": spec.lr_schedule, "warmup_steps": spec.warmup_steps, "per_phase": True},
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
    objective = OBJECTIVES[spec.kind](spec, plan, device)
    extra = objective.extra_modules()
    opt = _make_optimizer(objective.model.parameters(), spec)
    extra_opts = {k: _make_optimizer(m.parameters(), spec) for k, m in extra.items()}
    ema = AveragedModel(objective.model, multi_avg_fn=get_ema_multi_avg_fn(spec.ema), use_buffers=True) \
        if spec.ema else None
    pos, history = Position(), []
    ckpt = _local_checkpoint(Path(spec.out)) if spec.workers == 0 else ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st = torch.load(Path(d) / STATE, map_location=device, weights_only=False)
            mine = Path(d) / f"rank-{rank}.pt"  # this worker's data position and RNG states
            rs = torch.load(mine if mine.exists() else Path(d) / "rank-0.pt", weights_only=False)
        objective.model.load_state_dict(st["model"])
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
            from soundlake.generation.model_folder import load_weights, read_meta

            read_meta(spec.init, spec.kind)
            objective.model.load_state_dict(load_weights(spec.init, device))
            if ema is not None:
                ema.module.load_state_dict(objective.model.state_dict())
        torch.manual_seed(spec.seed + 7919 * rank)  # different noise per rank
        random.seed(spec.seed + rank)
    if pos.step >= spec.total_steps:
        ray.train.report({"step": pos.step, "done": True})
        return
    model = ray.train.torch.prepare_model(objective.model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else objective.model
    out = Path(spec.out)
    logger = _Logger(out, pos.step, spec) if rank == 0 else None
    memory: dict = {}
    t_last, n_last = time.perf_counter(), 0
    window: list[dict] = []
    batches = phase_batches(spec, plan, objective.loader_kw, pos.phase, pos.epoch, pos.batch, memory)
    t_data = 0.0
    while pos.step < spec.total_steps:
        t0 = time.perf_counter()
        epoch, read, batch = next(batches)
        item, n = objective.prepare(batch)
        t_data += time.perf_counter() - t0
        phase = spec.phases[pos.phase]
        lr = _lr_at(spec, pos.phase, pos.step - pos.phase_start(spec))
        for o in [opt, *extra_opts.values()]:
            for g in o.param_groups:
                g["lr"] = lr
        logs = objective.step(model, opt, extra_opts, item, phase)
        if ema is not None:
            ema.update_parameters(objective.model)
        pos.epoch, pos.batch, pos.step = epoch, read, pos.step + 1
        n_last += n * world
        window.append(logs)
        boundary = pos.step == pos.phase_start(spec) + phase.steps
        if boundary and pos.phase + 1 < len(spec.phases):  # next phase: its own shards from the start
            pos.phase, pos.epoch, pos.batch = pos.phase + 1, 0, 0
            batches = phase_batches(spec, plan, objective.loader_kw, pos.phase, 0, 0, memory)
            if phase.mode == "masked" and spec.phases[pos.phase].mode == "text":
                # EzAudio: text training starts with zeroed cross-attention outputs (before the
                # checkpoint of this step, so a resumed run starts the same way)
                from soundlake.generation.dit import rezero_cross_attention

                rezero_cross_attention(objective.model, opt)
        if pos.step % spec.log_every == 0 or pos.step == spec.total_steps or boundary:
            dt = time.perf_counter() - t_last
            row = {"step": pos.step, "phase": phase.name, "lr": lr, "samples_per_s": n_last / max(dt, 1e-9),
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
                if spec.workers == 0:   # local mode keeps only the reported object: persist it as Ray Train would
                    d = _persist_local(Path(d), Path(spec.out), f"step-{pos.step:08d}", spec.keep_checkpoints)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"step-{pos.step:08d}")
    if logger:
        logger.close()


def _checkpoints(out: Path) -> list[Path]:
    """Finished checkpoint folders under ``<out>/ray_train``, oldest first (a half-copied one is a
    dot-named temporary folder, never listed)."""
    return sorted(p for p in (out / RUN_NAME).glob("step-*") if (p / STATE).exists())


def _local_checkpoint(out: Path):
    """Local mode's resume point: the newest checkpoint folder, whichever mode wrote it."""
    import ray.train

    found = _checkpoints(out)
    return ray.train.Checkpoint.from_directory(str(found[-1])) if found else None


def _persist_local(folder: Path, out: Path, name: str, keep: int) -> str:
    """Copy a checkpoint to ``<out>/ray_train/<name>`` atomically (a temporary folder renamed)
    and drop all but the newest ``keep``: what Ray Train's storage does for its workers."""
    import shutil

    final, tmp = out / RUN_NAME / name, out / RUN_NAME / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return str(final)


class _Logger:
    """Rank 0's CSV log (rows past a resumed checkpoint are dropped first), optional
    TensorBoard, and a small progress file the driver's progress bar reads."""

    FIELDS = ["step", "phase", "loss", "lr", "samples_per_s", "data_s", "seconds", "time"]

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
        write_text(self.progress, json.dumps({"step": row["step"], "total": total, "loss": row.get("loss"),
                                              "samples_per_s": row["samples_per_s"], "phase": row["phase"]}))

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


def _quicker_ray_train() -> None:
    """Ray Train V2 settings (read by this driver, passed on to its controller and workers;
    an environment value set by the user wins). Measured on a 2-core VM with 10-step runs."""
    # The controller polls its workers every 2 s by default, so a run's end waits up to 2 s
    # for it to notice (measured: 3.1-4.7 s from the last logged step to train() returning,
    # 0.9-1.6 s at 0.5 s). A poll is a tiny actor call; a slow answer is not a failure (the health
    # check gives up after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # The preemption watcher, one more actor per run, only logs node drains and feeds
    # ray.train.get_preemption_info (unused here; a failed run is not retried): its process
    # costs ~2.2 CPU-s per run, taken from the workers while they start.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _text_meta(spec: TrainSpec) -> dict:
    if spec.text_encoder:
        return {"path": str(Path(spec.text_encoder).resolve())}
    return {"path": None, "model": "all-MiniLM-L6-v2"}


def train(spec: TrainSpec, on_progress: Callable[[dict], None] | None = None) -> TrainSummary:
    """Run (or resume) training on Ray Train, then write the model folder into ``spec.out``."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from soundlake.core.ray_env import RaySpec, init_ray
    from soundlake.generation.model_folder import copy_model, read_meta, save_model

    spec = absolute_paths(spec)
    out = Path(spec.out)
    plan = make_plan(spec)
    out.mkdir(parents=True, exist_ok=True)
    started_at = _latest_step(out)
    # Worker and controller logs stay in Ray's log files: the progress bar and the summary report.
    # Local mode (workers 0) runs the loop here and needs no Ray at all.
    ray_s = init_ray(RaySpec(address=spec.ray_address, num_cpus=spec.ray_num_cpus), log_to_driver=False) \
        if spec.workers else 0.0
    threads = torch.get_num_threads()   # local mode sets this process's threads for the loop
    _quicker_ray_train()
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
        torch.set_num_threads(threads)
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
    if task_plan.get("eval_sets"):
        meta["eval_sets"] = task_plan["eval_sets"]   # the leakage check of each phase's export
    if spec.kind == "vae":
        from soundlake.generation.mel_vae import latent_geometry

        meta["config"] = task_plan["vae_config"]
        meta["latents"] = latent_geometry(meta["config"])   # what a DiT sees (grid_freq > 1: a 2D mel latent)
    elif spec.kind == "vocoder":
        meta["config"] = task_plan["vocoder_config"]
    elif spec.kind == "ar":
        meta |= {"config": task_plan["ar_config"], "latents": task_plan["latents"], "text": _text_meta(spec)}
        # the clips it trained on: a DiT whose second stream it feeds must train on others
        meta["train"]["phases"] = [{"shards": p.shards, "split": p.split} for p in spec.phases]
        tokens_meta = read_meta(spec.tokens, "tokens")
        copy_model(spec.tokens, out / "tokens")
        copy_model(tokens_meta["latents"]["vae"], out / "vae")
    else:
        meta |= {"config": task_plan["dit_config"], "schedule": task_plan["schedule"] or {},
                 "latents": task_plan["latents"], "text": _text_meta(spec),
                 "conditioning": {"extra_clap": spec.extra_clap, "cond2": spec.cond2,
                                  "cond2_frames": spec.cond2_frames, "primary": spec.primary,
                                  "ar": task_plan.get("ar")}}
        from soundlake.generation.diffusion import Schedule

        meta["schedule"] = Schedule(**meta["schedule"]).meta()
        copy_model(spec.vae, out / "vae")
        if spec.vocoder:
            copy_model(spec.vocoder, out / "vocoder")
        if task_plan.get("ar"):   # generate predicts the stream itself: the AR model travels along
            copy_model(task_plan["ar"]["model"]["path"], out / "ar")
    save_model(out, spec.kind, weights, meta)
    history = st["history"]
    losses = [h["loss"] for h in history[-1:] if h.get("loss") is not None]
    rates = [h["samples_per_s"] for h in history if h["step"] > started_at]
    return TrainSummary(str(out), spec.kind, st["position"]["step"], started_at, elapsed, ray_s,
                        sum(rates) / len(rates) if rates else 0.0,
                        losses[0] if losses else None, str(result.checkpoint.path), history)

