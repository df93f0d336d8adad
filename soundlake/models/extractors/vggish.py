"""VGGish (Hershey et al. 2017) as FAD uses it: 0.96 s log-mel examples -> 128-d embeddings.

The front end is VGGish's own (``vggish_input`` / ``mel_features``): 16 kHz mono, frames of
25 ms (400 samples, a periodic Hann window, a 512-point FFT) every 10 ms with no padding,
magnitude spectrum, 64 HTK-mel bands from 125 to 7500 Hz (triangles in mel space, the DC bin
dropped), ``log(mel + 0.01)``, then non-overlapping examples of 96 frames. The network and its
key names are torchvggish's (``vggish-10086976.pth``: ``features.*``, ``embeddings.*``, the
last Linear followed by a ReLU as there); the post-processing is the released PCA
(``vggish_pca_params-970ea276.pth``: ``pca_eigen_vectors``, ``pca_means``) with whitening,
clipping to [-2, 2] and 8-bit quantisation, as the AudioSet embeddings and the FAD reference
use. Weights are read from paths, never downloaded.

Public API::

    vggish_examples(wav [T] at 16 kHz) -> Tensor [n, 1, 96, 64]     # n = whole 0.96 s examples
    VGGish()(examples) -> raw embeddings [n, 128]; .postprocess(emb) -> PCA'd, quantised [n, 128]
    load_vggish(weights, pca=None, device="cpu") -> VGGish
    VggishMetrics(model, name)          # .embed(clips) -> every example's embedding, stacked
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
WINDOW, HOP, FFT = 400, 160, 512          # 25 ms, 10 ms, the next power of two
BANDS, FMIN, FMAX, LOG_OFFSET = 64, 125.0, 7500.0, 0.01
EXAMPLE_FRAMES = 96                        # 0.96 s, no overlap
QUANT_MIN, QUANT_MAX = -2.0, 2.0


def _hz_to_mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)  # HTK


def mel_matrix() -> np.ndarray:
    """[FFT // 2 + 1, BANDS]: triangles on the HTK mel scale, the DC bin zeroed."""
    bins_mel = _hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT // 2 + 1))
    edges = np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), BANDS + 2)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (bins_mel[:, None] - lo) / (mid - lo)
    down = (hi - bins_mel[:, None]) / (hi - mid)
    m = np.maximum(0.0, np.minimum(up, down))
    m[0] = 0.0
    return m


def vggish_examples(wav) -> torch.Tensor:
    """Mono 16 kHz waveform -> log-mel examples [n, 1, 96, 64] (float32)."""
    x = np.asarray(wav, np.float64).reshape(-1)
    n_frames = 1 + (len(x) - WINDOW) // HOP if len(x) >= WINDOW else 0
    frames = np.lib.stride_tricks.sliding_window_view(x, WINDOW)[::HOP][:n_frames]
    window = 0.5 - 0.5 * np.cos(2 * np.pi / WINDOW * np.arange(WINDOW))   # periodic Hann
    spec = np.abs(np.fft.rfft(frames * window, FFT))
    logmel = np.log(spec @ mel_matrix() + LOG_OFFSET)
    n = len(logmel) // EXAMPLE_FRAMES
    examples = logmel[:n * EXAMPLE_FRAMES].reshape(n, EXAMPLE_FRAMES, BANDS)
    return torch.from_numpy(examples[:, None].astype(np.float32))


class VGGish(nn.Module):
    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                                        nn.Linear(4096, 128), nn.ReLU())
        self.register_buffer("pca_matrix", None)   # set by load_vggish when the PCA params are given
        self.register_buffer("pca_means", None)

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        x = self.features(examples)                       # [n, 512, 6, 4]
        x = x.permute(0, 2, 3, 1).reshape(len(x), -1)     # TF's channels-last flattening
        return self.embeddings(x)

    def postprocess(self, emb: torch.Tensor) -> torch.Tensor:
        """PCA with whitening, clip to [-2, 2], quantise to 0..255 (as floats)."""
        if self.pca_matrix is None:
            raise ValueError("no PCA parameters: load_vggish(weights, pca=PATH)")
        pca = (emb - self.pca_means) @ self.pca_matrix.T
        clipped = pca.clamp(QUANT_MIN, QUANT_MAX)
        return torch.round((clipped - QUANT_MIN) * (255.0 / (QUANT_MAX - QUANT_MIN)))


def load_vggish(weights: str | Path, pca: str | Path | None = None, device: str = "cpu") -> VGGish:
    model = VGGish()
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise ValueError(f"{weights}: not a VGGish state_dict ({str(e).splitlines()[0]})") from None
    if pca is not None:
        params = torch.load(pca, map_location="cpu", weights_only=False)  # numpy arrays in the released file
        model.pca_matrix = torch.as_tensor(np.asarray(params["pca_eigen_vectors"]), dtype=torch.float32)
        model.pca_means = torch.as_tensor(np.asarray(params["pca_means"]).reshape(-1), dtype=torch.float32)
    return model.eval().to(device)


class VggishMetrics:
    """``embed`` for ``metrics.fd_audio``: every 0.96 s example of every clip (FAD pools them),
    post-processed when the model has its PCA parameters."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model: VGGish, name: str):
        self.net, self.model = model.eval(), name

    @classmethod
    def load(cls, weights: str | Path, pca: str | Path | None = None, device: str = "cpu") -> "VggishMetrics":
        digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:12]
        post = "+pca" if pca is not None else ""
        return cls(load_vggish(weights, pca, device), f"vggish{post}:{Path(weights).name}:{digest}")

    @torch.no_grad()
    def embed(self, clips) -> np.ndarray:
        device = next(self.net.parameters()).device
        ex = torch.cat([vggish_examples(c) for c in clips])
        if not len(ex):
            raise ValueError(f"VGGish needs clips of at least {EXAMPLE_FRAMES * HOP / SAMPLE_RATE + 0.015:.2f} s")
        emb = self.net(ex.to(device))
        if self.net.pca_matrix is not None:
            emb = self.net.postprocess(emb)
        return emb.float().cpu().numpy()
