"""Trained model folders: what `soundlake train vae|dit` write and `generate` / `encode` read.

A model folder holds ``model.safetensors`` (the weights; the EMA copy when training kept
one) and ``soundlake_model.json`` (what the weights are: kind, config, provenance). A DiT
folder is self-contained: it also holds the VAE it was trained with (``vae/``) and the
latent normalisation, so ``soundlake generate --model runs/dit`` needs nothing else.

    save_model(folder, "vae", model, {"config": ...})        # atomic per file
    vae, meta = load_vae("runs/vae")
    gen = Generator.load("runs/dit")
    out = gen.generate(["a high beep repeats three times"], seconds=10, steps=100, cfg=5, rescale=0.75)
    write_audio(out, "beep.wav")                              # + beep.wav.json with every setting
    gen.decode(gen.vae.encode(wav).mode()) -> waveforms [B, T]  # the VAE round trip, inverted as generate does

The latents the DiT sees are ``(vae_latent - mean) / std`` with the per-channel-free
scalars measured by ``soundlake encode`` over the training shards (as Stable Diffusion's
scale factor), recorded in the DiT's folder.

The mel path: a mel VAE (``config.kind: mel``; its ``config.mel`` is the log-mel front end)
decodes log-mels, which become audio through ``<dit>/vocoder`` (a ``vocoder`` folder copied
there by ``train dit --vocoder``) or else Griffin-Lim. 2D mel latents are ``grid_freq``
tokens per latent frame (time-major), recorded as ``latents.grid_freq`` in the VAE's and the
DiT's metadata (1 or absent for 1D latents).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from soundlake.core.errors import UserError
from soundlake.core.storage import atomic_path, write_text
from soundlake.generation.mel_vae import from_tokens, is_mel, to_tokens

WEIGHTS = "model.safetensors"
META = "soundlake_model.json"


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def save_model(folder: str | Path, kind: str, model: torch.nn.Module | dict, meta: dict) -> Path:
    """Write weights then metadata (each atomically): a folder with a META file is complete."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    _atomic_write(folder / WEIGHTS, lambda p: save_file(state, p))
    _atomic_write(folder / META, lambda p: Path(p).write_text(json.dumps({"kind": kind, **meta}, indent=2)))
    return folder


def read_meta(folder: str | Path, kind: str | None = None) -> dict:
    folder = Path(folder)
    path = folder / META
    if not path.is_file():
        hint = "train one with `soundlake train vae|dit`" if kind is None else f"train one with `soundlake train {kind}`"
        raise UserError(f"{folder}: not a soundlake model folder (no {META}); {hint}")
    meta = json.loads(path.read_text())
    if kind is not None and meta.get("kind") != kind:
        raise UserError(f"{folder}: holds a {meta.get('kind')!r} model, expected a {kind!r} model")
    return meta


def load_weights(folder: str | Path, device="cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / WEIGHTS), device=str(device))


def load_vae(folder: str | Path, device="cpu"):
    """(VAE in eval mode, meta) from a VAE folder: a WaveVAE, or a MelVAE (config ``kind: mel``)."""
    from soundlake.generation.mel_vae import build_vae

    meta = read_meta(folder, "vae")
    vae = build_vae(meta["config"])
    vae.load_state_dict(load_weights(folder, device))
    return vae.to(device).eval(), meta


def check_vocoder(folder: str | Path, mel: dict | None = None) -> dict:
    """A vocoder folder's meta, refused when its log-mel front end is not ``mel`` (the mel VAE's)."""
    meta = read_meta(folder, "vocoder")
    if mel is not None and meta["config"]["mel"] != mel:
        raise UserError(f"{folder}: the vocoder reads another mel front end than the mel VAE "
                        f"({meta['config']['mel']} vs {mel}); train it with `soundlake train vocoder --vae <mel VAE>`")
    return meta


def load_vocoder(folder: str | Path, device="cpu", mel: dict | None = None):
    """(Vocoder in eval mode, meta) from a vocoder folder; ``mel``: the front end it must share."""
    from soundlake.generation.vocoder import Vocoder, VocoderConfig

    meta = check_vocoder(folder, mel)
    vocoder = Vocoder(VocoderConfig.from_dict(meta["config"]))
    vocoder.load_state_dict(load_weights(folder, device))
    return vocoder.to(device).eval(), meta


def copy_model(src: str | Path, dst: str | Path) -> None:
    """Copy a model folder's two files and its model sub-folders (a DiT keeps its own copy of
    its VAE; an AR model its tokenizer and VAE)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, META):
        _atomic_write(dst / name, lambda p, n=name: shutil.copyfile(src / n, p))
    for sub in sorted(src.iterdir()):
        if (sub / META).is_file():
            copy_model(sub, dst / sub.name)


def pool_frames(z: torch.Tensor, n: int) -> torch.Tensor:
    """[B, F, C] latents averaged down to [B, n, C]: the DC-LDM second stream computed from audio."""
    return torch.nn.functional.adaptive_avg_pool1d(z.transpose(1, 2), n).transpose(1, 2)


@dataclass
class GeneratedAudio:
    audio: np.ndarray            # [B, T] float32, mono
    sample_rate: int
    prompts: list[str]
    meta: dict = field(default_factory=dict)


class Generator:
    """A trained DiT with its VAE and text encoder, ready to sample. With a mel VAE, the decoded
    log-mel becomes audio through the folder's vocoder (``vocoder/``), else (or with
    ``griffin_lim=True``) through Griffin-Lim."""

    def __init__(self, folder: str | Path, device: str = "cpu", griffin_lim: bool = False):
        from soundlake.generation.backbones import build_backbone
        from soundlake.generation.conditioning import TextConditioner
        from soundlake.generation.diffusion import Schedule

        self.folder = Path(folder)
        self.device = torch.device(device)
        self.meta = read_meta(folder, "dit")
        self.dit = build_backbone(self.meta["config"])  # the DiT or FIT backbone (config key "backbone")
        self.dit.load_state_dict(load_weights(folder, device))
        self.dit.to(self.device).eval()
        self.vae, self.vae_meta = load_vae(self.folder / "vae", device)
        self.is_mel = is_mel(self.vae_meta["config"])
        # 2D mel latents: this many frequency rows per latent frame, each a token (time-major)
        self.grid_freq = int(self.meta["latents"].get("grid_freq", 1))
        self.vocoder = None
        if self.is_mel and not griffin_lim and (self.folder / "vocoder" / META).is_file():
            self.vocoder, _ = load_vocoder(self.folder / "vocoder", device, self.vae_meta["config"]["mel"])
        self.schedule = Schedule(**self.meta["schedule"])
        self.text = TextConditioner(self.meta.get("text", {}).get("path"), device=device)
        self.latent_mean = float(self.meta["latents"]["mean"])
        self.latent_std = float(self.meta["latents"]["std"])
        self.conditioning = self.meta.get("conditioning") or {}
        self.ar = None
        if self.conditioning.get("ar"):   # DC-LDM: the AR model predicts the acoustic stream from the prompt
                self.ar = AcousticEncoder(self.folder / "ar", device=device)
        self.clap = None
        if self.conditioning.get("extra_clap"):
            from soundlake.models.clap.load import load_clap

            self.clap = load_clap(self.conditioning["extra_clap"], device=device)

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", griffin_lim: bool = False) -> "Generator":
        return cls(folder, device, griffin_lim)

    @property
    def sample_rate(self) -> int:
        return self.vae.cfg.sample_rate

    def frames(self, seconds: float) -> int:
        """The DiT's sequence length for ``seconds``: latent frames x frequency rows."""
        return max(1, round(seconds * self.vae.latent_rate)) * self.grid_freq

    @property
    def inversion(self) -> str | None:
        """How decoded log-mels become audio (None: a waveform VAE decodes audio itself)."""
        return None if not self.is_mel else "vocoder" if self.vocoder is not None else "griffin-lim"

    @property
    def sources(self) -> list[str]:
        """The dataset-ID vocabulary (empty: trained without dataset-ID conditioning)."""
        return list(self.dit.cfg.sources)

    def condition(self, prompts: list[str], reference: np.ndarray | None = None, source: str | None = None):
        """Text tokens (+ the GenAu CLAP vector, + the DC-LDM stream of a reference clip
        [T] at the VAE's rate, when the model was trained with them; + the dataset-ID of
        ``source``, unknown when None)."""
        from soundlake.generation.conditioning import build_condition
        from soundlake.generation.dataset_id import source_id

        extra_fn = self.clap.embed_text if self.clap is not None else None
        cond = build_condition(list(prompts), self.text, extra_fn=extra_fn)
        if source is not None and not self.sources:
            raise UserError(f"{self.folder}: --source {source}: this model was trained without dataset-ID "
                            "conditioning (no sources in its config)")
        if self.sources:
            try:
                sid = source_id(source, self.sources)
            except ValueError as e:
                raise UserError(f"--source: {e}") from None
            cond.source = torch.full((len(prompts),), sid, dtype=torch.long, device=cond.context.device)
        predicted = None
        if self.ar is not None and (self.conditioning.get("primary") == "ar" or reference is None):
            _, enc = self.ar.encode(list(prompts), via=self.conditioning["ar"]["via"])
            predicted = torch.from_numpy(enc).to(cond.context.device)
        if self.conditioning.get("primary") == "ar":
            cond.context, cond.mask = predicted, torch.ones(predicted.shape[:2], dtype=torch.bool,
                                                            device=predicted.device)
        if self.conditioning.get("cond2") == "ar" and reference is None:
            cond.context2 = pool_frames(predicted, self.conditioning["cond2_frames"])
            cond.mask2 = torch.ones(cond.context2.shape[:2], dtype=torch.bool, device=cond.context.device)
        if reference is not None:
            if not self.conditioning.get("cond2"):
                raise UserError(f"{self.folder}: this DiT has no second condition stream (trained without cond2)")
            n = len(reference) - len(reference) % self.vae.hop
            with torch.no_grad():
                z = self.vae.encode(torch.as_tensor(reference[:n], dtype=torch.float32)[None, None].to(self.device)).mean
            z = pool_frames((to_tokens(z, self.grid_freq) - self.latent_mean) / self.latent_std,
                            self.conditioning["cond2_frames"])
            cond.context2 = z.expand(len(prompts), -1, -1).to(cond.context.device)
            cond.mask2 = torch.ones(cond.context2.shape[:2], dtype=torch.bool, device=cond.context.device)
        return cond

    def to_audio(self, latents: torch.Tensor, seconds: float) -> np.ndarray:
        """DiT latents [B, F, C] -> waveforms [B, T] at the VAE's rate, cut to ``seconds``."""
        z = from_tokens(latents * self.latent_std + self.latent_mean, self.grid_freq)
        return self.decode(z)[:, :round(seconds * self.sample_rate)]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """VAE latents (as ``vae.encode`` gives them) -> waveforms [B, T]: a mel VAE's log-mel
        through the folder's vocoder, or Griffin-Lim."""
        out = self.vae.decode(z.to(self.device))   # a waveform [B, 1, T], or a mel VAE's log-mel [B, n_mels, frames]
        if not self.is_mel:
            return out[:, 0].float().cpu().numpy()
        if self.vocoder is not None:
            return self.vocoder(out.float()).cpu().numpy()
        from soundlake.generation.mel import griffin_lim

        return griffin_lim(out.float(), self.vae.cfg.mel)

    @torch.no_grad()
    def generate(self, prompts: list[str], seconds: float = 10.0, steps: int = 100, sampler: str = "ddim",
                 cfg: float = 5.0, rescale: float = 0.75, rescale_axis: str = "all", seed: int = 0,
                 callback=None, reference: np.ndarray | None = None, source: str | None = None) -> GeneratedAudio:
        from soundlake.generation.diffusion import sample

        if seconds <= 0:
            raise UserError(f"--seconds {seconds}: must be positive")
        prompts = list(prompts)
        shape = (len(prompts), self.frames(seconds), self.dit.cfg.in_channels)
        gen = torch.Generator().manual_seed(seed)
        latents, meta = sample(self.dit, shape, self.condition(prompts, reference, source), steps=steps,
                               sampler=sampler, cfg=cfg, rescale=rescale, rescale_axis=rescale_axis, generator=gen,
                               callback=callback, schedule=self.schedule, device=self.device)
        meta |= {"seed": seed, "seconds": seconds, "frames": shape[1], "sample_rate": self.sample_rate,
                 "model": str(self.folder), "model_step": self.meta.get("train", {}).get("step"),
                 "text_encoder": self.text.identity.get("model"), "reference": reference is not None,
                 "backbone": self.meta["config"].get("backbone", "dit")}
        if self.is_mel:
            meta |= {"inversion": self.inversion, "grid_freq": self.grid_freq}
        if self.sources:
            meta["source"] = source or "unknown"
        if self.ar is not None:   # DC-LDM: which AR model predicted the acoustic stream, and how
            meta["ar"] = {"step": self.ar.meta.get("train", {}).get("step"), "via": self.conditioning["ar"]["via"],
                          "primary": self.conditioning.get("primary", "text"), "overridden_by_reference":
                          reference is not None and self.conditioning.get("primary") != "ar"}
        return GeneratedAudio(self.to_audio(latents, seconds), self.sample_rate, prompts, meta)


def write_audio(out: GeneratedAudio, path: str | Path) -> list[Path]:
    """One WAV per prompt (``name.wav``, or ``name-<i>.wav`` for several) with a JSON sidecar
    recording the prompt and every sampling setting (CFG rescale axis included)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (wav, prompt) in enumerate(zip(out.audio, out.prompts)):
        p = path if len(out.prompts) == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        _atomic_write(p, lambda t: sf.write(t, np.clip(wav, -1, 1), out.sample_rate, format="WAV", subtype="PCM_16"))
        side = {"prompt": prompt, **{k: v for k, v in out.meta.items() if k != "timesteps"}}
        write_text(p.with_name(p.name + ".json"), json.dumps(side, indent=2))
        written.append(p)
    return written


def load_tokenizer(folder: str | Path):
    """(RVQ, meta) from a tokenizer folder (``soundlake train tokens``)."""
    from soundlake.generation.tokens import RVQ

    meta = read_meta(folder, "tokens")
    return RVQ(load_weights(folder)["codebooks"].numpy()), meta


class AcousticEncoder:
    """A trained AR folder (``soundlake train ar``): its model, tokenizer, VAE and text encoder;
    ``encode(captions)`` gives the predicted acoustic encodings, normalised latent tokens
    [B, frames, C] as the DiT reads them."""

    def __init__(self, folder, device: str = "cpu"):
        from soundlake.generation.ar import AcousticAR, ARConfig
        from soundlake.generation.conditioning import TextConditioner

        self.folder = Path(folder)
        self.meta = read_meta(self.folder, "ar")
        self.cfg = ARConfig.from_dict(self.meta["config"])
        self.model = AcousticAR(self.cfg)
        self.model.load_state_dict(load_weights(self.folder, device))
        self.model.to(device).eval()
        self.rvq, self.tokens_meta = load_tokenizer(self.folder / "tokens")
        text = self.meta.get("text", {})
        self.text = TextConditioner(text.get("path"), device=device)
        self.device = device
        self._vae = None

    @property
    def identity(self) -> dict:
        from soundlake.core.fingerprints import weights_sha256

        return {"path": str(self.folder), "weights_sha256": weights_sha256(self.folder / "model.safetensors"),
                "step": self.meta.get("train", {}).get("step"), "config": self.cfg.to_dict()}

    def codes(self, captions: list[str]) -> np.ndarray:
        """[B, frames, levels] codes sampled from the AR model, seeded by each caption."""
        from soundlake.generation.ar import caption_seed

        hidden, mask = self.text.encode(list(captions))
        return self.model.sample(hidden, mask, [caption_seed(c) for c in captions]).cpu().numpy()

    def encode(self, captions: list[str], via: str = "tokens", batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(codes [B, frames, levels], encodings [B, frames, C] float32). ``via="tokens"``: the
        codes decoded by the tokenizer (E_t2a); ``"vae"``: that latent decoded to audio by the
        VAE (+ Griffin-Lim for a mel VAE) and encoded again (E'_t2a)."""
        if via not in ("tokens", "vae"):
            raise ValueError(f"via must be 'tokens' or 'vae', not {via!r}")
        codes = np.concatenate([self.codes(captions[i:i + batch]) for i in range(0, len(captions), batch)])
        enc = self.rvq.decode(codes)
        if via == "vae":
            enc = np.concatenate([self._through_vae(enc[i:i + batch]) for i in range(0, len(enc), batch)])
        return codes, enc.astype(np.float32)

    @torch.no_grad()
    def _through_vae(self, tokens: np.ndarray) -> np.ndarray:
        lat = self.tokens_meta["latents"]
        if self._vae is None:
            self._vae = load_vae(self.folder / "vae", self.device)
        vae, vmeta = self._vae
        z = from_tokens(torch.from_numpy(tokens) * lat["std"] + lat["mean"], lat["grid_freq"]).to(self.device)
        out = vae.decode(z)
        if is_mel(vmeta["config"]):
            from soundlake.generation.mel import griffin_lim

            wav = torch.from_numpy(griffin_lim(out.float(), vae.cfg.mel))[:, None]
        else:
            wav = out
        n = wav.shape[-1] - wav.shape[-1] % vae.hop
        z2 = vae.encode(wav[..., :n].float().to(self.device)).mean.flatten(1, -2)
        back = (to_tokens(z2, lat["grid_freq"]) - lat["mean"]) / lat["std"]
        return back[:, : tokens.shape[1]].cpu().numpy()
