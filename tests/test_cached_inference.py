"""AudioCache (layer caching) and LiteFocus sparse attention on tiny real models.

A toy DiT with the project's block contract (blocks[i].self_attn / cross_attn / ff /
optional cross_attn2, a hookable ``self_attn.attention`` core, CFG in one forward) is
defined here; the real ``soundlake.generation.dit.DiT`` is exercised with a tiny config too.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soundlake.generation.dit import ScaledDotProductAttention, attention_core
from soundlake.generation.inference.audiocache import (
    AudioCache,
    CacheProfile,
    ProfileMismatch,
    calibrate,
    layer_names,
    load_or_calibrate,
    model_hash,
    plan_refreshes,
    profile_path,
)
from soundlake.generation.inference.hooks import HOOK_ATTR, HookRegistry
from soundlake.generation.inference.litefocus import (
    HOOK_NAME,
    FocusAttention,
    SparseAttention,
    attach_sparse_attention,
    dense_band_mask,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- toy DiT


class ToySelfAttn(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        attention_core(self)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(self.attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class ToyCrossAttn(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x, ctx):
        k, v = self.kv(ctx).chunk(2, -1)
        return self.out(F.scaled_dot_product_attention(self.q(x), k, v))


class ToyFF(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return self.net(x)


class ToyBlock(nn.Module):
    def __init__(self, d: int, heads: int, cross2: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.self_attn = ToySelfAttn(d, heads)
        self.cross_attn = ToyCrossAttn(d)
        self.cross_attn2 = ToyCrossAttn(d) if cross2 else None
        self.ff = ToyFF(d)
        self.gate = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x, ctx):
        x = x + self.gate * self.self_attn(self.norm(x))
        x = x + self.cross_attn(self.norm(x), ctx)
        if self.cross_attn2 is not None:
            x = x + self.cross_attn2(self.norm(x), ctx)
        return x + self.gate * self.ff(self.norm(x))


class ToyDiT(nn.Module):
    def __init__(self, c: int = 4, d: int = 16, heads: int = 2, depth: int = 3):
        super().__init__()
        self.inp, self.outp = nn.Linear(c, d), nn.Linear(d, c)
        self.t = nn.Linear(1, d)
        self.blocks = nn.ModuleList(ToyBlock(d, heads, cross2=(i == 1)) for i in range(depth))

    def forward(self, x, t, ctx):
        h = self.inp(x) + self.t(t.float().view(-1, 1, 1).expand(-1, 1, 1))
        for blk in self.blocks:
            h = blk(h, ctx)
        return self.outp(h)


@torch.no_grad()
def euler_cfg(model, x, ctx, steps, guidance=3.0, callback=None):
    """Euler sampler; CFG batches cond and uncond rows in ONE model call per step."""
    null = torch.zeros_like(ctx)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        v = model(torch.cat([x, x]), ts[i].expand(2 * len(x)), torch.cat([ctx, null]))
        vc, vu = v.chunk(2)
        x = x + (ts[i + 1] - ts[i]) * (vu + guidance * (vc - vu))
        if callback is not None:
            callback(i, ts[i], x)
    return x


def make_toy(seed=0):
    torch.manual_seed(seed)
    return ToyDiT().eval()


def inputs(seed, b=2, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 4, generator=g), torch.randn(b, 5, 16, generator=g)


def toy_profile(model, steps=10, layers=None):
    layers = layers or layer_names(model)
    prompts = [inputs(s) for s in range(3)]
    return calibrate(model, layers, lambda p: euler_cfg(model, *p, steps), prompts, steps,
                     sampler="euler_cfg")


def hook_free(model):
    """No module, the unregistered attention cores included, carries a hook or a forward
    of its own."""
    mods = list(model.modules())
    mods += [m.attention for m in mods if isinstance(getattr(m, "attention", None), nn.Module)]
    return all(not ({"forward", HOOK_ATTR} & m.__dict__.keys())
               and m.forward.__func__ is type(m).forward for m in mods)


def count_calls(model, names):
    """Count real executions of each layer's inner computation (forward hooks on its
    children run only when the layer's own forward actually runs)."""
    counts = {n: 0 for n in names}
    handles = []
    for n in names:
        child = next(model.get_submodule(n).children())

        def hook(*_, n=n):
            counts[n] += 1
        handles.append(child.register_forward_hook(hook))
    return counts, handles


# --------------------------------------------------------------------------- AudioCache


def test_layer_names_explicit():
    m = make_toy()
    names = layer_names(m)
    assert names[:3] == ["blocks.0.self_attn", "blocks.0.cross_attn", "blocks.0.ff"]
    assert "blocks.1.cross_attn2" in names and "blocks.0.cross_attn2" not in names
    assert len(names) == 3 * 3 + 1
    with pytest.raises(KeyError):
        layer_names(m, kinds=("self_attn", "mlp"))


def test_calibration_profile_shape_and_eq1():
    m = make_toy()
    p = toy_profile(m, steps=6)
    assert p.mean.shape == p.std.shape == (10, 6)
    assert p.num_prompts == 3 and p.model_hash == model_hash(m)
    assert (p.mean[:, 0] == 0).all() and (p.mean[:, 1:] > 0).all()
    # Eq. 1 of the paper by hand, for one layer and one prompt. The paper indexes diffusion
    # time, which counts down: E_t = ||L_t - L_{t+1}||_1 / ||L_t||_1 with L_{t+1} computed
    # one sampling step before L_t. Here outs[k] is the k-th call in sampling order, so the
    # paper's L_t is outs[k] and its L_{t+1} is outs[k - 1].
    outs = []
    h = m.blocks[2].ff.register_forward_hook(lambda mod, a, o: outs.append(o.clone()))
    euler_cfg(m, *inputs(0), 6)
    h.remove()
    paper_L = {5 - k: outs[k] for k in range(6)}   # diffusion time t = 5 .. 0
    r = [float((paper_L[t] - paper_L[t + 1]).abs().sum() / paper_L[t].abs().sum()) for t in range(4, -1, -1)]
    one = calibrate(m, ["blocks.2.ff"], lambda pr: euler_cfg(m, *pr, 6), [inputs(0)], 6)
    np.testing.assert_allclose(one.mean[0, 1:], r, rtol=1e-6)
    assert (one.std == 0).all()


@pytest.mark.parametrize("mode", ["delta0", "disabled"])
def test_cache_off_and_delta_zero_identical(mode):
    m = make_toy()
    p = toy_profile(m)
    x, ctx = inputs(7)
    ref = euler_cfg(m, x, ctx, 10)
    cache = AudioCache(m, p, delta=0.0) if mode == "delta0" else AudioCache(m, p, delta=1e9, enabled=False)
    with cache:
        with cache.run(10):
            out = euler_cfg(m, x, ctx, 10)
        assert torch.equal(out, ref)
        s = cache.stats()
        assert s["reused"] == 0 and s["computed"] == 10 * len(p.layers)
    assert torch.equal(euler_cfg(m, x, ctx, 10), ref)


def test_caching_changes_output_and_saves_work():
    m = make_toy()
    p = toy_profile(m)
    x, ctx = inputs(7)
    ref = euler_cfg(m, x, ctx, 10)
    counts, handles = count_calls(m, p.layers)
    with AudioCache(m, p, delta=float(np.median(p.mean[:, 1:])) * 3) as cache:
        with cache.run(10):
            out = euler_cfg(m, x, ctx, 10)
        s = cache.stats()
    for h in handles:
        h.remove()
    assert s["reused"] > 0 and s["total"] == 10 * len(p.layers)
    # a skipped layer does no work: real executions == counted computations
    assert counts == {n: v["computed"] for n, v in s["per_layer"].items()}
    assert not torch.equal(out, ref)  # reuse is an approximation...
    assert (out - ref).abs().max() < 10 * ref.abs().max()  # ...of the same trajectory


def test_constant_layer_always_reused_after_first_step():
    m = make_toy()
    ff = m.blocks[1].ff
    with torch.no_grad():  # output no longer depends on the input: a constant
        ff.net[0].weight.zero_()
    steps = 8
    p = toy_profile(m, steps, layers=["blocks.1.ff", "blocks.1.self_attn"])
    assert (p.mean[0] == 0).all() and (p.mean[1, 1:] > 0).all()
    x, ctx = inputs(3)
    ref = euler_cfg(m, x, ctx, steps)
    counts, handles = count_calls(m, ["blocks.1.ff"])
    computed_at = []
    cache = AudioCache(m, p, delta=p.mean[1, 1:].min() / 2)  # self_attn: always recomputed
    orig = ff.forward
    h = ff.net.register_forward_hook(lambda *a: computed_at.append(cache.step))
    with cache:
        with cache.run(steps):
            out = euler_cfg(m, x, ctx, steps)
    h.remove()
    for hh in handles:
        hh.remove()
    s = cache.stats()["per_layer"]
    assert s["blocks.1.ff"] == {"computed": 2, "reused": steps - 2}
    assert computed_at == [0, steps - 1]  # first and last steps computed
    assert s["blocks.1.self_attn"] == {"computed": steps, "reused": 0}
    assert torch.equal(out, ref)  # reusing a constant is exact
    assert ff.forward == orig


def test_model_untouched_by_hooks():
    m = make_toy()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = toy_profile(m)
    mods = [m, *(m.get_submodule(n) for n in p.layers)]
    assert all("forward" not in mod.__dict__ for mod in mods)
    cache = AudioCache(m, p, delta=0.5).attach()
    assert all("forward" in mod.__dict__ for mod in mods)
    with cache.run(10):
        euler_cfg(m, *inputs(1), 10)
    assert m.state_dict().keys() == before.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    cache.remove()
    assert hook_free(m)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    assert model_hash(m) == p.model_hash


def simulate(rates, delta, steps, max_reuse=None):
    """Independent reference of Eq. 2: per layer, the steps at which it computes."""
    out = []
    for curve in rates:
        acc, streak, comp = 0.0, 0, []
        for t in range(steps):
            acc = acc + curve[t] if t else 0.0
            if t in (0, steps - 1) or acc >= delta or (max_reuse is not None and streak >= max_reuse):
                comp.append(t)
                acc, streak = 0.0, 0
            else:
                streak += 1
        out.append(comp)
    return out


@pytest.mark.parametrize("max_reuse", [None, 1])
def test_stats_match_eq2(max_reuse):
    m = make_toy()
    p = toy_profile(m)
    delta = float(np.quantile(p.mean[:, 1:], 0.7)) * 2
    expected = simulate(p.mean, delta, 10, max_reuse)
    cache = AudioCache(m, p, delta=delta, max_reuse=max_reuse).attach()
    for _ in range(2):  # per-run state reset: the second run counts the same
        with cache.run(10):
            euler_cfg(m, *inputs(2), 10)
        s = cache.stats()
        for name, comp in zip(p.layers, expected):
            assert s["per_layer"][name] == {"computed": len(comp), "reused": 10 - len(comp)}
    cache.remove()
    assert sum(10 - len(c) for c in expected) == s["reused"] > 0
    if max_reuse == 1:
        assert all(b - a <= 2 for comp in expected for a, b in zip(comp, comp[1:]))


def test_profile_roundtrip_and_step_mapping(tmp_path):
    m = make_toy()
    p = toy_profile(m, steps=6)
    for path in (profile_path(tmp_path, "euler_cfg", 6), tmp_path / "p.npz"):
        q = CacheProfile.load(p.save(path))
        assert q.layers == p.layers and q.steps == 6 and q.sampler == "euler_cfg"
        assert q.model_hash == p.model_hash and q.num_prompts == 3
        np.testing.assert_array_equal(q.mean, p.mean)
        np.testing.assert_array_equal(q.std, p.std)
    # other step counts: interpolated, total change over the run preserved
    for n in (3, 11, 25):
        r = p.rates_for(n)
        assert r.shape == (len(p.layers), n) and (r[:, 0] == 0).all()
        np.testing.assert_allclose(r.sum(1), p.mean.sum(1), rtol=0.25)
    np.testing.assert_array_equal(p.rates_for(6), p.mean)
    # and a cached run with another step count works
    cache = AudioCache(m, p, delta=0.3).attach()
    with cache.run(15):
        euler_cfg(m, *inputs(0), 15)
    assert cache.stats()["total"] == 15 * len(p.layers)
    with pytest.raises(RuntimeError, match="4 steps of 1 model call"):
        with cache.run(4):
            euler_cfg(m, *inputs(0), 5)
    cache.remove()


def test_profile_for_other_model_refused():
    p = toy_profile(make_toy(0), steps=4)
    other = make_toy(1)
    with pytest.raises(ProfileMismatch, match="recalibrate"):
        AudioCache(other, p)
    AudioCache(other, p, check_model=False)  # explicit override allowed
    with pytest.raises(ProfileMismatch):
        AudioCache(nn.Sequential(nn.Linear(2, 2)), p, check_model=False)


# --------------------------------------------------------------------------- LiteFocus


def qkv(b=2, h=2, n=96, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("freq_bins", [None, 4])
def test_sparse_ratio_one_is_full_attention(freq_bins):
    q, k, v = qkv()
    attn = SparseAttention(window=9, ratio=1.0, seed=3, freq_bins=freq_bins, chunk=16)
    full = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attn(q, k, v), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("freq_bins,window", [(None, 9), (None, 1), (4, None), (4, 5)])
def test_band_only_equals_masked_dense(freq_bins, window):
    q, k, v = qkv()
    attn = SparseAttention(window=window, ratio=0.0, freq_bins=freq_bins, chunk=16)
    i = torch.arange(96)
    if freq_bins is None:  # the 1D band by hand: |i - j| <= window // 2
        mask = (i[:, None] - i[None]).abs() <= window // 2
    else:  # same frequency index (time-major layout: token = t * F + f)
        f, t = i % freq_bins, i // freq_bins
        mask = f[:, None] == f[None]
        if window is not None:
            mask &= (t[:, None] - t[None]).abs() <= window // 2
    assert torch.equal(dense_band_mask(96, window, freq_bins), mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attn(q, k, v), want, atol=1e-5, rtol=1e-5)


def test_random_keys_union_seeded():
    n, ratio = 96, 0.25
    a = SparseAttention(window=5, ratio=ratio, seed=1, chunk=16)
    band = dense_band_mask(n, 5)
    dense = torch.zeros(n, n, dtype=torch.bool)
    for c in a.plan(n):
        assert torch.equal(c.keys, torch.unique(c.keys))  # no key twice
        allowed = torch.ones(len(c.queries), len(c.keys), dtype=torch.bool) if c.mask is None else c.mask
        rows = torch.zeros(len(c.queries), n, dtype=torch.bool)
        rows[:, c.keys] = allowed
        # random part: exactly ceil(ratio * n) keys, shared by every query of the chunk
        rand = rows.all(0) & ~band[c.queries].any(0)
        assert rand.sum() <= math.ceil(ratio * n)
        assert (rows | band[c.queries]).equal(rows)  # band always included
        dense[c.queries] = rows
    assert (dense.sum(1) > band.sum(1)).any()
    assert dense.sum(1).max() <= band.sum(1).max() + math.ceil(ratio * n)
    q, k, v = qkv(n=n)
    torch.testing.assert_close(a(q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
                               atol=1e-5, rtol=1e-5)
    b = SparseAttention(window=5, ratio=ratio, seed=1, chunk=16)
    c = SparseAttention(window=5, ratio=ratio, seed=2, chunk=16)
    assert torch.equal(a(q, k, v), b(q, k, v))
    assert not torch.equal(a(q, k, v), c(q, k, v))


def test_sparse_key_padding_mask_and_min_tokens():
    q, k, v = qkv(n=32)
    keep = torch.ones(2, 1, 1, 32, dtype=torch.bool)
    keep[1, ..., 20:] = False
    a = SparseAttention(window=7, ratio=1.0, chunk=8)
    torch.testing.assert_close(a(q, k, v, attn_mask=keep),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=keep), atol=1e-5, rtol=1e-5)
    short = SparseAttention(window=1, ratio=0.0, min_tokens=32)  # at training length: exact
    torch.testing.assert_close(short(q, k, v), F.scaled_dot_product_attention(q, k, v))


def focus_by_eq1(q, k, v, focus_sets, keep=None):
    """LiteFocus Eq. 1 one query at a time: y_i = softmax(Q_i K_Fi^T / sqrt(d)) V_Fi, F_i a set
    of key indices (each key once), minus padded keys."""
    b, h, n, d = q.shape
    out = torch.empty_like(q)
    for bi in range(b):
        for i in range(n):
            fi = sorted(j for j in focus_sets[i] if keep is None or keep[bi, j])
            logits = torch.einsum("hd,hjd->hj", q[bi, :, i], k[bi, :, fi]) / math.sqrt(d)
            out[bi, :, i] = torch.einsum("hj,hjd->hd", torch.softmax(logits, dim=-1), v[bi, :, fi])
    return out


@pytest.mark.parametrize("ratio", [0.25, 0.0, 1.0])
def test_focus_attention_is_eqs_4_to_6(ratio):
    """F_i = S_i ∪ C: S_i = {j : j mod F = i mod F} (Eq. 5, time-major grid), C one random
    sample of floor(r * N) keys for the whole call (Eq. 6), no key counted twice."""
    n, f = 48, 4
    q, k, v = qkv(n=n)
    attn = FocusAttention(freq_bins=f, ratio=ratio, seed=5)
    got = attn(q, k, v)
    comp = attn.last_compensation.tolist()
    assert len(comp) == len(set(comp)) == math.floor(ratio * n)
    sets = [{j for j in range(n) if j % f == i % f} | set(comp) for i in range(n)]
    torch.testing.assert_close(got, focus_by_eq1(q, k, v, sets), atol=1e-5, rtol=1e-5)
    if ratio == 1.0:  # C is every key: exact attention
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_focus_attention_draws_one_set_per_call_from_its_seed():
    n = 64
    q, k, v = qkv(n=n)
    a, b, c = (FocusAttention(freq_bins=4, ratio=0.1, seed=s) for s in (1, 1, 2))
    draws_a = [(a(q, k, v), a.last_compensation) for _ in range(3)]
    draws_b = [(b(q, k, v), b.last_compensation) for _ in range(3)]
    for (ya, ca), (yb, cb) in zip(draws_a, draws_b):  # same seed: the same sequence of draws
        assert torch.equal(ca, cb) and torch.equal(ya, yb)
    assert not torch.equal(draws_a[0][1], draws_a[1][1])  # a fresh C at every call
    c(q, k, v)
    assert not torch.equal(c.last_compensation, draws_a[0][1])
    assert a.visited_fraction(n) == (n // 4 + math.floor(0.1 * n)) / n


def test_focus_attention_key_padding_and_exact_option():
    n, f = 32, 4
    q, k, v = qkv(n=n)
    keep = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keep[1, ..., 20:] = False
    attn = FocusAttention(freq_bins=f, ratio=0.5, seed=0)
    got = attn(q, k, v, attn_mask=keep)
    comp = set(attn.last_compensation.tolist())
    sets = [{j for j in range(n) if j % f == i % f} | comp for i in range(n)]
    torch.testing.assert_close(got, focus_by_eq1(q, k, v, sets, keep[:, 0, 0]), atol=1e-5, rtol=1e-5)
    exact = FocusAttention(freq_bins=f, ratio=0.0, min_tokens=n)  # up to the training length: exact
    torch.testing.assert_close(exact(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="multiple of freq_bins"):
        FocusAttention(freq_bins=5)(q, k, v)


def test_attach_focus_pattern_on_a_grid_dit():
    from soundlake.generation.dit import DiT, DiTConfig

    torch.manual_seed(0)
    dit = DiT(DiTConfig(in_channels=4, hidden=32, depth=3, heads=2, cond_dim=8, sola_rank=4, time_freq_dim=16,
                        grid_freq=4)).eval()
    with torch.no_grad():  # the zero-initialised (adaLN-zero) layers make an untrained DiT trivial
        for p in dit.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16 * 4, 4, generator=g), torch.full((2,), 500.0)
    ctx = torch.randn(2, 3, 8, generator=g)
    full = dit(x, t, context=ctx)
    with attach_sparse_attention(dit, blocks=range(3), ratio=1.0, freq_bins=4, pattern="focus", seed=3):
        assert isinstance(sparse_hook(dit, 2).attention, FocusAttention)
        assert sparse_hook(dit, 2).attention.seed == 5
        torch.testing.assert_close(dit(x, t, context=ctx), full, atol=1e-5, rtol=1e-5)
    with attach_sparse_attention(dit, blocks=range(3), ratio=0.1, freq_bins=4, pattern="focus"):
        assert not torch.allclose(dit(x, t, context=ctx), full, atol=1e-5)
    assert torch.equal(dit(x, t, context=ctx), full)
    with pytest.raises(ValueError, match="needs freq_bins"):
        attach_sparse_attention(dit, blocks=[0], pattern="focus")
    with pytest.raises(ValueError, match="pattern 'band'"):
        attach_sparse_attention(dit, blocks=[0], pattern="band")


def sparse_hook(model, i):
    return HookRegistry.of(model.blocks[i].self_attn.attention).get_hook(HOOK_NAME)


def test_attach_sparse_attention_per_block():
    m = make_toy()
    x, ctx = inputs(0, n=24)
    t = torch.zeros(2)
    ref = m(x, t, ctx)
    with attach_sparse_attention(m, blocks=[0, 2], window=3, ratio=1.0, seed=0, chunk=8):
        assert isinstance(sparse_hook(m, 0).attention, SparseAttention)
        assert sparse_hook(m, 1) is None
        assert sparse_hook(m, 2).attention.seed == 2
        torch.testing.assert_close(m(x, t, ctx), ref, atol=1e-5, rtol=1e-5)
    handle = attach_sparse_attention(m, blocks=[1], window=3, ratio=0.0)
    assert not torch.allclose(m(x, t, ctx), ref, atol=1e-4)
    with pytest.raises(ValueError, match="already registered"):  # block 1 taken: block 0 rolled back
        attach_sparse_attention(m, blocks=[0, 1], window=3, ratio=0.0)
    assert sparse_hook(m, 0) is None
    handle.detach()
    assert hook_free(m)
    assert all(isinstance(b.self_attn.attention, ScaledDotProductAttention) for b in m.blocks)
    assert torch.equal(m(x, t, ctx), ref)
    assert not any("attention" in name for name, _ in m.named_modules())  # the core stays unregistered
    m.blocks[0].self_attn.attention = F.scaled_dot_product_attention  # a plain callable: not hookable
    with pytest.raises(AttributeError, match="must be a module"):
        attach_sparse_attention(m, blocks=[0], window=3, ratio=0.0)


# --------------------------------------------------------------------------- real DiT


def tiny_dit():
    from soundlake.generation.dit import DiT, DiTConfig

    torch.manual_seed(0)
    m = DiT(DiTConfig(in_channels=4, hidden=32, depth=4, heads=2, cond_dim=8, sola_rank=4,
                      cond2_dim=8, cross_attn2_blocks=[1], time_freq_dim=16)).eval()
    with torch.no_grad():  # the zero-initialised (adaLN-zero) layers make an untrained DiT trivial
        for p in m.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    return m


def project_sampler(dit, sampler, frames=16):
    """(run(seed, steps=8, callback=None) -> latents, its condition): the project's own
    sampler on ``dit`` with a fixed random condition."""
    from soundlake.generation import diffusion
    from soundlake.generation.conditioning import Condition

    g = torch.Generator().manual_seed(1)
    cond = Condition(torch.randn(2, 3, 8, generator=g), torch.ones(2, 3, dtype=torch.bool),
                     context2=torch.randn(2, 2, 8, generator=g))
    sched = diffusion.Schedule(num_steps=100)

    def run(seed, steps=8, callback=None):
        return diffusion.sample(dit, (2, frames, 4), cond, steps=steps, sampler=sampler, cfg=3.0,
                                schedule=sched, callback=callback,
                                generator=torch.Generator().manual_seed(seed))[0]

    return run, cond


class CfgWrapper:
    """One DiT call per step with cond and uncond rows batched (drop flags)."""

    def __init__(self, dit, ctx, ctx2):
        self.dit, self.ctx, self.ctx2 = dit, ctx, ctx2

    def __call__(self, x, t, _ctx):
        b = len(x) // 2
        drop = torch.arange(2 * b) >= b
        return self.dit(x, t * 1000, context=self.ctx.repeat(2, 1, 1), context2=self.ctx2.repeat(2, 1, 1),
                        drop=drop)


def test_real_dit_cache_and_sparse():
    dit = tiny_dit()
    g = torch.Generator().manual_seed(0)
    ctx, ctx2 = torch.randn(2, 3, 8, generator=g), torch.randn(2, 2, 8, generator=g)
    x = torch.randn(2, 16, 4, generator=g)
    run = CfgWrapper(dit, ctx, ctx2)

    def sample(model_call, steps, x=x):
        # model_call goes through dit.__call__, so the top-level hook sees one call per step
        return euler_cfg(model_call, x, torch.zeros(2, 1, 1), steps)

    layers = layer_names(dit)
    assert "blocks.1.cross_attn2" in layers and "blocks.0.cross_attn2" not in layers
    prof = calibrate(dit, layers, lambda xx: sample(run, 8, xx), [x, x + 0.1], 8)
    ref = sample(run, 8)
    with AudioCache(dit, prof, delta=0.0) as cache:
        with cache.run(8):
            assert torch.equal(sample(run, 8), ref)
        cache.delta = float(np.median(prof.mean[:, 1:])) * 3
        with cache.run(8):
            approx = sample(run, 8)
        s = cache.stats()
    assert s["reused"] > 0 and s["total"] == 8 * len(layers)
    assert torch.isfinite(approx).all()
    assert all("forward" not in dit.get_submodule(n).__dict__ for n in layers)
    assert torch.equal(sample(run, 8), ref)
    t = torch.full((4,), 500.0)
    xx = torch.cat([x, x])
    kw = dict(context=ctx.repeat(2, 1, 1), drop=torch.arange(4) >= 2, context2=ctx2.repeat(2, 1, 1))
    full = dit(xx, t, **kw)
    with attach_sparse_attention(dit, blocks=range(4), window=5, ratio=1.0, chunk=4):
        torch.testing.assert_close(dit(xx, t, **kw), full, atol=1e-5, rtol=1e-5)
    with attach_sparse_attention(dit, blocks=[0, 3], window=5, ratio=0.2, chunk=4):
        assert not torch.allclose(dit(xx, t, **kw), full, atol=1e-5)
    assert torch.equal(dit(xx, t, **kw), full)


def test_cache_and_sparse_attention_together():
    """Both attached on one DiT (cache hooks on the layers, sparse hooks on the attention
    cores): the result does not depend on the attach order, detaching either leaves exactly
    the other, and detaching both leaves the model as it was."""
    dit, bare = tiny_dit(), tiny_dit()  # same weights; `bare` is never hooked
    # 32 frames: longer than the sparse band, so sparse attention matters
    sample, cond = project_sampler(dit, "euler", frames=32)
    prof = calibrate(dit, layer_names(dit), sample, [0], 8, sampler="euler")

    def run():
        return sample(5)

    plain = run()
    cache = AudioCache(dit, prof, delta=float(np.quantile(prof.mean[:, 1:], 0.5)) * 2, sampler="euler")

    def cached():
        with cache.run(8):
            return run()

    def sparse():
        return attach_sparse_attention(dit, blocks=[0, 3], window=5, ratio=0.2, chunk=4)

    with cache:
        cache_only = cached()
        cache_stats = cache.stats()
    with sparse():
        sparse_only = run()
    assert cache_stats["reused"] > 0 and not torch.equal(sparse_only, plain)
    both = []
    for sparse_first in (False, True):
        if sparse_first:
            handle = sparse()
            cache.attach()
        else:
            cache.attach()
            handle = sparse()
        both.append(cached())
        assert cache.stats() == cache_stats  # the refresh plan depends on the profile only
        handle.detach()
        assert torch.equal(cached(), cache_only)
        handle = sparse()
        cache.remove()
        assert torch.equal(run(), sparse_only)
        handle.detach()
        assert torch.equal(run(), plain) and hook_free(dit)
    assert torch.equal(both[0], both[1])
    assert not torch.equal(both[0], cache_only) and not torch.equal(both[0], sparse_only)
    # the forward of the detached model is the never-hooked model's, bit for bit
    x, t = torch.randn(4, 32, 4, generator=torch.Generator().manual_seed(2)), torch.full((4,), 500.0)
    kw = dict(context=cond.context.repeat(2, 1, 1), context2=cond.context2.repeat(2, 1, 1),
              drop=torch.arange(4) >= 2)
    assert torch.equal(dit(x, t, **kw), bare(x, t, **kw))


def test_load_or_calibrate_reuses_matching_profile(tmp_path):
    m = make_toy()
    calls = []

    def run(p):
        calls.append(1)
        return euler_cfg(m, *p, 4)
    a = load_or_calibrate(m, tmp_path, run, [inputs(0)], 4, sampler="euler_cfg")
    assert profile_path(tmp_path, "euler_cfg", 4).exists() and len(calls) == 1
    b = load_or_calibrate(m, tmp_path, run, [inputs(0)], 4, sampler="euler_cfg")
    assert len(calls) == 1 and np.array_equal(a.mean, b.mean)
    with torch.no_grad():
        m.blocks[0].gate.add_(1.0)  # a different model: recalibrated, not reused
    load_or_calibrate(m, tmp_path, run, [inputs(0)], 4, sampler="euler_cfg")
    assert len(calls) == 2


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_real_sampler_with_cache(sampler):
    """The project's own sampler (diffusion.sample, CFG batched in one forward)."""
    dit = tiny_dit()
    run, _ = project_sampler(dit, sampler)
    prof = calibrate(dit, layer_names(dit), run, [0, 1], 8, sampler=sampler)
    assert prof.sampler == sampler and (prof.mean[:, 1:] > 0).all()
    ref = run(5)
    seen = []
    with AudioCache(dit, prof, delta=0.0, sampler=sampler) as cache:
        with cache.run(8):
            assert torch.equal(run(5, callback=lambda i, t, x: seen.append(i)), ref)
        assert seen == list(range(8)) and cache.stats()["reused"] == 0
        cache.delta = float(np.quantile(prof.mean[:, 1:], 0.5)) * 2
        with cache.run(8):
            approx = run(5)
        assert cache.stats()["reused"] > 0 and torch.isfinite(approx).all()
        with cache.run(12):  # another step count: mapped onto the 8-step profile
            run(5, steps=12)
        assert cache.stats()["total"] == 12 * len(prof.layers)
    assert torch.equal(run(5), ref)


def test_heun_rates_between_first_calls_and_one_decision_per_step():
    """AudioCache on Heun as the paper states it: Eq. 1's rate of step t compares the layer's
    output at the FIRST model call of step t with that of step t-1 (written out here from
    outputs recorded by a plain forward hook), and Eq. 2 decides once per step: a layer
    computes at both calls of a refreshed step and at neither call of a reused one."""
    from soundlake.generation.diffusion import model_calls

    dit = tiny_dit()
    run, _ = project_sampler(dit, "heun")
    steps, layer = 6, "blocks.1.ff"
    outs = []
    handle = dit.get_submodule(layer).register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    run(0, steps=steps)
    handle.remove()
    assert len(outs) == model_calls("heun", steps) == 2 * steps - 1
    first = [outs[2 * t] for t in range(steps)]   # step t's first call
    want = [0.0] + [float((first[t] - first[t - 1]).abs().sum() / first[t].abs().sum()) for t in range(1, steps)]
    prof = calibrate(dit, [layer], lambda seed: run(seed, steps=steps), [0], steps, sampler="heun")
    assert prof.steps == steps
    np.testing.assert_allclose(prof.mean[0], want, rtol=1e-5)

    delta = float(np.median(want[1:])) * 1.5
    plan = plan_refreshes(prof.rates_for(steps), delta)[0]
    assert plan[0] and plan[-1] and not plan.all()
    seen = []   # (step, call of the step) at which the layer really ran: its inner Linear fired
    with AudioCache(dit, prof, delta=delta, sampler="heun") as cache:
        inner = dit.get_submodule(layer).net[0].register_forward_hook(
            lambda *_: seen.append((cache.step, cache.slot)))
        with cache.run(steps):
            run(0, steps=steps)
        inner.remove()
        assert cache.stats()["computed"] == len(seen)
        assert cache.stats()["total"] == model_calls("heun", steps)
    expected = [(t, k) for t in range(steps) if plan[t] for k in range(2 if t < steps - 1 else 1)]
    assert seen == expected


def test_fig3_comparison_reads_the_papers_claims_off_a_profile():
    from soundlake.generation.inference.evaluate import fig3_comparison, fig3_text

    layers = [f"blocks.{b}.{k}" for b in range(6) for k in ("self_attn", "ff")]
    steps = 10
    mean = np.zeros((len(layers), steps))
    for i, name in enumerate(layers):
        b = int(name.split(".")[1])
        # front blocks (0, 1) busy in steps 1-3, rear blocks (4, 5) in steps 4-6, all quiet after
        mean[i, 1:4] = 0.4 if b < 2 else 0.1
        mean[i, 4:7] = 0.3 if b >= 4 else 0.1
        mean[i, 7:] = 0.02
    prof = CacheProfile(layers, steps, mean, 0.1 * mean, "euler", "x", num_prompts=4)
    cmp = fig3_comparison(prof)
    assert cmp["prompt_spread"] == pytest.approx(0.1)
    assert cmp["activity"]["early"] == pytest.approx({"front": 0.4, "middle": 0.1, "rear": 0.1})
    assert all(cmp["claims"].values()), cmp
    assert "(differs)" not in fig3_text(cmp)
    # the opposite profile: rear blocks first, nothing settles, prompts disagree
    rising = mean[::-1] + np.linspace(0, 1, steps)
    flipped = CacheProfile(layers, steps, rising, 2 * rising, "euler", "x")
    claims = fig3_comparison(flipped)["claims"]
    assert not claims["early: front blocks most active"] and not claims["end: all layers converge"]
    assert not claims["consistent across prompts"]
    assert "(differs)" in fig3_text(fig3_comparison(flipped))
    two_blocks = CacheProfile(layers[:4], steps, mean[:4], mean[:4], "euler", "x")
    assert fig3_comparison(two_blocks) == {} and "too few" in fig3_text({})


def test_latent_drift_rises_with_delta_below_the_reuse_everything_floor():
    """AudioCache's trade-off on the project's DiT and its paper sampler (DPM++ 3M SDE): the
    final latents' relative L1 drift from exact sampling is 0 at δ = 0, grows with δ, and
    stays below the floor, a run that reuses every layer but at the forced first and last step."""
    dit = tiny_dit()
    run, _ = project_sampler(dit, "dpmpp_3m_sde")
    steps = 20
    prof = calibrate(dit, layer_names(dit), lambda seed: run(seed, steps=steps), [0, 1], steps, sampler="dpmpp_3m_sde")
    exact = run(5, steps=steps)
    step_rate = float(np.median(prof.mean[:, 1:]))
    drift = {}
    for delta in (0.0, step_rate, 3 * step_rate, 1e9):
        with AudioCache(dit, prof, delta=delta, sampler="dpmpp_3m_sde") as cache:
            with cache.run(steps):
                out = run(5, steps=steps)
            drift[delta] = float((out - exact).abs().sum() / exact.abs().sum())
            if delta == 1e9:   # the floor: each layer computed at the first and last step only
                assert cache.stats()["computed"] == 2 * len(prof.layers)
    d0, d1, d3, floor = drift.values()
    assert d0 == 0.0 and 0 < d1 < d3 < floor, drift
