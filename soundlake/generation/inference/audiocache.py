"""AudioCache: training-free adaptive layer caching for DiT audio samplers.

After "AudioCache: adaptive layer caching for DiT audio generation". Each cached layer
(a block's ``self_attn``, ``cross_attn``, ``cross_attn2`` or ``ff`` submodule, whose output
the block adds to its residual stream; a FIT block's also ``local_attn``, ``local_ff``,
``read`` and ``write``) returns the output it computed at its last refresh instead of
running again; the residual additions around it are always computed.

Public API::

    layer_names(model, kinds=("self_attn", "cross_attn", "ff"), optional=OPTIONAL_LAYERS,
                container="blocks") -> list[str]           # e.g. ["blocks.0.self_attn", ...]
    model_hash(model) -> str                                # sha256 of the state_dict (16 hex)

    @dataclass CacheProfile(layers, steps, mean [L, S], std [L, S], sampler, model_hash,
                            num_prompts=0, meta={})
        .save(path)                    # *.json (lists) or *.npz (arrays + json metadata)
        CacheProfile.load(path)
        .rates_for(num_steps) -> np.ndarray [L, num_steps]    # step mapping, see below
    profile_path(model_dir, sampler, steps) -> Path         # the file "beside the model"

    calibrate(model, layers, run_sampler, prompts, num_steps, sampler="euler") -> CacheProfile
        # run_sampler(prompt) runs ONE sampling of num_steps steps of `sampler` on `model`
    load_or_calibrate(model, model_dir, run_sampler, prompts, num_steps, sampler="euler",
                      layers=None) -> CacheProfile
        # the profile beside the model if it matches this model, else calibrate and save it

    cache = AudioCache(model, profile, delta=0.1, max_reuse=None, check_model=True, sampler=None)
    cache.attach()                      # or: with AudioCache(...) as cache:
    with cache.run(num_steps):          # per-run state reset (cached outputs, counters)
        x = sampler(model, ..., steps=num_steps)
    cache.stats() -> {"computed", "reused", "total", "saved_fraction", "per_layer": {...}}
    cache.remove()                      # every forward restored exactly
    plan_refreshes(profile.rates_for(n), delta, max_reuse) -> bool [L, n]   # Eq. 2 offline:
                                        # which layer computes at which step (= stats() of a
                                        # run; Heun: each step's decision holds for its calls)

    HOOK_NAME = "audiocache"            # the hooks' name (soundlake.generation.inference.hooks):
                                        # a step counter on the model, one hook per layer;
                                        # calibration uses "audiocache.calibrate"

Definitions:

* Eq. 1, relative change of layer l at step t (t >= 1):
  ``r_t = ||o_t - o_{t-1}||_1 / ||o_t||_1`` over the whole output tensor (the CFG batch
  included). The paper writes it in diffusion time, which counts down:
  ``||L_t - L_{t+1}||_1 / ||L_t||_1``, where ``L_{t+1}`` is the output one step earlier in
  sampling, so the denominator is the current step's output. Column 0 of a profile is 0
  by convention: step 0 has no predecessor and is always computed anyway.
* Eq. 2, refresh rule: at step t a layer accumulates ``acc += rate[l, t]``; it is recomputed
  (and ``acc`` reset to 0) when ``acc >= delta``, at the first and last step, when it has
  been reused ``max_reuse`` times in a row, or when its input shape changed; otherwise its
  cached output is returned and its ``forward`` does no work. ``delta = 0`` therefore
  always computes.
* Steps: one top-level ``model(...)`` call is one sampler step (classifier-free guidance
  runs cond and uncond in one forward); Heun makes two calls per step (its last step one).
  ``cache.run(n)`` takes the sampler steps and counts the calls; a call beyond them raises,
  because the step mapping would be wrong. Outside ``run`` the hooks pass through and
  compute. For Heun, as the paper states, the rate of step t is measured between the first
  model calls of steps t and t-1, and Eq. 2 decides once per step at its first call: a
  layer refreshed at step t computes at both calls, a reused one returns, at each call, the
  output of the same call of its last refreshed step. ``stats()`` counts model calls.
* Step-count mismatch (chosen: interpolate, not refuse): a profile measured with S steps
  is used for n steps by resampling its rate curve on the normalised trajectory position
  ``t / (n - 1)`` (linear interpolation) and scaling by ``(S - 1) / (n - 1)``, so the total
  change accumulated over the whole run is preserved (per-step change scales with step
  size). A profile for a different model (hash mismatch) is refused with
  ``ProfileMismatch`` unless ``check_model=False``; a different sampler only warns.

The cached tensor is returned as is (no copy): the block must not modify a layer's
output in place (the DiT adds it out of place). Inference only (use ``torch.no_grad``).
While attached, the hooks (see ``hooks.py``) live in instance attributes: remove them
before pickling or deep-copying the whole module (``state_dict`` is unaffected at all times).
AudioCache and LiteFocus hook different modules under different names and can be attached
together; each detaches alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from soundlake.core.storage import atomic_path, write_text
from soundlake.generation.diffusion import calls_per_step, model_calls
from soundlake.generation.inference.hooks import (
    ModelHook,
    find_modules,
    register_hooks,
    remove_hooks,
)

HOOK_NAME = "audiocache"  # the hook name on the model and on each cached layer
# Listed where a block has them: the DiT's second cross-attention, FIT's patch-side and read/write layers.
OPTIONAL_LAYERS = ("cross_attn2", "local_attn", "local_ff", "read", "write")


class ProfileMismatch(ValueError):
    """A cache profile that cannot be used for this model / these layers."""


# --------------------------------------------------------------------------- hooks


class _StepCounter(ModelHook):
    """On the top-level model: each call is one sampler step."""

    def __init__(self, owner: "_Stepper"):
        self.owner = owner

    def pre_forward(self, module, *args, **kwargs):
        self.owner._advance()
        return args, kwargs


class _Stepper:
    """Step bookkeeping shared by calibration and caching: a step counter on the model and
    one layer hook per named layer, all registered under ``name``."""

    name = HOOK_NAME

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        self.model = model
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("no layers named")
        try:
            self.modules = find_modules(model, self.layers)
        except LookupError as e:
            raise ProfileMismatch(str(e)) from None
        self.num_steps: int | None = None
        self.calls_per_step = 1
        self.call = -1
        self.step = -1
        self.slot = 0       # which model call of its step this one is (Heun: 0, then 1)
        self.attached = False

    def _advance(self) -> None:
        if self.num_steps is None:
            return
        self.call += 1
        self.step, self.slot = divmod(self.call, self.calls_per_step)
        if self.step >= self.num_steps:
            raise RuntimeError(
                f"model called {self.call + 1} times in a run declared with {self.num_steps} steps of "
                f"{self.calls_per_step} model call(s); one sampler step must make that many calls")

    @property
    def active(self) -> bool:
        return self.num_steps is not None and self.step >= 0

    def _layer_hook(self, index: int) -> ModelHook:
        raise NotImplementedError

    def attach(self):
        if self.attached:
            return self
        self._hooks = [self._layer_hook(i) for i in range(len(self.modules))]
        register_hooks([self.model, *self.modules], [_StepCounter(self), *self._hooks], self.name)
        self.attached = True
        return self

    def remove(self) -> None:
        if not self.attached:
            return
        remove_hooks([self.model, *self.modules], self.name)
        self.attached = False

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.remove()

    def reset(self) -> None:
        self.call = self.step = -1
        self.slot = 0
        for h in getattr(self, "_hooks", []):
            h.reset_state()

    @contextlib.contextmanager
    def run(self, num_steps: int) -> Iterator[Any]:
        """One sampling run of ``num_steps`` sampler steps (``calls_per_step`` model calls
        each, the last step possibly fewer), with fresh per-run state."""
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        if not self.attached:
            raise RuntimeError("attach() before run()")
        self.reset()
        self._start(num_steps)
        self.num_steps = num_steps
        try:
            yield self
        finally:
            self.num_steps = None
            for h in self._hooks:
                h.release()

    def _start(self, num_steps: int) -> None:
        pass


def layer_names(
    model: nn.Module,
    kinds: Sequence[str] = ("self_attn", "cross_attn", "ff"),
    optional: Sequence[str] = OPTIONAL_LAYERS,
    container: str = "blocks",
) -> list[str]:
    """Explicit layer names ``{container}.{i}.{kind}``: every block must have each of
    ``kinds`` (else KeyError); ``optional`` kinds are listed where a block has them."""
    blocks = model.get_submodule(container)
    names = []
    for i, block in enumerate(blocks):
        children = dict(block.named_children())
        for kind in list(kinds) + list(optional):
            if kind in children:
                names.append(f"{container}.{i}.{kind}")
            elif kind in kinds:
                raise KeyError(f"{container}.{i} has no submodule {kind!r}")
    return names


def model_hash(model: nn.Module) -> str:
    """sha256 of parameter/buffer names, shapes, dtypes and bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- profile


@dataclass
class CacheProfile:
    layers: list[str]
    steps: int
    mean: np.ndarray  # [L, S] mean relative L1 change per step (column 0 = 0)
    std: np.ndarray  # [L, S] std across prompts
    sampler: str
    model_hash: str
    num_prompts: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)
        shape = (len(self.layers), self.steps)
        if self.mean.shape != shape or self.std.shape != shape:
            raise ValueError(f"mean/std must be {shape}, got {self.mean.shape}/{self.std.shape}")

    def _meta(self) -> dict:
        return {"format": "soundlake.audiocache.profile/1", "layers": self.layers,
                "steps": self.steps, "sampler": self.sampler, "model_hash": self.model_hash,
                "num_prompts": self.num_prompts, "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a reader never sees half a profile
        if path.suffix == ".npz":
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, mean=self.mean, std=self.std, meta=np.array(json.dumps(self._meta())))
        else:
            write_text(path, json.dumps(self._meta() | {"mean": self.mean.tolist(), "std": self.std.tolist()},
                                        indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CacheProfile":
        path = Path(path)
        if path.suffix == ".npz":
            with np.load(path) as z:
                d = json.loads(str(z["meta"])) | {"mean": z["mean"], "std": z["std"]}
        else:
            d = json.loads(path.read_text())
        return cls(layers=list(d["layers"]), steps=int(d["steps"]), mean=d["mean"], std=d["std"],
                   sampler=d["sampler"], model_hash=d["model_hash"],
                   num_prompts=int(d.get("num_prompts", 0)), meta=d.get("meta", {}))

    def rates_for(self, num_steps: int) -> np.ndarray:
        """Rate curve [L, num_steps] for a run of ``num_steps`` (see module docstring)."""
        if num_steps == self.steps:
            return self.mean.copy()
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        out = np.zeros((len(self.layers), num_steps))
        if num_steps == 1 or self.steps == 1:
            return out  # a single step is always computed
        src = np.arange(1, self.steps) / (self.steps - 1)
        dst = np.arange(1, num_steps) / (num_steps - 1)
        scale = (self.steps - 1) / (num_steps - 1)
        for i, curve in enumerate(self.mean[:, 1:]):
            out[i, 1:] = np.interp(dst, src, curve) * scale
        return out


def profile_path(model_dir: str | Path, sampler: str, steps: int) -> Path:
    return Path(model_dir) / f"audiocache_{sampler}_{steps}.json"


# --------------------------------------------------------------------------- calibration


class _Recorder(ModelHook):
    stateful = True

    def __init__(self, owner: "_Calibrator", index: int):
        self.owner, self.index = owner, index
        self.reset_state()

    def reset_state(self) -> None:
        self.prev: torch.Tensor | None = None
        self.last_call = -1

    def release(self) -> None:  # drop held tensors at the end of a run
        self.prev = None

    def post_forward(self, module, out):
        o = self.owner
        if not o.active:
            return out
        if o.call == self.last_call:
            raise RuntimeError(f"{o.layers[self.index]} called twice in one model call")
        self.last_call = o.call
        if o.slot:  # Heun's second call: the rate is measured between first calls of steps
            return out
        cur = out.detach().float()
        if self.prev is not None and o.step > 0:
            denom = cur.abs().sum().clamp_min(1e-12)  # Eq. 1: the current step's output
            o.rates[self.index, o.step] = float((cur - self.prev).abs().sum() / denom)
        self.prev = cur
        return out


class _Calibrator(_Stepper):
    name = HOOK_NAME + ".calibrate"

    def __init__(self, model: nn.Module, layers: Sequence[str], sampler: str):
        super().__init__(model, layers)
        self.calls_per_step = calls_per_step(sampler)

    def _layer_hook(self, index):
        return _Recorder(self, index)

    def _start(self, num_steps):
        self.rates = np.zeros((len(self.layers), num_steps))


@torch.no_grad()
def calibrate(
    model: nn.Module,
    layers: Sequence[str],
    run_sampler: Callable[[Any], Any],
    prompts: Iterable[Any],
    num_steps: int,
    sampler: str = "euler",
) -> CacheProfile:
    """Run ``run_sampler(prompt)`` once per prompt (each a full ``num_steps``-step sampling
    of ``model`` with ``sampler``), recording each layer's Eq. 1 change rate per step (for
    Heun between the first model calls of consecutive steps); mean and std across prompts
    make the profile."""
    cal = _Calibrator(model, layers, sampler)
    runs = []
    with cal:
        for prompt in prompts:
            with cal.run(num_steps):
                run_sampler(prompt)
                if cal.call != model_calls(sampler, num_steps) - 1:
                    raise RuntimeError(f"sampler made {cal.call + 1} model calls, expected "
                                       f"{model_calls(sampler, num_steps)} ({num_steps} {sampler} steps)")
            runs.append(cal.rates.copy())
    if not runs:
        raise ValueError("no prompts")
    r = np.stack(runs)
    return CacheProfile(layers=list(layers), steps=num_steps, mean=r.mean(0), std=r.std(0),
                        sampler=sampler, model_hash=model_hash(model), num_prompts=len(runs))


def load_or_calibrate(model: nn.Module, model_dir: str | Path, run_sampler: Callable[[Any], Any],
                      prompts: Iterable[Any], num_steps: int, sampler: str = "euler",
                      layers: Sequence[str] | None = None) -> CacheProfile:
    """Reuse ``profile_path(model_dir, sampler, num_steps)`` when it was calibrated on this
    exact model (same hash and layers); otherwise calibrate on ``prompts`` and save it."""
    layers = list(layers) if layers is not None else layer_names(model)
    path = profile_path(model_dir, sampler, num_steps)
    if path.exists():
        prof = CacheProfile.load(path)
        if prof.model_hash == model_hash(model) and prof.layers == layers:
            return prof
    prof = calibrate(model, layers, run_sampler, prompts, num_steps, sampler)
    prof.save(path)
    return prof


# --------------------------------------------------------------------------- caching


def refresh_due(t: int, last: int, acc: float, streak: int, delta: float, max_reuse: int | None) -> bool:
    """Eq. 2: recompute at the first and last step, once the accumulated change reaches
    delta, or after max_reuse reuses in a row."""
    return t == 0 or t == last or acc >= delta or (max_reuse is not None and streak >= max_reuse)


def plan_refreshes(rates: np.ndarray, delta: float, max_reuse: int | None = None) -> np.ndarray:
    """[L, S] bool: which layer computes at which step under Eq. 2 for a rate curve
    ``rates`` (``profile.rates_for(S)``). The decisions depend on the profile only, not on
    the data, so this predicts ``AudioCache.stats()`` of a run before running it."""
    rates = np.clip(np.asarray(rates, np.float64), 0.0, None)
    plan = np.zeros(rates.shape, dtype=bool)
    last = rates.shape[1] - 1
    for i, curve in enumerate(rates):
        acc, streak = 0.0, 0
        for t in range(rates.shape[1]):
            if t > 0:
                acc += float(curve[t])
            if refresh_due(t, last, acc, streak, delta, max_reuse):
                plan[i, t], acc, streak = True, 0.0, 0
            else:
                streak += 1
    return plan


class _CacheHook(ModelHook):
    stateful = True

    def __init__(self, owner: "AudioCache", index: int):
        self.owner, self.index = owner, index
        self.computed = self.reused = 0
        self.reset_state()

    def reset_state(self) -> None:
        self.out: list[torch.Tensor | None] = [None] * self.owner.calls_per_step  # one per call of a step
        self.in_shape: list[tuple | None] = [None] * self.owner.calls_per_step
        self.acc = 0.0
        self.streak = 0
        self.refresh = True  # this step's Eq. 2 decision, taken at its first call
        self.computed = self.reused = 0

    def release(self) -> None:  # drop held tensors at the end of a run, keep the counters
        self.out = [None] * len(self.out)
        self.in_shape = [None] * len(self.in_shape)

    def new_forward(self, module, *args, **kwargs):
        o = self.owner
        if not o.active or not o.enabled:
            self.computed += o.active
            return self.inner_forward(*args, **kwargs)
        t, last, k = o.step, o.num_steps - 1, o.slot
        x = args[0] if args else next(iter(kwargs.values()), None)
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        if k == 0:  # one decision per step; Heun's second call follows it
            if t > 0:
                self.acc += float(o.rates[self.index, t])
            self.refresh = refresh_due(t, last, self.acc, self.streak, o.delta, o.max_reuse)
            if self.refresh:
                self.acc, self.streak = 0.0, 0
            else:
                self.streak += 1
        if self.refresh or self.out[k] is None or shape != self.in_shape[k]:
            self.out[k] = self.inner_forward(*args, **kwargs)
            self.in_shape[k] = shape
            self.computed += 1
        else:
            self.reused += 1
        return self.out[k]


class AudioCache(_Stepper):
    """Adaptive layer cache driven by a :class:`CacheProfile` (see module docstring)."""

    name = "audiocache"

    def __init__(self, model: nn.Module, profile: CacheProfile, delta: float = 0.1,
                 max_reuse: int | None = None, check_model: bool = True, sampler: str | None = None,
                 enabled: bool = True):
        if delta < 0:
            raise ValueError("delta must be >= 0")
        if max_reuse is not None and max_reuse < 0:
            raise ValueError("max_reuse must be >= 0")
        super().__init__(model, profile.layers)
        if check_model:
            h = model_hash(model)
            if h != profile.model_hash:
                raise ProfileMismatch(
                    f"profile was calibrated on model {profile.model_hash}, this model is {h}; "
                    "recalibrate or pass check_model=False")
        if sampler is not None and sampler != profile.sampler:
            warnings.warn(f"profile measured with sampler {profile.sampler!r}, used with {sampler!r}")
        self.profile, self.delta, self.max_reuse, self.enabled = profile, delta, max_reuse, enabled
        self.calls_per_step = calls_per_step(sampler or profile.sampler)

    def _layer_hook(self, index):
        return _CacheHook(self, index)

    def _start(self, num_steps):
        self.rates = np.clip(self.profile.rates_for(num_steps), 0.0, None)

    def stats(self) -> dict:
        per = {n: {"computed": h.computed, "reused": h.reused}
               for n, h in zip(self.layers, getattr(self, "_hooks", []))}
        computed = sum(p["computed"] for p in per.values())
        reused = sum(p["reused"] for p in per.values())
        total = computed + reused
        return {"computed": computed, "reused": reused, "total": total,
                "saved_fraction": reused / total if total else 0.0, "per_layer": per,
                "delta": self.delta, "max_reuse": self.max_reuse}
