"""Training objectives: what differs between training the VAEs, the vocoder and the DiT (the
model, batch preparation, one loss step); ``OBJECTIVES`` maps a train spec's kind to one.

All objectives expose ``model``, ``extra_modules()`` (e.g. the VAE's discriminator),
``loader_kw`` (how the export loader reads their shards), ``prepare(batch)`` and
``step(model, opt, extra_opts, item, phase)``; :mod:`.trainer` runs them on Ray Train.
"""
from __future__ import annotations

from typing import Any

from soundlake.generation.train.specs import PhaseSpec, TrainSpec


class AudioObjective:
    """Models trained on audio crops (the VAEs, the vocoder): ``build(plan)`` gives the config,
    the model, its discriminator (or None) and its train step function."""

    def __init__(self, spec: TrainSpec, plan: dict, device):
        self.spec, self.device = spec, device
        self.cfg, self.model, self.disc, self._step = self.build(plan)
        self.model = self.model.to(device)
        self.disc = self.disc.to(device) if self.disc is not None else None
        sr, hop = self.cfg.sample_rate, self.cfg.hop
        samples = max(1, round(spec.seconds * sr / hop)) * hop
        self.loader_kw = {"seconds": samples / sr, "sample_rate": sr}

    def build(self, plan: dict):
        raise NotImplementedError

    def extra_modules(self) -> dict:
        return {"disc": self.disc} if self.disc is not None else {}

    def prepare(self, batch) -> tuple[Any, int]:
        wav = batch.audio.mean(dim=1, keepdim=True).to(self.device)  # mono [B, 1, T]
        return wav, wav.shape[0]

    def step(self, model, opt, extra_opts, wav, phase: PhaseSpec) -> dict:
        return self._step(model, opt, wav, self.cfg, self.disc, extra_opts.get("disc"), self.spec.grad_clip)


class VaeObjective(AudioObjective):
    """The waveform VAE, or the mel VAE when the config says ``kind: mel``."""

    def build(self, plan: dict):
        from soundlake.generation import mel_vae, vae

        cfg = mel_vae.vae_config(plan["vae_config"])
        if isinstance(cfg, mel_vae.MelVAEConfig):
            return cfg, mel_vae.MelVAE(cfg), mel_vae.build_mel_discriminator(cfg), mel_vae.mel_vae_train_step
        return cfg, vae.WaveVAE(cfg), vae.build_discriminator(cfg), vae.vae_train_step


class VocoderObjective(AudioObjective):
    def build(self, plan: dict):
        from soundlake.generation import vocoder

        cfg = vocoder.VocoderConfig.from_dict(plan["vocoder_config"])
        return cfg, vocoder.Vocoder(cfg), vocoder.build_vocoder_discriminator(cfg), vocoder.vocoder_train_step


class DitObjective:
    def __init__(self, spec: TrainSpec, plan: dict, device):
        from soundlake.generation.backbones import build_backbone
        from soundlake.generation.conditioning import TextConditioner
        from soundlake.generation.diffusion import Schedule

        self.spec, self.device = spec, device
        self.text = TextConditioner(spec.text_encoder, device=str(device))
        self.model = build_backbone(plan["dit_config"]).to(device)  # DiT or FIT (its "backbone" key)
        self.sources = list(self.model.cfg.sources)
        self.schedule = Schedule(**plan["schedule"])
        self.mean, self.std = plan["latents"]["mean"], plan["latents"]["std"]
        self.loader_kw = {"latent_frames": max(1, round(spec.seconds * plan["latents"]["rate"]))}
        self.grid_freq = int(plan["latents"].get("grid_freq", 1))
        self.min_span = max(1, round(spec.mask_min_span_s * plan["latents"]["rate"]))   # in latent frames
        self._cache: dict[str, Any] = {}
        self.clap = None
        if spec.extra_clap:
            from soundlake.models.clap.load import load_clap

            self.clap = load_clap(spec.extra_clap, device=str(device))
        self.encodings = None
        if "ar" in plan:   # the AR model's predictions, by caption: never the clip's own latents
            from soundlake.generation.train.ar_encode import EncodingTable

            self.encodings = EncodingTable.read(plan["ar"]["encodings"])

    def extra_modules(self) -> dict:
        return {}

    def _encode(self, captions: list[str]):
        """Text tokens for a batch; the frozen encoder's output is cached per caption."""
        import torch

        from soundlake.generation.conditioning import Condition

        new = sorted({c for c in captions if c not in self._cache})
        if new:
            if len(self._cache) > 50_000:
                self._cache.clear()
            hidden, mask = self.text.encode(new)
            extra = self.clap.embed_text(new) if self.clap is not None else [None] * len(new)
            for c, h, m, e in zip(new, hidden, mask, extra):
                self._cache[c] = (h[m].clone(), None if e is None else torch.as_tensor(e))
        seqs = [self._cache[c][0] for c in captions]
        n = max(s.shape[0] for s in seqs)
        ctx = torch.zeros(len(seqs), n, seqs[0].shape[1])
        mask = torch.zeros(len(seqs), n, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ctx[i, :len(s)], mask[i, :len(s)] = s, True
        extra = torch.stack([self._cache[c][1] for c in captions]) if self.clap is not None else None
        return Condition(ctx, mask, extra).to(self.device)

    def prepare(self, batch) -> tuple[Any, int]:
        from soundlake.generation.mel_vae import to_tokens

        # [B, F, C]; 2D mel latents: F = frames x grid_freq tokens, time-major
        x0 = to_tokens((batch.latents - self.mean) / self.std, self.grid_freq).to(self.device)
        return (x0, batch.captions, batch.meta), x0.shape[0]

    def source_ids(self, metas: list[dict]):
        """Dataset-ids of the samples' sources; a ``source_drop`` fraction trains as unknown (id 0),
        the id ``generate`` uses without ``--source``."""
        import torch

        from soundlake.generation.dataset_id import source_ids

        ids = source_ids(metas, self.sources)
        ids[torch.rand(len(ids)) < self.spec.source_drop] = 0
        return ids.to(self.device)

    def step(self, model, opt, extra_opts, item, phase: PhaseSpec) -> dict:
        import torch

        from soundlake.generation.diffusion import diffusion_train_step
        from soundlake.generation.model_folder import pool_frames

        x0, captions, metas = item
        masked = phase.mode == "masked"
        cond = None if masked else self._encode(captions)
        if cond is not None and self.sources:
            cond.source = self.source_ids(metas)
        if cond is not None and self.spec.primary == "ar":   # DC-LDM's "LDM w/ AG": no text at all
            cond.context = self.encodings.lookup(captions).to(x0.device)
            cond.mask = torch.ones(cond.context.shape[:2], dtype=torch.bool, device=x0.device)
        if cond is not None and self.spec.cond2:
            stream = self.encodings.lookup(captions).to(x0.device) if self.spec.cond2 == "ar" else x0
            cond.context2 = pool_frames(stream, self.spec.cond2_frames)
            cond.mask2 = torch.ones(cond.context2.shape[:2], dtype=torch.bool, device=x0.device)
        return diffusion_train_step(model, opt, x0, cond, self.schedule, masked=masked,
                                    cond_drop=self.spec.cond_drop, grad_clip=self.spec.grad_clip,
                                    mask_frac=tuple(self.spec.mask_frac), min_span=self.min_span,
                                    grid_freq=self.grid_freq, partial_prob=self.spec.text_partial_mask)


class ArObjective:
    """DC-LDM's AR model: the tokenizer's codes of a latent crop, predicted from the caption."""

    def __init__(self, spec: TrainSpec, plan: dict, device):
        from soundlake.generation.ar import AcousticAR, ARConfig
        from soundlake.generation.conditioning import TextConditioner
        from soundlake.generation.model_folder import load_tokenizer

        self.spec, self.device = spec, device
        self.cfg = ARConfig.from_dict(plan["ar_config"])
        self.model = AcousticAR(self.cfg).to(device)
        self.rvq, _ = load_tokenizer(spec.tokens)
        self.text = TextConditioner(spec.text_encoder, device=str(device))
        self.lat = plan["latents"]
        self.loader_kw = {"latent_frames": plan["latent_frames"]}

    def extra_modules(self) -> dict:
        return {}

    def prepare(self, batch) -> tuple[Any, int]:
        import torch

        from soundlake.generation.mel_vae import to_tokens

        x = (to_tokens(batch.latents, int(self.lat["grid_freq"])) - self.lat["mean"]) / self.lat["std"]
        codes = torch.from_numpy(self.rvq.encode(x.numpy())).to(self.device)
        return (codes, batch.captions), codes.shape[0]

    def step(self, model, opt, extra_opts, item, phase: PhaseSpec) -> dict:
        import torch

        codes, captions = item
        hidden, mask = self.text.encode(captions)
        model.train()
        loss = model.loss(codes, hidden.to(self.device), mask.to(self.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.spec.grad_clip)
        opt.step()
        return {"loss": float(loss.detach())}


OBJECTIVES = {"vae": VaeObjective, "vocoder": VocoderObjective, "dit": DitObjective, "ar": ArObjective}
