"""Generators trained end to end from shards on Ray Train: VAE, encode, DiT, resume, generate.

Every Ray Train run costs ~15-20 s of start-up here, so the runs are few and shared, and the
ones that do not test Ray Train itself run in its local mode (``workers=0``: the same loop in
this process). One 8-step dual-conditioned DiT run (``dit_base``, local mode) is the
dual-conditioning test's model, the resume test's uninterrupted reference (so that test also
shows a Ray Train run computes what local mode computes) and the weights of ``init_run``, which
trains from them through the CLI on two DDP workers (the CLI, init and DDP tests read it).
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import invoke_here

from soundlake.core.errors import UserError
from soundlake.core.storage import open_input
from soundlake.export import shards
from soundlake.generation.model_folder import (
    Generator,
    load_vae,
    load_weights,
    read_meta,
)
from soundlake.generation.train.data import shard_urls
from soundlake.generation.train.encode import encode_shards
from soundlake.generation.train.specs import load_train_spec, make_plan
from soundlake.generation.train.trainer import phase_batches, train
from soundlake.testing import make_synth_export

pytestmark = pytest.mark.slow
SMALL_DIT = ["overrides.depth=4", "overrides.hidden=64", "overrides.heads=4", "overrides.sola_rank=8"]


def log_rows(out) -> list[dict]:
    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def losses(out) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in log_rows(out)}


@pytest.fixture(scope="module")
def audio_shards(tmp_path_factory):
    return make_synth_export(tmp_path_factory.mktemp("synth"), 24, seconds=2.0, sr=16000, shard_count=4)


@pytest.fixture(scope="module")
def vae_dir(audio_shards, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vae"
    # 24 steps (the loss falls most in the first ~10), checkpoints at 8, 16 and 24 of which the
    # newest two are kept
    spec = load_train_spec("vae", shards=str(audio_shards), out=str(out), steps=24, batch_size=4, seconds=0.5,
                           sets=["log_every=4", "checkpoint_every=8", "shuffle=16", "lr=1e-3", "workers=0"])
    summary = train(spec)
    assert summary.steps == 24
    return out


@pytest.fixture(scope="module")
def latent_shards(vae_dir, audio_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "v1"
    encode_shards(str(vae_dir), str(audio_shards), str(out))
    return out


def dit_spec(latents, vae_dir, out, steps, *sets, **kw):
    return load_train_spec("dit", shards=str(latents), vae=str(vae_dir), out=str(out), steps=steps, batch_size=4,
                           seconds=1.0, sets=[*SMALL_DIT, "shuffle=16", *sets], **kw)


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory):
    from soundlake.testing import make_tiny_hf_clap

    return make_tiny_hf_clap(tmp_path_factory.mktemp("clap") / "clap", sample_rate=16000)


def base_sets(clap) -> list[str]:
    """dit_base's settings (also a resumed or init run's: the same model); logged every step."""
    return ["log_every=1", "checkpoint_every=100", f"extra_clap={clap}", "cond2=latents", "cond2_frames=5"]


@pytest.fixture(scope="module")
def dit_base(latent_shards, vae_dir, tiny_clap, tmp_path_factory):
    """8 uninterrupted steps of a DiT with both extra conditions: GenAu's CLAP text vector and
    DC-LDM's second stream (the clip's own latents)."""
    out = tmp_path_factory.mktemp("runs") / "base"
    s = train(dit_spec(latent_shards, vae_dir, out, 8, *base_sets(tiny_clap), "workers=0"))
    assert s.steps == 8 and s.ray_startup_s == 0.0   # local mode starts no Ray
    return out


def test_vae_loss_falls_and_model_folder_loads(vae_dir, audio_shards):
    rows = log_rows(vae_dir)
    assert [int(r["step"]) for r in rows] == list(range(4, 25, 4))
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < 0.8 * first, (first, last)
    assert float(rows[-1]["samples_per_s"]) > 0
    vae, meta = load_vae(vae_dir)
    assert meta["kind"] == "vae" and meta["train"]["step"] == 24
    wav = torch.zeros(1, 1, vae.hop * 10)
    assert vae.decode(vae.encode(wav).mode()).shape == wav.shape
    # Ray Train kept the newest checkpoints (num_to_keep=2): step 16 and step 24, not step 8
    assert sorted(p.name for p in (vae_dir / "ray_train").glob("step-*")) == ["step-00000016", "step-00000024"]


def test_a_phase_chooses_its_data_mode(audio_shards, tmp_path):
    """``data: memory`` replays the batches read once (epoch 0's) every epoch; ``shards`` reads
    each epoch afresh (its own order and crops). A phase's ``data`` beats the spec's, and a
    phase without one takes the spec's."""
    phases = [{"name": n, "shards": str(audio_shards), "steps": 1, **({"data": d} if d else {})}
              for n, d in (("disk", "shards"), ("ram", "memory"), ("inherit", None))]
    spec = load_train_spec("vae", out=str(tmp_path), phases=phases, batch_size=4, seconds=0.5,
                           sets=["shuffle=16", "data=memory"])
    plan = make_plan(spec)

    def two_epochs(phase: int) -> list[torch.Tensor]:
        it = phase_batches(spec, plan, {"seconds": 0.5, "sample_rate": 16000}, phase, 0, 0, {})
        got = [next(it) for _ in range(12)]   # 24 clips / batch 4: 6 batches an epoch
        assert [e for e, _, _ in got] == [0] * 6 + [1] * 6
        return [b.audio for _, _, b in got]

    disk, ram, inherit = (two_epochs(i) for i in range(3))
    assert not any(torch.equal(disk[i], disk[i + 6]) for i in range(6))
    for batches in (ram, inherit):
        assert all(torch.equal(batches[i], batches[i + 6]) for i in range(6))


def test_encode_writes_vae_latents_and_resumes(vae_dir, audio_shards, latent_shards):
    vae, _ = load_vae(vae_dir)
    manifest = json.loads((latent_shards / "manifest.json").read_text())
    assert manifest["latents"]["channels"] == vae.latent_dim and manifest["latents"]["rate"] == 50.0
    assert [s["name"] for s in manifest["shards"]] == \
        [s["name"] for s in json.loads((audio_shards / "manifest.json").read_text())["shards"]]
    # a stored latent is the VAE's posterior mean of the stored audio
    src = dict(_samples(shard_urls(str(audio_shards))[0]))
    key, lat = next(iter(_samples(shard_urls(str(latent_shards))[0])))
    z = np.load(io.BytesIO(lat["latents.npy"]))
    audio, sr = sf.read(io.BytesIO(src[key]["flac"]), dtype="float32")
    with torch.no_grad():
        want = vae.encode(torch.from_numpy(audio)[None, None]).mean[0].numpy()
    np.testing.assert_allclose(z, want, atol=1e-5)
    assert json.loads(lat["json"])["latents"]["frames"] == z.shape[1]
    # resume: a finished shard is kept (same inode), a missing one is written again
    first, second = (latent_shards / manifest["shards"][0]["name"]), (latent_shards / manifest["shards"][1]["name"])
    inode = first.stat().st_ino
    second.unlink()
    r = encode_shards(str(vae_dir), str(audio_shards), str(latent_shards))
    assert (r.written, r.kept) == (1, len(manifest["shards"]) - 1)
    assert first.stat().st_ino == inode and second.exists()
    assert json.loads((latent_shards / "manifest.json").read_text())["shards"] == manifest["shards"]


def _samples(url):
    with open_input(url) as f:
        for s in shards.iter_samples(f, url):
            yield s["__key__"], s


def test_dit_phases_loss_falls_and_generate_writes_audio(latent_shards, vae_dir, tmp_path, soundlake_here):
    out = tmp_path / "dit"
    # the pretrain phase reads from memory (a phase's data mode): the run switches to the shards
    spec = dit_spec(latent_shards, vae_dir, out, None, "log_every=5", "lr=1e-3", "ema=0.9",
                    "phases=[{name: pretrain, mode: masked, shards: %s, steps: 10, data: memory}, "
                    "{name: text, shards: %s, steps: 50}]" % (latent_shards, latent_shards), "workers=0")
    s = train(spec)
    assert s.steps == 60
    rows = log_rows(out)
    assert [r["phase"] for r in rows] == ["pretrain"] * 2 + ["text"] * 10
    text = [float(r["loss"]) for r in rows if r["phase"] == "text"]
    assert np.mean(text[-3:]) < 0.8 * text[0], text
    # the folder is self-contained: DiT + its VAE + latent statistics + text encoder identity
    gen = Generator.load(out)
    assert gen.meta["train"]["step"] == 60 and gen.meta["train"]["ema"] == 0.9
    assert (out / "vae" / "model.safetensors").exists()
    wav = tmp_path / "gen" / "beep.wav"
    r = soundlake_here("generate", "a high beep", "a bell rings", "--model", out, "--seconds", "1.5",
                       "--steps", "4", "--rescale-axis", "time", "--out", wav)
    assert r.exit_code == 0, r.output
    for i, prompt in enumerate(["a high beep", "a bell rings"]):
        p = tmp_path / "gen" / f"beep-{i}.wav"
        info = sf.info(str(p))
        assert info.samplerate == 16000 and info.frames == 24000
        side = json.loads(p.with_name(p.name + ".json").read_text())
        assert side["prompt"] == prompt and side["rescale_axis"] == "time" and side["steps"] == 4
    # long audio with sparse attention: 4x the 1 s training crop
    r = soundlake_here("generate", "a bell rings", "--model", out, "--seconds", "4", "--steps", "2",
                       "--sparse-attention", "litefocus", "--ratio", "0.2", "--out", tmp_path / "long.wav")
    assert r.exit_code == 0, r.output
    assert sf.info(str(tmp_path / "long.wav")).frames == 64000
    assert json.loads((tmp_path / "long.wav.json").read_text())["sparse_attention"] == "litefocus"


@pytest.mark.parametrize("workers", [1, 0], ids=["ray_train", "local_mode"])
def test_resume_reproduces_the_uninterrupted_next_step_loss(dit_base, latent_shards, vae_dir, tiny_clap,
                                                             tmp_path, workers):
    """The first run (Ray Train with one worker, or local mode) stops at step 5; local mode
    resumes from its checkpoint folder, whichever mode wrote it."""
    sets = base_sets(tiny_clap)   # dit_base is the uninterrupted run "a"
    train(dit_spec(latent_shards, vae_dir, tmp_path / "b", 5, *sets, f"workers={workers}"))  # checkpoint at 5
    s = train(dit_spec(latent_shards, vae_dir, tmp_path / "b", 8, *sets, "workers=0"))        # resumes at 5
    assert s.resumed_from == 5 and s.steps == 8
    # both modes keep finished checkpoints as <out>/ray_train/step-N, the newest keep_checkpoints of them
    assert sorted(p.name for p in (tmp_path / "b" / "ray_train").glob("step-*")) == ["step-00000005", "step-00000008"]
    a, b = losses(dit_base), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))    # no duplicated or missing log rows
    # 24 samples / batch 4 = 6 batches per epoch: step 7 starts the second epoch
    for step in (6, 7, 8):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), (step, a[step], b[step])


def test_dual_conditioning_genau_clap_vector_and_dcldm_stream(dit_base, tiny_clap, audio_shards):
    from soundlake.models.clap.load import load_clap

    gen = Generator.load(dit_base)
    cfg = gen.dit.cfg
    assert cfg.cond_extra_dim == load_clap(str(tiny_clap)).dim and cfg.cond2_dim == 16 \
        and cfg.cross_attn2_blocks == [0, 3]   # DC-LDM's best placement: the first and the last block
    # the stream reached the loss: its zero-initialised out-projections were trained
    assert gen.dit.blocks[0].cross_attn2.out.weight.abs().max() > 0
    assert gen.dit.blocks[3].cross_attn2.out.weight.abs().max() > 0
    # and generation reads it: two reference clips give two different generations
    key, sample = next(iter(_samples(shard_urls(str(audio_shards))[0])))
    ref, _ = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
    a = gen.generate(["a bell"], seconds=0.5, steps=2, reference=ref).audio
    b = gen.generate(["a bell"], seconds=0.5, steps=2, reference=np.roll(ref, 8000) * 0.5).audio
    assert a.shape == b.shape == (1, 8000)
    assert not np.array_equal(a, b)


def test_bad_specs_say_what_to_fix(audio_shards, vae_dir, tmp_path, soundlake_here):
    with pytest.raises(UserError, match="unknown key 'lrr'"):
        load_train_spec("vae", shards=str(audio_shards), out=str(tmp_path), steps=1, sets=["lrr=1"])
    with pytest.raises(UserError, match="vae: a DiT trains on VAE latents"):
        load_train_spec("dit", shards=str(audio_shards), out=str(tmp_path), steps=1)
    with pytest.raises(UserError, match="soundlake encode"):  # audio shards given to the DiT
        train(dit_spec(audio_shards, vae_dir, tmp_path / "x", 1))
    with pytest.raises(UserError, match="no such bundled config"):
        load_train_spec("vae", shards=str(audio_shards), out=str(tmp_path), steps=1, config="vae-huge")
    r = soundlake_here("generate", "x", "--model", tmp_path)
    assert r.exit_code == 2 and "not a soundlake model folder" in " ".join(r.output.split())


@pytest.fixture(scope="module")
def init_run(ray_session, dit_base, latent_shards, vae_dir, tiny_clap, tmp_path_factory):
    """`soundlake train dit --set init=<dit_base>`: 2 steps at lr 1e-12 on two DDP workers of the
    session's Ray (joined with --address)."""
    out = tmp_path_factory.mktemp("runs") / "init"
    sets = [*SMALL_DIT, *base_sets(tiny_clap), f"init={dit_base}", "lr=1e-12"]
    r = invoke_here("train", "dit", "--shards", latent_shards, "--vae", vae_dir, "--out", out, "--steps", "2",
                    "--batch-size", "4", "--seconds", "1.0", "--workers", "2", "--address", ray_session,
                    *(arg for s in sets for arg in ("--set", s)))
    assert r.exit_code == 0, r.output[-2000:]
    return out, r.output


def test_train_cli_reports_progress_and_summary(init_run):
    """The CLI's progress callback reads what the trainer writes (a key mismatch only shows as a
    traceback in a thread, so look for one)."""
    out, stderr = init_run
    # (lines that Ray's workers log to this process's driver start with "(Name pid=N)")
    assert not any(line.startswith("Traceback") for line in stderr.splitlines()), stderr
    assert "train dit done" in stderr
    assert read_meta(out, "dit")["train"]["spec"]["ray_address"] == os.environ["SOUNDLAKE_TEST_RAY_ADDRESS"]


def test_weights_only_init(init_run, dit_base):
    out, stderr = init_run
    assert "resumed" not in stderr and read_meta(out, "dit")["train"]["step"] == 2   # fresh, not a resume
    a, b = load_weights(dit_base), load_weights(out)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-8) for k in a)


def test_two_workers_ddp(init_run):
    out, _ = init_run
    assert len(log_rows(out)) == 2   # rank 0 alone logs
    # both ranks' data positions are in the merged checkpoint, the model state once
    ckpt = out / "ray_train" / "step-00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["rank-0.pt", "rank-1.pt", "state.pt"]
