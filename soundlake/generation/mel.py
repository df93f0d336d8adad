"""The log-mel front end of the mel path (mel VAE, vocoder), its inversion by Griffin-Lim, and
the spectral distances the VAEs and the vocoder train and are scored on.

:class:`MelSpec` holds every setting of the front end (rate, n_fft, hop, window, mel bands,
fmin/fmax, log floor). It is recorded in each mel model folder's metadata and every
consumer rebuilds the front end from it, so encode, the vocoder and generate cannot
disagree with training.

Framing follows AudioLDM / HiFi-GAN (what GenAu's 1D VAE reads): reflect-pad
``(n_fft - hop) / 2`` samples on each side and frame without centring, so ``T`` samples
(a multiple of ``hop``) give exactly ``T / hop`` frames, frame ``i`` centred on sample
``(i + 1/2) * hop``. Magnitude STFT (power 1) with a periodic Hann window of ``win``
samples, Slaney-normalised Slaney-scale mel filters (``librosa.filters.mel``), then
``log(max(mel, log_floor))``.

Public API::

    MelSpec(...)                     # dataclass; .from_dict(d) (unknown keys: ValueError), .to_dict()
    LogMel(spec)(wav [B, T] | [B, 1, T]) -> log-mel [B, n_mels, T // hop]   (torch, differentiable)
    mel_filters(spec) -> np.ndarray [n_mels, n_fft // 2 + 1]
    griffin_lim(logmel [n_mels, F] | [B, n_mels, F], spec, n_iter=32, seed=0) -> wav [B, F * hop]
    log_spectral_distance(x, y, n_fft=1024) -> float   # dB, waveforms [T] or [B, T]
    mrstft_distance(x, y, sizes=(2048, 1024, 512, 256, 128)) -> float  # spectral convergence + log-magnitude L1
    mrstft_loss(x [B, 1, T], y, sizes) -> (spectral convergence, log-magnitude L1)   # the training loss, torch
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MelSpec:
    sample_rate: int = 16000    # Hz
    n_fft: int = 1024           # FFT size, samples
    hop: int = 160              # samples between frames (100 frames/s at 16 kHz)
    win: int = 1024             # Hann window length, samples (<= n_fft)
    n_mels: int = 64            # mel bands (GenAu / AudioLDM: 64)
    fmin: float = 0.0           # Hz
    fmax: float = 8000.0        # Hz (Nyquist at 16 kHz)
    log_floor: float = 1e-5     # mel magnitudes are clamped here before the log

    def __post_init__(self):
        if not 0 < self.hop <= self.win <= self.n_fft:
            raise ValueError(f"mel: need 0 < hop ({self.hop}) <= win ({self.win}) <= n_fft ({self.n_fft})")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"mel: need 0 <= fmin ({self.fmin}) < fmax ({self.fmax}) <= sample_rate / 2")
        if self.n_mels < 1 or self.log_floor <= 0:
            raise ValueError("mel: n_mels must be >= 1 and log_floor > 0")

    @classmethod
    def from_dict(cls, d: dict) -> "MelSpec":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown mel keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def pad(self) -> tuple[int, int]:
        left = (self.n_fft - self.hop) // 2
        return left, self.n_fft - self.hop - left


def mel_filters(spec: MelSpec) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=spec.sample_rate, n_fft=spec.n_fft, n_mels=spec.n_mels, fmin=spec.fmin,
                               fmax=spec.fmax, htk=False, norm="slaney").astype(np.float32)


class LogMel(nn.Module):
    """Waveforms -> log-mel frames. The filters and window are non-persistent buffers: the
    spec rebuilds them, so they are not in a model's weights."""

    def __init__(self, spec: MelSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("filters", torch.from_numpy(mel_filters(spec)), persistent=False)
        self.register_buffer("window", torch.hann_window(spec.win), persistent=False)

    def magnitude(self, wav: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = wav.reshape(-1, wav.shape[-1])
        if x.shape[-1] % s.hop:
            raise ValueError(f"length {x.shape[-1]} is not a multiple of the mel hop {s.hop}")
        mode = "reflect" if x.shape[-1] > max(s.pad) else "constant"  # reflect needs more samples than the pad
        x = nn.functional.pad(x[:, None], s.pad, mode=mode)[:, 0]
        return torch.stft(x, s.n_fft, s.hop, s.win, window=self.window, center=False, return_complex=True).abs()

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        mel = torch.matmul(self.filters, self.magnitude(wav))
        return mel.clamp_min(self.spec.log_floor).log()


def griffin_lim(logmel, spec: MelSpec, n_iter: int = 32, seed: int = 0) -> np.ndarray:
    """Invert log-mel frames with librosa (NNLS mel -> linear magnitude, then Griffin-Lim with
    momentum), on the front end's own framing: the result is aligned sample for sample."""
    import librosa

    m = np.asarray(logmel.detach().cpu() if isinstance(logmel, torch.Tensor) else logmel, dtype=np.float32)
    m = m[None] if m.ndim == 2 else m
    left = spec.pad[0]
    n = m.shape[-1] * spec.hop
    out = np.zeros((len(m), n), np.float32)
    for i, one in enumerate(m):
        mag = librosa.feature.inverse.mel_to_stft(np.exp(one), sr=spec.sample_rate, n_fft=spec.n_fft, power=1.0,
                                                  fmin=spec.fmin, fmax=spec.fmax, htk=False, norm="slaney")
        y = librosa.griffinlim(mag, n_iter=n_iter, hop_length=spec.hop, win_length=spec.win, n_fft=spec.n_fft,
                               center=False, random_state=seed)
        y = y[left: left + n]
        out[i, :len(y)] = y
    return out


def _as_batch(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return t[None] if t.ndim == 1 else t


def log_spectral_distance(x, y, n_fft: int = 1024) -> float:
    """Log-spectral distance in dB between waveforms ``x`` and reference ``y`` (same length):
    per frame, the RMS over frequency of the power spectra's dB difference; mean over frames."""
    x, y = _as_batch(x), _as_batch(y)
    win = torch.hann_window(n_fft)
    px = torch.stft(x, n_fft, n_fft // 4, window=win, return_complex=True).abs().pow(2).clamp_min(1e-10)
    py = torch.stft(y, n_fft, n_fft // 4, window=win, return_complex=True).abs().pow(2).clamp_min(1e-10)
    diff = 10 * (px.log10() - py.log10())
    return float(diff.pow(2).mean(dim=1).sqrt().mean())


def mrstft_loss(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-resolution STFT loss of x against target y: (spectral convergence, log-magnitude L1)."""
    x, y = x.flatten(0, 1), y.flatten(0, 1)
    sc, mag = x.new_zeros(()), x.new_zeros(())
    for n in sizes:
        win = torch.hann_window(n, device=x.device, dtype=x.dtype)
        X = torch.stft(x, n, n // 4, window=win, return_complex=True).abs().clamp_min(1e-7)
        Y = torch.stft(y, n, n // 4, window=win, return_complex=True).abs().clamp_min(1e-7)
        # over the whole batch (as auraloss does): per clip, a near-silent crop would divide by ~0
        sc = sc + torch.linalg.norm(Y - X) / torch.linalg.norm(Y).clamp_min(1e-7)
        mag = mag + F.l1_loss(X.log(), Y.log())
    return sc / len(sizes), mag / len(sizes)


def mrstft_distance(x, y, sizes=(2048, 1024, 512, 256, 128)) -> float:
    """Multi-resolution STFT distance (spectral convergence + log-magnitude L1, averaged over
    the resolutions): the training loss of the waveform VAE, here as a score."""
    x, y = _as_batch(x)[:, None], _as_batch(y)[:, None]
    sc, mag = mrstft_loss(x, y, list(sizes))
    return float(sc + mag)
