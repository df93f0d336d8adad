"""Mel VAE (GenAu's 1D VAE, and an AudioLDM-style 2D variant): log-mel in, latent out,
log-mel reconstruction.

One module, two latent shapes (``MelVAEConfig.latent``):

* ``1d`` (GenAu, after Make-An-Audio 2): the mel bands are the input channels of 1D convs
  over time, so frequency is folded into the latent channels: latents ``[B, C, T']``.
* ``2d`` (AudioLDM): the log-mel is a one-channel image and 2D convs downsample time and
  frequency: latents ``[B, C, F', T']``, a time x frequency grid. The DiT reads it as
  ``T' * F'`` tokens of width ``C`` in time-major order (token ``t * F' + f``), so the tokens
  that share a frequency position ``f`` are every ``F'``-th token; ``grid_freq = F'`` is
  recorded in the model folders' metadata (LiteFocus-style attention can use it).

Encoder: input conv, then per level ``res_blocks`` residual blocks (GroupNorm, SiLU, conv)
and a strided conv between levels (``time_down`` / ``freq_down``), a middle block (optional
self-attention), GroupNorm, SiLU and a conv to mean and log-variance (LDM's autoencoder
design, as GenAu's code uses). The decoder mirrors it with nearest-neighbour upsampling.
The log-mel is normalised by fixed constants (``mel_mean``, ``mel_std``) so that the
networks see unit-scale values.

Losses: L1 on the normalised log-mel + ``kl_weight`` * KL (+ optional, off by default, a
patch discriminator on the log-mel image with a hinge loss and feature matching, as
GenAu's and AudioLDM's VAEs train with).

Latent shards store 2D latents folded to ``[C * F', T']`` (the loader crops time as for
1D latents); :func:`to_tokens` / :func:`from_tokens` convert between stored latents and
DiT tokens for both shapes (and for waveform-VAE latents, whose ``grid_freq`` is 1).

Public API::

    MelVAEConfig(...)                   # .from_dict / .from_yaml("mel-vae-tiny"); .mel: MelSpec
        .hop (samples per latent frame), .latent_rate, .grid_freq, .sample_rate
    MelVAE(cfg)
        .features(wav [B,1,T]) -> normalised log-mel [B, n_mels, T/mel.hop]
        .encode(wav [B,1,T]) -> Posterior (mean: [B,C,T'] or [B,C,F',T'])
        .encode_mel(x) -> Posterior ; .decode_norm(z) -> normalised log-mel
        .decode(z) -> log-mel [B, n_mels, T/mel.hop]
    mel_vae_loss(model, wav, cfg, disc=None) -> (loss, logs, recon, target); mel_vae_train_step(...) -> logs
    PatchDiscriminator(channels)   # trained with vae.add_adversarial / vae.optimise
    vae_config(d) / build_vae(d) / is_mel(d)   # either VAE family from a config dict
    latent_geometry(d) -> {"rate", "channels", "grid_freq", "stored_channels"}
    to_tokens(z_stored [B, C*F', T'], grid_freq) -> [B, T'*F', C]; from_tokens(x, grid_freq)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from soundlake.generation.mel import LogMel
from soundlake.generation.vae import (
    LatentVAE,
    MelModelConfig,
    Posterior,
    Stack,
    VAEConfig,
    WaveVAE,
    add_adversarial,
    optimise,
)


@dataclass
class MelVAEConfig(MelModelConfig):
    kind: str = "mel"
    latent: str = "1d"                    # "1d" (GenAu) | "2d" (AudioLDM-style grid)
    channels: int = 64                    # width after the input conv
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    time_down: list[int] = field(default_factory=lambda: [2, 2])   # one per level transition
    freq_down: list[int] = field(default_factory=lambda: [2, 2])   # 2d only
    res_blocks: int = 2
    mid_attention: bool = False
    latent_dim: int = 64                  # channels per latent position (GenAu: 64)
    mel_mean: float = -5.0                # log-mel normalisation: (x - mean) / std
    mel_std: float = 2.5
    # losses
    l1_weight: float = 1.0
    kl_weight: float = 1e-5
    discriminator: bool = False
    disc_channels: int = 32
    adv_weight: float = 0.1
    fm_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.latent not in ("1d", "2d"):
            raise ValueError(f"latent must be '1d' or '2d', not {self.latent!r}")
        levels = len(self.channel_mults) - 1
        if len(self.time_down) != levels or (self.latent == "2d" and len(self.freq_down) != levels):
            raise ValueError(f"time_down (and freq_down for 2d) need one factor per level transition ({levels})")
        if self.latent == "2d" and self.mel.n_mels % math.prod(self.freq_down):
            raise ValueError(f"mel.n_mels {self.mel.n_mels} is not divisible by prod(freq_down) "
                             f"{math.prod(self.freq_down)}")

    @property
    def hop(self) -> int:
        """Waveform samples per latent frame."""
        return self.mel.hop * math.prod(self.time_down)

    @property
    def latent_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def grid_freq(self) -> int:
        return self.mel.n_mels // math.prod(self.freq_down) if self.latent == "2d" else 1


# ---------------------------------------------------------------- config dispatch

def is_mel(config: dict) -> bool:
    return config.get("kind") == "mel"


def vae_config(config: dict) -> VAEConfig | MelVAEConfig:
    """The config of either VAE family (a mel VAE's has ``kind: mel``)."""
    return MelVAEConfig.from_dict(config) if is_mel(config) else VAEConfig.from_dict(config)


def build_vae(config: dict) -> WaveVAE | MelVAE:
    cfg = vae_config(config)
    return MelVAE(cfg) if isinstance(cfg, MelVAEConfig) else WaveVAE(cfg)


def latent_geometry(config: dict) -> dict:
    """What a DiT needs to know of a VAE's latents: frames per second, token width
    (``channels``), frequency rows per frame (``grid_freq``; 1 = a 1D latent) and the
    channels of the stored (folded) latents."""
    cfg = vae_config(config)
    return {"rate": cfg.latent_rate, "channels": cfg.latent_dim, "grid_freq": cfg.grid_freq,
            "stored_channels": cfg.latent_dim * cfg.grid_freq}


def to_tokens(z: torch.Tensor, grid_freq: int = 1) -> torch.Tensor:
    """Stored latents [B, C * F', T'] (or [B, C, F', T']) -> DiT tokens [B, T' * F', C], time-major."""
    b, t = z.shape[0], z.shape[-1]
    return z.reshape(b, -1, grid_freq, t).permute(0, 3, 2, 1).reshape(b, t * grid_freq, -1)


def from_tokens(x: torch.Tensor, grid_freq: int = 1) -> torch.Tensor:
    """DiT tokens [B, T' * F', C] -> VAE latents [B, C, T'] (1D) or [B, C, F', T'] (2D)."""
    b, n, c = x.shape
    if n % grid_freq:
        raise ValueError(f"{n} tokens is not a whole number of frames of {grid_freq} frequency rows")
    z = x.reshape(b, n // grid_freq, grid_freq, c).permute(0, 3, 2, 1)
    return z[:, :, 0] if grid_freq == 1 else z


# ---------------------------------------------------------------- networks

def _conv(dims: int):
    return nn.Conv1d if dims == 1 else nn.Conv2d


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int):
        super().__init__()
        conv = _conv(dims)
        self.net = nn.Sequential(_norm(cin), nn.SiLU(), conv(cin, cout, 3, padding=1),
                                 _norm(cout), nn.SiLU(), conv(cout, cout, 3, padding=1))
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.net(x)


class Attention(nn.Module):
    """Single-head self-attention over all positions (the LDM autoencoder's middle block)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).flatten(2).transpose(1, 2)          # [B, N, C]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = self.out(F.scaled_dot_product_attention(q, k, v))
        return x + h.transpose(1, 2).reshape(x.shape)


def _factors(cfg: MelVAEConfig, i: int) -> int | tuple[int, int]:
    return cfg.time_down[i] if cfg.latent == "1d" else (cfg.freq_down[i], cfg.time_down[i])


def _down(dims: int, ch: int, s) -> nn.Module:
    # kernel s + 2, padding 1: exactly L / s outputs for any factor s >= 1 (L a multiple of s)
    k = s + 2 if dims == 1 else (s[0] + 2, s[1] + 2)
    return _conv(dims)(ch, ch, k, stride=s, padding=1)


class _Up(nn.Module):
    def __init__(self, dims: int, ch: int, s):
        super().__init__()
        self.scale = s
        self.conv = _conv(dims)(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


def _middle(dims: int, ch: int, attention: bool) -> list[nn.Module]:
    return [ResBlock(dims, ch, ch)] + ([Attention(ch), ResBlock(dims, ch, ch)] if attention else [])


def _res_blocks(dims: int, cin: int, cout: int, n: int) -> list[nn.Module]:
    return [ResBlock(dims, cin if i == 0 else cout, cout) for i in range(n)]


class MelEncoder(Stack):
    def __init__(self, cfg: MelVAEConfig):
        dims = 1 if cfg.latent == "1d" else 2
        chans = [cfg.channels * m for m in cfg.channel_mults]
        layers: list[nn.Module] = [_conv(dims)(cfg.mel.n_mels if dims == 1 else 1, chans[0], 3, padding=1)]
        for i, (cin, ch) in enumerate(zip(chans[:1] + chans[:-1], chans)):
            layers += _res_blocks(dims, cin, ch, cfg.res_blocks)
            if i < len(chans) - 1:
                layers.append(_down(dims, ch, _factors(cfg, i)))
        prev = chans[-1]
        layers += _middle(dims, prev, cfg.mid_attention)
        layers += [_norm(prev), nn.SiLU(), _conv(dims)(prev, 2 * cfg.latent_dim, 3, padding=1)]
        super().__init__(layers)


class MelDecoder(Stack):
    def __init__(self, cfg: MelVAEConfig):
        dims = 1 if cfg.latent == "1d" else 2
        chans = [cfg.channels * m for m in cfg.channel_mults][::-1]
        layers: list[nn.Module] = [_conv(dims)(cfg.latent_dim, chans[0], 3, padding=1)]
        layers += _middle(dims, chans[0], cfg.mid_attention)
        for i, (cin, ch) in enumerate(zip(chans[:1] + chans[:-1], chans)):
            layers += _res_blocks(dims, cin, ch, cfg.res_blocks)
            if i < len(chans) - 1:
                layers.append(_Up(dims, ch, _factors(cfg, len(chans) - 2 - i)))
        prev = chans[-1]
        layers += [_norm(prev), nn.SiLU(), _conv(dims)(prev, cfg.mel.n_mels if dims == 1 else 1, 3, padding=1)]
        super().__init__(layers)


class MelVAE(LatentVAE):
    def __init__(self, cfg: MelVAEConfig):
        super().__init__(cfg, MelEncoder(cfg), MelDecoder(cfg))
        self.mel = LogMel(cfg.mel)

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [B, n_mels, T / mel.hop] of waveforms [B, 1, T] (or [B, T])."""
        if wav.shape[-1] % self.hop:
            raise ValueError(f"length {wav.shape[-1]} is not a multiple of hop {self.hop}")
        return (self.mel(wav) - self.cfg.mel_mean) / self.cfg.mel_std

    def encode_mel(self, x: torch.Tensor) -> Posterior:
        h = self.encoder(x if self.cfg.latent == "1d" else x[:, None])
        mean, logvar = h.chunk(2, dim=1)
        return Posterior(mean, logvar)

    def encode(self, wav: torch.Tensor) -> Posterior:
        return self.encode_mel(self.features(wav))

    def decode_norm(self, z: torch.Tensor) -> torch.Tensor:
        x = self.decoder(z)
        return x if self.cfg.latent == "1d" else x[:, 0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> log-mel [B, n_mels, frames] (natural log of the magnitude mel)."""
        return self.decode_norm(z) * self.cfg.mel_std + self.cfg.mel_mean

    def forward(self, wav: torch.Tensor, generator: torch.Generator | None = None):
        """(reconstruction, target, posterior), both normalised log-mels."""
        x = self.features(wav)
        post = self.encode_mel(x)
        return self.decode_norm(post.sample(generator)), x, post


# ---------------------------------------------------------------- losses

class PatchDiscriminator(nn.Module):
    """A PatchGAN on the log-mel image (AudioLDM / GenAu train their VAEs with one)."""

    def __init__(self, ch: int = 32, layers: int = 3):
        super().__init__()
        chans = [1] + [ch * 2 ** i for i in range(layers)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Conv2d(chans[-1], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        h, feats = x[:, None], []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            feats.append(h)
        return [(self.out(h), feats)]


def build_mel_discriminator(cfg: MelVAEConfig) -> PatchDiscriminator | None:
    return PatchDiscriminator(cfg.disc_channels) if cfg.discriminator else None


def mel_vae_loss(model: MelVAE, wav: torch.Tensor, cfg: MelVAEConfig, disc: PatchDiscriminator | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """(loss, float logs, reconstruction, target) on a batch of waveforms [B, 1, T]."""
    recon, x, post = model(wav, generator)
    l1 = F.l1_loss(recon, x)
    kl = post.kl()
    loss = cfg.l1_weight * l1 + cfg.kl_weight * kl
    # l1_db: the reconstruction error in dB of mel magnitude (20 log10 e per nat)
    logs = {"l1": l1.item(), "l1_db": l1.item() * cfg.mel_std * 20 / math.log(10), "kl": kl.item()}
    return add_adversarial(loss, logs, cfg, disc, recon, x), logs, recon, x


def mel_vae_train_step(model: MelVAE, opt: torch.optim.Optimizer, wav: torch.Tensor, cfg: MelVAEConfig,
                       disc: PatchDiscriminator | None = None, disc_opt: torch.optim.Optimizer | None = None,
                       grad_clip: float | None = 1.0) -> dict:
    """One optimisation step (VAE, then the discriminator if given). Returns float logs."""
    model.train()
    loss, logs, recon, x = mel_vae_loss(model, wav, cfg, disc)
    return optimise(model, opt, loss, logs, grad_clip, disc, disc_opt, x, recon)
