"""A small Vocos-style vocoder: log-mel frames -> ConvNeXt blocks -> iSTFT head -> waveform.

Vocos (Siuzdak 2023) predicts, per frame, the log-magnitude and phase of an STFT and
inverts it with one iSTFT: no upsampling convolutions, so it is light enough to train on a
CPU. Here: a conv embedding of the log-mel, LayerNorm, ``layers`` ConvNeXt blocks
(depthwise conv, LayerNorm, pointwise MLP, layer scale), LayerNorm, a linear head to
``n_fft + 2`` values per frame (magnitude ``exp`` clipped at 100, phase as an angle), then
``torch.istft`` with the mel hop (``n_fft``: 4 x hop by default, as Vocos).

The vocoder reads the log-mel of its own :class:`~soundlake.generation.mel.MelSpec`
(recorded in its model folder); ``generate`` uses it only when it equals the mel VAE's.

Losses: multi-resolution STFT (spectral convergence + log magnitude) + ``mel_weight`` x L1
between the log-mels of the output and the input; optionally (off in the tiny config) the
waveform VAE's multi-period discriminator with a hinge loss and feature matching (Vocos
trains with a multi-period and a multi-resolution discriminator).

Public API::

    VocoderConfig(...)           # .from_dict / .from_yaml("vocoder-tiny"); .mel: MelSpec
    Vocoder(cfg)(logmel [B, n_mels, F]) -> wav [B, F * hop]
    build_vocoder_discriminator(cfg) -> MultiPeriodDiscriminator | None
    vocoder_loss(model, wav [B,1,T], cfg, disc=None) -> (loss, logs, fake [B,1,T])
    vocoder_train_step(model, opt, wav, cfg, disc=None, disc_opt=None, grad_clip=1.0) -> logs
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from soundlake.generation.mel import LogMel, mrstft_loss
from soundlake.generation.vae import MelModelConfig, MultiPeriodDiscriminator, add_adversarial, optimise


@dataclass
class VocoderConfig(MelModelConfig):
    kind: str = "vocos"
    dim: int = 64
    intermediate: int = 192
    layers: int = 4
    kernel: int = 7
    n_fft: int | None = None              # iSTFT size; None = 4 x mel hop
    # losses
    stft_sizes: list[int] = field(default_factory=lambda: [1024, 512, 256, 128])
    stft_weight: float = 1.0
    mel_weight: float = 1.0
    discriminator: bool = False
    disc_periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    disc_channels: int = 16
    adv_weight: float = 1.0
    fm_weight: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        if self.n_fft is None:
            self.n_fft = 4 * self.mel.hop
        if self.n_fft < self.mel.hop or self.n_fft % 2:
            raise ValueError(f"n_fft {self.n_fft}: must be even and at least the mel hop {self.mel.hop}")

    @property
    def hop(self) -> int:
        return self.mel.hop


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, intermediate: int, kernel: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, intermediate), nn.GELU(), nn.Linear(intermediate, dim))
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D, F]
        h = self.mlp(self.norm(self.dwconv(x).transpose(1, 2))) * self.gamma
        return x + h.transpose(1, 2)


class Vocoder(nn.Module):
    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.cfg = cfg
        self.mel = LogMel(cfg.mel)
        self.embed = nn.Conv1d(cfg.mel.n_mels, cfg.dim, cfg.kernel, padding=cfg.kernel // 2)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.blocks = nn.ModuleList(ConvNeXtBlock(cfg.dim, cfg.intermediate, cfg.kernel, 1.0 / cfg.layers)
                                    for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.n_fft + 2)
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, n_mels, F] -> waveform [B, F * hop]."""
        x = self.norm(self.embed(logmel).transpose(1, 2)).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        h = self.head(self.final_norm(x.transpose(1, 2))).transpose(1, 2)   # [B, n_fft + 2, F]
        log_mag, phase = h.chunk(2, dim=1)
        mag = log_mag.exp().clamp(max=1e2)   # Vocos: a bound keeps an early large output finite
        spec = torch.polar(mag, phase)
        n = self.cfg.mel.hop
        return torch.istft(spec, self.cfg.n_fft, n, self.cfg.n_fft, window=self.window, center=True,
                           length=logmel.shape[-1] * n)


def build_vocoder_discriminator(cfg: VocoderConfig) -> MultiPeriodDiscriminator | None:
    return MultiPeriodDiscriminator(cfg.disc_periods, cfg.disc_channels) if cfg.discriminator else None


def vocoder_loss(model: Vocoder, wav: torch.Tensor, cfg: VocoderConfig,
                 disc: MultiPeriodDiscriminator | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(loss, float logs, generated waveform [B, 1, T]) on real waveforms [B, 1, T]."""
    with torch.no_grad():
        target = model.mel(wav)
    fake = model(target)[:, None]
    sc, mag = mrstft_loss(fake, wav, cfg.stft_sizes)
    mel_l1 = F.l1_loss(model.mel(fake), target)
    loss = cfg.stft_weight * (sc + mag) + cfg.mel_weight * mel_l1
    logs = {"stft_sc": sc.item(), "stft_mag": mag.item(), "mel_l1": mel_l1.item()}
    return add_adversarial(loss, logs, cfg, disc, fake, wav), logs, fake


def vocoder_train_step(model: Vocoder, opt: torch.optim.Optimizer, wav: torch.Tensor, cfg: VocoderConfig,
                       disc: MultiPeriodDiscriminator | None = None, disc_opt: torch.optim.Optimizer | None = None,
                       grad_clip: float | None = 1.0) -> dict:
    model.train()
    loss, logs, fake = vocoder_loss(model, wav, cfg, disc)
    return optimise(model, opt, loss, logs, grad_clip, disc, disc_opt, wav, fake)
