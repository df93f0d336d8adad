"""DC-LDM's AR acoustic condition: tokenizer, AR model, precomputed encodings, the DiT's second
stream fed by them (never by the clip's own latents), and generate text -> AR -> diffusion."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import invoke_here

from soundlake.core.errors import UserError
from soundlake.generation.tokens import RVQ, fit_rvq

pytestmark = pytest.mark.slow
SMALL_DIT = ["overrides.depth=3", "overrides.hidden=32", "overrides.heads=2", "overrides.sola_rank=4",
             "log_every=1", "shuffle=8", "workers=0"]
SMALL_AR = ["overrides.hidden=32", "overrides.depth=2", "overrides.heads=2", "log_every=1", "shuffle=8",
            "workers=0", "overrides.dropout=0.0"]


# ------------------------------------------------------------------ tokenizer (no shards)

def test_rvq_codes_are_nearest_per_level_and_levels_reduce_error():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 6)).astype(np.float32) * 3
    x = (centres[rng.integers(8, size=3000)] + 0.3 * rng.normal(size=(3000, 6))).astype(np.float32)
    rvq = fit_rvq(x, levels=3, codes=16, iters=10)
    codes = rvq.encode(x[:200])
    # level 0 is the nearest code by brute force; level 1 the nearest to what level 0 leaves
    d0 = ((x[:200, None] - rvq.codebooks[0][None]) ** 2).sum(-1)
    assert np.array_equal(codes[:, 0], d0.argmin(1))
    r1 = x[:200] - rvq.codebooks[0][codes[:, 0]]
    assert np.array_equal(codes[:, 1], ((r1[:, None] - rvq.codebooks[1][None]) ** 2).sum(-1).argmin(1))
    # decode is the sum of each level's code vector
    want = sum(rvq.codebooks[lv][codes[:, lv]] for lv in range(3))
    np.testing.assert_allclose(rvq.decode(codes), want, rtol=1e-6)
    # a sum of code vectors round-trips exactly; each level lowers the error
    c = rng.integers(16, size=(5, 3))
    exact = RVQ(rvq.codebooks[:1]).decode(c[:, :1])
    assert np.array_equal(RVQ(rvq.codebooks[:1]).encode(exact), c[:, :1])
    errs = [float(((x - RVQ(rvq.codebooks[:k]).decode(RVQ(rvq.codebooks[:k]).encode(x))) ** 2).sum())
            for k in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]
    with pytest.raises(ValueError, match="cannot fit"):
        fit_rvq(x[:10], levels=1, codes=16)


def test_ar_samples_respect_levels_and_seeds():
    from soundlake.generation.ar import AcousticAR, ARConfig

    torch.manual_seed(0)
    m = AcousticAR(ARConfig(levels=3, codes=5, frames=4, text_dim=8, hidden=16, depth=1, heads=2)).eval()
    text, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    a = m.sample(text, mask, [1, 2])
    assert a.shape == (2, 4, 3) and a.min() >= 0 and a.max() < 5
    assert torch.equal(a, m.sample(text, mask, [1, 2]))             # seeded
    assert torch.equal(a[1:], m.sample(text[1:], mask[1:], [2]))    # a row does not depend on its batch
    # the level mask: position p (frame p // 3, level p % 3) has finite logits only in its level's range
    logits = m.logits(torch.tensor([[m.bos, 0, 5]]), text[:1], mask[:1])[0]
    for p, lv in enumerate((0, 1, 2)):
        finite = torch.isfinite(logits[p]).nonzero().flatten()
        assert finite.min() == lv * 5 and finite.max() == lv * 5 + 4


# ------------------------------------------------------------------ the pipeline on shards

@pytest.fixture(scope="module")
def chain(ray_session, tmp_path_factory):
    """Export with an 'ar' split -> tiny waveform VAE -> latents -> tokenizer (CLI) -> AR model (CLI)
    -> ar-encode (CLI) -> a DC-LDM DiT on the 'train' split."""
    from soundlake.generation.train.encode import encode_shards
    from soundlake.generation.train.specs import load_train_spec
    from soundlake.generation.train.trainer import train
    from soundlake.testing import make_synth_export

    root = tmp_path_factory.mktemp("dcldm")
    # shard_count 3 (fewer shards, still several for ar-encode's resume) and 2 VAE steps: the VAE only has to
    # exist (its latents are the tokenizer's, the AR's and the DiT's data); every shard costs a Ray
    # Data encode and an AR sampling pass.
    audio = make_synth_export(root / "synth", 40, seconds=1.0, sr=16000, shard_count=3, splits={"ar": 0.4})
    train(load_train_spec("vae", shards=str(audio), out=str(root / "vae"), steps=2, batch_size=4, seconds=0.5,
                          sets=["workers=0", "shuffle=8", "lr=1e-3"]))
    latents = root / "latents"
    encode_shards(str(root / "vae"), str(audio), str(latents))
    r = invoke_here("train", "tokens", "--latents", str(latents), "--out", str(root / "tokens"), "--levels", "2",
                    "--codes", "16", "--iters", "5")
    assert r.exit_code == 0, r.output
    r = invoke_here("train", "ar", "--tokens", str(root / "tokens"), "--shards", str(latents), "--out",
                    str(root / "ar"), "--steps", "30", "--batch-size", "8", "--seconds", "0.5", "--lr", "3e-3",
                    *[a for s in SMALL_AR for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    r = invoke_here("ar-encode", "--ar", str(root / "ar"), "--shards", str(latents), "--out", str(root / "enc"))
    assert r.exit_code == 0, r.output
    spec = load_train_spec("dit", shards=str(latents), vae=str(root / "vae"), out=str(root / "dit"), steps=3,
                           batch_size=4, seconds=0.5, ar_encodings=str(root / "enc"), sets=[*SMALL_DIT])
    train(spec)
    return {"root": root, "audio": audio, "latents": latents, "spec": spec, "tokens_out": r.output}


def test_tokenizer_folder_records_its_fit(chain):
    from soundlake.generation.model_folder import read_meta

    meta = read_meta(chain["root"] / "tokens", "tokens")
    errs = meta["train"]["relative_error_by_level"]
    assert len(errs) == 2 and errs[0] > errs[1] > 0
    assert meta["latents"]["split"] == "ar" and meta["config"] == {"levels": 2, "codes": 16, "channels": 16}


def test_ar_loss_falls(chain):
    with open(chain["root"] / "ar" / "train_log.csv") as f:
        rows = [json.loads(json.dumps(r)) for r in __import__("csv").DictReader(f)]
    loss = [float(r["loss"]) for r in rows]
    assert len(loss) == 30
    # from about ln(16) per code (uniform) to clearly below it
    assert np.mean(loss[:3]) > np.log(16) - 0.5 and np.mean(loss[-5:]) < np.mean(loss[:3]) - 0.3


def test_precomputed_encodings_match_a_fresh_prediction(chain):
    from soundlake.generation.model_folder import AcousticEncoder
    from soundlake.generation.train.ar_encode import EncodingTable

    table = EncodingTable.read(str(chain["root"] / "enc"))
    captions = sorted(table.table)[:4]
    assert len(table.table) >= 10
    fresh_codes, fresh = AcousticEncoder(chain["root"] / "ar").encode(captions[::-1])
    for c, enc in zip(captions[::-1], fresh):
        np.testing.assert_allclose(table.table[c], enc, atol=1e-5)
    # and it is a sequence of the tokenizer's code sums: decoded codes, not a copy of any clip's latents
    frames = round(0.5 * json.loads((chain["root"] / "tokens" / "soundlake_model.json").read_text())["latents"]["rate"])
    assert fresh.shape == (4, frames, 16) and fresh_codes.shape == (4, frames, 2)


def test_second_option_goes_through_the_vae(chain):
    """E'_t2a: the predicted latent decoded to audio by the VAE and encoded again: same shape
    as E_t2a, the same codes, a different (re-encoded) encoding."""
    from soundlake.generation.model_folder import AcousticEncoder

    enc = AcousticEncoder(chain["root"] / "ar")
    codes, direct = enc.encode(["a bell rings"])
    codes2, via_vae = enc.encode(["a bell rings"], via="vae")
    assert np.array_equal(codes, codes2) and via_vae.shape == direct.shape
    assert np.isfinite(via_vae).all() and not np.allclose(via_vae, direct, atol=1e-3)


def test_ar_encode_resumes_a_lost_part(chain, tmp_path):
    import shutil

    from soundlake.generation.train.ar_encode import ar_encode

    enc = tmp_path / "enc"
    shutil.copytree(chain["root"] / "enc", enc)
    m = json.loads((enc / "manifest.json").read_text())
    first = m["parts"][0]["file"]
    (enc / first).unlink()
    r = ar_encode(str(chain["root"] / "ar"), str(chain["latents"]), str(enc))
    assert (r.written, r.kept) == (1, len(m["parts"]) - 1)
    assert (enc / first).read_bytes() == (chain["root"] / "enc" / first).read_bytes()
    with pytest.raises(UserError, match="another AR model or --via"):
        ar_encode(str(chain["root"] / "ar"), str(chain["latents"]), str(enc), via="vae")


def test_second_stream_is_the_prediction_never_the_clips_latents(chain):
    from soundlake.generation.model_folder import pool_frames
    from soundlake.generation.train.ar_encode import EncodingTable
    from soundlake.generation.train.objectives import DitObjective
    from soundlake.generation.train.specs import PhaseSpec, absolute_paths, make_plan

    spec = absolute_paths(chain["spec"])
    plan = make_plan(spec)
    obj = DitObjective(spec, plan, torch.device("cpu"))
    seen = []
    obj.model.cond2_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    table = EncodingTable.read(str(chain["root"] / "enc"))
    captions = sorted(table.table)[:3]
    channels = plan["dit_config"]["in_channels"]
    for scale in (1.0, -5.0):   # two different batches of latents under the same captions
        z = torch.randn(3, channels, 8) * scale
        item, _ = obj.prepare(type("B", (), {"latents": z, "captions": captions, "meta": [{}] * 3})())
        obj.step(obj.model, torch.optim.SGD(obj.model.parameters(), lr=0.0), {}, item, PhaseSpec(shards="x", steps=1))
    want = pool_frames(table.lookup(captions), spec.cond2_frames)
    assert torch.allclose(seen[0], want) and torch.allclose(seen[1], want)
    assert not torch.allclose(seen[0], pool_frames(item[0], spec.cond2_frames))


def test_dit_refuses_an_ar_model_that_saw_its_clips(chain):
    from soundlake.generation.train.specs import absolute_paths, load_train_spec, make_plan

    spec = load_train_spec("dit", shards=str(chain["latents"]), split="ar", vae=str(chain["root"] / "vae"),
                           out=str(chain["root"] / "x"), steps=1, seconds=0.5,
                           ar_encodings=str(chain["root"] / "enc"), sets=SMALL_DIT)
    with pytest.raises(UserError, match="trained on split 'ar' of .*, which this phase reads"):
        make_plan(absolute_paths(spec))


def test_generate_runs_text_then_ar_then_diffusion(chain, tmp_path):
    from soundlake.generation.model_folder import Generator, pool_frames

    folder = chain["root"] / "dit"
    assert (folder / "ar" / "tokens" / "soundlake_model.json").is_file() and (folder / "ar" / "vae" / "model.safetensors").is_file()
    gen = Generator.load(folder)
    cond = gen.condition(["a bell rings"])
    _, enc = gen.ar.encode(["a bell rings"])
    assert torch.allclose(cond.context2, pool_frames(torch.from_numpy(enc), gen.conditioning["cond2_frames"]))
    r = invoke_here("generate", "--model", str(folder), "a bell rings", "--seconds", "0.5", "--steps", "2",
                    "--out", str(tmp_path / "bell.wav"))
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "bell.wav.json").read_text())
    assert side["prompt"] == "a bell rings"


def test_ar_only_primary_condition(chain):
    from soundlake.generation.model_folder import Generator
    from soundlake.generation.train.specs import load_train_spec
    from soundlake.generation.train.trainer import train

    out = chain["root"] / "ar-only"
    train(load_train_spec("dit", shards=str(chain["latents"]), vae=str(chain["root"] / "vae"), out=str(out),
                          steps=2, batch_size=4, seconds=0.5, ar_encodings=str(chain["root"] / "enc"),
                          sets=[*SMALL_DIT, "primary=ar"]))
    gen = Generator.load(out)
    assert gen.dit.cfg.cond_dim == 16 and not gen.dit.cfg.cond2_dim
    cond = gen.condition(["a bell rings", "white noise hisses"])
    _, enc = gen.ar.encode(["a bell rings", "white noise hisses"])
    assert torch.allclose(cond.context, torch.from_numpy(enc))
    assert gen.generate(["a bell rings"], seconds=0.5, steps=2).audio.shape == (1, 8000)
