"""The papers' metric extractors against their reference packages, on random weights.

PANNs CNN14 against ``panns_inference`` (the authors' package; its front end is torchlibrosa's)
and VGGish against ``torchvggish`` (front end, network, PCA post-processing), both test-only
extras (``pip install -e .[test]``). Random weights, with random batch-norm statistics so that
every layer matters; the checkpoints are saved and read back through the loaders, as a
released file would be.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from soundlake.generation.inference.metrics import is_audio, kl_audio
from soundlake.models.extractors import panns, vggish

torch.set_num_threads(1)


def randomise_batch_norms(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def clips(n=3, seconds=1.3, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return [(0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(len(t)))
            .astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def reference_cnn14(tmp_path_factory, monkeypatch_module):
    # panns_inference reads an AudioSet label CSV from ~/panns_data at import (and would fetch it)
    home = tmp_path_factory.mktemp("home")
    (home / "panns_data").mkdir()
    (home / "panns_data" / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/m/09x0r,Speech\n")
    monkeypatch_module.setenv("HOME", str(home))
    models = pytest.importorskip("panns_inference.models", reason="panns-inference (the test extra) is not installed")
    torch.manual_seed(0)
    ref = models.Cnn14(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50, fmax=8000,
                       classes_num=527)
    randomise_batch_norms(ref)
    return ref.eval()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_cnn14_matches_panns_inference(reference_cnn14, tmp_path):
    path = tmp_path / "Cnn14_16k.pth"
    torch.save({"model": reference_cnn14.state_dict()}, path)   # the released files' layout
    ours = panns.load_panns(path)
    x = torch.from_numpy(np.stack(clips()))
    with torch.no_grad():
        want = reference_cnn14(x)
        got = ours(x)
    torch.testing.assert_close(got["embedding"], want["embedding"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.sigmoid(got["logits"]), want["clipwise_output"], atol=1e-5, rtol=1e-4)
    # the front end alone: torchlibrosa's conv-STFT log-mel
    with torch.no_grad():
        ref_mel = reference_cnn14.logmel_extractor(reference_cnn14.spectrogram_extractor(x))
    torch.testing.assert_close(ours.front(x), ref_mel, atol=2e-3, rtol=1e-4)


def test_panns_metrics_feed_fd_kl_is(reference_cnn14, tmp_path):
    path = tmp_path / "cnn14.pth"
    torch.save(reference_cnn14.state_dict(), path)                # a bare state_dict loads too
    m = panns.PannsMetrics.load(path)
    a, b = clips(4, seed=1), clips(4, seed=2)
    assert m.sample_rate == 16000 and m.model.startswith("panns-cnn14-16k:cnn14.pth:")
    emb = m.embed(a)
    assert emb.shape == (4, 2048) and (emb >= 0).all()
    probs = m.classify(a)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert not np.allclose(m.embed(b), emb)   # (FD's core is tested in test_metrics: a 2048-d sqrtm is slow)
    assert kl_audio(a, a, m.classify, 16000).value == pytest.approx(0.0, abs=1e-9)
    assert is_audio(a, m.classify, 16000, splits=1).value >= 1.0


def test_panns_loader_names_a_wrong_file(tmp_path):
    bad = tmp_path / "not_panns.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises((ValueError, KeyError)):
        panns.load_panns(bad)


@pytest.fixture(scope="module")
def tv():
    return pytest.importorskip("torchvggish", reason="torchvggish (the test extra) is not installed")


def test_vggish_front_end_matches_torchvggish(tv):
    vi = importlib.import_module("torchvggish.vggish_input")
    for wav in clips(2, seconds=2.1):
        want = vi.waveform_to_examples(wav.astype(np.float64), 16000, return_tensor=True).detach()
        got = vggish.vggish_examples(wav)
        assert got.shape == want.shape == (2, 1, 96, 64)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert vggish.vggish_examples(np.zeros(15599, np.float32)).shape[0] == 0   # under 0.975 s: no example
    assert vggish.vggish_examples(np.zeros(15600, np.float32)).shape[0] == 1


def test_vggish_network_and_pca_match_torchvggish(tv, tmp_path):
    tvm = importlib.import_module("torchvggish.torchvggish")
    torch.manual_seed(0)
    ref = tvm._vgg(postprocess=False).eval()
    for p in ref.parameters():   # the default init leaves most ReLUs dead on log-mel input
        p.data.normal_(0, 0.02)
    torch.save(ref.state_dict(), tmp_path / "vggish.pth")
    g = torch.Generator().manual_seed(1)
    pca = {"pca_eigen_vectors": torch.randn(128, 128, generator=g).numpy() * 0.3,
           "pca_means": torch.randn(128, 1, generator=g).numpy()}
    torch.save(pca, tmp_path / "pca.pth")
    ours = vggish.load_vggish(tmp_path / "vggish.pth", tmp_path / "pca.pth")
    ex = torch.cat([vggish.vggish_examples(w) for w in clips(2, seconds=2.1)])
    with torch.no_grad():
        want_raw, got_raw = ref(ex), ours(ex)
    torch.testing.assert_close(got_raw, want_raw, atol=1e-5, rtol=1e-4)
    assert (want_raw > 0).any()
    post = object.__new__(tvm.Postprocessor)   # its __init__ downloads the PCA file
    post._pca_matrix = torch.as_tensor(pca["pca_eigen_vectors"]).float()
    post._pca_means = torch.as_tensor(pca["pca_means"].reshape(-1, 1)).float()
    torch.testing.assert_close(ours.postprocess(got_raw), post.postprocess(want_raw), atol=1.0, rtol=0)
    assert (ours.postprocess(got_raw) == post.postprocess(want_raw)).float().mean() > 0.99
    m = vggish.VggishMetrics.load(tmp_path / "vggish.pth", tmp_path / "pca.pth")
    assert m.model.startswith("vggish+pca:vggish.pth:") and m.embed(clips(3, seconds=2.1)).shape == (6, 128)
    with pytest.raises(ValueError, match="at least 0.97"):
        m.embed([np.zeros(8000, np.float32)])
