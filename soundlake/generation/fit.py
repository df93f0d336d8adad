"""GenAu's FIT backbone: far-reaching interleaved transformer over latent frames [B, F, C].

After Chen & Li, "FIT: Far-reaching Interleaved Transformers" as GenAu revises it for 1D
audio latents ("Taming Data and Transformers for Audio Generation", Sec. 3.3 and the
released ``FITBlockV5``). Frames are cut into **patches** of ``patch_size`` frames (one token
each) and the patch tokens into contiguous **groups** of ``group_size``; each group owns
``latents_per_group`` learnable **latent tokens** (one shared table, the same for every
group, so any length works). One FIT block:

1. ``local_attn`` + ``local_ff`` on the patches, attention only **within a group** (RoPE
   over the position in the group; the last group's padding is masked out);
2. ``cross_attn``: every latent attends to the text tokens (T5 / MiniLM), then the optional
   ``cross_attn2`` to a DC-LDM second stream (GenAu: "immediately before the read");
3. ``read``: each group's latents attend to that group's patches (cross-attention);
4. ``self_attn`` + ``ff``: **global** self-attention among all latents (RoPE over the
   group index), the only path between groups;
5. ``write``: each group's patches attend to that group's latents.

Conditioning (GenAu's dual text encoder): the text tokens reach the latents through
``cross_attn``; the timestep, the ``extra`` vector (the CLAP text embedding) and the
dataset-ID embedding are summed into one global vector ``c`` that drives AdaLN-zero
modulation of the local and global layers and of the final layer. Classifier-free
guidance: ``drop`` replaces the text tokens, the second stream and the extra vector by
learned null values (the source id stays: see dit.py).

Differences from the paper, where it is silent or GenAu's code differs (README: "FIT"):
one local and one global layer per block (the released config has 2 + 4 in 2 blocks), so
every block exposes one layer of each kind to AudioCache and LiteFocus; patches and
latents share one width; AdaLN-zero (as the DiT) instead of conditioning tokens in the
context; a learned position-in-group embedding instead of a fixed-length one.

Structure contract (the DiT's names where the role matches; cache / sparse hooks)::

    model.blocks: nn.ModuleList[FITBlock]
    FITBlock.local_attn(h [B*G, S, D], rope, mask [B*G, S] | None) -> [B*G, S, D]  # within groups
    FITBlock.local_ff(h [B, P, D])                   -> [B, P, D]
    FITBlock.cross_attn(l [B, L, D], context, mask)  -> [B, L, D]   # latents -> text
    FITBlock.cross_attn2(l, context2, mask2)         -> [B, L, D]   (chosen blocks, else None)
    FITBlock.read(l [B*G, K, D], patches [B*G, S, D], mask) -> [B*G, K, D]
    FITBlock.self_attn(l [B, L, D], rope)            -> [B, L, D]   # global, among latents
    FITBlock.ff(l [B, L, D])                         -> [B, L, D]
    FITBlock.write(h [B*G, S, D], latents [B*G, K, D]) -> [B*G, S, D]
    (S = group_size, K = latents_per_group, G groups, P = G*S patches, L = G*K latents)

Every one of these is added to its residual stream out of place (AudioCache may return a
cached output); LiteFocus hooks ``blocks.i.self_attn.attention``, the global attention,
whose length grows with the audio (the local layers are bounded by the group already).

Public API::

    FITConfig(...)   # FITConfig.from_yaml("fit-tiny" | path); ``model.backbone: fit`` is accepted
    FIT(cfg).forward(...)                 # the DiT's signature and contract (dit.py)
    FIT.groups(frames) -> G;  FIT.num_latents(frames) -> G * latents_per_group
    group_mask(n_patches, group_size) -> BoolTensor [P, P]   # True where local attention may look
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from soundlake.generation.dit import (
    BackboneConfig,
    ConditionMixin,
    CrossAttention,
    FeedForward,
    FinalLayer,
    SelfAttention,
    adaln_head,
    init_weights,
    modulate,
    rope_tables,
    timestep_embedding,
    zero_init,
)


@dataclass
class FITConfig(BackboneConfig):
    BACKBONE: ClassVar[str] = "fit"
    in_channels: int = 64           # VAE latent channels (GenAu's 1D-VAE: 64)
    patch_size: int = 1             # latent frames per patch token (GenAu: 1)
    group_size: int = 32            # patches per group (GenAu: 32)
    latents_per_group: int = 32     # latent tokens per group (GenAu: 256 over its 8 groups)
    hidden: int = 256
    depth: int = 6                  # FIT blocks
    heads: int = 4
    mlp_ratio: float = 4.0
    cond_dim: int = 384             # text token width (MiniLM 384, FLAN-T5-large 1024)
    cond_extra_dim: int = 0         # GenAu's CLAP text vector, 0 = off
    cond2_dim: int = 0              # DC-LDM second stream width, 0 = off
    cross_attn2_blocks: list[int] = field(default_factory=list)
    adaln: str = "sola"             # "sola" (shared MLP + low-rank per block) | "full"
    sola_rank: int = 32
    qk_norm: bool = True
    rope_base: float = 10000.0
    null_cond: str = "learned"      # "learned" | "zero"
    time_freq_dim: int = 256
    sources: list[str] = field(default_factory=list)  # dataset-ID vocabulary ("unknown" first), [] = off


def group_mask(n_patches: int, group_size: int) -> torch.Tensor:
    """[P, P] block-diagonal: True where patch j is in patch i's group (local attention)."""
    g = torch.arange(n_patches) // group_size
    return g[:, None] == g[None, :]


def _grouped(h: torch.Tensor, size: int) -> torch.Tensor:
    """[B, G*size, D] -> [B*G, size, D] (contiguous groups; a view)."""
    return h.reshape(-1, size, h.shape[-1])


class FITBlock(nn.Module):
    def __init__(self, cfg: FITConfig, cross2: bool = False):
        super().__init__()
        d = cfg.hidden
        self.group_size, self.latents_per_group = cfg.group_size, cfg.latents_per_group
        plain = dict(elementwise_affine=False, eps=1e-6)
        # patch side (modulated, gated)
        self.norm_local = nn.LayerNorm(d, **plain)
        self.local_attn = SelfAttention(d, cfg.heads, cfg.qk_norm)
        self.norm_local_ff = nn.LayerNorm(d, **plain)
        self.local_ff = FeedForward(d, cfg.mlp_ratio)
        # latents <- conditions (pre-norm, zero-initialised output: an untrained model ignores them)
        self.norm_cross = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = CrossAttention(d, cfg.heads, cfg.qk_norm)
        self.norm_c2 = nn.LayerNorm(d, eps=1e-6) if cross2 else None
        self.cross_attn2 = CrossAttention(d, cfg.heads, cfg.qk_norm) if cross2 else None
        # read / write between a group's patches and its latents
        self.norm_read, self.norm_read_ctx = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.read = CrossAttention(d, cfg.heads, cfg.qk_norm)
        self.norm_write, self.norm_write_ctx = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.write = CrossAttention(d, cfg.heads, cfg.qk_norm)
        # latent side (global; modulated, gated)
        self.norm_global = nn.LayerNorm(d, **plain)
        self.self_attn = SelfAttention(d, cfg.heads, cfg.qk_norm)
        self.norm_global_ff = nn.LayerNorm(d, **plain)
        self.ff = FeedForward(d, cfg.mlp_ratio)
        self.adaln = adaln_head(cfg, 12)

    def forward(self, h, lat, c, shared, local_rope, global_rope, pmask, context, context_mask,
                context2=None, context2_mask=None):
        """h: patches [B, P, D]; lat: latents [B, L, D]; pmask: [B*G, S] real patches or None."""
        m = self.adaln(c) if shared is None else shared + self.adaln(c)
        (ps1, pc1, pg1, ps2, pc2, pg2, ls1, lc1, lg1, ls2, lc2, lg2) = m.chunk(12, dim=-1)
        s, k = self.group_size, self.latents_per_group
        b, p, d = h.shape
        # 1. local layers, within groups
        a = self.local_attn(_grouped(modulate(self.norm_local(h), ps1, pc1), s), local_rope, pmask)
        h = h + pg1[:, None] * a.reshape(b, p, d)
        h = h + pg2[:, None] * self.local_ff(modulate(self.norm_local_ff(h), ps2, pc2))
        # 2. latents read the conditions
        lat = lat + self.cross_attn(self.norm_cross(lat), context, context_mask)
        if self.cross_attn2 is not None:
            lat = lat + self.cross_attn2(self.norm_c2(lat), context2, context2_mask)
        # 3. read: each group's latents from its patches
        r = self.read(_grouped(self.norm_read(lat), k), _grouped(self.norm_read_ctx(h), s), pmask)
        lat = lat + r.reshape(lat.shape)
        # 4. global layers among all latents
        lat = lat + lg1[:, None] * self.self_attn(modulate(self.norm_global(lat), ls1, lc1), global_rope)
        lat = lat + lg2[:, None] * self.ff(modulate(self.norm_global_ff(lat), ls2, lc2))
        # 5. write: each group's patches from its latents
        w = self.write(_grouped(self.norm_write(h), s), _grouped(self.norm_write_ctx(lat), k))
        return h + w.reshape(b, p, d), lat


class FIT(ConditionMixin, nn.Module):
    def __init__(self, cfg: FITConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        cfg.head_dim()
        for key in ("patch_size", "group_size", "latents_per_group", "depth"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if cfg.cross_attn2_blocks and not cfg.cond2_dim:
            raise ValueError("cross_attn2_blocks needs cond2_dim > 0")
        # + 1 input channel per frame: the DiT's frame flag (1 = noised, 0 = given clean)
        self.x_embed = nn.Linear(cfg.patch_size * (cfg.in_channels + 1), d)
        self.group_pe = nn.Parameter(torch.randn(cfg.group_size, d) * 0.02)   # position in the group
        self.latents = nn.Parameter(torch.randn(cfg.latents_per_group, d) * 0.02)
        self.t_embed = nn.Sequential(nn.Linear(cfg.time_freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.adaln_shared = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(d, 12 * d))) if cfg.adaln == "sola" else None
        self.cond_proj = nn.Linear(cfg.cond_dim, d)
        self.extra_proj = nn.Linear(cfg.cond_extra_dim, d) if cfg.cond_extra_dim else None
        self.cond2_proj = nn.Linear(cfg.cond2_dim, d) if cfg.cond2_dim else None
        self._build_conditions(d, 3)  # null rows: text, second stream, extra vector
        self.blocks = nn.ModuleList(FITBlock(cfg, cross2=i in cfg.cross_attn2_blocks) for i in range(cfg.depth))
        self.final = FinalLayer(d, cfg.patch_size * cfg.in_channels)
        init_weights(self)

    # -- sizes

    def groups(self, frames: int) -> int:
        return math.ceil(math.ceil(frames / self.cfg.patch_size) / self.cfg.group_size)

    def num_latents(self, frames: int) -> int:
        """Global (latent) tokens for a sequence of ``frames`` latent frames."""
        return self.groups(frames) * self.cfg.latents_per_group

    # -- conditions

    def embed_condition(self, b: int, ref: torch.Tensor, context=None, context_mask=None, extra=None,
                        context2=None, context2_mask=None, drop=None):
        """-> (ctx, mask, ctx2, mask2, extra vector [B, D] or None), projected to the width."""
        if context is None:
            ctx, m = self._null(b, 0, ref)
        else:
            ctx, m = self._finish(self.cond_proj(context), context_mask, drop, 0)
        ctx2, m2 = self._second_stream(b, ref, context2, context2_mask, drop)
        vec = None
        if self.extra_proj is not None:
            null = self.null_tokens[2].to(ref.dtype).expand(b, -1)
            if context is None:  # no text at all (masked pretraining): the null vector too
                vec = null
            elif extra is None:
                raise ValueError("this FIT was built with cond_extra_dim: pass `extra`")
            else:
                vec = self.extra_proj(extra)
                if drop is not None:
                    vec = torch.where(drop[:, None], null, vec)
        return ctx, m, ctx2, m2, vec

    # -- forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                context2: torch.Tensor | None = None, context2_mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None,
                source: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        b, n, ch = x.shape
        if t.dim() == 0:
            t = t.expand(b)
        ps, s, k = cfg.patch_size, cfg.group_size, cfg.latents_per_group
        g = self.groups(n)
        frames = g * s * ps  # padded to whole groups of whole patches
        flag = torch.ones(b, n, device=x.device, dtype=x.dtype) if frame_mask is None else frame_mask.to(x.dtype)
        xin = F.pad(torch.cat([x, flag[..., None]], dim=-1), (0, 0, 0, frames - n))
        h = self.x_embed(xin.reshape(b, g * s, ps * (ch + 1)))
        h = h + self.group_pe.to(h.dtype).repeat(g, 1)
        real = math.ceil(n / ps)  # patches holding at least one real frame
        pmask = None
        if real < g * s:
            pmask = (torch.arange(g * s, device=x.device) < real).expand(b, -1).reshape(b * g, s)
        c = self.t_embed(timestep_embedding(t, cfg.time_freq_dim).to(h.dtype))
        ctx, m, ctx2, m2, vec = self.embed_condition(b, h, context, context_mask, extra, context2, context2_mask,
                                                     drop)
        if vec is not None:
            c = c + vec
        c = self._with_source(c, source)
        shared = self.adaln_shared(c) if self.adaln_shared is not None else None
        head = cfg.hidden // cfg.heads
        local_rope = rope_tables(s, head, cfg.rope_base, x.device)
        cos, sin = rope_tables(g, head, cfg.rope_base, x.device)
        global_rope = (cos.repeat_interleave(k, 0), sin.repeat_interleave(k, 0))  # a group's latents share its index
        lat = self.latents.to(h.dtype).repeat(g, 1).expand(b, -1, -1)
        for blk in self.blocks:
            h, lat = blk(h, lat, c, shared, local_rope, global_rope, pmask, ctx, m, ctx2, m2)
        out = self.final(h, c).reshape(b, frames, ch)
        return out[:, :n]


__all__ = ["FIT", "FITBlock", "FITConfig", "group_mask"]
