"""Training objectives: what differs between training the VAE and the DiT (the model, batch
preparation, one loss step).

Both objectives expose ``model``, ``extra_modules()`` (e.g. the VAE's discriminator),
``loader_kw`` (how the export loader reads their shards), ``prepare(batch)`` and
``step(model, opt, extra_opts, item, phase)``; :mod:`.trainer` runs them on Ray Train.
"""
from __future__ import annotations

from typing import Any

from soundlake.generation.train.specs import PhaseSpec, TrainSpec


class VaeObjective:
    def __init__(self, spec: TrainSpec, plan: dict, device):
        from soundlake.generation.vae import VAEConfig, WaveVAE, build_discriminator

        self.spec, self.device = spec, device
        self.cfg = VAEConfig.from_dict(plan["vae_config"])
        self.model = WaveVAE(self.cfg).to(device)
        self.disc = build_discriminator(self.cfg)
        self.disc = self.disc.to(device) if self.disc is not None else None
        samples = max(1, round(spec.seconds * self.cfg.sample_rate / self.cfg.hop)) * self.cfg.hop
        self.loader_kw = {"seconds": samples / self.cfg.sample_rate, "sample_rate": self.cfg.sample_rate}

    def extra_modules(self) -> dict:
        return {"disc": self.disc} if self.disc is not None else {}

    def prepare(self, batch) -> tuple[Any, int]:
        wav = batch.audio.mean(dim=1, keepdim=True).to(self.device)  # mono [B, 1, T]
        return wav, wav.shape[0]

    def step(self, model, opt, extra_opts, wav, phase: PhaseSpec) -> dict:
        from soundlake.generation.vae import vae_train_step

        return vae_train_step(model, opt, wav, self.cfg, self.disc, extra_opts.get("disc"), self.spec.grad_clip)


class DitObjective:
    def __init__(self, spec: TrainSpec, plan: dict, device):
        from soundlake.generation.conditioning import TextConditioner
        from soundlake.generation.diffusion import Schedule
        from soundlake.generation.dit import DiT, DiTConfig

        self.spec, self.device = spec, device
        self.text = TextConditioner(spec.text_encoder, device=str(device))
        self.model = DiT(DiTConfig.from_dict(plan["dit_config"])).to(device)
        self.schedule = Schedule(**plan["schedule"])
        self.mean, self.std = plan["latents"]["mean"], plan["latents"]["std"]
        self.loader_kw = {"latent_frames": max(1, round(spec.seconds * plan["latents"]["rate"]))}
        self._cache: dict[str, Any] = {}
        self.clap = None
        if spec.extra_clap:
            from soundlake.models.clap.load import load_clap

            self.clap = load_clap(spec.extra_clap, device=str(device))

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
        x0 = ((batch.latents - self.mean) / self.std).transpose(1, 2).to(self.device)  # [B, F, C]
        return (x0, batch.captions), x0.shape[0]

    def step(self, model, opt, extra_opts, item, phase: PhaseSpec) -> dict:
        import torch

        from soundlake.generation.diffusion import diffusion_train_step
        from soundlake.generation.model_folder import pool_frames

        x0, captions = item
        masked = phase.mode == "masked"
        cond = None if masked else self._encode(captions)
        if cond is not None and self.spec.cond2 == "latents":
            cond.context2 = pool_frames(x0, self.spec.cond2_frames)
            cond.mask2 = torch.ones(cond.context2.shape[:2], dtype=torch.bool, device=x0.device)
        return diffusion_train_step(model, opt, x0, cond, self.schedule, masked=masked,
                                    cond_drop=self.spec.cond_drop, grad_clip=self.spec.grad_clip,
                                    mask_frac=tuple(self.spec.mask_frac))
