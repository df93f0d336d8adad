"""Cached-inference evaluation: AudioCache calibration and the Table I-style report.

What ``soundlake calibrate-cache`` and ``soundlake evaluate --model ...`` run:

* :func:`calibrate_cache` samples each prompt once with a trained DiT
  (:class:`~soundlake.generation.model_folder.Generator`), records every cached layer's change
  rate per step (``audiocache.calibrate``, Eq. 1) and saves the profile beside the model
  (``audiocache.profile_path``) with a PNG of the per-layer curves (the paper's Fig. 3).
* :func:`evaluate_generation` runs a prompt set uncached, with AudioCache at each δ, and
  with full vs LiteFocus sparse self-attention at several durations. For each setting it
  measures wall time (end to end and the DiT loop alone), self-attention time, layer
  evaluations (``AudioCache.stats()``) and FD / KL / IS / CLAP score
  (``soundlake.generation.inference.metrics``) with a CLAP model; :class:`CacheEvalReport` writes it
  as Markdown, HTML (plots embedded) and JSON.

Fairness: every setting of a batch samples from the same seeded noise, and the settings
are interleaved batch by batch, so machine noise hits them alike. Speed-ups are ratios
to the uncached run (cache rows) or to full attention at the same duration (sparse rows),
measured in the same process.

Reference set: the prompts' reference audio when every prompt has one; otherwise the
uncached (full attention) outputs at the same duration, so FD and KL then measure the
drift from exact inference (0 for the baseline row). The report says which.

Public API::

    read_prompts(path) -> list[EvalPrompt]            # .jsonl ({"caption", "audio"?}) or text
    @dataclass Sampling(steps=100, sampler="ddim", cfg=5.0, rescale=0.75, rescale_axis="all",
                        seed=0, batch_size=8)
    calibrate_cache(gen, captions, sampling, seconds, progress=None) -> CacheProfile
    load_profile(gen, sampling) -> CacheProfile | None  # the saved one, if it fits this model
    profile_summary(profile) -> dict                   # layers, steps, mean change per kind
    fig3_comparison(profile) -> dict; fig3_text(cmp) -> str   # the profile against the paper's Fig. 3
    change_rate_png(profile) -> bytes                  # Fig. 3
    @dataclass EvalSettings(deltas, seconds, sparse_ratio=None, durations=(), max_reuse=None,
                            window=None, chunk=None, exact_short=False, sparse_with_delta=None)
    evaluate_generation(gen, prompts, sampling, settings, clap, labels, profile,
                        progress=None, profile_source="", extractors=None) -> CacheEvalReport
        # clap: metrics.ClapFunctions (with a classifier); labels: (name, [label, ...]);
        # extractors: PaperExtractors(panns=..., vggish=...) adds the papers' FD/KL/IS and FAD
    model_steps(settings, sampling, n_prompts) -> int  # what the progress callback will count
    training_seconds(gen) / planned_fraction(...)
    litefocus_geometry(gen, window, chunk, seconds, exact_short=False) -> LiteFocusGeometry  # focus on 2D grids
    sparse_geometry(gen, settings) -> LiteFocusGeometry; attach_litefocus(gen, geometry, ratio, seed) -> handle
    CacheEvalReport.markdown() / .html() / .to_dict() / .write(out_dir) -> list[Path]
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from soundlake.core.audio import read_mono
from soundlake.core.errors import UserError
from soundlake.generation.diffusion import calls_per_step, model_calls
from soundlake.generation.inference.audiocache import (
    AudioCache,
    CacheProfile,
    calibrate,
    layer_names,
    model_hash,
    plan_refreshes,
    profile_path,
)
from soundlake.generation.inference.hooks import (
    HookRegistry,
    ModelHook,
    find_modules,
    register_hooks,
    remove_hooks,
)
from soundlake.generation.inference.litefocus import (
    SparseHandle,
    attach_sparse_attention,
)
from soundlake.generation.inference.metrics import (
    ClapFunctions,
    clap_score_audio,
    fd_audio,
    is_audio,
    kl_audio,
)

LAYER_KINDS = ("self_attn", "cross_attn", "cross_attn2", "ff")
Progress = Callable[[int, str], None]  # (model steps just done, what is running)


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class EvalPrompt:
    caption: str
    reference: Path | None = None


def read_prompts(path: str | Path) -> list[EvalPrompt]:
    """Prompts from a .jsonl file (one object per line: ``caption`` (or ``text`` /
    ``prompt``) and optionally ``audio`` (or ``reference`` / ``path``), a reference clip
    path, relative to the file) or a text file (one caption per line). Blank lines and
    ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file (a .jsonl with captions or a text file, one per line)")
    prompts = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            prompts.append(EvalPrompt(line))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{no}: not valid JSON ({e.msg}); write one object per line") from None
        caption = next((row[k] for k in ("caption", "text", "prompt") if isinstance(row.get(k), str)), None)
        if not caption or not caption.strip():
            raise UserError(f"{path}:{no}: no \"caption\" string in {line[:60]!r}")
        ref = next((row[k] for k in ("audio", "reference", "path") if row.get(k)), None)
        if ref is not None:
            ref = Path(ref) if Path(ref).is_absolute() else path.parent / ref
            if not ref.is_file():
                raise UserError(f"{path}:{no}: reference audio {ref} not found")
        prompts.append(EvalPrompt(caption.strip(), ref))
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in the file")
    with_ref = sum(p.reference is not None for p in prompts)
    if 0 < with_ref < len(prompts):
        raise UserError(f"{path}: {with_ref} of {len(prompts)} prompts have reference audio; give one for "
                        "every prompt (paired KL needs them all) or for none")
    return prompts


# --------------------------------------------------------------------------- sampling


@dataclass
class Sampling:
    steps: int = 100
    sampler: str = "ddim"
    cfg: float = 5.0
    rescale: float = 0.75
    rescale_axis: str = "all"
    seed: int = 0
    batch_size: int = 8


def training_seconds(gen) -> float | None:
    """The crop length the DiT was trained on (``train.spec.seconds`` in its folder), if recorded."""
    seconds = (gen.meta.get("train", {}).get("spec") or {}).get("seconds")
    return float(seconds) if seconds else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Timed:
    audio: np.ndarray
    latents: np.ndarray  # the sampler's final latents [B, F, C], before the VAE
    wall_s: float
    dit_s: float


def _generate(gen, captions: list[str], seconds: float, s: Sampling, seed: int,
              on_step: Callable[[], None] | None = None) -> _Timed:
    """One ``gen.generate`` call, timed end to end and from the first DiT call to the last step."""
    first: list[float] = []
    last = [0.0]
    final: list[torch.Tensor] = []

    def pre_hook(*_):
        if not first:
            first.append(time.perf_counter())

    def callback(i, t, x):
        last[0] = time.perf_counter()
        final[:] = [x]
        if on_step is not None:
            on_step()

    handle = gen.dit.register_forward_pre_hook(pre_hook)
    try:
        t0 = time.perf_counter()
        out = gen.generate(captions, seconds=seconds, steps=s.steps, sampler=s.sampler, cfg=s.cfg,
                           rescale=s.rescale, rescale_axis=s.rescale_axis, seed=seed, callback=callback)
        _sync(gen.device)
        wall = time.perf_counter() - t0
    finally:
        handle.remove()
    return _Timed(out.audio, final[0].float().cpu().numpy(), wall, last[0] - first[0] if first else 0.0)


def _batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))]


# --------------------------------------------------------------------------- calibration


def calibrate_cache(gen, captions: Sequence[str], sampling: Sampling, seconds: float,
                    progress: Progress | None = None) -> CacheProfile:
    """Calibrate every block's self_attn / cross_attn / ff of ``gen.dit`` on ``captions``
    (one sampling per caption, noise seeded by its index) and save the profile beside the
    model. Returns the profile (``profile.meta`` records how it was made)."""
    if not captions:
        raise UserError("no prompts to calibrate on")
    layers = layer_names(gen.dit)

    def run(item):
        i, caption = item
        _generate(gen, [caption], seconds, sampling, sampling.seed + i,
                  None if progress is None else (lambda: progress(1, "calibrating")))

    prof = calibrate(gen.dit, layers, run, list(enumerate(captions)), sampling.steps, sampler=sampling.sampler)
    prof.meta = {"cfg": sampling.cfg, "rescale": sampling.rescale, "rescale_axis": sampling.rescale_axis,
                 "seconds": seconds, "seed": sampling.seed, "model": str(gen.folder)}
    prof.save(profile_path(gen.folder, sampling.sampler, sampling.steps))
    return prof


def load_profile(gen, sampling: Sampling) -> CacheProfile | None:
    """The profile beside the model for this sampler and step count, if it was calibrated
    on this exact model (same weights hash and layers)."""
    path = profile_path(gen.folder, sampling.sampler, sampling.steps)
    if not path.is_file():
        return None
    prof = CacheProfile.load(path)
    ok = (prof.model_hash == model_hash(gen.dit) and prof.layers == layer_names(gen.dit)
          and prof.steps == sampling.steps)  # Heun profiles before per-step rates counted model calls
    return prof if ok else None


def _kind(layer: str) -> str:
    return layer.rsplit(".", 1)[-1]


def profile_summary(profile: CacheProfile) -> dict:
    """Mean relative change per step (steps 1..S-1) of each layer kind, and its spread."""
    kinds: dict[str, list[int]] = {}
    for i, name in enumerate(profile.layers):
        kinds.setdefault(_kind(name), []).append(i)
    rates = profile.mean[:, 1:] if profile.steps > 1 else profile.mean
    return {"layers": len(profile.layers), "blocks": len({n.rsplit(".", 1)[0] for n in profile.layers}),
            "steps": profile.steps, "prompts": profile.num_prompts, "sampler": profile.sampler,
            "model_hash": profile.model_hash,
            "mean_rate": {k: float(rates[idx].mean()) for k, idx in kinds.items()},
            "max_rate": {k: float(rates[idx].max()) for k, idx in kinds.items()},
            "total_change": {k: float(rates[idx].sum(1).mean()) for k, idx in kinds.items()}}


def _block(layer: str) -> int:
    return int(layer.split(".")[1])


def fig3_comparison(profile: CacheProfile) -> dict:
    """Where this profile's change rates land against AudioCache's Fig. 3, whose text says:
    the rates barely vary across prompts; in the first (contour) phase of denoising the front
    blocks are the most active, in the detail phase the middle and rear blocks; at the end all
    layers converge. Steps 1..S-1 are split into thirds (early, middle, late), blocks into
    thirds (front, middle, rear); each claim is measured and marked as agreeing or not."""
    rates, std = profile.mean[:, 1:], profile.std[:, 1:]
    blocks = np.array([_block(n) for n in profile.layers])
    if rates.shape[1] < 3 or len(np.unique(blocks)) < 3:  # thirds of steps and of blocks
        return {}
    groups = np.array_split(np.unique(blocks), 3)
    phases = np.array_split(np.arange(rates.shape[1]), 3)
    activity = np.array([[rates[np.isin(blocks, g)][:, ph].mean() for g in groups] for ph in phases])  # [phase, group]
    spread = float(np.median(std[rates > 0] / rates[rates > 0])) if (rates > 0).any() else 0.0
    early, middle, late = activity
    return {
        "prompt_spread": spread,                                   # median std / mean over layers and steps
        "activity": {ph: dict(zip(("front", "middle", "rear"), map(float, row)))
                     for ph, row in zip(("early", "middle", "late"), activity)},
        "claims": {
            "consistent across prompts": spread < 0.5,
            "early: front blocks most active": bool(early.argmax() == 0),
            "detail phase: middle and rear blocks more active than front": bool(middle[1:].max() > middle[0]),
            "end: all layers converge": bool((late < early).all()),
        },
    }


def fig3_text(cmp: dict) -> str:
    """One line of :func:`fig3_comparison`."""
    if not cmp:
        return "Fig. 3: too few steps or blocks to compare (3 of each at least)"
    act = cmp["activity"]

    def row(ph):
        return "/".join(f"{act[ph][g]:.3f}" for g in ("front", "middle", "rear"))

    verdict = "; ".join(f"{claim} {'(agrees)' if ok else '(differs)'}" for claim, ok in cmp["claims"].items())
    return (f"Fig. 3: prompt spread (std/mean) {cmp['prompt_spread']:.2f}; mean change front/middle/rear blocks: "
            f"early {row('early')}, middle {row('middle')}, late {row('late')}. {verdict}")


def planned_fraction(profile: CacheProfile, steps: int, delta: float, max_reuse: int | None = None,
                     sampler: str | None = None) -> float:
    """Fraction of layer evaluations (model calls x layers) Eq. 2 computes at ``delta`` over
    ``steps`` steps of ``sampler`` (default: the profile's) (1.0 = no saving)."""
    plan = plan_refreshes(profile.rates_for(steps), delta, max_reuse)
    calls = np.full(steps, calls_per_step(sampler or profile.sampler))
    calls[-1] = 1  # Heun's last step makes one call
    return float((plan * calls).sum() / (calls.sum() * len(plan)))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def change_rate_png(profile: CacheProfile) -> bytes:
    """Fig. 3: relative L1 change per step of every cached layer, one panel per layer kind,
    one line per block (darker = deeper); the band is ±1 std across prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in LAYER_KINDS if any(_kind(n) == k for n in profile.layers)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), sharey=True, squeeze=False)
    steps = np.arange(1, profile.steps)
    depth = max(1, len({n.rsplit(".", 1)[0] for n in profile.layers}))
    for ax, kind in zip(axes[0], kinds):
        for i, name in enumerate(profile.layers):
            if _kind(name) != kind:
                continue
            block = int(name.split(".")[-2]) if name.split(".")[-2].isdigit() else 0
            colour = plt.cm.viridis(block / max(1, depth - 1))
            m, s = profile.mean[i, 1:], profile.std[i, 1:]
            ax.plot(steps, m, color=colour, linewidth=0.9, label=f"block {block}")
            ax.fill_between(steps, np.clip(m - s, 1e-6, None), m + s, color=colour, alpha=0.08)
        ax.set_title(kind)
        ax.set_xlabel("sampling step")
        if (profile.mean[:, 1:] > 0).all():
            ax.set_yscale("log")
    axes[0][0].set_ylabel("relative L1 change")
    if depth <= 12:
        axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"AudioCache change rates · {profile.sampler}, {profile.steps} steps, "
                 f"{profile.num_prompts} prompts", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalSettings:
    deltas: list[float]
    seconds: float
    sparse_ratio: float | None = None   # None: no sparse-attention rows
    durations: list[float] = field(default_factory=list)
    max_reuse: int | None = None
    window: int | None = None           # window pattern: band in tokens (default: the training length)
    chunk: int | None = None            # window pattern: queries per sparse block (default: half the window)
    exact_short: bool = False           # focus pattern: exact attention up to the training length
    sparse_with_delta: float | None = None  # also AudioCache at this δ and LiteFocus together, per duration


@dataclass
class _Setting:
    name: str
    group: str                  # "cache" | "sparse"
    seconds: float
    delta: float | None = None  # None: no cache
    ratio: float | None = None  # None: full attention
    audio: list = field(default_factory=list)
    latents: list = field(default_factory=list)
    wall_s: float = 0.0
    dit_s: float = 0.0
    attention_s: float = 0.0
    computed: int = 0
    reused: int = 0


_TIMER_HOOK = "eval_attention_timer"  # the timer's hook name on each attention core


class _TimerHook(ModelHook):
    """Times one attention core's call, what is registered inside it included (LiteFocus's
    sparse kernel), synchronising the device around it."""

    stateful = True

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._t0 = 0.0

    def pre_forward(self, module, *args, **kwargs):
        _sync(self.device)
        self._t0 = time.perf_counter()
        return args, kwargs

    def post_forward(self, module, output):
        _sync(self.device)
        self.seconds += time.perf_counter() - self._t0
        return output

    def reset_state(self) -> None:
        self.seconds = 0.0


class _AttentionTimer:
    """Accumulates the time spent in every block's self-attention core
    (``blocks.i.self_attn.attention``, exact or LiteFocus sparse) while attached: a
    :class:`_TimerHook` per core, registered through ``hooks.py``; ``detach()`` (or ``with``
    exit) removes them, ``seconds`` stays readable.

    Attach it before LiteFocus: the first hook registered on a module is the outermost, so
    the timer then wraps LiteFocus's hook (which replaces the core's forward and calls
    nothing registered inside it). Attaching it on a core that already has hooks raises."""

    def __init__(self, dit, device: torch.device):
        modules = find_modules(dit, [f"blocks.{i}.self_attn.attention" for i in range(len(dit.blocks))])
        taken = [name for m in modules for name in HookRegistry.of(m).hooks]
        if taken:
            raise RuntimeError(f"attention cores already hooked ({', '.join(sorted(set(taken)))}): "
                               "attach the attention timer first so that it wraps those hooks")
        self.hooks = [_TimerHook(device) for _ in modules]
        register_hooks(modules, self.hooks, _TIMER_HOOK)
        self.modules = modules

    @property
    def seconds(self) -> float:
        return sum(h.seconds for h in self.hooks)

    def detach(self) -> None:
        remove_hooks(self.modules, _TIMER_HOOK)
        self.modules = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def _plan(settings: EvalSettings) -> list[_Setting]:
    plan = [_Setting("uncached", "cache", settings.seconds)]
    for d in settings.deltas:
        plan.append(_Setting(f"δ={d:g}", "cache", settings.seconds, delta=d))
    if settings.sparse_ratio is not None:
        for sec in settings.durations:
            if sec != settings.seconds:
                plan.append(_Setting(f"full {sec:g} s", "sparse", sec))
            plan.append(_Setting(f"litefocus r={settings.sparse_ratio:g} {sec:g} s", "sparse", sec,
                                 ratio=settings.sparse_ratio))
            if settings.sparse_with_delta is not None:
                plan.append(_Setting(f"δ={settings.sparse_with_delta:g} + litefocus r={settings.sparse_ratio:g} "
                                     f"{sec:g} s", "sparse", sec, delta=settings.sparse_with_delta,
                                     ratio=settings.sparse_ratio))
    return plan


def model_steps(settings: EvalSettings, sampling: Sampling, n_prompts: int) -> int:
    """Sampler steps an evaluation runs (for a progress bar): settings x batches x steps."""
    return len(_plan(settings)) * len(_batches(range(n_prompts), sampling.batch_size)) * sampling.steps


def _baseline(plan: list[_Setting], s: _Setting) -> _Setting:
    """Exact inference at the same duration: the row speed-ups and no-reference metrics use."""
    return next(b for b in plan if b.seconds == s.seconds and b.delta is None and b.ratio is None)


class LiteFocusGeometry(NamedTuple):
    """How LiteFocus runs on a model, sizes in DiT tokens (latent frames x frequency rows)."""
    pattern: str            # "focus": the paper's, on a 2D latent grid | "window": local band, 1D latents
    window: int | None      # window: the local band every query attends to
    chunk: int | None       # window: queries per sparse block
    train_frames: int       # the DiT's training crop (``seconds`` when the model folder does not record it)
    freq_bins: int | None   # focus: frequency rows of the grid
    min_tokens: int         # exact attention up to this length (0: sparse at every length)


def litefocus_geometry(gen, window: int | None, chunk: int | None, seconds: float,
                       exact_short: bool = False) -> LiteFocusGeometry:
    """LiteFocus for this model. A DiT on a 2D latent grid gets the paper's same-frequency
    focus at every length (``exact_short``: exact attention up to the training length, an
    option). Otherwise (1D latents, or FIT, whose global attention runs over group latents)
    the local-window pattern: the band defaults to the training length, so every query sees
    a neighbourhood as wide as the clips the DiT learned from, with exact attention up to the
    band; query chunks default to half the band (at least 16), so each chunk's shared random
    keys stay a small part of the sequence."""
    train_frames = gen.frames(training_seconds(gen) or seconds)
    if gen.grid_freq > 1 and gen.dit.cfg.BACKBONE == "dit":
        return LiteFocusGeometry("focus", None, None, train_frames, gen.grid_freq, train_frames if exact_short else 0)
    window = window or train_frames
    return LiteFocusGeometry("window", window, chunk or max(16, window // 2), train_frames, None, window)


def sparse_geometry(gen, settings: EvalSettings) -> LiteFocusGeometry:
    """:func:`litefocus_geometry` for an evaluation's settings."""
    return litefocus_geometry(gen, settings.window, settings.chunk, settings.seconds, settings.exact_short)


def attach_litefocus(gen, geometry: LiteFocusGeometry, ratio: float | None, seed: int) -> SparseHandle:
    """LiteFocus on every block of the generator's DiT (the paper's two U-Net blocks have no
    counterpart in a DiT, whose blocks all see the same tokens), or an empty handle for full
    attention (``ratio`` None)."""
    if ratio is None:
        return SparseHandle()
    return attach_sparse_attention(gen.dit, range(len(gen.dit.blocks)), window=geometry.window, ratio=ratio,
                                   seed=seed, freq_bins=geometry.freq_bins, chunk=geometry.chunk or 256,
                                   min_tokens=geometry.min_tokens, pattern=geometry.pattern)


@dataclass
class PaperExtractors:
    """The papers' metric extractors, when their weights are given (both at 16 kHz): PANNs
    CNN14 (``models.extractors.panns.PannsMetrics``) adds FD, KL and IS as audioldm_eval
    computes them, VGGish (``models.extractors.vggish.VggishMetrics``) adds FAD."""
    panns: object | None = None
    vggish: object | None = None

    def metrics(self, generated: list, gen_rate: int, reference: list, ref_rate: int, splits: int) -> dict:
        out = {}
        if self.panns is not None:
            p = self.panns
            a, r = _resample(generated, gen_rate, p.sample_rate), _resample(reference, ref_rate, p.sample_rate)
            out |= {"fd_panns": fd_audio(a, r, p.embed, p.sample_rate, model=p.model),
                    "kl_panns": kl_audio(a, r, p.classify, p.sample_rate, model=p.model),
                    "is_panns": is_audio(a, p.classify, p.sample_rate, splits=splits, model=p.model)}
        if self.vggish is not None:
            v = self.vggish
            a, r = _resample(generated, gen_rate, v.sample_rate), _resample(reference, ref_rate, v.sample_rate)
            out["fad_vggish"] = fd_audio(a, r, v.embed, v.sample_rate, model=v.model)
        return out


def evaluate_generation(gen, prompts: Sequence[EvalPrompt], sampling: Sampling, settings: EvalSettings,
                        clap: ClapFunctions, labels: tuple[str, Sequence[str]], profile: CacheProfile | None,
                        progress: Progress | None = None, profile_source: str = "",
                        extractors: PaperExtractors | None = None) -> "CacheEvalReport":
    """Run every setting on every prompt batch (interleaved) and score it (module docstring)."""
    if len(prompts) < 2:
        raise UserError(f"{len(prompts)} prompt(s): FD needs at least 2; add prompts")
    if (settings.deltas or settings.sparse_with_delta is not None) and profile is None:
        raise UserError("cache settings need a calibration profile (soundlake calibrate-cache)")
    refs = None  # (clips at the CLAP's rate, their file rates), read first: a bad file fails fast
    if prompts[0].reference is not None:
        loaded = [_load_reference(p.reference, clap.sample_rate) for p in prompts]
        refs = ([a for a, _ in loaded], sorted({sr for _, sr in loaded}))
    plan = _plan(settings)
    caches = {s.delta: AudioCache(gen.dit, profile, delta=s.delta, max_reuse=settings.max_reuse,
                                  sampler=sampling.sampler)
              for s in plan if s.delta is not None}
    geometry = sparse_geometry(gen, settings)
    captions = [p.caption for p in prompts]
    n_layers = len(profile.layers) if profile is not None else len(layer_names(gen.dit))
    for sec in sorted({s.seconds for s in plan}):  # warm-up: first-call costs out of the timings
        _generate(gen, captions[:1], sec, Sampling(steps=2, sampler=sampling.sampler), 0)
    for b, batch in enumerate(_batches(captions, sampling.batch_size)):
        for s in plan:
            step = None if progress is None else (lambda s=s: progress(1, s.name))
            # the timer first, so that it wraps the sparse hook
            with _AttentionTimer(gen.dit, gen.device) as timer, attach_litefocus(gen, geometry, s.ratio,
                                                                                      sampling.seed):
                if s.delta is None:
                    out = _generate(gen, batch, s.seconds, sampling, sampling.seed + b, step)
                    s.computed += model_calls(sampling.sampler, sampling.steps) * n_layers
                else:
                    with caches[s.delta] as cache, cache.run(sampling.steps):
                        out = _generate(gen, batch, s.seconds, sampling, sampling.seed + b, step)
                    st = cache.stats()  # this run's counters (the next run resets them)
                    s.computed += st["computed"]
                    s.reused += st["reused"]
            s.audio.extend(out.audio)
            s.latents.extend(out.latents)
            s.wall_s += out.wall_s
            s.dit_s += out.dit_s
            s.attention_s += timer.seconds
    return _score(gen, prompts, refs, sampling, settings, plan, clap, labels, profile, profile_source, geometry,
                  extractors or PaperExtractors())


def _load_reference(path: Path, rate: int) -> tuple[np.ndarray, int]:
    """(the clip at ``rate``, the file's own rate, which the report records)."""
    import soundfile as sf

    audio = read_mono(path, rate)
    return audio, sf.info(str(path)).samplerate


def _resample(clips: list[np.ndarray], src: int, dst: int) -> list[np.ndarray]:
    if src == dst:
        return [np.asarray(c, np.float32) for c in clips]
    import soxr

    return [soxr.resample(np.asarray(c, np.float32), src, dst).astype(np.float32) for c in clips]


def _score(gen, prompts, refs, sampling, settings, plan, clap, labels, profile, profile_source,
           geometry: LiteFocusGeometry, extractors: PaperExtractors) -> "CacheEvalReport":
    captions = [p.caption for p in prompts]
    rate = clap.sample_rate
    refs, ref_rates = refs or (None, [])
    splits = max(1, min(10, len(prompts) // 10))
    rows = []
    for s in plan:
        base = _baseline(plan, s)
        gen_audio = _resample(s.audio, gen.sample_rate, rate)
        ref = refs if refs is not None else _resample(base.audio, gen.sample_rate, rate)
        row = {"setting": s.name, "group": s.group, "seconds": s.seconds, "delta": s.delta, "ratio": s.ratio,
               "clips": len(s.audio), "wall_s": s.wall_s, "dit_s": s.dit_s, "attention_s": s.attention_s,
               "speedup": base.wall_s / s.wall_s, "dit_speedup": base.dit_s / max(s.dit_s, 1e-9),
               "attention_speedup": base.attention_s / max(s.attention_s, 1e-9),
               "layer_computed": s.computed, "layer_reused": s.reused,
               "layer_total": s.computed + s.reused, "layer_cut": (s.computed + s.reused) / max(1, s.computed),
               "frames": gen.frames(s.seconds)}
        # drift from exact inference, whatever the reference set: the final latents' relative
        # L1 change (before the VAE) and FD between the two sets of outputs
        row["latent_drift"] = float(np.mean([np.abs(z - z0).sum() / max(np.abs(z0).sum(), 1e-12)
                                             for z, z0 in zip(s.latents, base.latents)]))
        if s.delta is not None:
            row["planned_fraction"] = planned_fraction(profile, sampling.steps, s.delta, settings.max_reuse,
                                                       sampling.sampler)
        metrics = {
            "fd": fd_audio(gen_audio, ref, clap.embed_audio, rate, model=clap.model),
            "kl": kl_audio(gen_audio, ref, clap.classify, rate, model=clap.model),
            "is": is_audio(gen_audio, clap.classify, rate, splits=splits, model=clap.model),
            "clap": clap_score_audio(gen_audio, captions, clap.embed_audio, clap.embed_text, rate,
                                     model=clap.model),
        }
        metrics |= extractors.metrics(s.audio, gen.sample_rate, ref, rate, splits)
        if refs is not None:
            metrics["fd_exact"] = fd_audio(gen_audio, _resample(base.audio, gen.sample_rate, rate), clap.embed_audio,
                                           rate, model=clap.model)
        row |= {k: m.value for k, m in metrics.items()} | {"is_std": metrics["is"].std}
        row.setdefault("fd_exact", row["fd"])  # without references FD already is against exact inference
        row["metrics"] = {k: m.to_dict() for k, m in metrics.items()}
        rows.append(row)
    meta = {
        "model": str(gen.folder), "model_hash": model_hash(gen.dit), "model_step": gen.meta.get("train", {}).get("step"),
        "blocks": len(gen.dit.blocks), "cached_layers": len(profile.layers) if profile else None,
        "sampling": asdict(sampling), "seconds": settings.seconds,
        "training_seconds": training_seconds(gen), "max_reuse": settings.max_reuse,
        "prompts": len(prompts), "generated_sample_rate": gen.sample_rate,
        "clap": {"model": clap.model, "sample_rate": rate},
        "reference": ("reference audio from the prompt file" if refs is not None else
                      "generated-uncached audio (no reference audio given): FD/KL measure drift from exact inference"),
        "reference_clips": len(prompts), "reference_sample_rates": ref_rates,
        "labels": {"name": labels[0], "count": len(labels[1])}, "is_splits": splits,
        "kl_direction": "KL(reference||generated)",
        "extractors": {name: {"model": x.model, "sample_rate": x.sample_rate}
                       for name, x in (("panns", extractors.panns), ("vggish", extractors.vggish)) if x is not None},
        "sparse": (None if settings.sparse_ratio is None else
                   {"ratio": settings.sparse_ratio, "pattern": geometry.pattern, "window_frames": geometry.window,
                    "chunk": geometry.chunk, "freq_bins": geometry.freq_bins, "exact_up_to": geometry.min_tokens,
                    "durations": settings.durations, "latent_rate": gen.vae.latent_rate}),
        "profile": None if profile is None else profile_summary(profile) | {"source": profile_source,
                                                                           "fig3": fig3_comparison(profile)},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(gen.device),
        "machine": platform.processor() or platform.machine(),
    }
    return CacheEvalReport(meta, rows, profile)


# --------------------------------------------------------------------------- report


def _sparse_setup(sp: dict, m: dict) -> str:
    train = f"training length {fmt_metric(m['training_seconds'], 'g')} s at {sp['latent_rate']:g} frames/s"
    if sp.get("pattern") == "focus":
        exact = f"exact attention up to {sp['exact_up_to']} tokens" if sp["exact_up_to"] else "sparse at every length"
        return (f"Same-frequency focus on {sp['freq_bins']} frequency rows plus one set of floor(r N) "
                f"cross-frequency keys drawn per call, r = {sp['ratio']}, every block ({train}); {exact}.")
    return (f"Band {sp['window_frames']} tokens ({train}), random keys r = {sp['ratio']}, {sp['chunk']} queries "
            "per block; exact attention up to the band.")


def fmt_metric(v, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    text = format(v, fmt)
    return text[1:] if text.startswith("-") and not any(c in "123456789" for c in text) else text  # no "-0.000"


@dataclass
class CacheEvalReport:
    meta: dict
    rows: list[dict]
    profile: CacheProfile | None = None

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}

    def cache_rows(self) -> list[dict]:
        return [r for r in self.rows if r["group"] == "cache"]

    def has_cache_rows(self) -> bool:
        return any(r["delta"] is not None for r in self.cache_rows())

    def sparse_rows(self) -> list[dict]:
        return [r for r in self.rows if r["group"] == "sparse" or
                (self.meta.get("sparse") and r["setting"] == "uncached"
                 and r["seconds"] in self.meta["sparse"]["durations"])]

    def markdown(self, images: bool = True) -> str:
        m, smp = self.meta, self.meta["sampling"]
        lines = [f"# Cached inference evaluation · `{m['model']}`", "",
                 f"{m['prompts']} prompts · {smp['sampler']} {smp['steps']} steps · CFG {smp['cfg']} "
                 f"(rescale {smp['rescale']}, axis {smp['rescale_axis']}) · seed {smp['seed']} · "
                 f"{m['seconds']:g} s clips at {m['generated_sample_rate']} Hz · {m['blocks']} blocks", "",
                 f"Reference set: {m['reference']} ({m['reference_clips']} clips"
                 + (f", read at {', '.join(map(str, m['reference_sample_rates']))} Hz" if m["reference_sample_rates"]
                    else "") + f"). Metrics at {m['clap']['sample_rate']} Hz with CLAP `{m['clap']['model']}`; "
                 f"KL and IS over the zero-shot classes `{m['labels']['name']}` ({m['labels']['count']} labels), "
                 f"{m['kl_direction']}, IS with {m['is_splits']} split(s).", "",
                 ]
        if self.has_cache_rows() or not self.meta.get("sparse"):
            lines += ["## AudioCache (Table I)", "",
                      "| setting | speed-up | wall s | DiT loop speed-up | layer evaluations | cut | planned | "
                      "FD ↓ | KL ↓ | IS ↑ | CLAP ↑ | drift | FD vs exact |", "|" + "---|" * 13]
            for r in self.cache_rows():
                lines.append(
                    f"| {r['setting']} | {r['speedup']:.2f}x | {r['wall_s']:.1f} | {r['dit_speedup']:.2f}x | "
                    f"{r['layer_computed']} / {r['layer_total']} | {r['layer_cut']:.2f}x | "
                    f"{fmt_metric(r.get('planned_fraction'), '.1%')} | {fmt_metric(r['fd'])} | "
                    f"{fmt_metric(r['kl'])} | {fmt_metric(r['is'], '.2f')} | {fmt_metric(r['clap'])} | "
                    f"{r['latent_drift']:.2%} | {fmt_metric(r['fd_exact'])} |")
            lines += ["", "*layer evaluations*: self_attn / cross_attn / ff outputs computed / all the "
                      "sampler asked for (AudioCache.stats(), summed over batches); *cut* = all / computed; "
                      "*planned* = the fraction Eq. 2 computes on the profile, predicted before the run; "
                      "*drift* = relative L1 change of the final latents vs exact inference (same noise), "
                      "*FD vs exact* = FD against the exact outputs instead of the reference set."]
            if images:
                lines += ["", "![FD and CLAP score against speed-up](tradeoff.png)"]
        if self.meta.get("sparse"):
            sp = self.meta["sparse"]
            lines += ["", "## Sparse self-attention (LiteFocus)", "",
                      _sparse_setup(sp, m), "",
                      "| setting | frames | attention s | attention speed-up | wall s | speed-up | FD ↓ | KL ↓ | "
                      "IS ↑ | CLAP ↑ | drift | FD vs exact |", "|" + "---|" * 12]
            for r in self.sparse_rows():
                name = r["setting"] if r["group"] == "sparse" else f"full {r['seconds']:g} s"
                lines.append(
                    f"| {name} | {r['frames']} | {r['attention_s']:.2f} | {r['attention_speedup']:.2f}x | "
                    f"{r['wall_s']:.1f} | {r['speedup']:.2f}x | {fmt_metric(r['fd'])} | {fmt_metric(r['kl'])} | "
                    f"{fmt_metric(r['is'], '.2f')} | {fmt_metric(r['clap'])} | {r['latent_drift']:.2%} | "
                    f"{fmt_metric(r['fd_exact'])} |")
        ex = m.get("extractors") or {}
        if ex:
            keys = [k for k in ("fd_panns", "kl_panns", "is_panns", "fad_vggish") if k in self.rows[0]]
            lines += ["", "## The papers' extractors", "",
                      " · ".join(f"{n}: {e['model']} at {e['sample_rate']} Hz" for n, e in ex.items())
                      + f" · {self.rows[0]['clips']} clips per setting", "",
                      "| setting | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
            lines += [f"| {r['setting']} | " + " | ".join(fmt_metric(r[k]) for k in keys) + " |" for r in self.rows]
        p = m.get("profile")
        if p:
            lines += ["", "## Change-rate profile (Fig. 3)", "",
                      f"{p['layers']} layers in {p['blocks']} blocks, {p['steps']} steps, {p['prompts']} "
                      f"calibration prompts, {p['source']}. Mean relative change per step: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in p["mean_rate"].items()) + "."]
            if p.get("fig3"):
                lines += ["", fig3_text(p["fig3"])]
            if images:
                lines += ["", "![change rates](change_rates.png)"]
        lines += ["", f"torch {m['torch']} · {m['threads']} threads · {m['device']} · {m['machine']}", ""]
        return "\n".join(lines)

    def tradeoff_png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.cache_rows()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, key, label in ((axes[0], "fd", "FD (lower is better)"), (axes[1], "clap", "CLAP score")):
            ax.plot([r["speedup"] for r in rows], [r[key] for r in rows], "o-")
            for r in rows:
                ax.annotate(r["setting"], (r["speedup"], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xlabel("wall-time speed-up vs uncached")
            ax.set_ylabel(label)
        fig.tight_layout()
        return _png(fig)

    def images(self) -> dict[str, bytes]:
        out = {"tradeoff.png": self.tradeoff_png()} if self.has_cache_rows() else {}
        if self.profile is not None:
            out["change_rates.png"] = change_rate_png(self.profile)
        return out

    def html(self, images: dict[str, bytes] | None = None) -> str:
        import markdown_it  # rich ships markdown-it-py

        images = self.images() if images is None else images
        body = markdown_it.MarkdownIt().enable("table").render(self.markdown(images=False))
        figs = "".join(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
                       f"{base64.b64encode(png).decode()}'><figcaption>{html.escape(name)}</figcaption></figure>"
                       for name, png in images.items())
        return ("<!doctype html><meta charset=utf-8><title>cached inference evaluation</title>"
                "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:"
                "collapse}td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}</style>"
                + body + figs)

    def write(self, out_dir: str | Path) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        images = self.images()
        paths = []
        for name, png in images.items():
            (out_dir / name).write_bytes(png)
            paths.append(out_dir / name)
        for name, text in (("report.md", self.markdown()), ("report.html", self.html(images)),
                           ("report.json", json.dumps(self.to_dict(), indent=2, default=str))):
            (out_dir / name).write_text(text, encoding="utf-8")
            paths.append(out_dir / name)
        return paths
