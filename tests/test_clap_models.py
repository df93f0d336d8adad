"""CLAP model layer: hf / laion / in-house backends, windowing, zero-shot, text encoder.

Real classes, tiny random weights: a transformers ClapModel saved with save_pretrained
and loaded back through load_clap; the in-house model trained for a few steps on synth
clips. No hub access (the MiniLM tokenizer doubles as the tiny CLAP's tokenizer).
"""
from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest
import torch

from soundlake.models.clap.load import detect_backend, load_clap
from soundlake.models.clap.windowing import Windowing, label_prompts, zero_shot
from soundlake.models.text import load_text_encoder

torch.set_num_threads(1)

SR = 8000       # tiny hf model: 8 kHz, 4 s window
WIN_S = 4


def _noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    # a tone whose pitch depends on the seed, plus noise: clips differ in content
    return (0.3 * np.sin(2 * np.pi * (200 + 150 * seed) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module", params=[False, True], ids=["unfused", "fused"])
def tiny_hf(request, tmp_path_factory):
    from soundlake.testing import make_tiny_hf_clap

    return make_tiny_hf_clap(tmp_path_factory.mktemp("tiny_clap"), SR, WIN_S, fusion=request.param)


def test_hf_loads_normalised_vectors_and_identity(tiny_hf):
    assert detect_backend(tiny_hf) == "hf"
    clap = load_clap(str(tiny_hf))
    assert (clap.sample_rate, clap.dim) == (SR, 12)
    a = clap.embed_audio([_noise(1.5, 1), _noise(4, 2), _noise(9, 3)])
    t = clap.embed_text(["a dog barks", "rain on a tin roof"])
    assert a.shape == (3, 12) and t.shape == (2, 12) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    weights = (tiny_hf / "model.safetensors").read_bytes()
    assert clap.identity["checkpoint_sha256"] == hashlib.sha256(weights).hexdigest()[:16]
    assert clap.identity["backend"] == "hf" and clap.identity["window_s"] == WIN_S
    assert clap.identity["is_longer"] is False
    assert clap.embed_audio([]).shape == (0, 12)
    with pytest.raises(ValueError):
        clap.embed_audio([np.zeros((2, SR), np.float32)])   # stereo: the caller must downmix


def test_hf_same_clip_same_vector_whatever_the_batch(tiny_hf):
    clap = load_clap(str(tiny_hf))
    clips = [_noise(s, i) for i, s in enumerate([0.7, 3.0, 4.0, 6.5, 12.0])]
    alone = np.stack([clap.embed_audio([c])[0] for c in clips])
    batch = clap.embed_audio(clips)
    order = [3, 0, 4, 2, 1]
    shuffled = clap.embed_audio([clips[i] for i in order])
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    np.testing.assert_allclose(shuffled, batch[order], atol=1e-5)
    # fused models: the extractor would flag one random clip as "longer"; repeated calls agree
    np.testing.assert_allclose(clap.embed_audio(clips[:2]), clap.embed_audio(clips[:2]), atol=1e-6)
    # different content gives different vectors (the model is not constant)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3
    texts = ["a dog barks", "a long sentence about a very loud siren passing by in the street", "hum"]
    t_all = clap.embed_text(texts)
    np.testing.assert_allclose(np.stack([clap.embed_text([x])[0] for x in texts]), t_all, atol=1e-5)


def test_long_clip_is_the_mean_of_its_windows(tiny_hf):
    clap = load_clap(str(tiny_hf))
    clip = _noise(25, 4) * np.linspace(0.2, 1.0, 25 * SR, dtype=np.float32)
    w = WIN_S * SR
    starts = Windowing(SR, WIN_S).starts(len(clip))
    assert starts == [0, w, 2 * w, 3 * w, 4 * w, 5 * w, 25 * SR - w]   # last window aligned to the end
    per_window = clap.embed_audio([clip[s : s + w] for s in starts])
    expected = per_window.mean(0)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(clap.embed_audio([clip])[0], expected, atol=1e-5)
    assert np.abs(per_window[0] - per_window[-1]).max() > 1e-4   # windows differ: the mean matters


def test_detect_backend_refuses_unknown_folders(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError):
        detect_backend(tmp_path)
    with pytest.raises(FileNotFoundError):
        detect_backend(tmp_path / "missing")


def test_windowing_policy():
    win = Windowing(100, 1.0, hop_s=0.5)
    assert win.starts(100) == [0] and win.starts(250) == [0, 50, 100, 150]
    assert win.windows(np.ones(250, np.float32)).shape == (4, 100)
    rep = Windowing(100, 1.0, pad="repeatpad").windows(np.arange(1, 31, dtype=np.float32))[0]
    np.testing.assert_array_equal(rep[:90], np.tile(np.arange(1, 31), 3))
    assert not rep[90:].any()
    zero = Windowing(100, 1.0, pad="zero").windows(np.ones(30, np.float32))[0]
    assert zero[:30].all() and not zero[30:].any()
    assert not Windowing(100, 1.0).windows(np.zeros(0, np.float32)).any()   # empty clip: silence
    with pytest.raises(ValueError):
        Windowing(100, 1.0, pad="random")


def test_zero_shot_probabilities():
    rng = np.random.default_rng(0)
    audio, labels = rng.standard_normal((5, 8)), rng.standard_normal((3, 8))
    p = zero_shot(audio, labels, logit_scale=30.0)
    assert p.shape == (5, 3)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)
    cos = (audio / np.linalg.norm(audio, axis=1, keepdims=True)) @ (labels / np.linalg.norm(labels, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(p.argmax(1), cos.argmax(1))
    assert zero_shot(audio, labels, 100.0).max(1).mean() > zero_shot(audio, labels, 1.0).max(1).mean()
    assert label_prompts(["Dog", "Rain"]) == ["the sound of Dog", "the sound of Rain"]


def test_text_encoder_sentence_embeddings():
    enc = load_text_encoder()
    e = enc.encode(["a dog is barking", "a dog barks loudly", "a violin plays a slow melody"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2      # real pretrained weights: paraphrases are close
    hidden, mask = enc.encode_tokens(["short", "a somewhat longer caption"])
    assert hidden.shape[:2] == mask.shape and hidden.shape[2] == enc.dim
    assert mask[0].sum() < mask[1].sum()
    assert len(enc.identity["sha256"]) == 16


# ---------------------------------------------------------------- laion


@pytest.mark.skipif(importlib.util.find_spec("laion_clap") is not None, reason="laion_clap is installed")
def test_laion_missing_says_how_to_install(tmp_path):
    ckpt = tmp_path / "630k-audioset-best.pt"
    torch.save({"state_dict": {}}, ckpt)
    assert detect_backend(ckpt) == "laion"
    with pytest.raises(ImportError, match=r"soundlake\[laion\]"):
        load_clap(str(ckpt))


@pytest.mark.skipif(importlib.util.find_spec("laion_clap") is None,
                    reason="laion_clap not importable (optional extra: pip install 'soundlake[laion]')")
def test_laion_checkpoint_round_trip(tmp_path):
    import laion_clap

    try:  # its constructor fetches roberta-base; offline that works only from a local cache
        module = laion_clap.CLAP_Module(enable_fusion=False, device="cpu")
    except Exception as e:  # pragma: no cover - depends on the machine's cache
        pytest.skip(f"laion_clap cannot build its model offline: {e}")
    ckpt = tmp_path / "tiny-laion.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in module.model.state_dict().items()}}, ckpt)
    clap = load_clap(str(ckpt))
    sr = clap.sample_rate
    clips = [np.sin(np.arange(int(s * sr)) * 0.01 * (i + 1)).astype(np.float32) for i, s in enumerate([3, 12])]
    a = clap.embed_audio(clips)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(clap.embed_audio(clips[::-1])[::-1], a, atol=1e-5)
    assert clap.identity["backend"] == "laion" and clap.identity["checkpoint_sha256"]


# ---------------------------------------------------------------- in-house


def test_inhouse_trains_saves_and_loads(tmp_path):
    synth = pytest.importorskip("soundlake.sources.synth")
    from soundlake.models.clap.inhouse import ClapTrainConfig, InHouseClap, train_clap

    cfg = ClapTrainConfig(epochs=6, batch_size=8, lr=3e-3, warmup_steps=1, window_s=3.0, channels=32,
                          dim=32, seed=0, time_mask=0.0, freq_mask=0)
    pairs = [synth.synth_clip(7, i, 3.0, cfg.sample_rate) for i in range(16)]
    audio = (np.asarray(a, dtype=np.float32).reshape(-1) for _, a in pairs)   # a generator: streamed once
    captions = [scene.caption for scene, _ in pairs]
    out = tmp_path / "clap"
    res = train_clap(audio, captions, out, cfg)
    losses = [row["loss"] for row in res["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.6

    assert detect_backend(out) == "soundlake"
    loaded = load_clap(str(out))
    assert isinstance(loaded, InHouseClap) and loaded.dim == 32
    clips = [np.asarray(a, dtype=np.float32).reshape(-1) for _, a in pairs[:4]] + [np.zeros(cfg.sample_rate, np.float32)]
    np.testing.assert_allclose(loaded.embed_audio(clips), res["model"].embed_audio(clips), atol=1e-6)
    np.testing.assert_allclose(loaded.embed_text(captions[:3]), res["model"].embed_text(captions[:3]), atol=1e-6)
    a = loaded.embed_audio(clips)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(loaded.embed_audio(clips[::-1])[::-1], a, atol=1e-5)
    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert loaded.identity["checkpoint_sha256"] == sha == res["identity"]["checkpoint_sha256"]
    assert loaded.identity["backend"] == "soundlake" and loaded.identity["pad"] == "zero"
