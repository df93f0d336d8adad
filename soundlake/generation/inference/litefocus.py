"""LiteFocus sparse self-attention for generating audio longer than training, two patterns.

``focus`` (:class:`FocusAttention`, the paper's, Eqs. 4-6) on a time x frequency token grid
(``freq_bins=F``, time-major, token ``t * F + f``): query ``i`` attends to every token of its
own frequency row and to one set ``C`` of ``floor(ratio * N)`` keys drawn per call, each key
once; one fused attention call per frequency row.

``window`` (:class:`SparseAttention`, for 1D latents, which have no frequency rows): each
query attends to the union (no key counted twice) of

* its **band**: on a 1D latent sequence, the keys within a local time window of width
  ``window`` centred on it (``|i - j| <= window // 2``); on a time x frequency token grid
  (``freq_bins=F``, tokens laid out time-major, index ``t * F + f``), the keys sharing its
  frequency index (optionally further limited to ``|t - t'| <= window // 2``);
* a **random fraction** ``ratio`` of all keys (``ceil(ratio * N)``), drawn without
  replacement from a seeded generator, fresh for each query chunk and shared by that
  chunk's queries (so each chunk is one small dense product, and every key is seen by some
  chunk), identical from call to call (the plan is cached per sequence length), so
  every sampler step attends the same way.

``ratio=1`` is exact full attention (every key is in the union); ``ratio=0`` is band only.
The cost is ``N * (chunk + window + ratio * N)`` dot products instead of ``N**2``: queries
are processed in contiguous chunks, each chunk gathers only its union of keys and runs
``F.scaled_dot_product_attention`` with a boolean mask over that small set.

Public API::

    FocusAttention(freq_bins, ratio=0.1, seed=0, min_tokens=0)(q, k, v, attn_mask=None, scale=None)
        # .last_compensation: the latest C; .visited_fraction(n)
    SparseAttention(window=256, ratio=0.1, seed=0, freq_bins=None, chunk=256, min_tokens=0)
        (q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None) -> Tensor
        # drop-in for F.scaled_dot_product_attention on [B, H, N, D]; sequences of at most
        # min_tokens tokens (e.g. the training length) use exact attention
    attach_sparse_attention(model, blocks, window, ratio, seed=0, freq_bins=None,
                            chunk=256, min_tokens=0, container="blocks", pattern="window") -> SparseHandle
        # hooks (``hooks.py``, name HOOK_NAME) the attention core module
        # model.<container>[i].self_attn.attention for i in blocks (block i gets seed + i);
        # handle.detach() (or `with` exit) removes them: the model is as before
    SparseAttentionHook(attention)      # the hook: new_forward computes ``attention(q, k, v, ...)``
    dense_band_mask(n, window, freq_bins=None) -> BoolTensor [N, N]   # the band, for tests

The hooks sit on the attention cores, below AudioCache's layer hooks (``self_attn``), so
both can be attached together in either order: a reused layer runs no attention at all.
On the FIT backbone (fit.py) ``self_attn`` is the global attention among its latent tokens
(``latents_per_group`` per group, in time order), so ``window`` and ``min_tokens`` count
latent tokens there; its local attention is already bounded by the group.

Only the default call shape is sparse: a key-padding mask broadcast over queries
(``[..., 1, N]`` boolean) is supported, other masks, dropout and causal attention raise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from soundlake.generation.inference.hooks import (
    ModelHook,
    find_modules,
    register_hooks,
    remove_hooks,
)

HOOK_NAME = "litefocus"  # the hook name on each attention core


def _positions(n: int, freq_bins: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, time) per token in sequence order."""
    idx = torch.arange(n)
    if freq_bins is None:
        return torch.zeros(n, dtype=torch.long), idx
    if n % freq_bins:
        raise ValueError(f"sequence length {n} is not a multiple of freq_bins={freq_bins}")
    return idx % freq_bins, idx // freq_bins


def dense_band_mask(n: int, window: int | None, freq_bins: int | None = None) -> torch.Tensor:
    """[N, N] True where key j is in query i's band."""
    g, t = _positions(n, freq_bins)
    m = g[:, None] == g[None, :]
    if window is not None:
        m &= (t[:, None] - t[None, :]).abs() <= window // 2
    return m


@dataclass
class _Chunk:
    queries: torch.Tensor  # [c] token indices
    keys: torch.Tensor  # [k] sorted unique token indices
    mask: torch.Tensor | None  # [c, k] bool, None when every pair is allowed


class _SparseCore:
    """What both patterns share: the ``F.scaled_dot_product_attention`` signature, exact
    attention up to ``min_tokens`` tokens, and the one call shape the sparse kernels take."""

    min_tokens = 0

    def sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, scale) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 **kwargs) -> torch.Tensor:
        n = q.shape[-2]
        if k.shape[-2] != n:
            raise ValueError("sparse attention is self-attention: q and k lengths must match")
        if n <= self.min_tokens:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, **kwargs)
        if dropout_p or is_causal or kwargs:
            raise NotImplementedError("sparse attention supports no dropout / causal / extra kwargs")
        if attn_mask is not None and (attn_mask.dtype != torch.bool or attn_mask.shape[-2] != 1):
            raise NotImplementedError("only boolean key-padding masks [..., 1, N] are supported")
        return self.sparse(q, k, v, attn_mask, scale)


class SparseAttention(_SparseCore):
    """Drop-in replacement for ``F.scaled_dot_product_attention`` (see module docstring)."""

    def __init__(self, window: int | None = 256, ratio: float = 0.1, seed: int = 0,
                 freq_bins: int | None = None, chunk: int = 256, min_tokens: int = 0):
        if window is None and freq_bins is None:
            raise ValueError("a 1D band needs a window")
        if window is not None and window < 1:
            raise ValueError("window must be >= 1")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("ratio must be in [0, 1]")
        self.window, self.ratio, self.seed = window, ratio, seed
        self.freq_bins, self.chunk, self.min_tokens = freq_bins, chunk, min_tokens
        self._plans: dict[int, list[_Chunk]] = {}
        self._on_device: dict[tuple[int, str], list[_Chunk]] = {}  # plans moved once per device

    def __repr__(self):
        return (f"SparseAttention(window={self.window}, ratio={self.ratio}, seed={self.seed}, "
                f"freq_bins={self.freq_bins}, chunk={self.chunk}, min_tokens={self.min_tokens})")

    def plan(self, n: int) -> list[_Chunk]:
        if n in self._plans:
            return self._plans[n]
        group, time = _positions(n, self.freq_bins)
        # Frequency-major order makes every band a contiguous run of that order.
        order = torch.argsort(group * n + time)
        gen = torch.Generator().manual_seed(self.seed)
        n_rand = math.ceil(self.ratio * n)
        half = None if self.window is None else self.window // 2
        chunks = []
        for g in torch.unique(group).tolist():
            members = order[group[order] == g]  # this group's tokens, by time
            for s in range(0, len(members), self.chunk):
                q = members[s:s + self.chunk]
                lo, hi = s, min(len(members), s + self.chunk)
                if half is not None:
                    lo, hi = max(0, lo - half), min(len(members), hi + half)
                else:
                    lo, hi = 0, len(members)
                band_keys = members[lo:hi]
                rand = torch.randperm(n, generator=gen)[:n_rand]
                keys = torch.unique(torch.cat([band_keys, rand]))  # sorted, no duplicates
                is_rand = torch.zeros(n, dtype=torch.bool)
                is_rand[rand] = True
                allowed = group[keys][None, :] == group[q][:, None]
                if half is not None:
                    allowed &= (time[keys][None, :] - time[q][:, None]).abs() <= half
                allowed |= is_rand[keys][None, :]
                chunks.append(_Chunk(q, keys, None if bool(allowed.all()) else allowed))
        self._plans[n] = chunks
        return chunks

    def sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, scale) -> torch.Tensor:
        n = q.shape[-2]
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        key = (n, str(q.device))
        if key not in self._on_device:
            self._on_device[key] = [
                _Chunk(c.queries.to(q.device), c.keys.to(q.device),
                       None if c.mask is None else c.mask.to(q.device)) for c in self.plan(n)]
        for c in self._on_device[key]:
            qi, ki, mask = c.queries, c.keys, c.mask
            if attn_mask is not None:
                km = attn_mask.index_select(-1, ki)
                mask = km if mask is None else (km & mask)
            out.index_copy_(-2, qi, F.scaled_dot_product_attention(
                q.index_select(-2, qi), k.index_select(-2, ki), v.index_select(-2, ki),
                attn_mask=mask, scale=scale))
        return out


class FocusAttention(_SparseCore):
    """LiteFocus as the paper states it (Eqs. 4-6), a drop-in for
    ``F.scaled_dot_product_attention`` on a time x frequency token grid (time-major, index
    ``t * F + f``, ``freq_bins = F``).

    Query ``i`` attends to ``F_i = S_i ∪ C``: ``S_i``, every token of its own frequency row
    (``j mod F == i mod F``, same-frequency focus), and ``C``, **one** set of ``floor(ratio * N)``
    keys drawn without replacement for the whole call (cross-frequency compensation), fresh at
    every call from this object's seeded generator. A key of ``C`` that is already in ``S_i``
    is counted once. ``last_compensation`` holds the latest ``C``.

    The kernel runs one fused, unmasked attention call per frequency row over that row's
    ``T`` tokens plus the ``C`` keys outside the row: at most ``N * (T + |C|)`` pairs instead
    of ``N**2`` (``1/F + ratio`` of them). Sequences of at most ``min_tokens`` tokens use
    exact attention (off by default: the paper sparsifies at every length).
    """

    def __init__(self, freq_bins: int, ratio: float = 0.1, seed: int = 0, min_tokens: int = 0):
        if freq_bins < 1:
            raise ValueError("freq_bins must be >= 1")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("ratio must be in [0, 1]")
        self.freq_bins, self.ratio, self.seed, self.min_tokens = freq_bins, ratio, seed, min_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.last_compensation: torch.Tensor | None = None

    def __repr__(self):
        return (f"FocusAttention(freq_bins={self.freq_bins}, ratio={self.ratio}, seed={self.seed}, "
                f"min_tokens={self.min_tokens})")

    def visited_fraction(self, n: int) -> float:
        """Share of the ``N**2`` query-key pairs the kernel computes, at most (a key of ``C``
        inside a row is counted once)."""
        return (n // self.freq_bins + math.floor(self.ratio * n)) / n

    def sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, scale) -> torch.Tensor:
        n, f = q.shape[-2], self.freq_bins
        if n % f:
            raise ValueError(f"sequence length {n} is not a multiple of freq_bins={f}")
        t = n // f
        comp = torch.randperm(n, generator=self.generator)[:math.floor(self.ratio * n)].sort().values
        self.last_compensation = comp
        comp = comp.to(q.device)
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        grid = out.unflatten(-2, (t, f))  # a view: [..., T, F, D]
        for row in range(f):
            # this row's tokens, then the compensation keys outside it: every key once, no mask,
            # so the fused kernel runs on just these T + |C \ S_i| keys
            keys = torch.cat([torch.arange(row, n, f, device=q.device), comp[comp % f != row]])
            mask = None if attn_mask is None else attn_mask.index_select(-1, keys)
            grid[..., row, :] = F.scaled_dot_product_attention(
                q[..., row::f, :], k.index_select(-2, keys), v.index_select(-2, keys), attn_mask=mask, scale=scale)
        return out


class SparseAttentionHook(ModelHook):
    """Replaces an attention core's forward (``F.scaled_dot_product_attention`` signature)."""

    def __init__(self, attention: SparseAttention | FocusAttention):
        self.attention = attention

    def new_forward(self, module, *args, **kwargs):
        return self.attention(*args, **kwargs)


@dataclass
class SparseHandle:
    """Removes the sparse-attention hooks from ``modules`` on ``detach()`` (an empty handle
    does nothing)."""

    modules: list[nn.Module] = field(default_factory=list)

    def detach(self) -> None:
        remove_hooks(self.modules, HOOK_NAME)
        self.modules.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


PATTERNS = ("focus", "window")


def attach_sparse_attention(model: nn.Module, blocks: Sequence[int], window: int | None = 256,
                            ratio: float = 0.1, seed: int = 0, freq_bins: int | None = None,
                            chunk: int = 256, min_tokens: int = 0,
                            container: str = "blocks", pattern: str = "window") -> SparseHandle:
    """Hook the self-attention core of the listed blocks with :class:`FocusAttention`
    (``pattern="focus"``, the paper's, on a grid of ``freq_bins`` rows; ``window`` and
    ``chunk`` unused) or :class:`SparseAttention` (``"window"``, the local band for 1D latents)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern {pattern!r}: expected one of {', '.join(PATTERNS)}")
    if pattern == "focus" and not freq_bins:
        raise ValueError("the focus pattern needs freq_bins (frequency rows of a 2D latent grid)")
    blocks = list(blocks)
    try:
        modules = find_modules(model, [f"{container}.{i}.self_attn.attention" for i in blocks])
    except LookupError as e:
        raise AttributeError(f"{e}: the attention core must be a module "
                             "(soundlake.generation.dit.ScaledDotProductAttention)") from None
    hooks = [SparseAttentionHook(FocusAttention(freq_bins, ratio, seed + i, min_tokens) if pattern == "focus" else
                                 SparseAttention(window, ratio, seed + i, freq_bins, chunk, min_tokens))
             for i in blocks]
    register_hooks(modules, hooks, HOOK_NAME)
    return SparseHandle(modules=modules)
