"""The released AutoCap's audio side: HTS-AT frame features and the laion-CLAP embedding, from raw audio.

AutoCap (GenAU, ``AutoCap/src/models/pl_htsat_q_bart_captioning.py``) captions a 10 s clip at
32 kHz (peak-normalised to 0.5 after removing the mean, zero-padded at the end) with two frozen
audio models whose weights sit in its checkpoint:

* ``encoder.audio_enc.*``: HTS-AT (``AutoCap/src/modules/audio_encoder/htsat.py``). Its front end
  is torchlibrosa's ``Spectrogram`` + ``LogmelFilterBank`` (1024-point STFT as two conv kernels,
  hop 320, 64 Slaney mel bands 50-14000 Hz, ``10 log10(max(x, 1e-10))``), then ``bn0``; the
  Swin-Transformer body is the one transformers ports as ``ClapAudioModel``. AutoCap reads its
  ``fine_grained_embedding``: the last stage averaged over the frequency rows, 32 frames of 768,
  each repeated 32 times: [B, 1024, 768], which ``enc_to_dec_proj`` takes.
* ``clap_model.model.*``: laion-clap HTSAT-base + RoBERTa (``CLAP_Module``), fed the same clip
  resampled to 48 kHz by ``torchaudio.transforms.Resample`` (``audio_clap_resampler``); its
  normalised audio embedding (512) is what ``clap_proj`` takes. Its front end is torchlibrosa's
  again, at 48 kHz with hop 480. This is transformers' ``ClapModel``.

Both front ends use the checkpoint's own STFT kernels and mel filters (checked against the
formulas below), the resampler its own stored kernel when the checkpoint has one. Module names
follow the GenAU and laion-clap sources; the HTS-AT -> transformers renaming is the one
transformers' CLAP conversion script uses (qkv split into query/key/value, norm1/2 ->
layernorm_before/after, mlp -> intermediate/output, bn0 -> batch_norm).

Public API::

    stft_kernels(n_fft) -> (real, imag)          # torchlibrosa's conv kernels [n_fft//2+1, 1, n_fft]
    mel_filters(sr, n_fft, n_mels, fmin, fmax)   # Slaney mel filterbank [n_fft//2+1, n_mels] (librosa's default)
    sinc_resample_kernel(orig, new) -> (kernel, width)   # torchaudio's default Resample kernel
    LogMel(real, imag, mel, hop)                 # waveform [B, N] -> log-mel [B, 1, T, n_mels]
    ReleasedAudio(...)                           # clips -> (frames [B, 1024, C], clap embeddings [B, D])
    build_released_audio(state, settings, report) -> ReleasedAudio   # from the checkpoint's tensors
    ReleasedAudio.save(folder) / ReleasedAudio.load(folder, device)
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from soundlake.core.errors import UserError

HTSAT_PREFIX = "encoder.audio_enc."
CLAP_PREFIX = "clap_model.model."
RESAMPLER_KEY = "audio_clap_resampler.kernel"
HEADS = [4, 8, 16, 32]        # HTS-AT's heads per stage (AutoCap's audio_encoder.py, laion's create_htsat_model)
CLAP_SR, CLAP_HOP = 48000, 480   # laion-clap HTSAT-base's audio_cfg (sample_rate, hop_size)
AUDIO_FILE, AUDIO_META = "audio.safetensors", "audio.json"

# HTS-AT (htsat.py) block names -> transformers' ClapAudioEncoder names
_BLOCK = [(".norm1.", ".layernorm_before."), (".norm2.", ".layernorm_after."), (".mlp.fc1.", ".intermediate.dense."),
          (".mlp.fc2.", ".output.dense."), (".attn.proj.", ".attention.output.dense."),
          (".attn.relative_position_bias_table", ".attention.self.relative_position_bias_table"),
          (".attn.relative_position_index", ".attention.self.relative_position_index")]


# ---------------------------------------------------------------- front end


def stft_kernels(n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchlibrosa's STFT as conv kernels: DFT rows times a periodic Hann window."""
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    angle = 2 * np.pi * np.outer(np.arange(n_fft // 2 + 1), n) / n_fft
    real, imag = np.cos(angle) * window, -np.sin(angle) * window
    return (torch.tensor(real, dtype=torch.float32)[:, None], torch.tensor(imag, dtype=torch.float32)[:, None])


def _hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < 1000, f * 3 / 200, 15 + np.log(np.maximum(f, 1e-10) / 1000) * 27 / np.log(6.4))


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15, m * 200 / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))


def mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    """Triangular Slaney-normalised mel filters on the FFT bins, [n_fft//2+1, n_mels]."""
    bins = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))
    tri *= 2 / (hi - lo)          # equal area per filter
    return torch.tensor(tri.T, dtype=torch.float32)


def sinc_resample_kernel(orig: int, new: int, zeros: int = 6, rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    """torchaudio's default resampler (Hann-windowed sinc, 6 zero crossings, rolloff 0.99): [new', 1, K], width."""
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / cutoff)
    # output phase j reads inputs i - width .. i + width + orig - 1 around its position j * orig / new
    t = (torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig
         - torch.arange(new, dtype=torch.float64)[:, None] / new) * cutoff
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t * math.pi) / (t * math.pi))
    return (sinc * window * cutoff / orig).float()[:, None], width


def resample(wave: torch.Tensor, kernel: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """[B, N] at ``orig`` -> [B, ceil(N * new / orig)] at ``new`` with a kernel from sinc_resample_kernel."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    width = (kernel.shape[-1] - o) // 2
    out = F.conv1d(F.pad(wave, (width, width + o))[:, None], kernel, stride=o)
    return out.transpose(1, 2).reshape(wave.shape[0], -1)[:, : math.ceil(n * wave.shape[-1] / o)]


class LogMel(nn.Module):
    """torchlibrosa's Spectrogram + LogmelFilterBank (center, reflect padding, power 2, ref 1, amin 1e-10)."""

    def __init__(self, real: torch.Tensor, imag: torch.Tensor, mel: torch.Tensor, hop: int):
        super().__init__()
        self.register_buffer("real", real.float().clone())
        self.register_buffer("imag", imag.float().clone())
        self.register_buffer("mel", mel.float().clone())
        self.hop = hop

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        n_fft = self.real.shape[-1]
        x = F.pad(wave[:, None], (n_fft // 2, n_fft // 2), mode="reflect")
        power = F.conv1d(x, self.real, stride=self.hop) ** 2 + F.conv1d(x, self.imag, stride=self.hop) ** 2
        mel = power.transpose(1, 2) @ self.mel                       # [B, T, n_mels]
        return (10 * torch.log10(mel.clamp(min=1e-10)))[:, None]


# ---------------------------------------------------------------- the name mapping


def htsat_name(key: str) -> list[str] | None:
    """transformers' ClapAudioEncoder name(s) for an HTS-AT tensor name (qkv -> three); None: no place."""
    if key.startswith("bn0."):
        return ["batch_norm." + key[4:]]
    if key.startswith(("patch_embed.proj.", "patch_embed.norm.", "norm.")) or re.match(r"layers\.\d+\.downsample\.", key):
        return [key]
    m = re.match(r"(layers\.\d+\.blocks\.\d+)(\..+)$", key)
    if not m:
        return None
    head, tail = m.groups()
    if tail.startswith(".attn.qkv."):
        return [f"{head}.attention.self.{p}.{tail[len('.attn.qkv.'):]}" for p in ("query", "key", "value")]
    for theirs, ours in _BLOCK:
        if tail.startswith(theirs):
            return [head + ours + tail[len(theirs):]]
    return None


def _htsat_config(state: dict, prefix: str, n_mels: int):
    """ClapAudioConfig for the HTS-AT under ``prefix``: widths and depths from the tensors, heads as HTS-AT's."""
    from transformers import ClapAudioConfig

    depths = []
    for key in state:
        m = re.match(re.escape(prefix) + r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depths.extend([0] * (i + 1 - len(depths)))
            depths[i] = max(depths[i], j + 1)
    embed = state[prefix + "patch_embed.proj.weight"].shape[0]
    if len(depths) != len(HEADS) or not all(depths):
        raise UserError(f"{prefix}: expected an HTS-AT with {len(HEADS)} stages, found blocks in stages {depths}")
    return ClapAudioConfig(patch_embeds_hidden_size=embed, depths=depths, num_attention_heads=HEADS, window_size=8,
                           spec_size=256, num_mel_bins=n_mels, hidden_size=embed * 2 ** (len(depths) - 1),
                           enable_fusion=False, drop_path_rate=0.0, hidden_dropout_prob=0.0)


def _clap_config(state: dict, n_mels: int):
    """ClapConfig for laion-clap's model: sizes from the tensors; RoBERTa heads at 64 dims each (roberta-base's)."""
    from transformers import ClapConfig

    p = CLAP_PREFIX
    if p + "text_branch.embeddings.word_embeddings.weight" not in state:
        raise UserError("clap_model: only laion-clap's RoBERTa text branch is supported "
                        f"(no {p}text_branch.embeddings.word_embeddings.weight)")
    audio = _htsat_config(state, p + "audio_branch.", n_mels)
    vocab, hidden = state[p + "text_branch.embeddings.word_embeddings.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"text_branch\.encoder\.layer\.(\d+)\.", k))}
    text = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=max(1, hidden // 64),
                intermediate_size=state[p + "text_branch.encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_position_embeddings=state[p + "text_branch.embeddings.position_embeddings.weight"].shape[0],
                type_vocab_size=state[p + "text_branch.embeddings.token_type_embeddings.weight"].shape[0],
                layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    dim = state[p + "audio_projection.0.weight"].shape[0]
    return ClapConfig(audio_config={**audio.to_dict(), "projection_dim": dim}, text_config={**text, "projection_dim": dim},
                      projection_dim=dim)


def _clap_name(key: str) -> list[str] | None:
    """transformers' ClapModel name(s) for a laion-clap ``CLAP`` tensor name."""
    if key.startswith("audio_branch."):
        names = htsat_name(key[len("audio_branch."):])
        return ["audio_model.audio_encoder." + n for n in names] if names else None
    if key.startswith("text_branch."):
        return ["text_model." + key[len("text_branch."):]]
    m = re.match(r"(audio|text)_projection\.([02])\.(weight|bias)$", key)
    if m:
        return [f"{m.group(1)}_projection.linear{1 if m.group(2) == '0' else 2}.{m.group(3)}"]
    if key in ("logit_scale_a", "logit_scale_t"):
        return [key]
    return None


# ---------------------------------------------------------------- the module


class ReleasedAudio(nn.Module):
    """Raw 32 kHz clips -> (HTS-AT frame features [B, 1024, C], laion-CLAP audio embeddings [B, D])."""

    def __init__(self, htsat_config, clap_config, n_fft: int = 1024, n_mels: int = 64, hop: int = 320,
                 sample_rate: int = 32000, window_s: float = 10.0, resampler_taps: int | None = None):
        from transformers import ClapAudioModel, ClapModel

        super().__init__()
        self.sample_rate, self.window_s, self.hop = sample_rate, window_s, hop
        self.window = int(round(sample_rate * window_s))
        self.htsat = ClapAudioModel(htsat_config)
        self.clap = ClapModel(clap_config)
        bins = n_fft // 2 + 1
        zeros = torch.zeros(bins, 1, n_fft)
        self.htsat_mel = LogMel(zeros, zeros, torch.zeros(bins, n_mels), hop)
        self.clap_mel = LogMel(zeros, zeros, torch.zeros(bins, n_mels), CLAP_HOP)
        kernel, _ = sinc_resample_kernel(sample_rate, CLAP_SR)
        if resampler_taps is not None and resampler_taps != kernel.shape[-1]:
            raise UserError(f"{RESAMPLER_KEY}: {resampler_taps} taps, expected {kernel.shape[-1]} for "
                            f"{sample_rate} -> {CLAP_SR} Hz")
        self.register_buffer("resampler", kernel)
        self.frame_dim = htsat_config.hidden_size
        self.clap_dim = clap_config.projection_dim
        self.eval()

    def _window(self, clip) -> np.ndarray:
        """AutoCap's read_wav_file: the first window, mean removed, peak 0.5, zero-padded at the end."""
        x = np.asarray(clip, dtype=np.float32).reshape(-1)[: self.window]
        if len(x):
            x = x - x.mean()
            x = x / (np.abs(x).max() + 1e-8) * 0.5
        return np.pad(x, (0, self.window - len(x)))

    def frames(self, wave: torch.Tensor) -> torch.Tensor:
        """HTS-AT's fine_grained_embedding: [B, 32 * 32, C]."""
        h = self.htsat(input_features=self.htsat_mel(wave)).last_hidden_state   # [B, C, freq groups, 32]
        return h.mean(dim=2).transpose(1, 2).repeat_interleave(32, dim=1)

    def clap_embedding(self, wave: torch.Tensor) -> torch.Tensor:
        x = resample(wave, self.resampler, self.sample_rate, CLAP_SR)
        return self.clap.get_audio_features(input_features=self.clap_mel(x)).pooler_output   # L2-normalised

    @torch.inference_mode()
    def forward(self, clips) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.resampler.device
        wave = torch.from_numpy(np.stack([self._window(c) for c in clips])).to(device)
        return self.frames(wave), self.clap_embedding(wave)

    def batched(self, clips, batch_size: int = 8):
        out = [self(clips[i:i + batch_size]) for i in range(0, len(clips), batch_size)]
        return torch.cat([f for f, _ in out]), torch.cat([e for _, e in out])

    # -------------------------------------------------------- saving

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_model

        folder.mkdir(parents=True, exist_ok=True)
        save_model(self, str(folder / AUDIO_FILE))
        meta = {"htsat_config": self.htsat.config.to_dict(), "clap_config": self.clap.config.to_dict(),
                "n_fft": self.htsat_mel.real.shape[-1], "n_mels": self.htsat_mel.mel.shape[1], "hop": self.hop,
                "sample_rate": self.sample_rate, "window_s": self.window_s}
        (folder / AUDIO_META).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "ReleasedAudio":
        from safetensors.torch import load_model
        from transformers import ClapAudioConfig, ClapConfig

        folder = Path(folder)
        meta = json.loads((folder / AUDIO_META).read_text())
        audio = cls(ClapAudioConfig.from_dict(meta.pop("htsat_config")), ClapConfig.from_dict(meta.pop("clap_config")),
                    **meta)
        load_model(audio, str(folder / AUDIO_FILE), strict=True)
        return audio.to(device).eval()


def _check_close(name: str, stored: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    if tuple(stored.shape) != tuple(expected.shape) or not torch.allclose(stored.float(), expected, atol=atol, rtol=1e-3):
        raise UserError(f"{name}: not {what} (the yaml's audio settings do not match the checkpoint)")


def build_released_audio(state: dict[str, torch.Tensor], settings: dict, report) -> ReleasedAudio:
    """ReleasedAudio holding the checkpoint's HTS-AT, laion-CLAP and front-end tensors; fills ``report``.

    Every ``encoder.*``, ``clap_model.*`` and ``audio_clap_resampler.*`` tensor is placed, checked
    as a constant, or recorded with the reason it has no place; every tensor of ours but the
    constant index buffers comes from the checkpoint.
    """
    a = settings.get("audio_args") or {}
    sr, hop, n_fft = int(a.get("sr", 32000)), int(a.get("hop_length", 320)), int(a.get("n_fft", 1024))
    n_mels, fmin, fmax = int(a.get("n_mels", 64)), float(a.get("f_min", 50)), float(a.get("f_max", 14000))
    fe = HTSAT_PREFIX + "audio_feats_extractor."
    le = CLAP_PREFIX + "audio_branch."
    for k in (fe + "mel_trans.stft.conv_real.weight", HTSAT_PREFIX + "patch_embed.proj.weight",
              le + "spectrogram_extractor.stft.conv_real.weight", CLAP_PREFIX + "audio_projection.0.weight"):
        if k not in state:
            raise UserError(f"the checkpoint has no {k}: not the released AutoCap layout (HTS-AT encoder + laion CLAP)")
    stored_kernel = state.get(RESAMPLER_KEY)
    audio = ReleasedAudio(_htsat_config(state, HTSAT_PREFIX, n_mels), _clap_config(state, n_mels), n_fft=n_fft,
                          n_mels=n_mels, hop=hop, sample_rate=sr, window_s=float(a.get("max_length", 10)),
                          resampler_taps=None if stored_kernel is None else stored_kernel.shape[-1])
    ours = audio.state_dict()
    out: dict[str, torch.Tensor] = {}

    # front ends: the checkpoint's own kernels and filters, checked against the formulas
    real, imag = stft_kernels(n_fft)
    clap_n_fft = state[le + "spectrogram_extractor.stft.conv_real.weight"].shape[-1]
    clap_real, clap_imag = stft_kernels(clap_n_fft)
    fronts = {fe + "mel_trans.stft.conv_real.weight": ("htsat_mel.real", real, "torchlibrosa's STFT kernel"),
              fe + "mel_trans.stft.conv_imag.weight": ("htsat_mel.imag", imag, "torchlibrosa's STFT kernel"),
              fe + "log_trans.melW": ("htsat_mel.mel", mel_filters(sr, n_fft, n_mels, fmin, fmax),
                                      f"the Slaney mel filterbank for audio_args {sr} Hz {fmin}-{fmax} Hz"),
              le + "spectrogram_extractor.stft.conv_real.weight": ("clap_mel.real", clap_real, "torchlibrosa's STFT kernel"),
              le + "spectrogram_extractor.stft.conv_imag.weight": ("clap_mel.imag", clap_imag, "torchlibrosa's STFT kernel"),
              le + "logmel_extractor.melW": ("clap_mel.mel", mel_filters(CLAP_SR, clap_n_fft, n_mels, 50, 14000),
                                             "laion-clap's mel filterbank (48 kHz, 50-14000 Hz)")}
    if stored_kernel is not None:
        fronts[RESAMPLER_KEY] = ("resampler", sinc_resample_kernel(sr, CLAP_SR)[0], "torchaudio's Resample kernel")
    for key, (target, expected, what) in fronts.items():
        _check_close(key, state[key], expected, what, atol=1e-4 if "mel" in target else 1e-5)
        out[target] = state[key]
        report.mapped[key] = target

    unused = {"tscam_conv.": "HTS-AT's AudioSet classification head (AutoCap and laion-clap read the features before it)",
              "head.": "HTS-AT's AudioSet classification head (AutoCap and laion-clap read the features before it)"}
    for key, value in state.items():
        if key in fronts:
            continue
        if key.startswith(HTSAT_PREFIX):
            rel, place, base = key[len(HTSAT_PREFIX):], "htsat.audio_encoder.", audio.htsat.audio_encoder
            names = htsat_name(rel)
        elif key.startswith(CLAP_PREFIX):
            rel, place, base = key[len(CLAP_PREFIX):], "clap.", audio.clap
            names = _clap_name(rel)
            if rel.startswith("audio_branch."):
                rel = rel[len("audio_branch."):]
                base = audio.clap.audio_model.audio_encoder
        else:
            continue
        if names is None:
            reason = next((why for p, why in unused.items() if rel.startswith(p)), None)
            if reason is None and re.match(r"layers\.\d+\.blocks\.\d+\.attn_mask$", rel):
                _check_attn_mask(key, value, base, rel)
                reason = "shifted-window attention mask (transformers computes the same mask)"
            if reason is None and rel.startswith(("text_transform.", "audio_transform.")):
                reason = "laion-clap's training-only MLP heads (not used for embeddings)"
            if reason is None:
                raise UserError(f"checkpoint tensor {key!r} has no place in transformers' CLAP/HTS-AT "
                                "(unknown HTS-AT or laion-clap layout)")
            report.checked[key] = reason
            continue
        parts = value.chunk(len(names), dim=0) if len(names) > 1 else [value]
        for name, part in zip(names, parts):
            target = place + name
            if target not in ours:
                raise UserError(f"checkpoint tensor {key!r} maps to {target!r}, which transformers' model does not have")
            if tuple(ours[target].shape) != tuple(part.shape):
                raise UserError(f"{key}: shape {tuple(part.shape)} but {target} is {tuple(ours[target].shape)} "
                                "(HTS-AT heads or window differ from the released model's)")
            out[target] = part
        if len(names) == 1:
            report.mapped[key] = place + names[0]
        else:
            report.split[key] = tuple(place + n for n in names)
    # buffers transformers derives from the config; the checkpoint may or may not store them
    for target in set(ours) - set(out):
        if not re.search(r"(relative_position_index|embeddings\.position_ids|embeddings\.token_type_ids)$", target):
            raise UserError(f"the checkpoint has no tensor for {target} (missing from encoder.* / clap_model.*)")
        report.constants.append(target)
    for target, value in out.items():   # stored constants must be the ones transformers builds
        if re.search(r"(relative_position_index|position_ids|token_type_ids)$", target) \
                and not torch.equal(value.to(ours[target].dtype), ours[target]):
            raise UserError(f"{target}: the checkpoint's constant index buffer differs from transformers' "
                            "(window or positions differ from the released model's)")
    audio.load_state_dict({**ours, **out}, strict=True)
    return audio.eval()


def _check_attn_mask(key: str, value: torch.Tensor, encoder, rel: str) -> None:
    """The stored shifted-window mask must be the one transformers builds for that block."""
    i, j = (int(x) for x in re.findall(r"\d+", rel)[:2])
    layer = encoder.layers[i].blocks[j]
    height, width = encoder.input_resolutions[i]
    layer.set_shift_and_window_size((height, width))
    mask = layer.get_attn_mask(height, width, dtype=torch.float32, device="cpu")
    if mask is None or not torch.equal(mask, value.float()):
        raise UserError(f"{key}: not the shifted-window mask of block {i}.{j} (window 8)")
