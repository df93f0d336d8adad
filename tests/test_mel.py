"""The mel path: the log-mel front end against independent references, the mel VAE's 1D and
2D latents, the vocoder, Griffin-Lim, and `generate` through the CLI on a mel model folder.

One Ray Train run in all (a 2D-latent DiT with a vocoder, then `soundlake generate`); the
VAE, the vocoder and the objectives' steps run in-process.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from soundlake.core.errors import UserError
from soundlake.generation.inference.evaluate import attach_litefocus, litefocus_geometry
from soundlake.generation.inference.hooks import HookRegistry
from soundlake.generation.inference.litefocus import HOOK_NAME, FocusAttention
from soundlake.generation.mel import LogMel, MelSpec, griffin_lim, mel_filters
from soundlake.generation.mel_vae import (
    MelVAE,
    MelVAEConfig,
    from_tokens,
    latent_geometry,
    mel_vae_train_step,
    to_tokens,
)
from soundlake.generation.model_folder import Generator, read_meta, save_model
from soundlake.generation.vocoder import Vocoder, VocoderConfig, vocoder_train_step
from soundlake.sources.synth import synth_clip

SR = 16000
TINY = dict(channels=8, channel_mults=[1, 2, 2], time_down=[2, 2], freq_down=[2, 4], res_blocks=1, latent_dim=4)


def tone(freq: float, seconds: float = 0.5) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def synth_crops(n: int, seconds: float, seed: int = 0) -> torch.Tensor:
    samples = int(seconds * SR)
    return torch.from_numpy(np.stack([synth_clip(seed, i, duration=seconds, sample_rate=SR)[1][:samples]
                                      for i in range(n)]))[:, None]


def test_front_end_matches_librosa_and_its_filters_match_transformers():
    import librosa
    from transformers.audio_utils import mel_filter_bank

    spec = MelSpec()
    rng = np.random.default_rng(0)
    wav = tone(440.0) + 0.05 * rng.standard_normal(SR // 2).astype(np.float32)
    ours = LogMel(spec)(torch.from_numpy(wav)[None])[0].numpy()
    # librosa computes its own STFT (numpy) on the same AudioLDM framing: reflect pad, no centring
    ref = librosa.feature.melspectrogram(y=np.pad(wav, spec.pad, mode="reflect"), sr=SR, n_fft=spec.n_fft,
                                         hop_length=spec.hop, win_length=spec.win, center=False, power=1.0,
                                         n_mels=spec.n_mels, fmin=spec.fmin, fmax=spec.fmax)
    assert ours.shape == ref.shape == (64, len(wav) // spec.hop)
    np.testing.assert_allclose(ours, np.log(np.maximum(ref, spec.log_floor)), atol=5e-3)
    # the filters against another library's implementation of Slaney mel filters
    other = mel_filter_bank(num_frequency_bins=spec.n_fft // 2 + 1, num_mel_filters=spec.n_mels,
                            min_frequency=spec.fmin, max_frequency=spec.fmax, sampling_rate=SR, norm="slaney",
                            mel_scale="slaney").T
    np.testing.assert_allclose(mel_filters(spec), other, atol=1e-6)
    with pytest.raises(ValueError, match="hop"):
        MelSpec(hop=2048)
    with pytest.raises(ValueError, match="multiple of the mel hop"):
        LogMel(spec)(torch.zeros(1, 1000))


@pytest.mark.parametrize("latent", ["1d", "2d"])
def test_latent_shapes_tokens_and_round_trip(latent):
    torch.manual_seed(0)
    cfg = MelVAEConfig(latent=latent, **TINY)
    assert MelVAEConfig.from_dict(cfg.to_dict()) == cfg
    vae = MelVAE(cfg)
    wav = synth_crops(2, 0.64)                         # 64 mel frames -> 16 latent frames
    z = vae.encode(wav).mean
    grid = cfg.grid_freq
    assert grid == (64 // 8 if latent == "2d" else 1)
    assert z.shape == ((2, 4, 16) if latent == "1d" else (2, 4, 8, 16))
    assert vae.decode(z).shape == (2, 64, 64)
    assert latent_geometry(cfg.to_dict()) == {"rate": 25.0, "channels": 4, "grid_freq": grid, "stored_channels": 4 * grid}
    # stored folded [B, C * F', T'] -> tokens [B, T' * F', C] (time-major) -> back, exactly
    tokens = to_tokens(z.flatten(1, -2), grid)
    assert tokens.shape == (2, 16 * grid, 4)
    assert torch.equal(from_tokens(tokens, grid), z)
    if latent == "2d":   # token t * F' + f holds grid position (f, t): tokens sharing f are every F'-th
        assert torch.equal(tokens[:, 5 * grid + 3], z[:, :, 3, 5])
    # round trip: a few steps on two clips bring the reconstruction closer
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    l1 = [mel_vae_train_step(vae, opt, wav, cfg)["l1"] for _ in range(30)]
    assert np.mean(l1[-5:]) < 0.7 * l1[0], l1


def test_vocoder_training_loss_falls_and_keeps_length():
    torch.manual_seed(0)
    cfg = VocoderConfig(dim=32, intermediate=64, layers=2, stft_sizes=[512, 128])
    voc = Vocoder(cfg)
    wav = synth_crops(2, 0.32)
    opt = torch.optim.AdamW(voc.parameters(), lr=3e-3)
    losses = [vocoder_train_step(voc, opt, wav, cfg)["loss"] for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.8 * losses[0], losses
    with torch.no_grad():
        assert voc(voc.mel(wav)).shape == (2, wav.shape[-1])


@pytest.mark.parametrize("freq", [440.0, 1500.0])
def test_griffin_lim_keeps_a_tones_pitch(freq):
    import librosa

    spec = MelSpec()
    wav = tone(freq)
    out = griffin_lim(LogMel(spec)(torch.from_numpy(wav)[None]), spec)[0]
    assert out.shape == wav.shape and np.abs(out).max() > 0.1
    peak = np.argmax(np.abs(np.fft.rfft(out))) * SR / len(out)
    centres = librosa.mel_frequencies(spec.n_mels + 2, fmin=spec.fmin, fmax=spec.fmax)
    band = np.diff(centres)[np.searchsorted(centres, freq) - 1]   # one mel band's width at the tone
    assert abs(peak - freq) < band, (peak, freq, band)


def test_mel_vae_objective_and_plans(tmp_path, mel_shards):
    """`train vae --config mel-vae-tiny` and `train vocoder` resolve and step in-process
    (the trainer runs exactly these objectives on its workers)."""
    from soundlake.generation.train.objectives import OBJECTIVES
    from soundlake.generation.train.specs import load_train_spec, make_plan
    from soundlake.generation.train.trainer import phase_batches

    shards, vae_dir, voc_dir = mel_shards["audio"], mel_shards["vae"], mel_shards["vocoder"]
    for kind, extra in (("vae", {"config": "mel-vae-tiny"}), ("vocoder", {"vae": str(vae_dir)})):
        spec = load_train_spec(kind, shards=str(shards), out=str(tmp_path / kind), steps=1, batch_size=2,
                               seconds=0.64, sets=["shuffle=0"], **extra)
        plan = make_plan(spec)
        obj = OBJECTIVES[kind](spec, plan, "cpu")
        _, _, batch = next(phase_batches(spec, plan, obj.loader_kw, 0, 0, 0, {}))
        item, n = obj.prepare(batch)
        assert n == 2 and item.shape == (2, 1, 10240)
        opt = torch.optim.AdamW(obj.model.parameters(), lr=1e-3)
        assert np.isfinite(obj.step(obj.model, opt, {}, item, spec.phases[0])["loss"])
    assert plan["vocoder_config"]["mel"] == read_meta(vae_dir, "vae")["config"]["mel"]   # from --vae
    # a vocoder of another front end is refused before any training
    bad = tmp_path / "bad-vocoder"
    save_model(bad, "vocoder", Vocoder(VocoderConfig(mel=MelSpec(n_mels=80))),
               {"config": VocoderConfig(mel=MelSpec(n_mels=80)).to_dict()})
    spec = load_train_spec("dit", shards=str(mel_shards["latents"]), vae=str(vae_dir), out=str(tmp_path / "d"),
                           steps=1, vocoder=str(bad))
    with pytest.raises(UserError, match="another mel front end"):
        make_plan(spec)
    spec = load_train_spec("dit", shards=str(mel_shards["latents"]), vae=str(vae_dir), out=str(tmp_path / "d"),
                           steps=1, vocoder=str(voc_dir))
    plan = make_plan(spec)
    assert plan["dit_config"]["in_channels"] == 8 and plan["latents"]["grid_freq"] == 8
    assert plan["dit_config"]["grid_freq"] == 8   # the DiT's 2D RoPE reads the grid


@pytest.fixture(scope="module")
def mel_shards(tmp_path_factory, ray_session):
    """A synth export, a (barely trained) 2D mel VAE, its latent shards and a vocoder."""
    from soundlake.generation.train.encode import encode_shards
    from soundlake.testing import make_synth_export

    root = tmp_path_factory.mktemp("mel")
    audio = make_synth_export(root, 8, seconds=1.0, sr=SR, shard_count=2)
    torch.manual_seed(0)
    cfg = MelVAEConfig.from_yaml("mel-vae-tiny-2d")
    vae = MelVAE(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for _ in range(3):
        mel_vae_train_step(vae, opt, synth_crops(2, 0.64), cfg)
    save_model(root / "vae", "vae", vae, {"config": cfg.to_dict(), "latents": latent_geometry(cfg.to_dict())})
    vcfg = VocoderConfig(dim=16, intermediate=32, layers=1)
    save_model(root / "vocoder", "vocoder", Vocoder(vcfg), {"config": vcfg.to_dict()})
    encode_shards(str(root / "vae"), str(audio), str(root / "latents"))
    return {"audio": audio, "vae": root / "vae", "vocoder": root / "vocoder", "latents": root / "latents"}


@pytest.mark.slow
def test_generate_through_the_cli_on_the_mel_path(mel_shards, tmp_path, soundlake_here):
    from soundlake.generation.train.specs import load_train_spec
    from soundlake.generation.train.trainer import train

    manifest = json.loads((mel_shards["latents"] / "manifest.json").read_text())
    assert manifest["latents"]["grid_freq"] == 8 and manifest["latents"]["channels"] == 8
    out = tmp_path / "dit"
    spec = load_train_spec("dit", shards=str(mel_shards["latents"]), vae=str(mel_shards["vae"]), out=str(out),
                           steps=4, batch_size=2, seconds=0.64, vocoder=str(mel_shards["vocoder"]),
                           sets=["overrides.depth=2", "overrides.hidden=32", "overrides.heads=2",
                                 "overrides.sola_rank=4", "shuffle=0", "log_every=1", "workers=0"])
    assert train(spec).steps == 4
    meta = read_meta(out, "dit")
    assert meta["latents"]["grid_freq"] == 8 and meta["config"]["in_channels"] == 8 and meta["config"]["grid_freq"] == 8
    assert read_meta(out / "vocoder", "vocoder")["config"]["mel"] == read_meta(out / "vae", "vae")["config"]["mel"]
    wav = tmp_path / "siren.wav"
    r = soundlake_here("generate", "a siren wails", "--model", out, "--seconds", "1.0", "--steps", "2", "--out", wav)
    assert r.exit_code == 0, r.output
    info = sf.info(str(wav))
    assert info.samplerate == SR and info.frames == SR
    side = json.loads(wav.with_name(wav.name + ".json").read_text())
    assert side["inversion"] == "vocoder" and side["grid_freq"] == 8 and side["frames"] == 25 * 8
    # LiteFocus on the 2D grid: the paper's same-frequency focus, sparse at every length
    long = tmp_path / "long.wav"
    r = soundlake_here("generate", "a siren wails", "--model", out, "--seconds", "2.56", "--steps", "2",
                       "--sparse-attention", "litefocus", "--ratio", "0.1", "--out", long)
    assert r.exit_code == 0, r.output
    side = json.loads(long.with_name(long.name + ".json").read_text())
    assert (side["pattern"], side["freq_bins"], side["min_tokens"], side["ratio"]) == ("focus", 8, 0, 0.1)
    assert sf.info(str(long)).frames == int(2.56 * SR)
    gen = Generator.load(out)
    geometry = litefocus_geometry(gen, None, None, 2.56)
    with attach_litefocus(gen, geometry, 0.1, 0) as handle:
        assert len(handle.modules) == 2  # every block
        gen.generate(["a siren wails"], seconds=2.56, steps=2)
        focus = [HookRegistry.of(m).get_hook(HOOK_NAME).attention for m in handle.modules]
    n = gen.frames(2.56)  # 64 latent frames x 8 rows
    assert n == 512 and all(isinstance(f, FocusAttention) and len(f.last_compensation) == int(0.1 * n) for f in focus)
    # without the vocoder: Griffin-Lim (in-process, a short clip)
    gen = Generator.load(out, griffin_lim=True)
    res = gen.generate(["a bell rings"], seconds=0.32, steps=2)
    assert res.meta["inversion"] == "griffin-lim" and res.audio.shape == (1, int(0.32 * SR))
    assert np.isfinite(res.audio).all()
