"""In-house CLAP: frozen MiniLM text tower + small trainable audio encoder.

Trains on CPU in minutes on data the project can make (the ``synth`` source), so CLAP
scores mean something offline. Architecture:

* text: frozen all-MiniLM-L6-v2 sentence embedding (384) -> trainable linear -> ``dim``;
  the frozen embeddings are computed once per unique caption before training;
* audio: log-mel (torch.stft + a slaney mel matrix from ``transformers.audio_utils``,
  no torchaudio/librosa) -> per-band BatchNorm -> 5 Conv1d blocks over time (mel bands as
  channels, time max-pooled x16) -> one Transformer layer with learned positions (so word
  order like "then" can be heard) -> attention + max pooling -> linear -> ``dim``;
* learned temperature, symmetric InfoNCE in which clips with the *same* caption count
  as positives of each other (templated captions repeat; treating them as negatives
  would teach the model to separate identical descriptions).

Public API::

    @dataclass ClapTrainConfig(epochs=20, batch_size=64, lr=2e-3, dim=256, sample_rate=16000,
                               window_s=10.0, seed=0, ...)
    train_clap(audio, captions, out_dir, config=ClapTrainConfig(), progress=None, val=None, device="cpu") -> dict
        audio: iterable of mono float32 clips at config.sample_rate (consumed once, streamed;
               only their log-mels, float16, are kept in memory)
        val: (audio, captions) or None; per-epoch val loss and text->audio R@1/R@5
             (a hit = a clip whose caption is identical to the query)
        progress: callable(dict) called after every epoch with that epoch's metrics
        returns {"history": [per-epoch dicts], "train_seconds", "path", "identity", "model": InHouseClap}
        writes out_dir/soundlake_clap.json (config + identity) and out_dir/model.safetensors
    InHouseClap.load(path, device="cpu", hop_s=None) -> a ClapBackend (see soundlake.models.clap.load)

Windowing at inference is the shared one (``soundlake.models.clap.load.Windowing``) with
``pad="zero"``: a short clip is the event followed by silence, like the training scenes.
During training, a clip longer than the window is cropped at a seeded random offset
each epoch; a shorter one is zero-padded.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from soundlake.core.fingerprints import weights_sha256
from soundlake.core.storage import atomic_path, write_text
from soundlake.models.clap.windowing import Windowing, embed_windowed
from soundlake.models.text import TextEncoder, load_text_encoder

FORMAT = "soundlake-clap/1"
INHOUSE_CONFIG = "soundlake_clap.json"
WEIGHTS = "model.safetensors"


@dataclass
class ClapTrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    dim: int = 256
    sample_rate: int = 16000
    window_s: float = 10.0
    n_fft: int = 1024
    hop_length: int = 640          # 40 ms frames: enough for these events, and half the compute of 20 ms
    n_mels: int = 64
    f_min: float = 20.0
    f_max: float = 8000.0
    channels: int = 192
    init_temperature: float = 0.07
    time_mask: float = 0.1         # SpecAugment: fraction of frames masked (train only)
    freq_mask: int = 8             # SpecAugment: max mel bands masked (train only)
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "ClapTrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------- the network


class LogMel(nn.Module):
    """Waveform [B, S] -> log-mel [B, n_mels, T] (Hann STFT, power, slaney mel)."""

    def __init__(self, cfg: ClapTrainConfig):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(
            num_frequency_bins=cfg.n_fft // 2 + 1, num_mel_filters=cfg.n_mels,
            min_frequency=cfg.f_min, max_frequency=cfg.f_max, sampling_rate=cfg.sample_rate,
            norm="slaney", mel_scale="slaney",
        )  # [freq, mels]
        self.register_buffer("fb", torch.tensor(fb.T, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.n_fft, self.hop = cfg.n_fft, cfg.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave, self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        mel = self.fb @ spec.abs().pow(2)
        return torch.log(mel + 1e-6)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: ClapTrainConfig):
        super().__init__()
        c = cfg.channels
        self.norm = nn.BatchNorm1d(cfg.n_mels)

        def block(cin, cout, k, pool=True):
            layers = [nn.Conv1d(cin, cout, k, padding=k // 2), nn.BatchNorm1d(cout), nn.GELU()]
            return nn.Sequential(*layers, nn.MaxPool1d(2)) if pool else nn.Sequential(*layers)

        self.convs = nn.Sequential(block(cfg.n_mels, c, 5), block(c, c, 3), block(c, c, 3), block(c, c, 3),
                                   block(c, c, 3, pool=False))
        frames = cfg_frames(cfg) // 16 + 1
        self.pos = nn.Parameter(torch.zeros(1, frames, c))
        self.attn = nn.TransformerEncoderLayer(c, nhead=4, dim_feedforward=2 * c, dropout=0.1, batch_first=True, norm_first=True)
        self.score = nn.Linear(c, 1)
        self.out = nn.Linear(2 * c, cfg.dim)

    def frames(self, mel: torch.Tensor) -> torch.Tensor:  # [B, n_mels, T] -> [B, T', c], before pooling
        x = self.convs(self.norm(mel)).transpose(1, 2)
        return self.attn(x + self.pos[:, : x.shape[1]])

    def pool(self, x: torch.Tensor) -> torch.Tensor:      # [B, T', c] -> [B, dim]
        w = torch.softmax(self.score(x), dim=1)
        return self.out(torch.cat([(w * x).sum(1), x.amax(1)], dim=-1))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:  # [B, n_mels, T] -> [B, dim]
        return self.pool(self.frames(mel))


def cfg_frames(cfg: ClapTrainConfig) -> int:
    """Mel frames in one window (torch.stft with center=True)."""
    return int(round(cfg.window_s * cfg.sample_rate)) // cfg.hop_length + 1


class ClapNet(nn.Module):
    """Everything trainable: audio tower, text projection, temperature."""

    def __init__(self, cfg: ClapTrainConfig, text_dim: int):
        super().__init__()
        self.logmel = LogMel(cfg)
        self.audio = AudioEncoder(cfg)
        self.text_proj = nn.Linear(text_dim, cfg.dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def embed_mel(self, mel: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.audio(mel), dim=-1)

    def embed_sentence(self, sent: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(sent), dim=-1)


def clip_loss(a: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, cap_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; pairs sharing a caption are all positives (soft targets)."""
    logits = scale * a @ t.T
    same = (cap_ids[:, None] == cap_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ---------------------------------------------------------------- features


@torch.no_grad()
def _mel_features(audio: Iterable[np.ndarray], net: ClapNet, cfg: ClapTrainConfig) -> list[torch.Tensor]:
    """Log-mel of each clip (zero-padded to one window if shorter), float16 to save memory."""
    win = Windowing(cfg.sample_rate, cfg.window_s, pad="zero")
    out = []
    for clip in audio:
        clip = np.asarray(clip, dtype=np.float32)
        if clip.ndim != 1:
            raise ValueError(f"expected mono 1-D clips, got shape {clip.shape}")
        if len(clip) < win.window:
            clip = win.pad_to_window(clip)
        out.append(net.logmel(torch.from_numpy(clip)[None])[0].half())
    return out


def _crop(mels: list[torch.Tensor], frames: int, gen: torch.Generator | None) -> torch.Tensor:
    """Stack one window of frames per clip: random offset with ``gen``, else the start."""
    out = []
    for m in mels:
        extra = m.shape[1] - frames
        off = int(torch.randint(0, extra + 1, (1,), generator=gen)) if (gen is not None and extra > 0) else 0
        out.append(m[:, off : off + frames])
    return torch.stack(out).float()


def _spec_augment(mel: torch.Tensor, cfg: ClapTrainConfig, gen: torch.Generator) -> torch.Tensor:
    b, n_mels, t = mel.shape
    mel = mel.clone()
    fill = mel.mean(dim=(1, 2), keepdim=True)
    for i in range(b):
        if cfg.freq_mask > 0:
            w = int(torch.randint(0, cfg.freq_mask + 1, (1,), generator=gen))
            f0 = int(torch.randint(0, n_mels - w + 1, (1,), generator=gen))
            mel[i, f0 : f0 + w] = fill[i]
        if cfg.time_mask > 0:
            w = int(torch.randint(0, int(cfg.time_mask * t) + 1, (1,), generator=gen))
            t0 = int(torch.randint(0, t - w + 1, (1,), generator=gen))
            mel[i, :, t0 : t0 + w] = fill[i]
    return mel


@torch.no_grad()
def _evaluate(net: ClapNet, mels, sent: torch.Tensor, cap_ids: torch.Tensor, frames: int) -> dict:
    net.eval()
    dev = next(net.parameters()).device
    a = torch.cat([net.embed_mel(_crop(mels[i : i + 64], frames, None).to(dev)) for i in range(0, len(mels), 64)])
    cap_ids = cap_ids.to(dev)
    t = net.embed_sentence(sent.to(dev)[cap_ids])
    loss = float(clip_loss(a, t, net.logit_scale.exp(), cap_ids))
    sim = t @ a.T  # text -> audio; a hit is any clip carrying the same caption
    rank = torch.argsort(sim, dim=1, descending=True)
    hit = cap_ids[rank] == cap_ids[:, None]
    return {"val_loss": loss, "val_r1": float(hit[:, :1].any(1).float().mean()), "val_r5": float(hit[:, :5].any(1).float().mean())}


# ---------------------------------------------------------------- training


def train_clap(
    audio: Iterable[np.ndarray],
    captions: list[str],
    out_dir: str | Path,
    config: ClapTrainConfig | None = None,
    progress: Callable[[dict], None] | None = None,
    val: tuple[Iterable[np.ndarray], list[str]] | None = None,
    device: str = "cpu",
) -> dict:
    """Train the in-house CLAP on (clip, caption) pairs and save it to ``out_dir``."""
    cfg = config or ClapTrainConfig()
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    text = load_text_encoder(device=device)
    net = ClapNet(cfg, text.dim)
    frames = cfg_frames(cfg)

    captions = list(captions)
    mels = _mel_features(audio, net, cfg)
    if len(mels) != len(captions):
        raise ValueError(f"{len(mels)} clips but {len(captions)} captions")
    if len(mels) < 2:
        raise ValueError("contrastive training needs at least 2 clips")
    val_mels, val_caps = (None, [])
    if val is not None:
        val_mels, val_caps = _mel_features(val[0], net, cfg), list(val[1])
    # frozen text tower: one MiniLM pass per unique caption, train and val together
    uniq = sorted(set(captions) | set(val_caps))
    index = {c: i for i, c in enumerate(uniq)}
    sent = torch.from_numpy(text.encode(uniq))
    cap_ids = torch.tensor([index[c] for c in captions])
    val_ids = torch.tensor([index[c] for c in val_caps])

    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, len(mels))
    steps_per_epoch = max(1, len(mels) // bs)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    history = []
    for epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(len(mels), generator=gen)
        losses = []
        for s in range(steps_per_epoch):
            idx = perm[s * bs : (s + 1) * bs]
            mel = _spec_augment(_crop([mels[i] for i in idx], frames, gen), cfg, gen).to(device)
            ids = cap_ids[idx]
            a = net.embed_mel(mel)
            t = net.embed_sentence(sent[ids].to(device))
            loss = clip_loss(a, t, net.logit_scale.exp(), ids.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                net.logit_scale.clamp_(0, math.log(100.0))  # CLIP's cap on the temperature
            losses.append(loss.item())
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "logit_scale": float(net.logit_scale.detach().exp()),
               "seconds": time.perf_counter() - t_start}
        if val_mels:
            row.update(_evaluate(net, val_mels, sent, val_ids, frames))
        history.append(row)
        if progress is not None:
            progress(row)

    identity = save_clap(net, cfg, text, Path(out_dir), history[-1])
    model = InHouseClap(net, cfg, text, identity, device=device)
    return {"history": history, "train_seconds": time.perf_counter() - t_start, "path": str(out_dir),
            "identity": model.identity, "model": model}


def save_clap(net: ClapNet, cfg: ClapTrainConfig, text: TextEncoder, out_dir: Path, metrics: dict | None = None) -> dict:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS) as tmp:  # a reader never sees half a weights file
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, tmp)
    meta = {
        "format": FORMAT,
        "config": asdict(cfg),
        "weights": WEIGHTS,
        "checkpoint_sha256": weights_sha256(out_dir / WEIGHTS),
        "text_encoder": {"model": text.identity["model"], "sha256": text.identity["sha256"]},
        "final_metrics": metrics or {},
    }
    write_text(out_dir / INHOUSE_CONFIG, json.dumps(meta, indent=2))
    return InHouseClap.identity_for(out_dir, meta)


# ---------------------------------------------------------------- inference backend


class InHouseClap:
    """The trained in-house model as a ``ClapBackend``."""

    def __init__(self, net: ClapNet, cfg: ClapTrainConfig, text: TextEncoder, identity: dict,
                 device: str = "cpu", hop_s: float | None = None, batch_size: int = 32):
        self.net = net.to(device).eval()
        self.cfg, self.text, self.device = cfg, text, torch.device(device)
        self.sample_rate = cfg.sample_rate
        self.dim = cfg.dim
        self.logit_scale = float(net.logit_scale.detach().exp())
        self.windowing = Windowing(cfg.sample_rate, cfg.window_s, hop_s, pad="zero")
        self.batch_size = batch_size
        self.identity = {**identity, **self.windowing.identity}

    @staticmethod
    def identity_for(path: Path, meta: dict) -> dict:
        cfg = meta["config"]
        return {
            "backend": "soundlake",
            "model": str(path),
            "checkpoint_sha256": meta["checkpoint_sha256"],
            "text_encoder_sha256": meta["text_encoder"]["sha256"],
            "sample_rate": cfg["sample_rate"],
            "window_s": cfg["window_s"],
            "hop_s": cfg["window_s"],
            "pad": "zero",
        }

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", hop_s: float | None = None) -> "InHouseClap":
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / INHOUSE_CONFIG).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unsupported in-house CLAP format {meta.get('format')!r}")
        cfg = ClapTrainConfig.from_dict(meta["config"])
        text = load_text_encoder(device=device)
        if text.identity["sha256"] != meta["text_encoder"]["sha256"]:
            raise ValueError(
                f"{path} was trained with text encoder {meta['text_encoder']['sha256']}, "
                f"but the installed MiniLM is {text.identity['sha256']}"
            )
        weights = path / meta.get("weights", WEIGHTS)
        net = ClapNet(cfg, text.dim)
        net.load_state_dict(load_file(str(weights)))
        identity = cls.identity_for(path, {**meta, "checkpoint_sha256": weights_sha256(weights)})
        return cls(net, cfg, text, identity, device=device, hop_s=hop_s)

    @torch.inference_mode()
    def _embed_windows(self, windows: np.ndarray) -> np.ndarray:
        wave = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(self.device)
        mel = self.net.logmel(wave).half().float()  # same float16 rounding as training features
        return self.net.embed_mel(mel).cpu().numpy()

    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray:
        return embed_windowed(clips, self.windowing, self._embed_windows, self.batch_size, self.dim)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        sent = torch.from_numpy(self.text.encode(list(texts))).to(self.device)
        return self.net.embed_sentence(sent).cpu().numpy()
