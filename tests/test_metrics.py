"""Generation metrics against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from soundlake.generation.inference.metrics import (
    MetricResult,
    clap_score,
    clap_score_audio,
    fd_audio,
    frechet_distance,
    frechet_distance_from_stats,
    inception_score,
    is_audio,
    kl_audio,
    kl_divergence,
    softmax,
)


def test_fd_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fd_closed_form_diagonal_gaussians():
    # diagonal covariances: FD = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert want == pytest.approx(1 + 4 + 0.25 + 4 + 1 + 0)
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_fd_closed_form_commuting_full_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr sqrt(S1 S2) = sum sqrt(a b)
    rng = np.random.default_rng(1)
    qm, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.5, 3, 5), rng.uniform(0.5, 3, 5)
    s1, s2 = qm @ np.diag(a) @ qm.T, qm @ np.diag(b) @ qm.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    want = np.sum((mu1 - mu2) ** 2) + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_fd_from_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, size=(20000, 2))
    y = rng.normal(1.0, 2.0, size=(20000, 2))
    # |mu|^2 = 2, sum (1 - 2)^2 = 2
    assert frechet_distance(x, y) == pytest.approx(4.0, abs=0.15)


def test_fd_singular_covariance_is_finite():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 16))  # fewer samples than dims: rank-deficient covariances
    y = rng.normal(size=(4, 16)) + 1
    fd = frechet_distance(x, y)
    assert np.isfinite(fd) and fd > 0


def test_kl_identical_is_zero_and_hand_pair():
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(size=(6, 10)))
    assert np.allclose(kl_divergence(p, p), 0.0, atol=1e-12)
    ref = np.array([[0.5, 0.5], [0.9, 0.1]])
    gen = np.array([[0.25, 0.75], [0.5, 0.5]])
    want = [0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75),
            0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)]
    np.testing.assert_allclose(kl_divergence(ref, gen, eps=0.0), want, rtol=1e-12)
    np.testing.assert_allclose(kl_divergence(ref, gen), want, rtol=1e-4)
    # direction: KL(ref || gen), not symmetric
    assert not np.allclose(kl_divergence(gen, ref, eps=0.0), want)
    # a class the generated side misses stays finite thanks to eps
    assert np.isfinite(kl_divergence(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))).all()
    with pytest.raises(ValueError, match="probability"):
        kl_divergence(np.ones((2, 3)), np.ones((2, 3)))


def test_inception_score():
    c, n = 8, 80
    uniform = np.full((n, c), 1.0 / c)
    assert inception_score(uniform, splits=4) == (pytest.approx(1.0), pytest.approx(0.0))
    confident = np.eye(c)[np.arange(n) % c]  # one-hot, evenly spread over the classes
    mean, std = inception_score(confident, splits=5)
    assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-9)
    # all confident in one class: no diversity, IS = 1
    assert inception_score(np.eye(c)[np.zeros(n, int)], splits=2)[0] == pytest.approx(1.0)
    # hand value: 2 samples, 2 classes, p(y|x) = [.8,.2] and [.2,.8], p(y) = [.5,.5]
    kl = 0.8 * np.log(0.8 / 0.5) + 0.2 * np.log(0.2 / 0.5)
    assert inception_score(np.array([[0.8, 0.2], [0.2, 0.8]]), splits=1)[0] == pytest.approx(np.exp(kl))


def test_clap_score():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    t = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert clap_score(a, t) == pytest.approx((1 / np.sqrt(2) + 1.0) / 2)


def test_wrappers_record_rate_and_counts():
    rng = np.random.default_rng(0)
    gen = [rng.normal(size=1600).astype(np.float32) for _ in range(6)]
    ref = [rng.normal(size=1600).astype(np.float32) for _ in range(6)]
    proj = rng.normal(size=(4, 4))

    def embed(clips):  # a tiny deterministic "embedder": band energies
        return np.stack([np.log1p(np.abs(np.fft.rfft(c))[:400].reshape(4, 100).mean(1)) @ proj for c in clips])

    def classify(clips):
        return softmax(embed(clips))

    fd = fd_audio(gen, ref, embed, 16000, model="toy")
    assert isinstance(fd, MetricResult) and fd.sample_rate == 16000
    assert (fd.n_generated, fd.n_reference, fd.model) == (6, 6, "toy")
    assert fd.value == pytest.approx(frechet_distance(embed(gen), embed(ref)))
    assert fd_audio(gen, gen, embed, 16000).value == pytest.approx(0.0, abs=1e-8)
    kl = kl_audio(gen, ref, classify, 16000)
    assert kl.value == pytest.approx(kl_divergence(classify(ref), classify(gen)).mean())
    assert kl.details["direction"] == "KL(reference||generated)"
    assert kl_audio(gen, gen, classify, 16000).value == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="paired"):
        kl_audio(gen, ref[:3], classify, 16000)
    iscore = is_audio(gen, classify, 16000, splits=2)
    assert 1.0 <= iscore.value <= 4.0 and iscore.n_generated == 6 and iscore.std is not None
    texts = ["a", "b", "c", "d", "e", "f"]
    cs = clap_score_audio(gen, texts, embed, lambda ts: embed(gen), 16000)
    assert cs.value == pytest.approx(1.0) and cs.to_dict()["sample_rate"] == 16000


def test_inhouse_clap_plugs_in(tmp_path):
    """A tiny randomly initialised in-house CLAP, saved and loaded through load_clap."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from soundlake.generation.inference.metrics import ClapFunctions
    from soundlake.models.clap.inhouse import ClapNet, ClapTrainConfig, save_clap
    from soundlake.models.clap.load import load_clap
    from soundlake.models.text import load_text_encoder

    cfg = ClapTrainConfig(dim=16, channels=16, window_s=1.0, n_mels=16, sample_rate=16000)
    text = load_text_encoder()
    torch.manual_seed(0)
    save_clap(ClapNet(cfg, text.dim), cfg, text, tmp_path / "clap")
    fns = ClapFunctions.of(load_clap(str(tmp_path / "clap")), labels=["siren", "dog", "rain"])
    assert fns.sample_rate == 16000 and fns.model.startswith("soundlake:")
    rng = np.random.default_rng(0)
    gen = [rng.normal(size=16000).astype(np.float32) * 0.1 for _ in range(4)]
    t = np.arange(16000) / 16000
    ref = [np.sin(2 * np.pi * f * t).astype(np.float32) for f in (220, 440, 880, 1760)]
    fd = fd_audio(gen, ref, fns.embed_audio, fns.sample_rate, model=fns.model)
    assert np.isfinite(fd.value) and fd.value > 0 and fd.model == fns.model
    kl = kl_audio(gen, ref, fns.classify, fns.sample_rate)
    assert kl.value >= 0 and kl_audio(ref, ref, fns.classify, 16000).value == pytest.approx(0, abs=1e-6)
    iscore = is_audio(ref, fns.classify, 16000, splits=1)
    assert 1.0 <= iscore.value <= 3.0
    cs = clap_score_audio(ref, ["a tone"] * 4, fns.embed_audio, fns.embed_text, 16000)
    assert -1.0 <= cs.value <= 1.0 and cs.n_generated == 4
