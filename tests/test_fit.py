"""GenAu's FIT backbone (local attention in groups, global latent tokens) and dataset-ID
conditioning on both backbones."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from soundlake.generation import diffusion
from soundlake.generation.backbones import backbone_config, build_backbone, config_dict
from soundlake.generation.conditioning import Condition
from soundlake.generation.dataset_id import check_vocab, source_id, source_ids
from soundlake.generation.dit import DiT, DiTConfig, count_parameters, rope_tables
from soundlake.generation.fit import FIT, FITConfig, group_mask
from soundlake.generation.inference.audiocache import AudioCache, calibrate, layer_names
from soundlake.generation.inference.hooks import (
    ModelHook,
    find_modules,
    register_hooks,
    remove_hooks,
)
from soundlake.generation.inference.litefocus import attach_sparse_attention

torch.set_num_threads(1)
SOURCES = ["unknown", "audioset", "synth"]


def randomize_zero_init_(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """The zero-initialised layers (adaLN-zero, attention outputs, final) get small random
    values: an untrained backbone would otherwise output 0 whatever its input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "_zero_init", False):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
    return model


def tiny_fit(**over) -> FIT:
    torch.manual_seed(0)
    cfg = FITConfig(in_channels=4, hidden=32, depth=3, heads=2, group_size=4, latents_per_group=2,
                    cond_dim=8, sola_rank=4, time_freq_dim=16)
    for k, v in over.items():
        setattr(cfg, k, v)
    return randomize_zero_init_(FIT(cfg)).eval()


def tiny_dit(**over) -> DiT:
    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=4, hidden=32, depth=2, heads=2, cond_dim=8, sola_rank=4, time_freq_dim=16)
    for k, v in over.items():
        setattr(cfg, k, v)
    return randomize_zero_init_(DiT(cfg)).eval()


def inputs(b=2, n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, 3, dtype=torch.bool)
    mask[0, 2] = False
    return (torch.randn(b, n, 4, generator=g), torch.full((b,), 400.0),
            dict(context=torch.randn(b, 3, 8, generator=g), context_mask=mask))


class Capture(ModelHook):
    """Records a layer's inputs and output (a real hook of hooks.py)."""

    def __init__(self):
        self.calls = []

    def new_forward(self, module, *args, **kwargs):
        out = self.inner_forward(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


def captured(model, names, fn):
    mods = find_modules(model, names)
    hooks = [Capture() for _ in names]
    register_hooks(mods, hooks, "test.capture")
    try:
        fn()
    finally:
        remove_hooks(mods, "test.capture")
    return hooks


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("n", [24, 23])  # whole groups, and a padded last group
def test_local_attention_is_block_diagonal(n):
    """The local layer's output equals full-sequence attention under the hand-built
    block-diagonal group mask (and the padding mask), computed with a plain softmax."""
    m = tiny_fit()
    x, t, kw = inputs(n=n)
    (cap,) = captured(m, ["blocks.1.local_attn"], lambda: m(x, t, **kw))
    (h, rope, pmask), _, out = cap.calls[0]
    s, b = m.cfg.group_size, x.shape[0]
    g = m.groups(n)
    assert h.shape == (b * g, s, 32) and (pmask is None) == (n % s == 0)
    layer = m.blocks[1].local_attn
    seq = h.reshape(b, g * s, 32)  # the whole padded sequence, as one attention problem
    q, k, v = layer.qkv(seq).view(b, g * s, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k = layer.q_norm(q), layer.k_norm(k)
    cos, sin = rope_tables(s, 16, m.cfg.rope_base, x.device)
    pos_rope = (cos.repeat(g, 1), sin.repeat(g, 1))  # position within the group

    def rot(z):
        z1, z2 = z.chunk(2, dim=-1)
        return z * pos_rope[0] + torch.cat([-z2, z1], dim=-1) * pos_rope[1]

    scores = rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(16)
    allowed = group_mask(g * s, s)[None, None] & (torch.arange(g * s) < n)[None, None, None, :]
    att = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    ref = layer.out((att @ v).transpose(1, 2).reshape(b, g * s, 32))
    torch.testing.assert_close(out.reshape(b, g * s, 32), ref, atol=1e-5, rtol=1e-4)
    assert group_mask(8, 4).sum() == 32 and not group_mask(8, 4)[3, 4]


def test_read_write_shapes_and_global_token_count():
    m = tiny_fit(patch_size=2, group_size=3, latents_per_group=5)
    n = 19  # 10 patches (the last half padding) -> 4 groups of 3 patches, the last with 2 padding patches
    x, t, kw = inputs(n=n)
    names = ["blocks.0.read", "blocks.0.self_attn", "blocks.0.write", "blocks.0.cross_attn"]
    out = []
    caps = captured(m, names, lambda: out.append(m(x, t, **kw)))
    assert out[0].shape == x.shape and torch.isfinite(out[0]).all()
    assert m.groups(n) == 4 and m.num_latents(n) == 20
    (lat, patches, pmask), _, r = caps[0].calls[0]
    assert lat.shape == r.shape == (2 * 4, 5, 32) and patches.shape == (2 * 4, 3, 32)
    assert pmask.tolist()[3] == [True, False, False] and pmask[:3].all()  # 10 real patches of 12
    assert caps[1].calls[0][0][0].shape == caps[1].calls[0][2].shape == (2, 20, 32)  # global: G*K tokens
    (h, latg), _, w = caps[2].calls[0]
    assert h.shape == w.shape == (2 * 4, 3, 32) and latg.shape == (2 * 4, 5, 32)
    assert caps[3].calls[0][0][0].shape == (2, 20, 32)  # the latents read the text


@pytest.mark.parametrize("cut", ["read", "write"])
def test_groups_interact_only_through_latent_tokens(cut):
    """A change in group 0 reaches group 2 through the latents; with the read (or write)
    cross-attention zeroed the groups are independent."""
    m = tiny_fit()
    x, t, kw = inputs(n=24)
    x2 = x.clone()
    x2[:, :4] += 1.0  # group 0 only (4 frames per group)
    a, b = m(x, t, **kw), m(x2, t, **kw)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4  # FIT: far-reaching
    with torch.no_grad():
        for blk in m.blocks:
            getattr(blk, cut).out.weight.zero_()
            getattr(blk, cut).out.bias.zero_()
    a, b = m(x, t, **kw), m(x2, t, **kw)
    assert (a[:, :4] - b[:, :4]).abs().max() > 1e-4
    torch.testing.assert_close(a[:, 4:], b[:, 4:], atol=1e-6, rtol=0)


def test_condition_paths_and_null_rows():
    """T5 tokens via the latents' cross-attention; the CLAP vector joins the global
    condition; drop swaps both for their null values."""
    m = tiny_fit(cond_extra_dim=6)
    x, t, kw = inputs(n=12)
    extra = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    base = m(x, t, extra=extra, **kw)
    assert not torch.allclose(m(x, t, extra=extra * 2, **kw), base)
    ctx2 = dict(kw, context=kw["context"] * 2)
    assert not torch.allclose(m(x, t, extra=extra, **ctx2), base)
    drop = torch.tensor([True, False])
    d1, d2 = m(x, t, extra=extra, drop=drop, **kw), m(x, t, extra=extra * 2, drop=drop, **ctx2)
    torch.testing.assert_close(d1[0], d2[0])  # a dropped row ignores text and CLAP
    with pytest.raises(ValueError, match="pass `extra`"):
        m(x, t, **kw)


def test_backbone_selection_and_published_sizes():
    cfg = FITConfig.from_yaml("fit-tiny")
    assert cfg.sources[0] == "unknown" and "synth" in cfg.sources
    d = config_dict(cfg)
    assert d["backbone"] == "fit" and isinstance(backbone_config(d), FITConfig)
    assert isinstance(build_backbone({"in_channels": 4, "hidden": 32, "depth": 1, "heads": 2}), DiT)  # no key: DiT
    with pytest.raises(ValueError, match="backbone 'unet'"):
        backbone_config({"backbone": "unet"})
    with pytest.raises(ValueError, match="cannot build"):
        DiTConfig.from_dict(d)
    for name, params in (("fit-genau-small", 493e6), ("fit-genau-large", 1.25e9)):
        g = FITConfig.from_yaml(name)
        assert (g.patch_size, g.group_size, g.in_channels) == (1, 32, 64)
        assert g.latents_per_group * 8 == 256  # GenAu's 256 latents over its 8 groups (256 frames / 32)
        g.cond_extra_dim = 512  # + the CLAP text vector
        with torch.device("meta"):
            n = count_parameters(FIT(g))
        assert abs(n / params - 1) < 0.05, (name, n)


# ---------------------------------------------------------------- dataset-ID


def test_vocabulary_helpers():
    assert check_vocab(SOURCES) == SOURCES
    for bad in (["audioset", "unknown"], ["unknown", "a", "a"], []):
        with pytest.raises(ValueError, match="sources"):
            check_vocab(bad)
    assert source_id(None, SOURCES) == 0 and source_id("synth", SOURCES) == 2
    with pytest.raises(ValueError, match="vocabulary"):
        source_id("vggsound", SOURCES)
    ids = source_ids([{"source": "synth"}, {"source": "vggsound"}, {}], SOURCES)
    assert ids.tolist() == [2, 0, 0]


@pytest.mark.parametrize("make", [tiny_dit, tiny_fit], ids=["dit", "fit"])
def test_dataset_id_changes_output_only_through_its_embedding(make):
    m = make(sources=SOURCES)
    x, t, kw = inputs(n=12)
    ids = {i: torch.full((2,), i) for i in range(3)}
    outs = {i: m(x, t, source=ids[i], **kw) for i in ids}
    assert not torch.allclose(outs[1], outs[2], atol=1e-5)
    torch.testing.assert_close(m(x, t, **kw), outs[0])  # no source = unknown (id 0)
    with torch.no_grad():
        table = m.source_embed.weight
        table[0] = table[2]  # id 0 now has id 2's row: the same output
        torch.testing.assert_close(m(x, t, source=ids[0], **kw), outs[2])
        table.copy_(table[1].expand_as(table))  # equal rows: every id gives the same output
    torch.testing.assert_close(m(x, t, source=ids[2], **kw), m(x, t, source=ids[1], **kw))
    torch.testing.assert_close(m(x, t, source=ids[1], **kw), outs[1])
    with pytest.raises(ValueError, match="no dataset-ID"):
        make()(x, t, source=ids[1], **kw)


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
def test_every_sampler_keeps_the_source_in_both_guidance_branches(sampler):
    m = tiny_fit(sources=SOURCES)
    g = torch.Generator().manual_seed(0)
    cond = Condition(torch.randn(2, 3, 8, generator=g), torch.ones(2, 3, dtype=torch.bool))
    runs = {}
    for i in (1, 2):
        cond.source = torch.full((2,), i)
        (cap,) = captured(m, [""], lambda: runs.setdefault(i, diffusion.sample(
            m, (2, 13, 4), cond, steps=3, sampler=sampler, cfg=3.0, schedule=diffusion.Schedule(num_steps=100),
            generator=torch.Generator().manual_seed(1))[0]))
        (x, _), kw, _ = cap.calls[0]
        assert len(x) == 4 and kw["drop"].tolist() == [False, False, True, True]  # cond rows, then uncond rows
        assert kw["source"].tolist() == [i] * 4
    assert runs[1].shape == (2, 13, 4) and torch.isfinite(runs[1]).all()
    assert not torch.allclose(runs[1], runs[2])


# ---------------------------------------------------------------- inference tools


def fit_sampler(m, frames=40):
    g = torch.Generator().manual_seed(1)
    cond = Condition(torch.randn(2, 3, 8, generator=g), torch.ones(2, 3, dtype=torch.bool))
    sched = diffusion.Schedule(num_steps=100)

    def run(seed, steps=6):
        return diffusion.sample(m, (2, frames, 4), cond, steps=steps, sampler="euler", cfg=3.0, schedule=sched,
                                generator=torch.Generator().manual_seed(seed))[0]
    return run


def test_audiocache_and_sparse_attention_on_fit():
    m = tiny_fit()
    layers = layer_names(m)
    assert {"blocks.0.local_attn", "blocks.0.local_ff", "blocks.0.read", "blocks.0.write",
            "blocks.2.self_attn", "blocks.2.cross_attn", "blocks.2.ff"} <= set(layers)
    assert len(layers) == 7 * 3
    run = fit_sampler(m)
    prof = calibrate(m, layers, run, [0], 6, sampler="euler")
    ref = run(5)
    with AudioCache(m, prof, delta=0.0, sampler="euler") as cache:
        with cache.run(6):
            assert torch.equal(run(5), ref)
        cache.delta = float(np.quantile(prof.mean[:, 1:], 0.5)) * 2
        with cache.run(6):
            approx = run(5)
        stats = cache.stats()
    assert stats["reused"] > 0 and approx.shape == ref.shape and torch.isfinite(approx).all()
    assert torch.equal(run(5), ref)  # detached: as before
    # LiteFocus on the global attention (40 frames -> 10 groups -> 20 latent tokens)
    x, t, kw = inputs(n=40)
    full = m(x, t, **kw)
    with attach_sparse_attention(m, range(3), window=5, ratio=1.0, chunk=4):
        torch.testing.assert_close(m(x, t, **kw), full, atol=1e-5, rtol=1e-5)
    with attach_sparse_attention(m, range(3), window=5, ratio=0.2, chunk=4):
        sparse = m(x, t, **kw)
        with AudioCache(m, prof, delta=cache.delta, sampler="euler") as both:
            with both.run(6):
                combined = run(5)
    assert sparse.shape == full.shape and torch.isfinite(sparse).all() and not torch.allclose(sparse, full, atol=1e-5)
    assert torch.isfinite(combined).all() and torch.equal(m(x, t, **kw), full)


# ---------------------------------------------------------------- training and generation


def test_training_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = FIT(FITConfig(in_channels=4, hidden=32, depth=2, heads=2, group_size=4, latents_per_group=2, cond_dim=8,
                      sola_rank=4, time_freq_dim=16, cond_extra_dim=6, sources=SOURCES))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 4, generator=g)
    cond = Condition(torch.randn(4, 3, 8, generator=g), torch.ones(4, 3, dtype=torch.bool),
                     extra=torch.randn(4, 6, generator=g), source=torch.tensor([0, 1, 2, 1]))
    sched = diffusion.Schedule(num_steps=100)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = [diffusion.diffusion_train_step(m, opt, x0, cond, sched, generator=torch.Generator().manual_seed(7))["loss"]
              for _ in range(25)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.6 * losses[0], losses
    assert m.source_embed.weight.grad is not None and m.source_embed.weight.grad[1:].abs().sum() > 0


def test_generate_cli_with_source_on_a_fit_folder(tmp_path):
    from typer.testing import CliRunner

    from soundlake.cli.main import app
    from soundlake.testing import make_tiny_generator

    folder = make_tiny_generator(tmp_path / "fit", backbone="fit", sources=SOURCES)
    assert json.loads((folder / "soundlake_model.json").read_text())["config"]["sources"] == SOURCES
    args = ["generate", "a bell rings", "--model", str(folder), "--seconds", "0.5", "--steps", "2"]
    wavs = {}
    for source in ("synth", "audioset"):
        out = tmp_path / f"{source}.wav"
        r = CliRunner().invoke(app, [*args, "--source", source, "--out", str(out)])
        assert r.exit_code == 0, r.output
        side = json.loads(out.with_name(out.name + ".json").read_text())
        assert side["source"] == source and side["backbone"] == "fit"
        wavs[source] = sf.read(str(out))[0]
    assert not np.array_equal(wavs["synth"], wavs["audioset"])
    r = CliRunner().invoke(app, [*args, "--source", "bbc", "--out", str(tmp_path / "x.wav")])
    assert r.exit_code != 0 and "not in this model's dataset-ID vocabulary" in r.output


def test_train_spec_selects_the_backbone_and_the_objective_feeds_source_ids(tmp_path):
    from soundlake.core.errors import UserError
    from soundlake.generation.train.data import LatentBatch
    from soundlake.generation.train.objectives import DitObjective
    from soundlake.generation.train.specs import dit_model_config, load_train_spec
    from soundlake.generation.vae import read_config

    def spec(config, *sets):
        return load_train_spec("dit", config=config, shards=str(tmp_path), vae=str(tmp_path), out=str(tmp_path / "o"),
                               steps=1, sets=list(sets))

    s = spec("fit-tiny", "source_drop=0")
    cfg = dit_model_config(s, read_config(s.config), latent_dim=4)
    assert cfg["backbone"] == "fit" and cfg["in_channels"] == 4 and cfg["cond_dim"] == 384
    assert cfg["sources"] == read_config("fit-tiny")["model"]["sources"]
    assert dit_model_config(spec("dit-tiny"), read_config("dit-tiny"), 4)["backbone"] == "dit"
    with pytest.raises(UserError, match="unknown DiTConfig keys"):  # FIT keys cannot build a DiT
        dit_model_config(spec("fit-tiny", "backbone=dit"), read_config("fit-tiny"), 4)
    plan = {"dit_config": cfg, "schedule": {"num_steps": 100}, "latents": {"mean": 0.0, "std": 1.0, "rate": 50}}
    torch.manual_seed(0)
    obj = DitObjective(s, plan, "cpu")
    assert isinstance(obj.model, FIT)
    metas = [{"source": "synth"}, {"source": "vggsound"}, {"source": "bbc"}]
    batch = LatentBatch(torch.randn(3, 4, 20), ["a dog barks", "rain falls", "a bell rings"], torch.zeros(3),
                        torch.full((3,), 20), metas, ["a", "b", "c"])
    item, n = obj.prepare(batch)
    opt = torch.optim.AdamW(obj.model.parameters(), lr=1e-3)
    (cap,) = captured(obj.model, [""], lambda: obj.step(obj.model, opt, {}, item, s.phases[0]))
    vocab = cfg["sources"]
    assert n == 3 and cap.calls[0][1]["source"].tolist() == [vocab.index("synth"), vocab.index("vggsound"), 0]
    obj.spec = s.model_copy(update={"source_drop": 1.0})  # every clip trains as unknown
    assert obj.source_ids(metas).tolist() == [0, 0, 0]
