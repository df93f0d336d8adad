"""PANNs CNN14 (Kong et al. 2020) as the papers' FD, KL and IS use it: audioldm_eval's 16 kHz model.

The network and its key names are those of the released checkpoints (``Cnn14_16k_mAP=0.438.pth``:
``{"model": state_dict}``), so one loads with :func:`load_panns` from a path, never downloaded.
The front end is recomputed from its settings rather than loaded: torchlibrosa's
``Spectrogram`` (periodic Hann window, ``center=True``, reflect padding, power 2) and
``LogmelFilterBank`` (``librosa.filters.mel``, ``10 log10(max(x, 1e-10))``, ``ref`` 1, no
``top_db``), the checkpoint's ``spectrogram_extractor.*`` / ``logmel_extractor.*`` tensors
(those same DFT and mel matrices) are skipped.

What audioldm_eval reads (and :class:`PannsMetrics` returns): ``"2048"``, the embedding
``relu(fc1(x))`` for FD, and ``"logits"``, ``fc_audioset`` of it, whose softmax gives KL and
IS (its sigmoid is the 527 AudioSet tag probabilities).

Public API::

    PANNS_16K                               # the front end audioldm_eval uses at 16 kHz
    Cnn14(front=PANNS_16K, classes=527)(wav [B, T]) -> {"embedding": [B, 2048], "logits": [B, classes]}
    load_panns(path, device="cpu") -> Cnn14        # a released checkpoint or a saved state_dict
    PannsMetrics(model, name)                      # .embed(clips) / .classify(clips) / .sample_rate / .model
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PANNS_16K = {"sample_rate": 16000, "n_fft": 512, "hop": 160, "n_mels": 64, "fmin": 50.0, "fmax": 8000.0}
FRONT_END_KEYS = ("spectrogram_extractor.", "logmel_extractor.")  # recomputed, not loaded


class LogMelFrontEnd(nn.Module):
    """Waveforms [B, T] -> log-mel power in dB [B, 1, frames, n_mels] (torchlibrosa's)."""

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int, fmin: float, fmax: float,
                 amin: float = 1e-10):
        super().__init__()
        import librosa

        self.n_fft, self.hop, self.amin = n_fft, hop, amin
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        mel = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        self.register_buffer("mel", torch.from_numpy(mel.T.astype(np.float32)), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wav, self.n_fft, self.hop, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True).abs().pow(2)             # [B, F, frames]
        mel = spec.transpose(1, 2) @ self.mel                           # [B, frames, n_mels]
        return (10.0 * torch.log10(mel.clamp_min(self.amin)))[:, None]  # ref 1: minus 10 log10(1) = 0


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool)


class Cnn14(nn.Module):
    def __init__(self, front: dict = PANNS_16K, classes: int = 527):
        super().__init__()
        self.front_settings = dict(front)
        self.front = LogMelFrontEnd(**front)
        self.bn0 = nn.BatchNorm2d(front["n_mels"])
        widths = [1, 64, 128, 256, 512, 1024, 2048]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(f"conv_block{i}", ConvBlock(a, b))
        self.fc1 = nn.Linear(2048, 2048)
        self.fc_audioset = nn.Linear(2048, classes)

    def forward(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.front(wav)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # batch norm over mel bands
        for i in range(1, 7):
            x = getattr(self, f"conv_block{i}")(x, (2, 2) if i < 6 else (1, 1))
        x = x.mean(dim=3)                                 # over mel bands
        x = x.max(dim=2).values + x.mean(dim=2)           # over time
        embedding = F.relu(self.fc1(x))
        return {"embedding": embedding, "logits": self.fc_audioset(embedding)}


def load_panns(path: str | Path, device: str = "cpu") -> Cnn14:
    """CNN14 at 16 kHz from a released checkpoint (``{"model": state_dict}``) or a bare state_dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k: v for k, v in ckpt.get("model", ckpt).items() if not k.startswith(FRONT_END_KEYS)}
    model = Cnn14(classes=sd["fc_audioset.weight"].shape[0] if "fc_audioset.weight" in sd else 527)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a PANNs CNN14 checkpoint ({str(e).splitlines()[0]})") from None
    return model.eval().to(device)


class PannsMetrics:
    """The callables ``metrics.fd_audio`` / ``kl_audio`` / ``is_audio`` take, on clips at 16 kHz."""

    def __init__(self, model: Cnn14, name: str):
        self.net, self.model = model.eval(), name
        self.sample_rate = int(model.front_settings["sample_rate"])
        self._last: list[tuple[object, dict]] = []   # FD, KL and IS read the same clip lists: one forward each

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "PannsMetrics":
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
        return cls(load_panns(path, device), f"panns-cnn14-16k:{Path(path).name}:{digest}")

    @torch.no_grad()
    def _outputs(self, clips) -> dict[str, np.ndarray]:
        for seen, out in self._last:
            if seen is clips:
                return out
        device = next(self.net.parameters()).device
        outs = [self.net(torch.as_tensor(np.asarray(c, np.float32).reshape(1, -1), device=device)) for c in clips]
        out = {k: torch.cat([o[k] for o in outs]).float().cpu().numpy() for k in ("embedding", "logits")}
        self._last = [*self._last[-1:], (clips, out)]   # generated and reference of one row
        return out

    def embed(self, clips) -> np.ndarray:
        return self._outputs(clips)["embedding"]

    def classify(self, clips) -> np.ndarray:
        logits = torch.from_numpy(self._outputs(clips)["logits"])
        return torch.softmax(logits.double(), dim=-1).numpy()
