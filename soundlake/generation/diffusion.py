"""v-prediction diffusion on latent frames: schedule, training losses, samplers, CFG.

* ``Schedule``: scaled-linear or cosine betas, rescaled to **zero terminal SNR** with the
  algorithm of Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are
  Flawed"): shift sqrt(alpha_bar) so its last value is 0, scale so its first is unchanged.
  With zero terminal SNR the model must predict v (eps is undefined at the last step).
* ``training_loss``: MSE on v; each row's condition is replaced by the model's null
  condition with probability ``cond_drop`` (10 %) so the same model serves as the
  unconditional branch of classifier-free guidance. The null condition is the DiT's
  learned null token per stream (``DiTConfig.null_cond="learned"``, or an all-zero token
  with ``"zero"``), with every other key masked out.
* ``masked_training_loss``: per row spans of at least ``min_span`` frames (0.2 s) covering
  25-100 % of the frames (``span_mask``) are noised; the rest is given clean (and flagged
  clean through ``frame_mask``) and excluded from the loss. Stage-1 pretraining: no text;
  stage 2 (text training): with the text, a ``partial_prob`` share of the rows partly masked,
  the others fully noised.
* Samplers (one model call per step but ``heun``, cond and uncond rows batched in each call):
  ``"ddim"`` (eta = 0) with *trailing* timestep spacing (starts at t = T-1, where SNR = 0),
  ``"euler"`` on the v-ODE in angle form (x = cos(phi) x0 + sin(phi) eps, so dx/dphi = v),
  ``"dpmpp_2m"`` (DPM-Solver++ 2M, data prediction; first-order at the infinite-lambda ends),
  ``"dpmpp_3m_sde"`` (DPM-Solver++ 3M SDE, eta = 1, the sampler of AudioCache's experiments: the
  multistep data-prediction update of k-diffusion's ``sample_dpmpp_3m_sde``, written for
  alpha/sigma, with fresh noise from ``generator`` each step; first, then second order while
  its history fills or a step is infinite in lambda), and ``"heun"`` (Heun's second-order
  method on the same angle-form v-ODE as ``"euler"``: an Euler step, a second model call at its
  end, the average slope; the last step, which lands on clean data, is an Euler step, so
  ``2 * steps - 1`` model calls).
* CFG: ``cfg_combine`` with rescale phi (Lin et al.); the std axis is ``rescale_axis``:
  ``"all"`` = std over all non-batch dims (EzAudio), ``"time"`` = per frame, over channels
  (stable-audio-tools). The chosen axis is recorded in the sample's metadata.

Latents are [B, F, C] (frames, channels) as the DiT takes them; VAE latents are [B, C, F].

Public API::

    Schedule(num_steps=1000, kind="scaled_linear", beta_start=0.00085, beta_end=0.012,
             zero_terminal_snr=True)   # .alphas_cumprod, .betas; Schedule.from_yaml(name)
    training_loss(model, x0, cond, schedule, cond_drop=0.1, generator=None) -> (loss, logs)
    span_mask(b, n, min_frac=0.25, max_frac=1.0, min_span=1, generator=None) -> BoolTensor [b, n]
    masked_training_loss(model, x0, schedule, min_frac=0.25, max_frac=1.0, generator=None, *,
                         min_span=1, grid_freq=1, cond=None, cond_drop=0.1, partial_prob=1.0)
        -> (loss, logs)
    diffusion_train_step(model, opt, x0, cond, schedule, masked=False, cond_drop=0.1,
                         grad_clip=1.0, generator=None, mask_frac=(0.25, 1.0), min_span=1,
                         grid_freq=1, partial_prob=0.0) -> logs
    cfg_combine(cond_out, uncond_out, scale, rescale=0.0, rescale_axis="all") -> Tensor
    trailing_timesteps(num_train, steps) -> LongTensor (descending)
    sample(model, shape, cond, uncond=None, steps=25, sampler="ddim", cfg=3.0, rescale=0.0,
           rescale_axis="all", generator=None, callback=None, schedule=None)
        -> (latents [B, F, C], meta dict)
        cond: Condition or None (None = unconditional); uncond: Condition or None (None =
        the model's null condition via ``drop``); callback(step_index, t, x) every step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from soundlake.generation.conditioning import Condition
from soundlake.generation.vae import read_config

SAMPLERS = ("ddim", "euler", "dpmpp_2m", "dpmpp_3m_sde", "heun")


def calls_per_step(sampler: str) -> int:
    """Model calls in one sampler step: ``heun`` 2 (its last step 1), the others 1."""
    return 2 if sampler == "heun" else 1


def model_calls(sampler: str, steps: int) -> int:
    """Model calls of one sampling: ``heun`` calls twice per step but the last, the others once."""
    return calls_per_step(sampler) * (steps - 1) + 1


RESCALE_AXES = ("all", "time")


# ---------------------------------------------------------------- schedule

def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1, on alpha_bar (float64 in, float64 out)."""
    s = alphas_cumprod.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    return s.pow(2)


@dataclass
class Schedule:
    num_steps: int = 1000
    kind: str = "scaled_linear"  # "scaled_linear" | "cosine"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = True
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        n = self.num_steps
        if self.kind == "scaled_linear":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float64) ** 2
            ab = torch.cumprod(1.0 - betas, 0)
        elif self.kind == "cosine":  # Nichol & Dhariwal, betas clipped at 0.999
            f = lambda t: math.cos((t / n + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(n)], dtype=torch.float64)
            ab = torch.cumprod(1.0 - betas, 0)
        else:
            raise ValueError(f"schedule kind must be 'scaled_linear' or 'cosine', not {self.kind!r}")
        if self.zero_terminal_snr:
            ab = rescale_zero_terminal_snr(ab)
        self.alphas_cumprod = ab

    @property
    def betas(self) -> torch.Tensor:
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        return 1.0 - self.alphas_cumprod / prev

    def alpha_sigma(self, t: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alphas_cumprod[t.long().cpu()]  # index on CPU: float64 is not on every device
        return ab.sqrt().float().to(device), (1.0 - ab).sqrt().float().to(device)

    def meta(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "alphas_cumprod"}

    @classmethod
    def from_yaml(cls, name_or_path: str | Path) -> "Schedule":
        return cls(**read_config(name_or_path).get("schedule", {}))


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.view(-1, *([1] * (x.dim() - 1)))


# ---------------------------------------------------------------- training

def _cond_kwargs(cond: Condition | None) -> dict:
    return {} if cond is None else cond.as_kwargs()


def training_loss(model: nn.Module, x0: torch.Tensor, cond: Condition | None, schedule: Schedule,
                  cond_drop: float = 0.1, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """v-prediction MSE at uniformly drawn timesteps, with condition dropout."""
    b, dev = x0.shape[0], x0.device
    t = torch.randint(0, schedule.num_steps, (b,), generator=generator).to(dev)
    noise = torch.randn(x0.shape, generator=generator).to(dev, x0.dtype)
    a, s = schedule.alpha_sigma(t, dev)
    a, s = _bcast(a, x0), _bcast(s, x0)
    xt = a * x0 + s * noise
    v = a * noise - s * x0
    drop = (torch.rand(b, generator=generator) < cond_drop).to(dev)
    pred = model(xt, t.float(), drop=drop, **_cond_kwargs(cond))
    loss = F.mse_loss(pred.float(), v.float())
    return loss, {"loss": loss.item(), "dropped": int(drop.sum())}


def span_mask(b: int, n: int, min_frac: float = 0.25, max_frac: float = 1.0, min_span: int = 1,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """[b, n] bool, True = noised. Per row a share f ~ U[min_frac, max_frac] of the n frames is
    covered by spans of ``min_span`` frames at uniform random starts (overlapping spans merge)
    until at least ceil(f n) frames are: EzAudio masks 25-100 % of the tokens in spans of at
    least 0.2 s."""
    length = max(1, min(min_span, n))
    frac = min_frac + (max_frac - min_frac) * torch.rand(b, generator=generator)
    need = torch.ceil(frac * n).long().clamp(1, n).tolist()
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        covered = 0
        while covered < need[i]:
            start = int(torch.randint(0, n - length + 1, (1,), generator=generator))
            mask[i, start:start + length] = True
            covered = int(mask[i].sum())
    return mask


def masked_training_loss(model: nn.Module, x0: torch.Tensor, schedule: Schedule, min_frac: float = 0.25,
                         max_frac: float = 1.0, generator: torch.Generator | None = None, *, min_span: int = 1,
                         grid_freq: int = 1, cond: Condition | None = None, cond_drop: float = 0.1,
                         partial_prob: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Masked modelling: the frames of each row's :func:`span_mask` are noised, the rest given
    clean (flagged through ``frame_mask``), and the loss is on the noised tokens only.

    Stage 1 (``cond=None``, ``partial_prob=1``): no text, every row partly masked. Stage 2
    (EzAudio's text training): with ``cond``, a row is partly masked with probability
    ``partial_prob`` and fully noised otherwise, so a full mask is the likelier; the condition
    is dropped for ``cond_drop`` of the rows. ``grid_freq`` > 1 (2D mel latents): spans cover
    whole frames, every frequency row of a frame alike."""
    b, n, _ = x0.shape
    dev = x0.device
    frames = n // grid_freq
    span = span_mask(b, frames, min_frac, max_frac, min_span, generator)
    partial = torch.rand(b, generator=generator) < partial_prob
    span[~partial] = True
    span = span.repeat_interleave(grid_freq, dim=1).to(dev)   # [B, F] True = noised
    t = torch.randint(0, schedule.num_steps, (b,), generator=generator).to(dev)
    noise = torch.randn(x0.shape, generator=generator).to(dev, x0.dtype)
    a, s = schedule.alpha_sigma(t, dev)
    a, s = _bcast(a, x0), _bcast(s, x0)
    xt = torch.where(span[..., None], a * x0 + s * noise, x0)
    v = a * noise - s * x0
    kwargs, logs = {}, {}
    if cond is not None:
        drop = (torch.rand(b, generator=generator) < cond_drop).to(dev)
        kwargs = {"drop": drop, **_cond_kwargs(cond)}
        logs["dropped"] = int(drop.sum())
    pred = model(xt, t.float(), frame_mask=span, **kwargs)   # without cond: the null condition (no text)
    w = span[..., None].to(pred.dtype)
    loss = ((pred.float() - v.float()).pow(2) * w).sum() / (w.sum() * x0.shape[-1]).clamp_min(1)
    return loss, {"loss": loss.item(), "span_frac": float(span.float().mean()),
                  "partial": int(partial.sum()), **logs}


def diffusion_train_step(model: nn.Module, opt: torch.optim.Optimizer, x0: torch.Tensor,
                         cond: Condition | None, schedule: Schedule, masked: bool = False,
                         cond_drop: float = 0.1, grad_clip: float | None = 1.0,
                         generator: torch.Generator | None = None,
                         mask_frac: tuple[float, float] = (0.25, 1.0), min_span: int = 1, grid_freq: int = 1,
                         partial_prob: float = 0.0) -> dict:
    """One optimisation step of the DiT: masked pretraining (``masked``, no text), or text
    training, where ``partial_prob`` of the rows are partly masked (EzAudio's stage 2) and the
    rest fully noised (``partial_prob=0``: plain text-conditioned diffusion)."""
    model.train()
    if masked:
        loss, logs = masked_training_loss(model, x0, schedule, *mask_frac, generator=generator, min_span=min_span,
                                          grid_freq=grid_freq)
    elif partial_prob > 0:
        loss, logs = masked_training_loss(model, x0, schedule, *mask_frac, generator=generator, min_span=min_span,
                                          grid_freq=grid_freq, cond=cond, cond_drop=cond_drop,
                                          partial_prob=partial_prob)
    else:
        loss, logs = training_loss(model, x0, cond, schedule, cond_drop, generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        logs["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    opt.step()
    return logs


# ---------------------------------------------------------------- guidance

def cfg_combine(cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float, rescale: float = 0.0,
                rescale_axis: str = "all") -> torch.Tensor:
    """uncond + scale (cond - uncond), then blend with its std-matched version by ``rescale``.

    ``rescale_axis="all"``: std over every non-batch dim; ``"time"``: per frame over channels
    (x is [B, F, C]).
    """
    out = uncond_out + scale * (cond_out - uncond_out)
    if rescale <= 0:
        return out
    if rescale_axis == "all":
        dims = tuple(range(1, out.dim()))
    elif rescale_axis == "time":
        dims = (-1,)
    else:
        raise ValueError(f"rescale_axis must be one of {RESCALE_AXES}, not {rescale_axis!r}")
    std_cond = cond_out.std(dim=dims, keepdim=True)
    std_out = out.std(dim=dims, keepdim=True).clamp_min(1e-12)  # an all-zero output (untrained) stays 0
    return rescale * (out * std_cond / std_out) + (1 - rescale) * out


# ---------------------------------------------------------------- sampling

def trailing_timesteps(num_train: int, steps: int) -> torch.Tensor:
    """Trailing spacing (Lin et al. 2024): always starts at T-1, where SNR is zero."""
    ts = torch.round(torch.arange(num_train, 0, -num_train / steps, dtype=torch.float64)) - 1
    return ts.long().clamp(0, num_train - 1)[:steps]


def _v_to_x0_eps(x, v, a, s):
    return a * x - s * v, s * x + a * v


def _dpmpp_3m_sde_step(x: torch.Tensor, x0: torch.Tensor, a: float, s: float, a2: float, s2: float,
                       history: list[tuple[torch.Tensor, float]], noise: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """One DPM-Solver++ 3M SDE step from (a, s) to (a2, s2), in lambda = log(alpha / sigma).

    k-diffusion's update works on x / alpha with sigma = s / a; multiplied back by a2 it is
        x2 = (a2 / a) e^{-(1+eta) h} x + a2 (1 - e^{-(1+eta) h}) x0 + a2 (phi2 d1 - phi3 d2)
             + s2 sqrt(1 - e^{-2 eta h}) noise
    with d1, d2 the first and second divided differences of the data predictions over the last
    three steps (fewer while the history fills). An infinite step (lambda = -inf at the start,
    +inf at the end) is first order: x2 = a2 x0 + s2 noise. ``history`` holds (x0, h) of the
    previous steps, newest last; this step appends its own."""
    lam = math.log(a / s) if a > 0 else -math.inf
    lam2 = math.log(a2 / s2) if s2 > 0 else math.inf
    h = lam2 - lam
    if not math.isfinite(h):
        history.append((x0, h))
        return a2 * x0 + s2 * noise
    h_eta = h * (1.0 + eta)
    out = (a2 / a) * math.exp(-h_eta) * x - a2 * math.expm1(-h_eta) * x0
    phi2 = math.expm1(-h_eta) / h_eta + 1.0
    if len(history) >= 2 and all(math.isfinite(ph) for _, ph in history[-2:]):
        (x0_2, h_2), (x0_1, h_1) = history[-2:]
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (x0 - x0_1) / r0
        d1_1 = (x0_1 - x0_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi3 = phi2 / h_eta - 0.5
        out = out + a2 * (phi2 * d1 - phi3 * d2)
    elif history and math.isfinite(history[-1][1]):
        x0_1, h_1 = history[-1]
        out = out + a2 * phi2 * (x0 - x0_1) / (h_1 / h)
    history.append((x0, h))
    return out + s2 * math.sqrt(-math.expm1(-2.0 * eta * h)) * noise


@torch.no_grad()
def sample(model: nn.Module, shape: tuple[int, ...], cond: Condition | None, uncond: Condition | None = None,
           steps: int = 25, sampler: str = "ddim", cfg: float = 3.0, rescale: float = 0.0,
           rescale_axis: str = "all", generator: torch.Generator | None = None,
           callback: Callable[[int, int, torch.Tensor], None] | None = None,
           schedule: Schedule | None = None, device=None) -> tuple[torch.Tensor, dict]:
    """Generate latents [B, F, C] from pure noise; one model forward per step."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")
    if rescale_axis not in RESCALE_AXES:
        raise ValueError(f"rescale_axis must be one of {RESCALE_AXES}, not {rescale_axis!r}")
    schedule = schedule or Schedule()
    device = device or next(model.parameters()).device
    b = shape[0]
    guided = cond is not None and cfg != 1.0
    if guided:  # cond rows then uncond rows, one forward per step
        if uncond is None:
            batch_cond = cond.repeat(2).to(device)
            drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(device)
        else:
            batch_cond, drop = Condition.cat([cond, uncond]).to(device), None
        kwargs = batch_cond.as_kwargs()
    else:
        kwargs = _cond_kwargs(cond.to(device) if cond is not None else None)
        drop = None

    def model_v(x: torch.Tensor, t: int) -> torch.Tensor:
        xin = torch.cat([x, x]) if guided else x
        tt = torch.full((xin.shape[0],), float(t), device=device)
        out = model(xin, tt, drop=drop, **kwargs).float()
        if not guided:
            return out
        c, u = out.chunk(2)
        return cfg_combine(c, u, cfg, rescale, rescale_axis)

    ts = trailing_timesteps(schedule.num_steps, steps)
    ab = schedule.alphas_cumprod
    ab_next = [float(ab[t]) for t in ts[1:]] + [1.0]  # the final step lands on clean data
    x = torch.randn(shape, generator=generator).to(device)
    prev_x0, prev_h = None, None
    history: list[tuple[torch.Tensor, float]] = []   # dpmpp_3m_sde: (x0, h) of the last two steps
    nfe = 0
    model.eval()
    for i, t in enumerate(ts.tolist()):
        a, s = math.sqrt(float(ab[t])), math.sqrt(1.0 - float(ab[t]))
        a2, s2 = math.sqrt(ab_next[i]), math.sqrt(1.0 - ab_next[i])
        v = model_v(x, t)
        nfe += 1
        x0, eps = _v_to_x0_eps(x, v, a, s)
        if sampler == "ddim":
            x = a2 * x0 + s2 * eps
        elif sampler == "euler":
            x = x + (math.atan2(s2, a2) - math.atan2(s, a)) * v
        elif sampler == "heun":
            dphi = math.atan2(s2, a2) - math.atan2(s, a)
            x_euler = x + dphi * v
            if i + 1 < len(ts):   # the slope at the Euler step's end, then the average slope
                v2 = model_v(x_euler, int(ts[i + 1]))
                nfe += 1
                x = x + dphi * 0.5 * (v + v2)
            else:
                x = x_euler
        elif sampler == "dpmpp_3m_sde":
            noise = torch.randn(shape, generator=generator).to(device)
            x = _dpmpp_3m_sde_step(x, x0, a, s, a2, s2, history, noise)
        else:  # dpmpp_2m in lambda = log(alpha / sigma); lambda is -inf at t=T-1, +inf at the end
            lam = math.log(a / s) if a > 0 else -math.inf
            lam2 = math.log(a2 / s2) if s2 > 0 else math.inf
            h = lam2 - lam
            d = x0
            if prev_x0 is not None and math.isfinite(h) and math.isfinite(prev_h):
                r = prev_h / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            # x_next = (s2/s) x - a2 (e^{-h} - 1) d; e^{-h} = 0 when h is infinite
            x = (s2 / s) * x + a2 * (1 - math.exp(-h)) * d if s > 0 else a2 * d
            prev_x0, prev_h = x0, h
        if callback is not None:
            callback(i, t, x)
    meta = {"sampler": sampler, "steps": steps, "timesteps": ts.tolist(), "cfg": cfg, "rescale": rescale,
            "rescale_axis": rescale_axis, "guided": guided, "nfe": nfe, "prediction": "v",
            "schedule": schedule.meta(),
            "uncond": "explicit" if uncond is not None else "null_token"}
    return x, meta
