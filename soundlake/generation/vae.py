"""Waveform VAE (EzAudio / Stable Audio "Oobleck" style): 1D convs with Snake activations.

Encoder: conv -> [residual units (dilations 1,3,9) -> strided conv] per stride -> Snake ->
conv to 2*latent_dim (mean, logvar). Decoder mirrors it with transposed convs. The latent
frame rate is ``sample_rate / prod(strides)`` (EzAudio: 24 kHz / 480 = 50 Hz, 128 channels).
Clip lengths must be a multiple of ``hop`` (the data loader crops/pads to that).

Losses: multi-resolution STFT (spectral convergence + log-magnitude L1) + waveform L1 +
``kl_weight`` * KL; optionally (off by default) a small multi-period discriminator with a
hinge loss and feature matching.

Public API::

    VAEConfig(...)                      # dataclass; VAEConfig.from_yaml("vae-tiny" | path)
    WaveVAE(cfg)                        # nn.Module
        .encode(wav [B,1,T]) -> Posterior (mean, logvar: [B, C, F])
        .decode(z [B,C,F]) -> wav [B,1,F*hop]
        .forward(wav, generator=None) -> (recon, posterior)
        .hop: int, .latent_rate: float, .latent_dim: int
    Posterior.sample(generator=None) / .mode() / .kl()
    MultiPeriodDiscriminator(periods, channels)       # build_discriminator(cfg) -> it or None
    vae_loss(model, wav, cfg, disc=None) -> (loss, logs, recon)
    adversarial_terms(disc, fake, real) -> (adv, fm); add_adversarial(loss, logs, cfg, disc, fake, real) -> loss
    optimise(model, opt, loss, logs, grad_clip, disc=None, disc_opt=None, real=None, fake=None) -> logs
    discriminator_loss(disc, real, fake) -> (loss, logs)
    vae_train_step(model, opt, wav, cfg, disc=None, disc_opt=None, grad_clip=1.0) -> logs
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from soundlake.generation.mel import MelSpec, mrstft_loss

CONFIG_DIR = Path(__file__).parent / "configs"


def read_config(name_or_path: str | Path) -> dict:
    """A YAML config by bare name (``configs/<name>.yaml``) or by path."""
    import yaml

    p = Path(name_or_path)
    if not p.suffix:
        p = CONFIG_DIR / f"{name_or_path}.yaml"
    with open(p) as f:
        return yaml.safe_load(f) or {}


def model_keys(name_or_path: str | Path) -> dict:
    """A flat model config (a VAE's, a vocoder's) without its ``train:`` section (training
    defaults that ``soundlake train`` reads as spec keys)."""
    return {k: v for k, v in read_config(name_or_path).items() if k != "train"}


class FlatConfig:
    """A model config dataclass read from a flat dict or YAML; unknown keys are refused by name."""

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, name_or_path: str | Path):
        return cls.from_dict(model_keys(name_or_path))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MelModelConfig(FlatConfig):
    """A config of a model that reads log-mels: ``mel`` is its front end (a dict in YAML) and
    ``kind`` must be the subclass's default, so a config of another family is refused."""
    kind: str = ""
    mel: MelSpec = field(default_factory=MelSpec)

    def __post_init__(self):
        if isinstance(self.mel, dict):
            self.mel = MelSpec.from_dict(self.mel)
        expected = type(self).__dataclass_fields__["kind"].default
        if self.kind != expected:
            raise ValueError(f"kind must be {expected!r}, not {self.kind!r}")

    @property
    def sample_rate(self) -> int:
        return self.mel.sample_rate


@dataclass
class VAEConfig(FlatConfig):
    sample_rate: int = 16000
    channels: int = 16                    # width after the input conv
    channel_mults: list[int] = field(default_factory=lambda: [2, 4, 8, 8])  # one per stride
    strides: list[int] = field(default_factory=lambda: [2, 4, 5, 8])  # prod = hop
    latent_dim: int = 32
    dilations: list[int] = field(default_factory=lambda: [1, 3, 9])
    # losses
    stft_sizes: list[int] = field(default_factory=lambda: [512, 256, 128])  # hop = n/4
    stft_weight: float = 1.0
    l1_weight: float = 1.0
    kl_weight: float = 1e-4
    # adversarial (off by default)
    discriminator: bool = False
    disc_periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    disc_channels: int = 16
    adv_weight: float = 1.0
    fm_weight: float = 2.0

    @property
    def hop(self) -> int:
        return math.prod(self.strides)

    @property
    def latent_rate(self) -> float:
        return self.sample_rate / self.hop

    grid_freq = 1   # frequency rows per latent frame: a waveform latent has one


class Snake(nn.Module):
    """x + 1/alpha * sin^2(alpha x), alpha learnable per channel (periodic inductive bias)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    def __init__(self, ch: int, dilation: int):
        super().__init__()
        self.net = nn.Sequential(
            Snake(ch), nn.Conv1d(ch, ch, 7, dilation=dilation, padding=3 * dilation),
            Snake(ch), nn.Conv1d(ch, ch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _down(cin: int, cout: int, s: int) -> nn.Conv1d:
    # kernel 2s, padding ceil(s/2): output length is exactly T/s for any s >= 2
    return nn.Conv1d(cin, cout, 2 * s, stride=s, padding=math.ceil(s / 2))


def _up(cin: int, cout: int, s: int) -> nn.ConvTranspose1d:
    return nn.ConvTranspose1d(cin, cout, 2 * s, stride=s, padding=math.ceil(s / 2), output_padding=s % 2)


class Stack(nn.Module):
    """One nn.Sequential kept under `net`, the key prefix that saved weights carry."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Encoder(Stack):
    def __init__(self, cfg: VAEConfig):
        chans = [cfg.channels] + [cfg.channels * m for m in cfg.channel_mults]
        layers: list[nn.Module] = [nn.Conv1d(1, chans[0], 7, padding=3)]
        for cin, cout, s in zip(chans[:-1], chans[1:], cfg.strides):
            layers += [ResidualUnit(cin, d) for d in cfg.dilations]
            layers += [Snake(cin), _down(cin, cout, s)]
        layers += [Snake(chans[-1]), nn.Conv1d(chans[-1], 2 * cfg.latent_dim, 3, padding=1)]
        super().__init__(layers)


class Decoder(Stack):
    def __init__(self, cfg: VAEConfig):
        chans = [cfg.channels] + [cfg.channels * m for m in cfg.channel_mults]
        layers: list[nn.Module] = [nn.Conv1d(cfg.latent_dim, chans[-1], 7, padding=3)]
        for cin, cout, s in zip(chans[:0:-1], chans[-2::-1], cfg.strides[::-1]):
            layers += [Snake(cin), _up(cin, cout, s)]
            layers += [ResidualUnit(cout, d) for d in cfg.dilations]
        layers += [Snake(chans[0]), nn.Conv1d(chans[0], 1, 7, padding=3)]
        super().__init__(layers)


@dataclass
class Posterior:
    """Diagonal Gaussian over latents [B, C, F]."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def __post_init__(self):
        # clamp as Stable Diffusion / Stable Audio do: keeps exp() finite early in training
        self.logvar = self.logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over channels, mean over batch and frames."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.sum(1).mean()


class LatentVAE(nn.Module):
    """What training, encode and generate read of either VAE family: encoder, decoder, and
    the config's hop, latent rate and latent width."""

    def __init__(self, cfg, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.decoder = decoder

    @property
    def hop(self) -> int:
        return self.cfg.hop

    @property
    def latent_rate(self) -> float:
        return self.cfg.latent_rate

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim


class WaveVAE(LatentVAE):
    def __init__(self, cfg: VAEConfig):
        if len(cfg.channel_mults) != len(cfg.strides):
            raise ValueError("channel_mults and strides must have the same length")
        super().__init__(cfg, Encoder(cfg), Decoder(cfg))

    def encode(self, wav: torch.Tensor) -> Posterior:
        if wav.shape[-1] % self.hop:
            raise ValueError(f"length {wav.shape[-1]} is not a multiple of hop {self.hop}")
        mean, scale = self.encoder(wav).chunk(2, dim=1)
        # softplus std (as Stable Audio): grows linearly, so an early large activation
        # cannot blow the KL up the way exp(logvar) does
        std = F.softplus(scale) + 1e-4
        return Posterior(mean, 2.0 * std.log())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, wav: torch.Tensor, generator: torch.Generator | None = None):
        post = self.encode(wav)
        return self.decode(post.sample(generator)), post


# ---------------------------------------------------------------- losses

class PeriodDiscriminator(nn.Module):
    """HiFi-GAN style: fold the waveform by period p and run 2D convs over (T/p, p)."""

    def __init__(self, period: int, ch: int):
        super().__init__()
        self.period = period
        chans = [1, ch, ch * 2, ch * 4]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0)) for a, b in zip(chans[:-1], chans[1:])
        )
        self.out = nn.Conv2d(chans[-1], 1, (3, 1), padding=(1, 0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, t = x.shape
        pad = (-t) % self.period
        x = F.pad(x, (0, pad), mode="reflect" if pad < t else "constant")
        x = x.view(b, c, -1, self.period)
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            feats.append(x)
        return self.out(x), feats


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, periods: list[int], channels: int = 16):
        super().__init__()
        self.discs = nn.ModuleList(PeriodDiscriminator(p, channels) for p in periods)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [d(x) for d in self.discs]


def build_discriminator(cfg: VAEConfig) -> MultiPeriodDiscriminator | None:
    return MultiPeriodDiscriminator(cfg.disc_periods, cfg.disc_channels) if cfg.discriminator else None


def vae_loss(model: WaveVAE, wav: torch.Tensor, cfg: VAEConfig,
             disc: MultiPeriodDiscriminator | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Generator-side (loss, float logs, reconstruction) on a batch of waveforms [B, 1, T]."""
    recon, post = model(wav, generator)
    sc, mag = mrstft_loss(recon, wav, cfg.stft_sizes)
    l1 = F.l1_loss(recon, wav)
    kl = post.kl()
    loss = cfg.stft_weight * (sc + mag) + cfg.l1_weight * l1 + cfg.kl_weight * kl
    logs = {"stft_sc": sc.item(), "stft_mag": mag.item(), "l1": l1.item(), "kl": kl.item()}
    return add_adversarial(loss, logs, cfg, disc, recon, wav), logs, recon


def adversarial_terms(disc: nn.Module, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generator side of a hinge GAN: (adversarial loss, feature matching L1); ``disc`` returns
    a list of (logits, features) per sub-discriminator."""
    fake_out = disc(fake)
    with torch.no_grad():
        real_out = disc(real)
    adv = sum(-logit.mean() for logit, _ in fake_out) / len(fake_out)
    fm = sum(F.l1_loss(f, r) for (_, ff), (_, rf) in zip(fake_out, real_out) for f, r in zip(ff, rf))
    return adv, fm / sum(len(ff) for _, ff in fake_out)


def add_adversarial(loss: torch.Tensor, logs: dict, cfg, disc: nn.Module | None, fake: torch.Tensor,
                    real: torch.Tensor) -> torch.Tensor:
    """``loss`` plus, when there is a discriminator, the config's weighted adversarial and feature
    matching terms; the total goes into ``logs["loss"]``."""
    if disc is not None:
        adv, fm = adversarial_terms(disc, fake, real)
        loss = loss + cfg.adv_weight * adv + cfg.fm_weight * fm
        logs |= {"adv": adv.item(), "fm": fm.item()}
    logs["loss"] = loss.item()
    return loss


def discriminator_loss(disc: MultiPeriodDiscriminator, real: torch.Tensor,
                       fake: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hinge loss: push real logits above +1 and fake ones below -1."""
    real_out, fake_out = disc(real), disc(fake.detach())
    loss = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for (r, _), (f, _) in zip(real_out, fake_out))
    loss = loss / len(real_out)
    return loss, {"disc": loss.item()}


def vae_train_step(model: WaveVAE, opt: torch.optim.Optimizer, wav: torch.Tensor, cfg: VAEConfig,
                   disc: MultiPeriodDiscriminator | None = None,
                   disc_opt: torch.optim.Optimizer | None = None, grad_clip: float | None = 1.0) -> dict:
    """One optimisation step (generator, then discriminator if given). Returns float logs."""
    model.train()
    loss, logs, recon = vae_loss(model, wav, cfg, disc)
    return optimise(model, opt, loss, logs, grad_clip, disc, disc_opt, wav, recon)


def optimise(model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, logs: dict,
             grad_clip: float | None, disc: nn.Module | None = None, disc_opt: torch.optim.Optimizer | None = None,
             real: torch.Tensor | None = None, fake: torch.Tensor | None = None) -> dict:
    """One optimisation step of ``model`` on ``loss``, then (when given) one hinge step of the
    discriminator on ``real`` against ``fake``. Returns ``logs`` with the step's extras."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        logs["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    opt.step()
    if disc is not None and disc_opt is not None:
        d_loss, d_logs = discriminator_loss(disc, real, fake)
        disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_opt.step()
        logs |= d_logs
    return logs
