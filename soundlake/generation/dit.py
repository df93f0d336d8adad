"""EzAudio-DiT: a diffusion transformer over VAE latent frames [B, F, C].

* **AdaLN-SOLA**: one shared AdaLN MLP maps the timestep embedding to shift/scale/gate
  (6 x width) for all blocks; each block adds a rank-``sola_rank`` adjustment. The
  ``adaln="full"`` variant (a full AdaLN MLP per block, as in DiT) exists only to compare
  parameter counts.
* **Long skips** (U-ViT): outputs of the first ``depth // 2`` blocks are concatenated to
  the inputs of the mirrored last blocks and fused by Linear + LayerNorm (``skip_fuse``).
* **Self-attention** with RoPE and QK-Norm (RMSNorm per head). Over a 1D latent the RoPE
  position is the frame. Over a 2D mel latent (``grid_freq`` F > 1 frequency rows per
  frame, tokens time-major) it is axial: half of each head's rotation pairs turn with the
  frame ``n // F`` and half with the frequency row ``n % F``, so attention scores depend on
  (time offset, frequency offset), not on a token distance that mixes the two.
* **Cross-attention** to the text tokens (key padding mask); its out-projection is zero
  at init, so an untrained model ignores the condition. Optional **DC-LDM** second
  cross-attention ``cross_attn2`` in the blocks listed in ``cross_attn2_blocks``,
  reading a second condition stream, also zero-initialised and added to the residual.
* Null condition for classifier-free guidance: a learned (or zero, ``null_cond``) token
  per stream, substituted for the rows whose ``drop`` flag is set. Guidance batches cond
  and uncond rows in one forward call (see diffusion.py).
* **Dataset-ID** (GenAu): with a ``sources`` vocabulary (``soundlake.generation.dataset_id``)
  a learned embedding of the clip's source id is added to the timestep embedding that
  drives AdaLN; ``source=None`` is id 0 (``unknown``). ``drop`` leaves it in place: the
  unconditional branch of guidance is "no text, same source".

The condition handling (null tokens, second stream, dataset-ID, weight init) is shared with
the FIT backbone (fit.py) through :class:`ConditionMixin` and :func:`init_weights`.

Structure contract (relied on by cache / sparse-attention hooks attached from outside)::

    model.blocks: nn.ModuleList[DiTBlock]
    DiTBlock.self_attn(h, rope)            -> [B, N, D]   (h = modulated norm of x)
    DiTBlock.cross_attn(h, context, mask)  -> [B, N, D]
    DiTBlock.cross_attn2(h, context2, mask2) -> [B, N, D]   (only in chosen blocks, else None)
    DiTBlock.ff(h)                         -> [B, N, D]
    block forward: x += gate1 * self_attn(..); x += cross_attn(..); [x += cross_attn2(..)];
                   x += gate2 * ff(..)
    SelfAttention / CrossAttention compute q, k, v [B, H, N, Dh] and call
    ``self.attention(q, k, v)`` (cross, or self with a key mask: ``attn_mask=`` [B, 1, 1, N]
    boolean too): by default a
    ScaledDotProductAttention module, the attention core that hooks replace by name
    (LiteFocus: ``blocks.i.self_attn.attention``). It is a plain attribute, not a child
    module, so state_dict and named_modules are those of the bare computation and any
    callable may still be assigned in its place.

Public API::

    DiTConfig(...)  # DiTConfig.from_yaml("dit-tiny" | path) reads the ``model:`` section
    DiT(cfg).forward(x [B,F,C], t [B] (timestep index, float ok), context=None [B,T,Dc],
                     context_mask=None [B,T], extra=None [B,De], context2=None [B,S,D2],
                     context2_mask=None, drop=None [B] bool, frame_mask=None [B,F] bool,
                     source=None [B] long (dataset-ID; only with cfg.sources))
        -> v prediction [B, F, C]
    count_parameters(module) -> int
    ScaledDotProductAttention()(q, k, v, **kw)   # the default attention core (a module)
    attention_core(layer)                        # gives a layer its core as ``layer.attention``
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from soundlake.generation.dataset_id import check_vocab
from soundlake.generation.vae import read_config


class BackboneConfig:
    """What the DiT and FIT configs share: read from a config's ``model:`` section or a model
    folder's dict (whose ``backbone`` key, if any, must name ``BACKBONE``)."""
    BACKBONE: ClassVar[str]

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**config_kwargs(cls, d, cls.BACKBONE))

    @classmethod
    def from_yaml(cls, name_or_path: str | Path):
        return cls.from_dict(read_config(name_or_path).get("model", {}))

    def to_dict(self) -> dict:
        return asdict(self)

    def head_dim(self) -> int:
        """Width per attention head, checked: RoPE rotates pairs, so it must be even."""
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError("hidden / heads must be an even integer (RoPE)")
        return self.hidden // self.heads


@dataclass
class DiTConfig(BackboneConfig):
    BACKBONE: ClassVar[str] = "dit"
    in_channels: int = 32           # VAE latent channels
    hidden: int = 128
    depth: int = 12
    heads: int = 4
    mlp_ratio: float = 4.0
    ff: str = "gelu"                # feed-forward: "gelu" | "geglu" (EzAudio's released L / XL)
    cond_dim: int = 384             # text token width (MiniLM 384, FLAN-T5-large 1024)
    cond_extra_dim: int = 0         # GenAu extra vector (e.g. CLAP text), 0 = off
    cond2_dim: int = 0              # DC-LDM second stream width, 0 = off
    cross_attn2_blocks: list[int] = field(default_factory=list)
    adaln: str = "sola"             # "sola" | "full"
    sola_rank: int = 32
    long_skip: bool = True
    qk_norm: bool = True
    rope_base: float = 10000.0
    null_cond: str = "learned"      # "learned" | "zero"
    time_freq_dim: int = 256
    sources: list[str] = field(default_factory=list)  # dataset-ID vocabulary ("unknown" first), [] = off
    grid_freq: int = 1              # frequency rows per latent frame (2D mel VAE); > 1: axial 2D RoPE


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def config_kwargs(cls, d: dict, backbone: str) -> dict:
    """A config dict's keys for ``cls``; a ``backbone`` key (model folders record one) must
    name this backbone."""
    d = dict(d)
    named = d.pop("backbone", backbone)
    if named != backbone:
        raise ValueError(f"a {named!r} config cannot build a {backbone!r} model "
                         "(soundlake.generation.backbones.build_backbone picks by the backbone key)")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return d


# ---------------------------------------------------------------- pieces

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(n: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)  # [N, Dh], rotate-half layout
    return ang.cos(), ang.sin()


def grid_rope_tables(n: int, grid_freq: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for ``n`` time-major tokens of a (frame, frequency row) grid, ``grid_freq``
    rows per frame: the first half of the rotation pairs (``apply_rope``'s i, i + Dh/2) turn
    with the frame, the second half with the row, each half with its own spectrum of
    ``head_dim / 4`` frequencies. ``grid_freq == 1`` gives :func:`rope_tables`."""
    if grid_freq == 1:
        return rope_tables(n, head_dim, base, device)
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head width divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv = 1.0 / base ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    pos = torch.arange(n, device=device)
    frame, row = (pos // grid_freq).float(), (pos % grid_freq).float()
    ang = torch.cat([frame[:, None] * inv[None], row[:, None] * inv[None]], dim=-1)   # [N, Dh/2]: one per pair
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def zero_init(lin: nn.Linear) -> nn.Linear:
    """Zero a layer and mark it so the model's Xavier init leaves it alone."""
    nn.init.zeros_(lin.weight)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)
    lin._zero_init = True
    return lin


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` as a parameterless module, so that hooks can
    replace the attention core of a named layer (see the structure contract)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def attention_core(module: nn.Module) -> None:
    """Give an attention layer its ``attention`` core: a plain attribute, not a child module
    (a callable assigned in its place must stay allowed; state_dict keys stay unchanged)."""
    module.__dict__["attention"] = ScaledDotProductAttention()


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.out = nn.Linear(dim, dim)
        attention_core(self)  # replaceable by hooks (sparse attention)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        # key padding mask [B, N] (FIT's last, padded group); None keeps the plain call
        o = self.attention(q, k, v) if mask is None else self.attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.out = zero_init(nn.Linear(dim, dim))  # an untrained model ignores the condition
        attention_core(self)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        s = context.shape[1]
        q = self.q_norm(self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2))
        k, v = self.kv(context).view(b, s, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = self.k_norm(k)
        attn_mask = None if mask is None else mask[:, None, None, :]
        o = self.attention(q, k, v, attn_mask=attn_mask)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """``"gelu"``: Linear, GELU, Linear. ``"geglu"`` (EzAudio's released configs): the first
    Linear is twice as wide and its halves (h, g) give h * GELU(g) (Shazeer 2020)."""

    def __init__(self, dim: int, mult: float, kind: str = "gelu"):
        super().__init__()
        if kind not in ("gelu", "geglu"):
            raise ValueError(f"ff must be 'gelu' or 'geglu', not {kind!r}")
        inner = int(dim * mult)
        self.kind = kind
        self.net = nn.Sequential(nn.Linear(dim, inner * (2 if kind == "geglu" else 1)),
                                 nn.GELU(approximate="tanh" if kind == "gelu" else "none"), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj, act, out = self.net
        if self.kind == "geglu":
            h, g = proj(x).chunk(2, dim=-1)
            return out(h * act(g))
        return out(act(proj(x)))


def rezero_cross_attention(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> int:
    """EzAudio's start of text training: the output projection of every text cross-attention
    (``cross_attn``, ``cross_attn2``; not FIT's latent read/write) back to zero, and its
    optimizer moments dropped, so that the text enters a model that ignores it, as a module
    added at that moment would (masked pretraining ran it on the null token). Returns how
    many layers were re-zeroed."""
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, CrossAttention) and name.rsplit(".", 1)[-1] in ("cross_attn", "cross_attn2"):
                for p in mod.out.parameters():
                    p.zero_()
                    if opt is not None:
                        opt.state.pop(p, None)
                n += 1
    return n


def adaln_head(cfg, chunks: int) -> nn.Sequential:
    """A block's AdaLN: ``chunks`` shift/scale/gate vectors of width ``cfg.hidden`` from the
    condition, zero at the start (the block begins as the identity). ``sola``: a low-rank
    per-block adjustment added to the shared AdaLN output."""
    d = cfg.hidden
    if cfg.adaln == "sola":
        head = nn.Sequential(nn.SiLU(), nn.Linear(d, cfg.sola_rank, bias=False),
                             nn.Linear(cfg.sola_rank, chunks * d, bias=False))
    elif cfg.adaln == "full":
        head = nn.Sequential(nn.SiLU(), nn.Linear(d, chunks * d))
    else:
        raise ValueError(f"adaln must be 'sola' or 'full', not {cfg.adaln!r}")
    zero_init(head[-1])
    return head


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, long_skip: bool = False, cross2: bool = False):
        super().__init__()
        d = cfg.hidden
        self.skip_fuse = nn.Sequential(nn.Linear(2 * d, d), nn.LayerNorm(d)) if long_skip else None
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(d, cfg.heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = CrossAttention(d, cfg.heads, cfg.qk_norm)
        self.norm_c2 = nn.LayerNorm(d, eps=1e-6) if cross2 else None
        self.cross_attn2 = CrossAttention(d, cfg.heads, cfg.qk_norm) if cross2 else None
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(d, cfg.mlp_ratio, cfg.ff)
        self.adaln = adaln_head(cfg, 6)

    def modulation(self, c: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        m = self.adaln(c)
        return m if shared is None else shared + m

    def forward(self, x, c, shared, rope, context, context_mask, context2=None, context2_mask=None, skip=None):
        if self.skip_fuse is not None:
            x = self.skip_fuse(torch.cat([x, skip], dim=-1))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c, shared).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.self_attn(modulate(self.norm1(x), shift1, scale1), rope)
        x = x + self.cross_attn(self.norm2(x), context, context_mask)
        if self.cross_attn2 is not None:
            x = x + self.cross_attn2(self.norm_c2(x), context2, context2_mask)
        x = x + gate2[:, None] * self.ff(modulate(self.norm3(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, d: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.proj = nn.Linear(d, out)
        zero_init(self.adaln[-1])
        zero_init(self.proj)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln(c).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


# ---------------------------------------------------------------- conditions (shared with FIT)

def init_weights(model: nn.Module) -> None:
    """Xavier for linears that are not deliberately zero (adaLN-zero, cross-attn out, final);
    small normal for the timestep MLP (``model.t_embed``)."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not getattr(m, "_zero_init", False):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.t_embed[0].weight, std=0.02)
    nn.init.normal_(model.t_embed[2].weight, std=0.02)


class ConditionMixin:
    """Null tokens, the DC-LDM second stream and the dataset-ID embedding, as both backbones
    build and apply them (the model sets ``cfg``, ``cond2_proj`` and calls
    :meth:`_build_conditions`)."""

    def _build_conditions(self, d: int, rows: int) -> None:
        cfg = self.cfg
        null = torch.randn(rows, d) * 0.02  # drawn either way: the same seed gives the same other weights
        if cfg.null_cond == "learned":  # row 0: text stream, row 1: second stream (FIT: row 2, the extra vector)
            self.null_tokens = nn.Parameter(null)
        elif cfg.null_cond == "zero":
            self.register_buffer("null_tokens", torch.zeros_like(null))
        else:
            raise ValueError(f"null_cond must be 'learned' or 'zero', not {cfg.null_cond!r}")
        self.source_embed = None
        if cfg.sources:
            check_vocab(cfg.sources)
            self.source_embed = nn.Embedding(len(cfg.sources), d)
            nn.init.normal_(self.source_embed.weight, std=0.02)

    def _finish(self, seq: torch.Tensor, mask: torch.Tensor | None, drop: torch.Tensor | None,
                row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask guard, then put the null token (and a one-key mask) in the rows flagged ``drop``."""
        b, n = seq.shape[:2]
        mask = torch.ones(b, n, dtype=torch.bool, device=seq.device) if mask is None else mask.bool().clone()
        mask[:, 0] |= ~mask.any(1)  # a row with no valid key would make attention NaN
        if drop is not None:
            null_seq = torch.zeros_like(seq)
            null_seq[:, 0] = self.null_tokens[row].to(seq.dtype)
            null_mask = torch.zeros_like(mask)
            null_mask[:, 0] = True
            seq = torch.where(drop[:, None, None], null_seq, seq)
            mask = torch.where(drop[:, None], null_mask, mask)
        return seq, mask

    def _null(self, b: int, row: int, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.null_tokens[row].to(ref.dtype).expand(b, 1, -1)
        return seq, torch.ones(b, 1, dtype=torch.bool, device=ref.device)

    def _second_stream(self, b: int, ref: torch.Tensor, context2, context2_mask, drop):
        """(ctx2, mask2) projected to the width, or (None, None) for a model without one."""
        if self.cond2_proj is None:
            return None, None
        if context2 is None:
            return self._null(b, 1, ref)
        return self._finish(self.cond2_proj(context2), context2_mask, drop, 1)

    def _with_source(self, c: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """The global condition plus the dataset-ID embedding (id 0 = unknown when not given)."""
        if self.source_embed is None:
            if source is not None:
                raise ValueError("this model has no dataset-ID conditioning (its config has no sources)")
            return c
        if source is None:
            source = torch.zeros(c.shape[0], dtype=torch.long, device=c.device)
        elif source.dim() == 0:
            source = source.expand(c.shape[0])
        return c + self.source_embed(source.long()).to(c.dtype)


# ---------------------------------------------------------------- model

class DiT(ConditionMixin, nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        if cfg.grid_freq < 1 or (cfg.grid_freq > 1 and cfg.head_dim() % 4):
            raise ValueError(f"grid_freq {cfg.grid_freq}: must be >= 1, and > 1 (2D RoPE) needs hidden / heads "
                             "divisible by 4")
        self.x_embed = nn.Linear(cfg.in_channels, d)
        self.frame_embed = nn.Embedding(2, d)  # 0 = clean (given) frame, 1 = noised frame
        self.t_embed = nn.Sequential(nn.Linear(cfg.time_freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        # adaLN-zero (DiT): gates start at 0, so every block starts as the identity
        self.adaln_shared = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(d, 6 * d))) if cfg.adaln == "sola" else None
        self.cond_proj = nn.Linear(cfg.cond_dim, d)
        self.extra_proj = nn.Linear(cfg.cond_extra_dim, d) if cfg.cond_extra_dim else None
        self.cond2_proj = nn.Linear(cfg.cond2_dim, d) if cfg.cond2_dim else None
        if cfg.cross_attn2_blocks and not cfg.cond2_dim:
            raise ValueError("cross_attn2_blocks needs cond2_dim > 0")
        self._build_conditions(d, 2)
        half = cfg.depth // 2 if cfg.long_skip else 0
        self.n_skip = half
        self.blocks = nn.ModuleList(
            DiTBlock(cfg, long_skip=i >= cfg.depth - half, cross2=i in cfg.cross_attn2_blocks)
            for i in range(cfg.depth)
        )
        self.final = FinalLayer(d, cfg.in_channels)
        init_weights(self)

    # -- conditions

    def embed_condition(self, b: int, ref: torch.Tensor, context=None, context_mask=None, extra=None,
                        context2=None, context2_mask=None, drop=None):
        """Project the condition streams to the width -> (ctx, mask, ctx2, mask2); ctx2 None if unused."""
        if context is None:
            ctx, m = self._null(b, 0, ref)
        else:
            ctx, m = self.cond_proj(context), context_mask
            if self.extra_proj is not None:  # GenAu: the extra vector becomes a leading token
                if extra is None:
                    raise ValueError("this DiT was built with cond_extra_dim: pass `extra`")
                ctx = torch.cat([self.extra_proj(extra)[:, None], ctx], dim=1)
                if m is not None:
                    m = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=m.device), m.bool()], dim=1)
            ctx, m = self._finish(ctx, m, drop, 0)
        ctx2, m2 = self._second_stream(b, ref, context2, context2_mask, drop)
        return ctx, m, ctx2, m2

    # -- forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                context2: torch.Tensor | None = None, context2_mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None,
                source: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        if t.dim() == 0:
            t = t.expand(b)
        h = self.x_embed(x)
        fm = torch.ones(b, n, dtype=torch.long, device=x.device) if frame_mask is None else frame_mask.long()
        h = h + self.frame_embed(fm)
        c = self._with_source(self.t_embed(timestep_embedding(t, self.cfg.time_freq_dim).to(h.dtype)), source)
        shared = self.adaln_shared(c) if self.adaln_shared is not None else None
        ctx, m, ctx2, m2 = self.embed_condition(b, h, context, context_mask, extra, context2, context2_mask, drop)
        if n % self.cfg.grid_freq:
            raise ValueError(f"{n} tokens is not a whole number of frames of {self.cfg.grid_freq} frequency rows")
        rope = grid_rope_tables(n, self.cfg.grid_freq, self.cfg.hidden // self.cfg.heads, self.cfg.rope_base, x.device)
        skips: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            skip = skips.pop() if blk.skip_fuse is not None else None
            h = blk(h, c, shared, rope, ctx, m, ctx2, m2, skip)
            if i < self.n_skip:
                skips.append(h)
        return self.final(h, c)
