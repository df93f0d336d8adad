"""The `autocap` captioner: the AutoCap architecture (GenAU), in-house sizes, offline.

    audio ──► frozen audio encoder ──► frame features [B, T, F] ──► frame_proj ──► Q-Former ──► nq tokens ─┐
          └─► frozen CLAP ──► audio embedding ──► clap_proj + LayerNorm ──► 1 token ──────────────┐          │
    metadata ──► "<TITLE> … </TITLE> \\n <HQVC> … </HQVC> \\n <DESC> … </DESC> \\n <LABELS> … </LABELS>" │
             ──► token embeddings (BART's; new tag tokens have their own table) ───────────────────┼──────────┤
                      [CLAP token, [boa], Q-Former tokens, [eoa], metadata tokens] ──► BART encoder
                                                        BART encoder states ──► BART decoder ──► caption

The encoder input follows the paper's Eq. 3 (``input_order="eq3"``, the default). GenAU's
code, and so its released checkpoint, differs: [bos, Q-Former tokens, metadata tokens] go
through the encoder and the CLAP token joins the sequence *after* it
(``input_order="genau"``, which the released-checkpoint path and folders saved before this
setting use). A missing metadata field keeps its empty tags; captions are decoded with beam
search. The seq2seq model is transformers' ``BartForConditionalGeneration``,
built from a ``BartConfig`` (the small in-house model) or loaded from a pretrained folder.

The in-house audio encoder is the in-house CLAP (``soundlake.models.clap.inhouse``): its
log-mel CNN + Transformer frames (before pooling) are the frame features and its pooled,
normalised output is the CLAP embedding; both stay frozen. One model window (10 s) is
captioned per clip: longer clips are cut to their first window, shorter ones zero-padded.

Public API::

    AutocapConfig(...)                         # architecture, metadata fields, generation
    AutocapNet(cfg, bart, base_vocab)          # the torch module (frame features in, tokens out)
    Autocap.load(path, device="cpu")           # a saved folder -> captioner
        .caption(clips, metas=None, num_beams=None) -> list[str]     # mono float32 at .sample_rate
        .model_id, .model_hash, .sample_rate
    prompt_version(use_metadata) -> str        # recorded with each caption
    meta_text(meta, cfg, drop=()) -> str        # the tagged metadata string
    build_tokenizer(cfg, texts) -> tokenizer    # trained WordPiece, MiniLM vocab or the BART folder's
    save_autocap(...)                           # used by training (soundlake.models.captioners.autocap_train)
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from soundlake.core.fingerprints import weights_sha256
from soundlake.core.storage import atomic_path, write_text

FORMAT = "soundlake-autocap/1"
META_FILE = "soundlake_autocap.json"
WEIGHTS = "model.safetensors"
RELEASED_AUDIO = "autocap-released"   # audio_encoder kind of a converted released checkpoint
PROMPT_VERSION = "autocap-tags-v1"   # the tagged-metadata input format; '-nometa' when fields are left empty

# metadata field -> (open tag, close tag), in the order they are written
IN_HOUSE_FIELDS = [["title", "<TITLE>", "</TITLE>"], ["video_caption", "<HQVC>", "</HQVC>"],
                   ["description", "<DESC>", "</DESC>"], ["labels", "<LABELS>", "</LABELS>"]]


@dataclass
class AutocapConfig:
    # audio side (frame_dim / clap_dim / sample_rate / window_s come from the audio encoder)
    frame_dim: int = 192
    clap_dim: int = 256             # 0: no CLAP token
    sample_rate: int = 16000
    window_s: float = 10.0
    num_queries: int = 8            # Q-Former output tokens
    qformer_dim: int = 128
    qformer_layers: int = 2
    qformer_heads: int = 4
    qformer_ffn: int = 256
    qformer_eps: float = 1e-12      # BERT's LayerNorm eps, as in the Q-Former
    max_frames: int = 64            # learned frame positions
    feature_dropout: float = 0.2    # on projected audio frames and on metadata embeddings (AutoCap: 0.2)
    # seq2seq: a pretrained BART folder, or a BartConfig from these sizes
    bart: str | None = None
    d_model: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    ffn: int = 512
    dropout: float = 0.1
    # text
    tokenizer: str = "train"        # train (WordPiece on the training texts) | minilm | bart (the BART folder's)
    vocab_size: int = 2000          # tokenizer=train: at most this many tokens
    fields: list = field(default_factory=lambda: [list(f) for f in IN_HOUSE_FIELDS])
    tag_tokens: list | None = None  # the tag table's order, when it holds more than the fields' tags (released)
    max_field_chars: int = 300      # long descriptions are cut so that later fields still fit
    max_meta_tokens: int = 96
    max_caption_tokens: int = 40
    # encoder input: "eq3", the paper's Eq. 3 (CLAP token, [boa] audio [eoa], tagged metadata, all
    # into the BART encoder), or "genau", GenAU's code and its released checkpoint ([bos] audio
    # metadata into the encoder, the CLAP token joined after it)
    input_order: str = "eq3"
    # generation
    num_beams: int = 3
    max_length: int = 40
    min_length: int = 2

    @property
    def tags(self) -> list[str]:
        return self.tag_tokens or [t for _, open_, close in self.fields for t in (open_, close)]

    @classmethod
    def from_dict(cls, d: dict) -> "AutocapConfig":
        names = {f.name for f in fields(cls)}
        # folders saved before input_order existed were trained with GenAU's order
        return cls(**{"input_order": "genau", **{k: v for k, v in d.items() if k in names}})


# ---------------------------------------------------------------- metadata


def field_text(meta: dict, name: str) -> str:
    value = meta.get(name)
    if name == "labels" and not value:
        value = meta.get("tags")            # AutoCap reads tags/keywords as labels too
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v).replace("_", " ") for v in value if v)
    return " ".join(str(value or "").split())


def meta_text(meta: dict | None, cfg: AutocapConfig, drop: set[str] | frozenset = frozenset()) -> str:
    """The tagged metadata string; a missing or dropped field keeps its empty tags."""
    meta = meta or {}
    parts = []
    for name, open_, close in cfg.fields:
        text = "" if name in drop else field_text(meta, name)[: cfg.max_field_chars]
        parts.append(f"{open_} {text} {close}")
    return " \n ".join(parts)


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(cfg: AutocapConfig, texts: list[str] | None = None):
    """The base tokenizer (before the tag tokens are added)."""
    from transformers import AutoTokenizer

    if cfg.tokenizer == "bart":
        if not cfg.bart:
            raise ValueError("tokenizer 'bart' needs a BART folder (bart=...)")
        return AutoTokenizer.from_pretrained(cfg.bart, local_files_only=True)
    if cfg.tokenizer == "minilm":
        from soundlake.models.text import minilm_path

        tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
        tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
        return tok
    if cfg.tokenizer != "train":
        raise ValueError(f"tokenizer {cfg.tokenizer!r}: expected train, minilm or bart")
    if not texts:
        raise ValueError("tokenizer 'train' needs the training texts")
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()&/")
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        initial_alphabet=alphabet))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", bos_token="[CLS]", eos_token="[SEP]", mask_token="[MASK]")


def add_tags(tokenizer, cfg: AutocapConfig) -> int:
    """Add the tag tokens as special tokens after the base vocabulary; returns the base size."""
    base = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": cfg.tags})
    ids = tokenizer.convert_tokens_to_ids(cfg.tags)
    if ids != list(range(base, base + len(cfg.tags))):
        raise ValueError(f"tag tokens {cfg.tags} already exist in the vocabulary (ids {ids})")
    return base


def bart_config(cfg: AutocapConfig, tokenizer, base_vocab: int):
    from transformers import BartConfig

    positions = 1 + cfg.num_queries + cfg.max_meta_tokens + 8
    return BartConfig(
        vocab_size=base_vocab, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.heads, decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn, decoder_ffn_dim=cfg.ffn, dropout=cfg.dropout, attention_dropout=cfg.dropout,
        max_position_embeddings=max(positions, cfg.max_caption_tokens + 2, cfg.max_length + 2),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=None, forced_eos_token_id=tokenizer.eos_token_id, scale_embedding=False)


def new_bart(cfg: AutocapConfig, tokenizer, base_vocab: int):
    """BART for this config: the pretrained folder (cfg.bart) or a fresh one from a BartConfig."""
    from transformers import BartForConditionalGeneration

    if cfg.bart:
        return BartForConditionalGeneration.from_pretrained(cfg.bart, local_files_only=True)
    torch.manual_seed(0)
    return BartForConditionalGeneration(bart_config(cfg, tokenizer, base_vocab))


# ---------------------------------------------------------------- the network


class Attention(nn.Module):
    """Multi-head attention with BERT's projections (query/key/value, then an output dense)."""

    def __init__(self, dim: int, context_dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim, dim)
        self.v = nn.Linear(context_dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t):
            return t.view(b, -1, h, d // h).transpose(1, 2)

        bias = None
        if mask is not None:  # [B, S] bool, True = attend
            bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, -1e4)[:, None, None]
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(ctx)), split(self.v(ctx)), attn_mask=bias,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class QFormerLayer(nn.Module):
    """Post-LayerNorm BERT layer for the queries: self-attention, cross-attention to the frames, FFN."""

    def __init__(self, dim: int, context_dim: int, heads: int, ffn: int, eps: float, dropout: float):
        super().__init__()
        self.self_attn = Attention(dim, dim, heads, dropout)
        self.self_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, context_dim, heads, dropout)
        self.cross_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_norm(x + self.drop(self.self_attn(x, x)))
        x = self.cross_norm(x + self.drop(self.cross_attn(x, ctx, ctx_mask)))
        return self.ffn_norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class QFormer(nn.Module):
    """Learned queries cross-attend to the audio frames; ``num_queries`` tokens of ``out_dim`` come out."""

    def __init__(self, cfg: AutocapConfig, context_dim: int, out_dim: int):
        super().__init__()
        dim = cfg.qformer_dim
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, dim) * 0.02)
        self.query_norm = nn.LayerNorm(dim, eps=cfg.qformer_eps)
        self.frame_pos = nn.Embedding(cfg.max_frames, context_dim)
        self.frame_norm = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList([QFormerLayer(dim, context_dim, cfg.qformer_heads, cfg.qformer_ffn,
                                                  cfg.qformer_eps, cfg.dropout) for _ in range(cfg.qformer_layers)])
        self.out = nn.Linear(dim, out_dim)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.frame_pos.weight, std=0.02)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = frames.shape
        if t > self.frame_pos.num_embeddings:
            raise ValueError(f"{t} audio frames but the Q-Former has {self.frame_pos.num_embeddings} positions")
        ctx = self.frame_norm(frames + self.frame_pos(torch.arange(t, device=frames.device)))
        x = self.drop(self.query_norm(self.queries.expand(b, -1, -1)))
        for layer in self.layers:
            x = layer(x, ctx, mask)
        return self.out(x)


class AutocapNet(nn.Module):
    """Everything after the frozen audio encoder: projections, Q-Former, tag embeddings, BART."""

    def __init__(self, cfg: AutocapConfig, bart, base_vocab: int):
        super().__init__()
        d = bart.config.d_model
        self.cfg, self.base_vocab = cfg, base_vocab
        self.frame_proj = nn.Linear(cfg.frame_dim, d)
        self.qformer = QFormer(cfg, context_dim=d, out_dim=d)
        if cfg.clap_dim:
            self.clap_proj = nn.Linear(cfg.clap_dim, d)
            self.clap_norm = nn.LayerNorm(d)
        self.tag_embed = nn.Embedding(len(cfg.tags), d)
        if cfg.input_order not in ("eq3", "genau"):
            raise ValueError(f"input_order must be 'eq3' or 'genau', not {cfg.input_order!r}")
        # Eq. 3's [boa] and [eoa] (started as <bos> and <eos>, like the metadata tags)
        self.audio_tags = nn.Embedding(2, d) if cfg.input_order == "eq3" else None
        self.bart = bart
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)
        with torch.no_grad():  # AutoCap: opening tags start as <bos>, closing tags as <eos>
            emb = bart.get_input_embeddings().weight
            for i, tag in enumerate(cfg.tags):
                self.tag_embed.weight[i] = emb[bart.config.eos_token_id if tag.startswith("</") else bart.config.bos_token_id]
            if self.audio_tags is not None:
                self.audio_tags.weight[0] = emb[bart.config.bos_token_id]
                self.audio_tags.weight[1] = emb[bart.config.eos_token_id]

    def token_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """BART's embeddings for ordinary tokens, the tag table for the added tag tokens."""
        is_tag = ids >= self.base_vocab
        base = self.bart.get_input_embeddings()(ids.masked_fill(is_tag, self.bart.config.pad_token_id))
        if not is_tag.any():
            return base
        tags = self.tag_embed((ids - self.base_vocab).clamp(min=0))
        return torch.where(is_tag[..., None], tags, base)

    def encoder_input(self, frames, clap, meta_ids, meta_mask, frame_mask=None):
        """(embeddings, attention mask) of the BART encoder's input; Eq. 3's order:
        x_clap [boa] x_audio [eoa] [bom]_1 x_meta_1 [eom]_1 ... (the paper's closing [bom]
        read as [eom]: the metadata's closing tags)."""
        b = frames.shape[0]
        audio = self.qformer(self.feature_dropout(self.frame_proj(frames)), frame_mask)
        meta = self.feature_dropout(self.token_embeds(meta_ids))
        boa, eoa = self.audio_tags.weight[:, None].expand(2, b, -1)[:, :, None]
        parts = [boa, audio, eoa, meta]
        if self.cfg.clap_dim:
            parts.insert(0, self.clap_norm(self.clap_proj(clap))[:, None])
        ones = torch.ones(b, sum(p.shape[1] for p in parts[:-1]), dtype=torch.long, device=frames.device)
        return torch.cat(parts, dim=1), torch.cat([ones, meta_mask.long()], dim=1)

    def encode(self, frames, clap, meta_ids, meta_mask, frame_mask=None):
        """BART encoder states (CLAP token first) and their attention mask."""
        if self.cfg.input_order == "eq3":
            x, mask = self.encoder_input(frames, clap, meta_ids, meta_mask, frame_mask)
            return self.bart.model.encoder(inputs_embeds=x, attention_mask=mask, return_dict=True).last_hidden_state, mask
        b = frames.shape[0]
        audio = self.qformer(self.feature_dropout(self.frame_proj(frames)), frame_mask)
        meta = self.feature_dropout(self.token_embeds(meta_ids))
        bos = self.token_embeds(torch.full((b, 1), self.bart.config.bos_token_id, device=frames.device))
        x = torch.cat([bos, audio, meta], dim=1)
        ones = torch.ones(b, 1 + audio.shape[1], dtype=torch.long, device=frames.device)
        mask = torch.cat([ones, meta_mask.long()], dim=1)
        h = self.bart.model.encoder(inputs_embeds=x, attention_mask=mask, return_dict=True).last_hidden_state
        if self.cfg.clap_dim:
            c = self.clap_norm(self.clap_proj(clap))[:, None]
            h = torch.cat([c, h], dim=1)
            mask = torch.cat([ones[:, :1], mask], dim=1)
        return h, mask

    def forward(self, frames, clap, meta_ids, meta_mask, labels, label_smoothing: float = 0.1):
        """Teacher-forced cross-entropy; ``labels`` padded with -100."""
        from transformers.models.bart.modeling_bart import shift_tokens_right

        h, mask = self.encode(frames, clap, meta_ids, meta_mask)
        cfg = self.bart.config
        dec_in = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        # Padding only trails the targets, so the causal mask alone keeps it out of every real position.
        logits = self.bart(encoder_outputs=(h,), attention_mask=mask, decoder_input_ids=dec_in, return_dict=True).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=label_smoothing)

    @torch.no_grad()
    def generate(self, frames, clap, meta_ids, meta_mask, num_beams: int, max_length: int, min_length: int = 2):
        from transformers.modeling_outputs import BaseModelOutput

        h, mask = self.encode(frames, clap, meta_ids, meta_mask)
        return self.bart.generate(encoder_outputs=BaseModelOutput(last_hidden_state=h), attention_mask=mask,
                                  num_beams=num_beams, max_length=max_length, min_length=min_length,
                                  do_sample=False)


# ---------------------------------------------------------------- the frozen audio encoder


class ClapAudio:
    """Frame features and CLAP embeddings from the in-house CLAP's audio tower (frozen)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from safetensors.torch import load_file

        from soundlake.models.clap.inhouse import FORMAT as CLAP_FORMAT
        from soundlake.models.clap.inhouse import (
            INHOUSE_CONFIG,
            ClapNet,
            ClapTrainConfig,
        )

        path = Path(path)
        meta_file = path / INHOUSE_CONFIG
        if not meta_file.is_file():
            raise ValueError(f"{path}: not an in-house CLAP folder (no {INHOUSE_CONFIG}); autocap's audio encoder "
                             "is the in-house CLAP (soundlake train clap)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != CLAP_FORMAT:
            raise ValueError(f"{path}: unsupported in-house CLAP format {meta.get('format')!r}")
        self.cfg = ClapTrainConfig.from_dict(meta["config"])
        weights = path / meta.get("weights", "model.safetensors")
        state = load_file(str(weights))
        self.net = ClapNet(self.cfg, text_dim=state["text_proj.weight"].shape[1])
        self.net.load_state_dict(state)
        self.net.to(device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.sample_rate, self.window = self.cfg.sample_rate, int(round(self.cfg.window_s * self.cfg.sample_rate))
        self.frame_dim, self.clap_dim = self.cfg.channels, self.cfg.dim
        self.sha256 = weights_sha256(weights)

    def _window(self, clip: np.ndarray) -> np.ndarray:
        clip = np.asarray(clip, dtype=np.float32).reshape(-1)[: self.window]
        return np.pad(clip, (0, self.window - len(clip))) if len(clip) < self.window else clip

    @torch.inference_mode()
    def __call__(self, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames [B, T, frame_dim], embeddings [B, clap_dim]) for mono clips at ``sample_rate``."""
        wave = torch.from_numpy(np.stack([self._window(c) for c in clips])).to(self.device)
        mel = self.net.logmel(wave).half().float()   # the rounding the CLAP was trained with
        frames = self.net.audio.frames(mel)
        return frames, F.normalize(self.net.audio.pool(frames), dim=-1)

    def batched(self, clips, batch_size: int = 32):
        frames, emb = [], []
        for i in range(0, len(clips), batch_size):
            f, e = self(clips[i:i + batch_size])
            frames.append(f)
            emb.append(e)
        return torch.cat(frames), torch.cat(emb)


# ---------------------------------------------------------------- saving and loading


def save_autocap(net: AutocapNet, tokenizer, out_dir: Path, audio_dir: Path | None, extra: dict | None = None) -> dict:
    """Write the folder: config json, weights, tokenizer, and the audio encoder under ``clap/``."""
    from safetensors.torch import save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    if audio_dir is not None and Path(audio_dir).resolve() != (out_dir / "clap").resolve():
        shutil.rmtree(out_dir / "clap", ignore_errors=True)
        shutil.copytree(audio_dir, out_dir / "clap")
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    with atomic_path(out_dir / WEIGHTS) as tmp:   # a reader never sees half a weights file
        save_model(net, tmp)                       # handles BART's tied embeddings
    meta = {"format": FORMAT, "config": asdict(net.cfg), "bart_config": net.bart.config.to_dict(),
            "base_vocab": net.base_vocab, "weights": WEIGHTS, "checkpoint_sha256": weights_sha256(out_dir / WEIGHTS),
            "audio_encoder": {"kind": "soundlake-clap", "path": "clap"} if audio_dir is not None else None,
            **(extra or {})}
    write_text(out_dir / META_FILE, json.dumps(meta, indent=2, default=str))
    return meta


def load_audio_encoder(path: Path, spec: dict | None, device: str = "cpu"):
    """The frozen audio side a saved folder names: the in-house CLAP, or the released AutoCap's HTS-AT + CLAP."""
    if not spec:
        return None
    if spec.get("kind") == RELEASED_AUDIO:
        from soundlake.models.captioners.autocap_audio import ReleasedAudio

        return ReleasedAudio.load(path / spec["path"], device)
    return ClapAudio(path / spec["path"], device)


def prompt_version(use_metadata: bool = True) -> str:
    """The input-format version recorded with each caption."""
    return PROMPT_VERSION if use_metadata else PROMPT_VERSION + "-nometa"


def is_autocap_folder(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


class Autocap:
    """A saved autocap folder as a captioner."""

    def __init__(self, net: AutocapNet, tokenizer, audio: ClapAudio | None, model_id: str, model_hash: str,
                 device: str = "cpu"):
        self.net = net.to(device).eval()
        self.tokenizer, self.audio = tokenizer, audio
        self.cfg = net.cfg
        self.model_id, self.model_hash = model_id, model_hash
        self.device = torch.device(device)
        self.sample_rate = audio.sample_rate if audio is not None else self.cfg.sample_rate

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Autocap":
        from safetensors.torch import load_model
        from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

        path = Path(path)
        if not is_autocap_folder(path):
            raise ValueError(f"{path}: not an autocap folder (no {META_FILE}); train one with "
                             "`soundlake train captioner`")
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unsupported autocap format {meta.get('format')!r}")
        cfg = AutocapConfig.from_dict(meta["config"])
        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
        bart = BartForConditionalGeneration(BartConfig.from_dict(meta["bart_config"]))
        net = AutocapNet(cfg, bart, meta["base_vocab"])
        weights = path / meta.get("weights", WEIGHTS)
        missing, unexpected = load_model(net, str(weights), strict=True)
        audio = load_audio_encoder(path, meta.get("audio_encoder"), device)
        return cls(net, tokenizer, audio, model_id=str(path), model_hash=weights_sha256(weights), device=device)

    def tokenize_meta(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_meta(self.tokenizer, texts, self.cfg.max_meta_tokens, self.device)

    def caption_features(self, frames: torch.Tensor, clap: torch.Tensor | None, metas: list[dict | None] | None = None,
                         num_beams: int | None = None) -> list[str]:
        metas = metas or [None] * frames.shape[0]
        ids, mask = self.tokenize_meta([meta_text(m, self.cfg) for m in metas])
        if clap is None:
            clap = torch.zeros(frames.shape[0], max(1, self.cfg.clap_dim))
        out = self.net.generate(frames.to(self.device), clap.to(self.device), ids, mask,
                                num_beams=num_beams or self.cfg.num_beams, max_length=self.cfg.max_length,
                                min_length=self.cfg.min_length)
        return [" ".join(t.split()) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def caption(self, clips: list[np.ndarray], metas: list[dict | None] | None = None,
                num_beams: int | None = None) -> list[str]:
        """One caption per mono clip at ``sample_rate`` (metadata per clip, or None)."""
        if self.audio is None:
            raise ValueError(f"{self.model_id}: this model has no audio encoder soundlake can run; "
                             "pass frame features to caption_features()")
        if not clips:
            return []
        frames, emb = self.audio(clips)
        return self.caption_features(frames, emb, metas, num_beams)


def tokenize_meta(tokenizer, texts: list[str], max_tokens: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Metadata token ids with <eos> appended (AutoCap's encode_meta), and the padding mask."""
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens - 1)
    rows = [ids + [tokenizer.eos_token_id] for ids in enc["input_ids"]]
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


def tokenize_captions(tokenizer, captions: list[str], max_tokens: int) -> torch.Tensor:
    """Caption targets ([bos] text [eos]), padded with -100."""
    enc = tokenizer(list(captions), truncation=True, max_length=max_tokens)
    n = max(len(r) for r in enc["input_ids"])
    labels = torch.full((len(captions), n), -100, dtype=torch.long)
    for i, r in enumerate(enc["input_ids"]):
        labels[i, : len(r)] = torch.tensor(r)
    return labels


def count_parameters(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
