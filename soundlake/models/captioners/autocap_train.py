"""Training the in-house autocap: two phases, AutoCap's "phase 1" and "phase 2".

* the audio encoder (the in-house CLAP: trained first on the same pairs when none is given)
  stays frozen, so its frame features and embeddings are computed once per clip;
* a BART built from a config (not a pretrained folder) is first trained on the captions and
  metadata texts with BART's own denoising objective, standing in for the pretraining that
  facebook/bart-base brings to AutoCap;
* phase 1: BART frozen; the Q-Former, the projections (frames, CLAP) and the new tag-token
  embeddings train;
* phase 2: BART (encoder and decoder: AutoCap calls the whole seq2seq model its decoder)
  trains too, except its token embeddings (shared by encoder, decoder and output layer);
* random metadata-field dropout (each field left empty with ``field_dropout``) teaches the
  model to caption from the audio alone as well as with titles, tags and labels;
* loss: cross-entropy with label smoothing 0.1 (AutoCap's), AdamW, warm-up + cosine per phase,
  gradients clipped at 2 (AutoCap's clip_grad).

Public API::

    @dataclass CaptionItem(audio, caption, meta)       # mono float32 at the audio encoder's rate
    @dataclass AutocapTrainConfig(phase1_epochs=4, phase2_epochs=16, batch_size=32, ...)
    train_autocap(items, out_dir, config=AutocapConfig(), train=AutocapTrainConfig(), clap=None,
                  val=None, progress=None, device="cpu") -> dict
        writes out_dir (loadable with Autocap.load); returns {"history", "train_seconds", "path", "model"}
    set_phase(net, phase)                               # which parameters train in phase 1 / 2
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from soundlake.models.captioners.autocap import (
    Autocap,
    AutocapConfig,
    AutocapNet,
    ClapAudio,
    add_tags,
    build_tokenizer,
    count_parameters,
    field_text,
    meta_text,
    new_bart,
    save_autocap,
    tokenize_captions,
    tokenize_meta,
)


@dataclass
class CaptionItem:
    audio: np.ndarray
    caption: str
    meta: dict = field(default_factory=dict)


@dataclass
class AutocapTrainConfig:
    phase1_epochs: int = 4       # BART frozen (AutoCap's stage 1)
    lr_phase1: float = 2e-3
    phase2_epochs: int = 16      # BART trains too, but not its token embeddings (stage 2)
    lr_phase2: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 1e-2
    warmup_steps: int = 20       # per phase, then cosine
    label_smoothing: float = 0.1
    field_dropout: float = 0.5   # each metadata field left empty with this probability
    clip_grad: float = 2.0
    clap_epochs: int = 12        # when no CLAP is given, one is trained on the same pairs first
    bart_epochs: int = 6         # a BART built from a config is first trained as a denoiser of the texts
    lr_bart: float = 2e-3
    val_clips: int = 64          # captioned (greedy) each epoch for the validation metrics
    seed: int = 0


def set_phase(net: AutocapNet, phase: int) -> None:
    """Phase 1: only the Q-Former, projections and tag embeddings; phase 2: BART too, but not its token embeddings."""
    if phase not in (1, 2):
        raise ValueError(f"phase must be 1 or 2, got {phase}")
    for p in net.parameters():
        p.requires_grad_(False)
    new = [net.frame_proj, net.qformer, net.tag_embed] + ([net.clap_proj, net.clap_norm] if net.cfg.clap_dim else [])
    for module in new:
        for p in module.parameters():
            p.requires_grad_(True)
    if phase == 2:
        for p in net.bart.parameters():
            p.requires_grad_(True)
        net.bart.get_input_embeddings().weight.requires_grad_(False)   # tied to the output layer


def pretrain_bart(bart, tokenizer, texts: list[str], epochs: int, batch_size: int, lr: float,
                  gen: torch.Generator, max_tokens: int, device, progress=None) -> None:
    """BART's own objective on the training texts: rebuild each text from a corrupted copy
    (30 % of its tokens masked, 10 % deleted). Gives a from-config BART the language (and the
    token embeddings) that a pretrained one brings, before they are frozen for phases 1 and 2."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    bart.train()
    opt = torch.optim.AdamW(bart.parameters(), lr=lr, weight_decay=1e-2)
    for epoch in range(epochs):
        losses = []
        for idx in _batches(len(enc), batch_size, gen):
            src, tgt = [], []
            for i in idx.tolist():
                ids = enc[i]
                u = torch.rand(len(ids), generator=gen)
                src.append([t if t in special or u[j] >= 0.4 else tokenizer.mask_token_id
                            for j, t in enumerate(ids) if t in special or not 0.3 <= u[j] < 0.4])
                tgt.append(ids)
            n, m = max(map(len, src)), max(map(len, tgt))
            x = torch.full((len(src), n), tokenizer.pad_token_id)
            y = torch.full((len(tgt), m), -100)
            for k, (s_, t_) in enumerate(zip(src, tgt)):
                x[k, : len(s_)], y[k, : len(t_)] = torch.tensor(s_), torch.tensor(t_)
            loss = bart(input_ids=x.to(device), attention_mask=(x != tokenizer.pad_token_id).to(device),
                        labels=y.to(device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if progress is not None:
            progress({"bart_epoch": epoch + 1, "bart_loss": float(np.mean(losses))})


def _batches(n: int, size: int, gen: torch.Generator | None):
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return [order[i:i + size] for i in range(0, n, size)]


def _meta_batch(metas: list[dict], cfg: AutocapConfig, p_drop: float, rng: np.random.Generator | None) -> list[str]:
    names = [f[0] for f in cfg.fields]
    out = []
    for m in metas:
        drop = {n for n in names if rng is not None and rng.random() < p_drop}
        out.append(meta_text(m, cfg, drop))
    return out


@torch.no_grad()
def _validate(net, tokenizer, feats, captions, metas, cfg: AutocapConfig, tcfg: AutocapTrainConfig,
              device) -> dict:
    from soundlake.models.caption_metrics import bleu, cider_d, rouge_l

    net.eval()
    frames, clap = feats
    losses = []
    for idx in _batches(len(captions), tcfg.batch_size, None):
        ids, mask = tokenize_meta(tokenizer, _meta_batch([metas[i] for i in idx], cfg, 0, None),
                                  cfg.max_meta_tokens, device)
        labels = tokenize_captions(tokenizer, [captions[i] for i in idx], cfg.max_caption_tokens).to(device)
        losses.append(float(net(frames[idx].to(device), clap[idx].to(device), ids, mask, labels,
                                tcfg.label_smoothing)) * len(idx))
    n = min(len(captions), tcfg.val_clips)
    preds = []
    for i in range(0, n, tcfg.batch_size):
        idx = torch.arange(i, min(n, i + tcfg.batch_size))
        ids, mask = tokenize_meta(tokenizer, _meta_batch([metas[j] for j in idx], cfg, 0, None),
                                  cfg.max_meta_tokens, device)
        out = net.generate(frames[idx].to(device), clap[idx].to(device), ids, mask, 1, cfg.max_length, cfg.min_length)
        preds += tokenizer.batch_decode(out, skip_special_tokens=True)
    refs = [[c] for c in captions[:n]]
    return {"val_loss": sum(losses) / len(captions), "val_bleu_4": bleu(preds, refs, 4),
            "val_rouge_l": rouge_l(preds, refs), "val_cider_d": cider_d(preds, refs)}


def train_autocap(items: list[CaptionItem], out_dir: str | Path, config: AutocapConfig | None = None,
                  train: AutocapTrainConfig | None = None, clap: str | Path | None = None,
                  val: list[CaptionItem] | None = None, progress: Callable[[dict], None] | None = None,
                  device: str = "cpu") -> dict:
    """Train autocap on (audio, caption, metadata) items and save it to ``out_dir``."""
    cfg = config or AutocapConfig()
    tcfg = train or AutocapTrainConfig()
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    if len(items) < 2:
        raise ValueError("autocap training needs at least 2 clips")
    torch.manual_seed(tcfg.seed)
    gen = torch.Generator().manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)

    with tempfile.TemporaryDirectory(prefix="autocap-clap-") as tmp:
        if clap is None:   # the frozen audio encoder: trained first on the same pairs
            from soundlake.models.clap.inhouse import ClapTrainConfig, train_clap

            clap = Path(tmp) / "clap"
            ccfg = ClapTrainConfig(epochs=tcfg.clap_epochs, seed=tcfg.seed, window_s=cfg.window_s)
            train_clap([it.audio for it in items], [it.caption for it in items], clap, ccfg, device=device,
                       progress=(lambda row: progress({"clap_" + k: v for k, v in row.items()})) if progress else None)
        audio = ClapAudio(clap, device)
        cfg.frame_dim, cfg.clap_dim = audio.frame_dim, audio.clap_dim
        cfg.sample_rate, cfg.window_s = audio.sample_rate, audio.window / audio.sample_rate
        feats = audio.batched([it.audio for it in items])
        val_feats = audio.batched([it.audio for it in val]) if val else None
        cfg.max_frames = max(cfg.max_frames, feats[0].shape[1])

        captions, metas = [it.caption for it in items], [it.meta or {} for it in items]
        texts = captions + [meta_text(m, cfg) for m in metas]
        tokenizer = build_tokenizer(cfg, texts)
        base_vocab = add_tags(tokenizer, cfg)
        bart = new_bart(cfg, tokenizer, base_vocab).to(device)
        if not cfg.bart and tcfg.bart_epochs > 0:   # a from-config BART learns the captions' language first
            plain = captions + [t for m in metas for f in cfg.fields if (t := field_text(m, f[0]))]
            pretrain_bart(bart, tokenizer, plain, tcfg.bart_epochs, tcfg.batch_size, tcfg.lr_bart, gen,
                          cfg.max_meta_tokens, device, progress)
        net = AutocapNet(cfg, bart, base_vocab).to(device)
        labels_all = tokenize_captions(tokenizer, captions, cfg.max_caption_tokens)

        history: list[dict] = []
        epoch = 0
        for phase, epochs, lr in ((1, tcfg.phase1_epochs, tcfg.lr_phase1), (2, tcfg.phase2_epochs, tcfg.lr_phase2)):
            if epochs <= 0:
                continue
            set_phase(net, phase)
            params = [p for p in net.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=tcfg.weight_decay)
            steps = epochs * math.ceil(len(items) / tcfg.batch_size)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, tcfg.warmup_steps))
                                                      * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
            for _ in range(epochs):
                epoch += 1
                net.train()
                losses = []
                for idx in _batches(len(items), tcfg.batch_size, gen):
                    ids, mask = tokenize_meta(tokenizer, _meta_batch([metas[i] for i in idx], cfg, tcfg.field_dropout,
                                                                     rng), cfg.max_meta_tokens, device)
                    labels = labels_all[idx]
                    labels = labels[:, : int((labels != -100).sum(1).max())].to(device)
                    loss = net(feats[0][idx].to(device), feats[1][idx].to(device), ids, mask, labels,
                               tcfg.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, tcfg.clip_grad)
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                row = {"epoch": epoch, "phase": phase, "loss": float(np.mean(losses)),
                       "trainable": count_parameters(net, trainable=True), "seconds": time.perf_counter() - t_start}
                if val:
                    row.update(_validate(net, tokenizer, val_feats, [it.caption for it in val],
                                         [it.meta or {} for it in val], cfg, tcfg, device))
                history.append(row)
                if progress is not None:
                    progress(row)
        net.eval()
        extra = {"train": asdict(tcfg), "audio_encoder_sha256": audio.sha256, "history": history,
                 "final_metrics": history[-1] if history else {}}
        save_autocap(net, tokenizer, out_dir, audio_dir=Path(clap), extra=extra)
    model = Autocap.load(out_dir, device)
    return {"history": history, "train_seconds": time.perf_counter() - t_start, "path": str(out_dir), "model": model}
