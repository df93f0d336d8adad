"""Generator models: waveform VAE, EzAudio-DiT, v-diffusion (schedule, losses, samplers, CFG)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from soundlake.generation.conditioning import (
    Condition,
    TextConditioner,
    build_condition,
)
from soundlake.generation.diffusion import (
    SAMPLERS,
    Schedule,
    cfg_combine,
    diffusion_train_step,
    masked_training_loss,
    model_calls,
    sample,
    span_mask,
    trailing_timesteps,
    training_loss,
)
from soundlake.generation.dit import DiT, DiTConfig, count_parameters
from soundlake.generation.vae import (
    VAEConfig,
    WaveVAE,
    build_discriminator,
    vae_train_step,
)

torch.set_num_threads(1)


def clips(n: int, seconds: float, sr: int, seed: int = 0) -> torch.Tensor:
    """[n, 1, T] mono clips from the synth source (its loudest window), else seeded tones."""
    size = int(seconds * sr)
    try:
        from soundlake.sources.synth import synth_clip
    except ImportError:
        synth_clip = None
    out = []
    rng = np.random.default_rng(seed)
    for i in range(n):
        if synth_clip is not None:  # synth scenes are multi-second: render 4 s, keep the busiest window
            a = np.asarray(synth_clip(seed, i, max(seconds, 4.0), sr)[1], dtype=np.float32).reshape(-1)
            hop = max(1, size // 4)
            starts = range(0, len(a) - size + 1, hop)
            start = max(starts, key=lambda s0: float(np.square(a[s0:s0 + size]).sum()))
            out.append(a[start:start + size])
        else:
            t = np.arange(size) / sr
            f = rng.uniform(100, 2000, size=2)
            env = np.exp(-rng.uniform(0, 4) * t)
            tone = np.sin(2 * np.pi * f[0] * t) + 0.5 * np.sin(2 * np.pi * f[1] * t)
            out.append((0.3 * env * tone).astype(np.float32))
    return torch.from_numpy(np.stack(out))[:, None]


def tiny_dit(**over) -> DiT:
    cfg = dataclasses.replace(DiTConfig(in_channels=8, hidden=64, depth=4, heads=4, cond_dim=24, sola_rank=8), **over)
    return DiT(cfg)


def cond_for(b: int, t: int = 5, dim: int = 24, seed: int = 0, **kw) -> Condition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, t - 2:] = False  # one padded row
    return Condition(torch.randn(b, t, dim, generator=g), mask, **kw)


def randomize_(model: torch.nn.Module, keep=lambda name: False, std: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not keep(name):
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("alpha") else 0.0))


# ---------------------------------------------------------------- VAE

def test_vae_latent_rate_and_decoded_length():
    torch.manual_seed(0)
    cfg = VAEConfig.from_yaml("vae-tiny")
    vae = WaveVAE(cfg)
    assert vae.hop == 320 and vae.latent_rate == 50.0
    seconds = 0.6
    wav = clips(2, seconds, cfg.sample_rate)
    post = vae.encode(wav)
    assert post.mean.shape == (2, cfg.latent_dim, round(seconds * vae.latent_rate))
    out = vae.decode(post.sample())
    assert out.shape == (2, 1, round(seconds * cfg.sample_rate))
    with pytest.raises(ValueError):
        vae.encode(wav[..., :-1])  # not a multiple of the hop


def test_vae_loss_falls():
    torch.manual_seed(0)
    cfg = dataclasses.replace(VAEConfig.from_yaml("vae-tiny"), channels=4, dilations=[1])  # lighter for CPU
    vae = WaveVAE(cfg)
    wav = clips(2, 0.2, cfg.sample_rate)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    logs = [vae_train_step(vae, opt, wav, cfg) for _ in range(30)]
    total = [lg["loss"] for lg in logs]
    recon = [lg["stft_sc"] + lg["stft_mag"] + lg["l1"] for lg in logs]
    assert all(math.isfinite(v) for v in total)
    assert np.mean(total[-5:]) < 0.8 * np.mean(total[:5]), total
    assert np.mean(recon[-5:]) < 0.8 * np.mean(recon[:5]), recon  # reconstruction itself improves


def test_vae_training_step_with_discriminator_batch2():
    torch.manual_seed(0)
    cfg = dataclasses.replace(VAEConfig.from_yaml("vae-tiny"), discriminator=True, disc_periods=[2, 3], disc_channels=4)
    vae, disc = WaveVAE(cfg), build_discriminator(cfg)
    assert disc is not None and build_discriminator(VAEConfig()) is None
    opt, dopt = torch.optim.Adam(vae.parameters(), 1e-3), torch.optim.Adam(disc.parameters(), 1e-3)
    wav = clips(2, 0.2, cfg.sample_rate)
    before = [p.detach().clone() for p in disc.parameters()]
    logs = vae_train_step(vae, opt, wav, cfg, disc, dopt)
    assert {"loss", "stft_sc", "stft_mag", "l1", "kl", "adv", "fm", "disc"} <= set(logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))


# ---------------------------------------------------------------- schedule and guidance

@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_schedule_zero_terminal_snr_and_monotone(kind):
    s = Schedule(kind=kind)
    ab = s.alphas_cumprod
    assert abs(float(ab[-1])) < 1e-8 and float(ab[-1]) == 0.0  # Lin et al.'s shift makes it exact
    assert bool((ab[1:] < ab[:-1]).all())
    assert float(ab[0]) == pytest.approx(float(Schedule(kind=kind, zero_terminal_snr=False).alphas_cumprod[0]))
    assert float(Schedule(kind=kind, zero_terminal_snr=False).alphas_cumprod[-1]) > 0  # the rescale did it
    assert bool((s.betas > 0).all()) and float(s.betas[-1]) == pytest.approx(1.0)


def test_trailing_timesteps_start_at_terminal_step():
    ts = trailing_timesteps(1000, 4)
    assert ts.tolist() == [999, 749, 499, 249]


def test_cfg_rescale_matches_hand_computation_for_both_axes():
    cond = torch.tensor([[[1.0, 3.0], [2.0, 6.0], [0.0, 1.0]]])    # [B=1, F=3, C=2]
    uncond = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]])
    scale, phi = 2.0, 0.5
    g = (uncond + scale * (cond - uncond)).numpy()[0]
    c = cond.numpy()[0]
    # all: one std over all 6 numbers (unbiased, as torch.std)
    r_all = g * c.std(ddof=1) / g.std(ddof=1)
    want_all = phi * r_all + (1 - phi) * g
    # time: one std per frame over its 2 channels
    r_time = g * c.std(axis=1, ddof=1, keepdims=True) / g.std(axis=1, ddof=1, keepdims=True)
    want_time = phi * r_time + (1 - phi) * g
    got_all = cfg_combine(cond, uncond, scale, phi, "all")[0].numpy()
    got_time = cfg_combine(cond, uncond, scale, phi, "time")[0].numpy()
    np.testing.assert_allclose(got_all, want_all, rtol=1e-5)
    np.testing.assert_allclose(got_time, want_time, rtol=1e-5)
    assert not np.allclose(got_all, got_time)
    np.testing.assert_allclose(cfg_combine(cond, uncond, scale, 0.0, "all")[0].numpy(), g)


# ---------------------------------------------------------------- DiT

def test_adaln_sola_has_fewer_parameters_than_full():
    for cfg in (DiTConfig.from_yaml("dit-tiny"), DiTConfig.from_yaml("dit-L")):
        with torch.device("meta"):  # counts without allocating
            sola = count_parameters(DiT(cfg))
            full = count_parameters(DiT(dataclasses.replace(cfg, adaln="full")))
        assert sola < full
    assert DiTConfig.from_yaml("dit-XL").depth == 28 and DiTConfig.from_yaml("dit-XL").hidden == 1152


@pytest.mark.parametrize("name, paper", [("dit-L", 596e6), ("dit-XL", 874e6)])
def test_ezaudio_configs_match_the_papers_parameter_counts(name, paper):
    """EzAudio's Table: EzAudio-L 596M, EzAudio-XL 874M parameters; the recipes, with the
    released configs' GEGLU feed-forward, SOLA rank and text width, are within 5 %."""
    with torch.device("meta"):  # counts without allocating
        n = count_parameters(DiT(DiTConfig.from_yaml(name)))
    assert abs(n - paper) / paper < 0.05, (name, n)


def test_geglu_feed_forward_by_hand():
    """GEGLU (Shazeer 2020): W2 (h * GELU(g)) + b2 with (h, g) the halves of W1 x + b1, GELU exact."""
    from soundlake.generation.dit import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(6, 2.0, "geglu").double()
    x = torch.randn(3, 6, dtype=torch.float64)
    w1, b1 = ff.net[0].weight, ff.net[0].bias
    w2, b2 = ff.net[2].weight, ff.net[2].bias
    assert w1.shape == (24, 6) and w2.shape == (6, 12)
    pre = x @ w1.T + b1
    h, g = pre[:, :12], pre[:, 12:]
    gelu = 0.5 * g * (1 + torch.special.erf(g / math.sqrt(2)))
    torch.testing.assert_close(ff(x), (h * gelu) @ w2.T + b2)
    with pytest.raises(ValueError, match="geglu"):
        FeedForward(6, 2.0, "relu")


def test_long_skips_pair_mirrored_blocks_and_fuse_by_linear_and_layernorm():
    """U-ViT long skips: block depth-1-i receives block i's output, fused as
    LayerNorm(W [x; skip] + b), checked against the LayerNorm formula by hand."""
    model = tiny_dit().double()
    randomize_(model)
    outs, fused = {}, {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
        if blk.skip_fuse is not None:
            blk.register_forward_pre_hook(lambda m, a, i=i: fused.__setitem__(i, (a[0], a[8])))
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    cond = cond_for(2)
    model(x, torch.tensor([3.0, 500.0]), context=cond.context.double(), context_mask=cond.mask)
    depth = len(model.blocks)
    assert sorted(fused) == [2, 3]
    for i, (h, skip) in fused.items():
        assert skip is outs[depth - 1 - i]
        blk = model.blocks[i]
        lin, ln = blk.skip_fuse
        z = torch.cat([h, skip], -1) @ lin.weight.T + lin.bias
        mean, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        want = (z - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias
        torch.testing.assert_close(blk.skip_fuse(torch.cat([h, skip], -1)), want)


def test_text_training_starts_with_zeroed_cross_attention_after_masked_pretraining():
    """EzAudio: masked pretraining runs cross-attention on the null token and trains it; text
    training then starts as if the module were new: output projections zero (their Adam
    moments gone), so any text gives the same output until it trains."""
    from soundlake.generation.diffusion import diffusion_train_step
    from soundlake.generation.dit import rezero_cross_attention

    torch.manual_seed(0)
    model = tiny_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        diffusion_train_step(model, opt, torch.randn(4, 9, 8), None, Schedule(), masked=True)
    outs = [blk.cross_attn.out for blk in model.blocks]
    assert all(float(o.weight.detach().abs().sum()) > 0 for o in outs)   # trained on the null token
    assert rezero_cross_attention(model, opt) == 4
    assert all(not o.weight.detach().any() and not o.bias.detach().any() for o in outs)
    assert all(o.weight not in opt.state and o.bias not in opt.state for o in outs)
    model.eval()
    x, t = torch.randn(2, 9, 8), torch.tensor([10.0, 700.0])
    a, b = cond_for(2, seed=1), cond_for(2, seed=2)
    torch.testing.assert_close(model(x, t, context=a.context, context_mask=a.mask),
                               model(x, t, context=b.context, context_mask=b.mask))


def test_structure_contract():
    model = tiny_dit(cond2_dim=6, cross_attn2_blocks=[1])
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 4
    for i, blk in enumerate(model.blocks):
        assert callable(blk.self_attn.attention) and callable(blk.cross_attn.attention)
        assert (blk.cross_attn2 is not None) == (i == 1)
    # long skips: the mirrored second half fuses the first half's outputs
    assert [b.skip_fuse is not None for b in model.blocks] == [False, False, True, True]
    # a swapped attention callable is what the block uses
    calls = []

    def spy(q, k, v, **kw):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)

    model.blocks[2].self_attn.attention = spy
    model(torch.randn(2, 10, 8), torch.tensor([3.0, 900.0]), **cond_for(2, context2=torch.randn(2, 3, 6)).as_kwargs())
    assert calls == [(2, 4, 10, 16)]


def _axial_rope_score(q, k, pq, pk, base):
    """The 2D RoPE score by its definition, in complex numbers: pair j of a head is
    z_j = x_j + i x_(j + Dh/2), turned by e^(i p θ_j); the first Dh/4 pairs take the frame as
    p, the rest the frequency row, each quarter with θ_m = base^(-m / (Dh/4))."""
    dh = q.numel()
    quarter = dh // 4
    theta = base ** (-np.arange(quarter) / quarter)
    theta = np.concatenate([theta, theta])
    p_q = np.array([pq[0]] * quarter + [pq[1]] * quarter, float)
    p_k = np.array([pk[0]] * quarter + [pk[1]] * quarter, float)
    zq = (q[:dh // 2] + 1j * q[dh // 2:]).numpy() * np.exp(1j * p_q * theta)
    zk = (k[:dh // 2] + 1j * k[dh // 2:]).numpy() * np.exp(1j * p_k * theta)
    return float(np.real(np.sum(zq * np.conj(zk))))


def test_2d_rope_scores_follow_time_and_frequency_offsets():
    """On a 2D mel latent (grid_freq rows per frame, time-major tokens) the DiT's RoPE is axial:
    a score depends on (frame offset, row offset) as the definition says, not on the token
    distance t * F + f, which the 1D RoPE would use."""
    from soundlake.generation.dit import apply_rope, grid_rope_tables, rope_tables

    grid, frames, dh, base = 4, 6, 16, 10000.0
    n = grid * frames
    cos, sin = grid_rope_tables(n, grid, dh, base, "cpu")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(dh, generator=g, dtype=torch.float64), torch.randn(dh, generator=g, dtype=torch.float64)
    rq = apply_rope(q.expand(n, dh), (cos.double(), sin.double()))
    rk = apply_rope(k.expand(n, dh), (cos.double(), sin.double()))
    scores = rq @ rk.T
    for a, b in [(0, 0), (5, 2), (9, 22), (23, 1), (7, 12)]:
        pa, pb = (a // grid, a % grid), (b // grid, b % grid)
        assert float(scores[a, b]) == pytest.approx(_axial_rope_score(q, k, pa, pb, base), abs=1e-5)
    # tokens 3 (frame 0, row 3) and 4 (frame 1, row 0) are neighbours in token order, far apart on the grid
    # (1D RoPE scores them as equals: one token apart)
    tables = tuple(t.double() for t in rope_tables(n, dh, base, "cpu"))
    one_d = apply_rope(q.expand(n, dh), tables) @ apply_rope(k.expand(n, dh), tables).T
    assert float(one_d[3, 4]) == pytest.approx(float(one_d[0, 1]), abs=1e-5)
    assert abs(float(scores[3, 4]) - float(scores[0, 1])) > 1e-2
    assert float(scores[4, 8]) == pytest.approx(float(scores[0, 4]), abs=1e-5)   # both (1 frame, 0 rows)
    # one row per frame is the 1D RoPE
    assert all(torch.equal(x, y) for x, y in zip(grid_rope_tables(n, 1, dh, base, "cpu"), rope_tables(n, dh, base, "cpu")))
    # a model on a 2D grid refuses a token count that is not whole frames, and head widths 2D RoPE cannot split
    m = DiT(DiTConfig(in_channels=4, hidden=32, depth=2, heads=2, cond_dim=8, sola_rank=4, grid_freq=grid))
    assert m(torch.randn(1, n, 4), torch.tensor([10])).shape == (1, n, 4)
    with pytest.raises(ValueError, match="whole number of frames"):
        m(torch.randn(1, n + 1, 4), torch.tensor([10]))
    with pytest.raises(ValueError, match="divisible by 4"):
        DiT(DiTConfig(in_channels=4, hidden=12, depth=2, heads=2, cond_dim=8, sola_rank=4, grid_freq=grid))


def test_rope_attention_logits_depend_only_on_the_relative_position():
    """RoPE (Su et al.): <R_m q, R_n k> is a function of m - n alone, and rotations keep norms."""
    from soundlake.generation.dit import apply_rope, rope_tables

    n, dh = 40, 16
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(dh, generator=g, dtype=torch.float64), torch.randn(dh, generator=g, dtype=torch.float64)
    tables = tuple(t.double() for t in rope_tables(n, dh, 10000.0, "cpu"))
    rq, rk = apply_rope(q.expand(n, dh), tables), apply_rope(k.expand(n, dh), tables)
    scores = rq @ rk.T
    for m, p, shift in [(3, 1, 7), (10, 25, 9), (0, 0, 30)]:
        assert float(scores[m, p]) == pytest.approx(float(scores[m + shift, p + shift]), abs=1e-5)  # fp32 tables
    assert float(scores[5, 2]) != pytest.approx(float(scores[2, 5]), abs=1e-6)   # but not symmetric in m - n
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(n))
    assert float(scores[0, 0]) == pytest.approx(float(q @ k), abs=1e-9)          # position 0: no rotation


def test_self_attention_with_qk_norm_by_hand():
    """QK-Norm: queries and keys RMS-normalised per head (learned gain) before RoPE and the
    scaled dot product; the output written out with plain tensor algebra."""
    from soundlake.generation.dit import SelfAttention, apply_rope, rope_tables

    torch.manual_seed(0)
    d, heads, n = 16, 2, 6
    attn = SelfAttention(d, heads, qk_norm=True).double()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, n, d, dtype=torch.float64)
    rope = tuple(t.double() for t in rope_tables(n, d // heads, 10000.0, "cpu"))
    got = attn(x, rope)

    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).view(n, 3, heads, d // heads).unbind(1)

    def rms(t, w):  # over the head's channels, eps as the module's (RMSNorm default: finfo eps)
        eps = torch.finfo(t.dtype).eps if attn.q_norm.eps is None else attn.q_norm.eps
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    outs = []
    for h in range(heads):
        qh = apply_rope(rms(q[:, h], attn.q_norm.weight), rope)
        kh = apply_rope(rms(k[:, h], attn.k_norm.weight), rope)
        w = torch.softmax(qh @ kh.T / math.sqrt(d // heads), dim=-1)
        outs.append(w @ v[:, h])
    want = torch.cat(outs, dim=-1) @ attn.out.weight.T + attn.out.bias
    torch.testing.assert_close(got[0], want)
    # and the norm is what makes q and k scale-free: scaling their projection changes nothing
    with torch.no_grad():
        attn.qkv.weight[: 2 * d] *= 7.0
        attn.qkv.bias[: 2 * d] *= 7.0
    torch.testing.assert_close(attn(x, rope), got)


def test_zero_init_cross_attention_makes_output_condition_independent():
    torch.manual_seed(0)
    model = tiny_dit(cond_extra_dim=5, cond2_dim=6, cross_attn2_blocks=[0, 2])
    out_proj = lambda n: ".cross_attn.out." in n or ".cross_attn2.out." in n  # noqa: E731
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if out_proj(n))
    randomize_(model, keep=out_proj)  # everything else non-trivial, so the output is not just 0
    x, t = torch.randn(2, 10, 8), torch.tensor([100.0, 700.0])
    c1 = cond_for(2, seed=1, extra=torch.randn(2, 5), context2=torch.randn(2, 3, 6))
    c2 = cond_for(2, seed=2, extra=torch.randn(2, 5), context2=torch.randn(2, 3, 6))
    y1, y2 = model(x, t, **c1.as_kwargs()), model(x, t, **c2.as_kwargs())
    assert y1.abs().mean() > 1e-3
    torch.testing.assert_close(y1, y2)
    assert not torch.allclose(y1, model(x + 1, t, **c1.as_kwargs()))
    randomize_(model, keep=lambda n: not out_proj(n), seed=3)  # now the condition reaches the output
    assert not torch.allclose(model(x, t, **c1.as_kwargs()), model(x, t, **c2.as_kwargs()))


def test_condition_dropout_uses_null_token():
    torch.manual_seed(0)
    model = tiny_dit()
    randomize_(model)
    x, t = torch.randn(2, 6, 8), torch.tensor([500.0, 500.0])
    drop = torch.tensor([True, True])
    a = model(x, t, **cond_for(2, seed=1).as_kwargs(), drop=drop)
    b = model(x, t, **cond_for(2, seed=2).as_kwargs(), drop=drop)
    torch.testing.assert_close(a, b)  # dropped rows see only the null token
    torch.testing.assert_close(a, model(x, t))  # ... the same as no condition at all


def test_dit_diffusion_loss_falls():
    torch.manual_seed(0)
    model = tiny_dit()
    sched = Schedule()
    # structured latents: 8 smooth patterns, each with its own "caption"
    base = torch.sin(torch.linspace(0, 6, 12)[None, :, None] * torch.arange(1, 9)[:, None, None] * 0.5
                     + torch.arange(8)[None, None, :].float())
    conds = cond_for(8, seed=4)

    def held_out_loss() -> float:  # same timesteps and noise before and after training
        with torch.no_grad():
            return training_loss(model, base.repeat(4, 1, 1), conds.repeat(4), sched, cond_drop=0.0,
                                 generator=torch.Generator().manual_seed(123))[0].item()

    before = held_out_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        assert math.isfinite(diffusion_train_step(model, opt, base, conds, sched, generator=g)["loss"])
    assert held_out_loss() < 0.8 * before


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    out, n = [], 0
    for v in row.tolist() + [False]:
        if v:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def test_span_masks_cover_a_quarter_to_all_in_spans_of_at_least_min_span():
    """EzAudio: 25-100 % of the tokens, in spans of at least 0.2 s (here 4 frames)."""
    mask = span_mask(400, 50, 0.25, 1.0, min_span=4, generator=torch.Generator().manual_seed(0))
    frac = mask.float().mean(1)
    assert bool((frac >= 0.25).all()) and float(frac.min()) < 0.35 and float(frac.max()) > 0.9
    assert all(min(_runs(row)) >= 4 for row in mask)
    assert any(len(_runs(row)) > 1 for row in mask)   # several spans, not one block


def test_masked_loss_keeps_unmasked_frames_clean():
    torch.manual_seed(0)
    model = tiny_dit()
    seen = {}
    model.register_forward_hook(lambda m, args, kw, out: seen.update(x=args[0], fm=kw["frame_mask"]), with_kwargs=True)
    x0 = torch.randn(16, 20, 8)
    loss, logs = masked_training_loss(model, x0, Schedule(), generator=torch.Generator().manual_seed(1), min_span=3)
    fm = seen["fm"]
    frac = fm.float().mean(1)
    assert bool(((frac >= 0.25 - 1e-6) & (frac <= 1.0)).all()) and bool((frac < 1).any())
    assert all(min(_runs(row)) >= 3 for row in fm)
    torch.testing.assert_close(seen["x"][~fm], x0[~fm])  # clean frames given as-is
    assert not torch.allclose(seen["x"][fm], x0[fm])
    assert math.isfinite(loss.item())


def test_stage_two_masks_partly_a_share_of_rows_with_text_and_whole_frames_on_2d_latents():
    """Text training (EzAudio stage 2): about partial_prob of the rows partly masked, the rest
    fully noised, the text given; on 2D latents every frequency row of a frame alike."""
    torch.manual_seed(0)
    model = tiny_dit(grid_freq=2)
    seen = {}
    model.register_forward_hook(lambda m, args, kw, out: seen.update(kw), with_kwargs=True)
    x0 = torch.randn(200, 12, 8)   # 6 frames x 2 rows
    cond = cond_for(200)
    _, logs = masked_training_loss(model, x0, Schedule(), generator=torch.Generator().manual_seed(2), min_span=2,
                                   grid_freq=2, cond=cond, cond_drop=0.1, partial_prob=0.25)
    fm = seen["frame_mask"]
    assert torch.equal(fm[:, 0::2], fm[:, 1::2])   # a frame's rows together
    partial = ~fm.all(1)
    assert 30 <= int(partial.sum()) <= 70 and logs["partial"] >= int(partial.sum())
    assert seen["context"] is cond.context and 5 <= int(seen["drop"].sum()) <= 40


# ---------------------------------------------------------------- sampling

class DiracDenoiser(torch.nn.Module):
    """Exact v-predictor for data that is a single point: the samplers must land on it."""

    def __init__(self, target: torch.Tensor, schedule: Schedule):
        super().__init__()
        self.target, self.ab = torch.nn.Parameter(target), schedule.alphas_cumprod

    def forward(self, x, t, drop=None, **kw):
        ab = self.ab[t.long()].float().view(-1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = (x - a * self.target) / s
        return a * eps - s * self.target


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_recover_a_dirac_distribution(sampler):
    sched = Schedule()
    target = torch.randn(1, 7, 3, generator=torch.Generator().manual_seed(0))
    err = {}
    for steps in (10, 40):
        out, meta = sample(DiracDenoiser(target, sched), (2, 7, 3), None, steps=steps, sampler=sampler,
                           schedule=sched, generator=torch.Generator().manual_seed(1))
        err[steps] = float((out - target).abs().max())
    assert meta["sampler"] == sampler and not meta["guided"]
    if sampler in ("euler", "heun"):  # ODE steps in the angle: the error shrinks with the step count
        assert err[40] < 0.05 and err[40] < err[10] / 2
    else:  # DDIM and DPM-Solver++ (2M, 3M SDE) are exact when the x0 prediction is constant
        assert err[10] < 1e-4 and err[40] < 1e-4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_calls_model_once_per_step_with_batched_cfg(sampler):
    torch.manual_seed(0)
    model = tiny_dit()
    randomize_(model)
    batches = []
    model.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    steps_seen = []
    cond = cond_for(2)
    lat, meta = sample(model, (2, 9, 8), cond, steps=6, sampler=sampler, cfg=3.0, rescale=0.7,
                       rescale_axis="time", generator=torch.Generator().manual_seed(0),
                       callback=lambda i, t, x: steps_seen.append((i, t, tuple(x.shape))))
    calls = 11 if sampler == "heun" else 6   # Heun: two calls per step, one in the last
    assert batches == [4] * calls and model_calls(sampler, 6) == calls  # cond + uncond rows in each call
    assert [s[0] for s in steps_seen] == list(range(6)) and steps_seen[0][1] == 999
    assert lat.shape == (2, 9, 8) and torch.isfinite(lat).all()
    assert meta["rescale_axis"] == "time" and meta["nfe"] == calls and meta["steps"] == 6
    # an explicit uncond condition of another length is padded into the same single call
    batches.clear()
    uncond = Condition(torch.zeros(2, 1, 24), torch.ones(2, 1, dtype=torch.bool))
    _, meta = sample(model, (2, 9, 8), cond, uncond, steps=3, sampler=sampler)
    assert batches == [4] * model_calls(sampler, 3) and meta["uncond"] == "explicit"


class GaussianDenoiser(torch.nn.Module):
    """Exact v-predictor for data drawn from N(mu, sd^2) per value: E[x0 | x_t] is linear in x_t.
    Its probability-flow ODE keeps z = (x_t - a mu) / sqrt(a^2 sd^2 + s^2) constant, so the exact
    state at every timestep is known from the starting noise."""

    def __init__(self, mu: float, sd: float, schedule: Schedule):
        super().__init__()
        self.mu, self.sd, self.ab = mu, sd, schedule.alphas_cumprod.double()
        self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def x0(self, x, t):
        ab = self.ab[t.long()].view(-1, *[1] * (x.dim() - 1))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        return self.mu + a * self.sd ** 2 / (a * a * self.sd ** 2 + s * s) * (x - a * self.mu)

    def forward(self, x, t, drop=None, **kw):
        x = x.double()
        ab = self.ab[t.long()].view(-1, *[1] * (x.dim() - 1))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = self.x0(x, t)
        return a * (x - a * x0) / s - s * x0


def test_heun_is_second_order_against_the_exact_ode_solution():
    """Heun's error at the last timestep before clean data (the final jump to t = 0 is left out:
    every sampler shares it) is far below Euler's at the same steps, and below Euler's with as
    many model calls."""
    sched, mu, sd = Schedule(), 0.5, 0.3
    model = GaussianDenoiser(mu, sd, sched)

    def error(sampler, steps):
        seen = {}
        _, meta = sample(model, (1, 500, 4), None, steps=steps, sampler=sampler, schedule=sched,
                         generator=torch.Generator().manual_seed(0), callback=lambda i, t, x: seen.update({i: x}))
        x_start = torch.randn((1, 500, 4), generator=torch.Generator().manual_seed(0)).double()
        ab = float(sched.alphas_cumprod[meta["timesteps"][-1]])
        exact = math.sqrt(ab) * mu + math.sqrt(ab * sd * sd + 1 - ab) * x_start
        return float((seen[steps - 2] - exact).abs().max())

    heun10, euler10, euler20 = error("heun", 10), error("euler", 10), error("euler", 20)
    assert heun10 < euler10 / 5 and heun10 < euler20 / 1.5, (heun10, euler10, euler20)
    assert error("heun", 40) < heun10 / 2


def test_dpmpp_3m_sde_matches_k_diffusions_algorithm():
    """DPM-Solver++ 3M SDE (eta 1) against k-diffusion's sample_dpmpp_3m_sde written out here in
    its own variables (x / alpha, sigma = s / alpha, the denoiser D(x, sigma)), with the same
    noise draws, on a schedule without zero terminal SNR (every sigma finite, as k-diffusion needs)."""
    sched, mu, sd = Schedule(zero_terminal_snr=False), 0.5, 0.3
    model = GaussianDenoiser(mu, sd, sched)
    shape, steps = (1, 64, 4), 12
    ours, meta = sample(model, shape, None, steps=steps, sampler="dpmpp_3m_sde", schedule=sched,
                        generator=torch.Generator().manual_seed(3))
    ts = meta["timesteps"]
    ab = sched.alphas_cumprod.double()
    alphas = [float(ab[t].sqrt()) for t in ts]
    sigmas = [math.sqrt(1 - float(ab[t])) / a for t, a in zip(ts, alphas)] + [0.0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).double() / alphas[0]   # the VP start, in k-diffusion's variable
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(steps):
        denoised = model.x0(alphas[i] * x, torch.tensor([ts[i]]))
        noise = torch.randn(shape, generator=g).double()
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        t, s = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
        h = s - t
        h_eta = h * 2.0
        x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * denoised
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            x = x + phi_2 * (denoised - d_1) / (h_1 / h)
        x = x + noise * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h))
        d_1, d_2, h_1, h_2 = denoised, d_1, h, h_1
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-6)   # the sampler runs in float32


# ---------------------------------------------------------------- conditioning and end to end

def _tiny_t5(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = "a dog barks loud siren wails in the distance rain falls".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    cfg = T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    T5EncoderModel(cfg).save_pretrained(folder)


def test_text_conditioner_loads_t5_encoder_by_path(tmp_path):
    torch.manual_seed(0)
    _tiny_t5(tmp_path)
    text = TextConditioner(tmp_path)
    assert text.dim == 16 and text.identity["class"] == "T5EncoderModel"
    cond = build_condition(["a dog barks", "rain falls in the distance"], text,
                           extra_fn=lambda texts: torch.ones(len(texts), 5))
    assert cond.context.shape[:2] == cond.mask.shape and cond.context.shape[-1] == 16
    assert cond.mask.sum(1).tolist()[0] < cond.mask.sum(1).tolist()[1]
    model = tiny_dit(cond_dim=16, cond_extra_dim=5)
    out = model(torch.randn(2, 6, 8), torch.tensor([1.0, 2.0]), **cond.as_kwargs())
    assert out.shape == (2, 6, 8)


def test_text_conditioner_default_minilm():
    text = TextConditioner()
    hidden, mask = text.encode(["a siren wails", "a dog barks twice in the rain"])
    assert text.dim == 384 and hidden.shape == (2, mask.shape[1], 384)
    assert mask[0].sum() < mask[1].sum()


def test_end_to_end_training_steps_and_generation_batch2():
    """VAE step, DiT step on its latents (with a DC-LDM stream), sample, decode: batch 2."""
    torch.manual_seed(0)
    vcfg = VAEConfig.from_yaml("vae-tiny")
    vae = WaveVAE(vcfg)
    wav = clips(2, 0.4, vcfg.sample_rate)
    vae_train_step(vae, torch.optim.Adam(vae.parameters(), 1e-3), wav, vcfg)
    with torch.no_grad():
        z = vae.encode(wav).sample().transpose(1, 2)  # [B, F, C] for the DiT
    model = tiny_dit(in_channels=vcfg.latent_dim, cond2_dim=vcfg.latent_dim, cross_attn2_blocks=[1])
    cond = cond_for(2, context2=z)  # DC-LDM: a reference clip's latents
    sched = Schedule(kind="cosine")
    for masked in (False, True):
        logs = diffusion_train_step(model, torch.optim.Adam(model.parameters(), 1e-3), z, cond, sched, masked=masked)
        assert math.isfinite(logs["loss"])
    loss, _ = training_loss(model, z, cond, sched, cond_drop=1.0)
    assert math.isfinite(loss.item())
    seconds = 0.4
    frames = round(seconds * vae.latent_rate)
    lat, _ = sample(model, (2, frames, vcfg.latent_dim), cond, steps=3, sampler="dpmpp_2m", schedule=sched)
    assert lat.shape == (2, frames, vcfg.latent_dim)
    with torch.no_grad():
        audio = vae.decode(lat.transpose(1, 2))
    assert audio.shape == (2, 1, round(seconds * vcfg.sample_rate))
