"""The synth source: deterministic scenes whose captions name exactly what sounds."""
from collections import Counter

import numpy as np
import pytest

from soundlake.sources.synth import (
    BASE_CLASSES,
    caption_mentions,
    mismatched_caption,
    plan_scene,
    render_scene,
    synth_clip,
)


def test_deterministic_whatever_the_order():
    a = synth_clip(3, 7, sample_rate=16000)
    synth_clip(3, 8, sample_rate=16000)
    b = synth_clip(3, 7, sample_rate=16000)
    assert a[0].caption == b[0].caption and np.array_equal(a[1], b[1])
    assert synth_clip(4, 7, sample_rate=16000)[0].source_id == "4-7"


@pytest.mark.parametrize("rate", [16000, 24000, 48000])
def test_length_rate_level(rate):
    scene, audio = synth_clip(0, 1, duration=4.0, sample_rate=rate)
    assert audio.dtype == np.float32 and audio.shape == (4 * rate,)
    peak = 20 * np.log10(np.abs(audio).max())
    assert -6.5 <= peak <= -2.5
    assert np.sqrt(np.mean(audio ** 2)) > 1e-3


def test_captions_name_exactly_the_labels_and_all_kinds_occur():
    scenes = [plan_scene(0, i) for i in range(300)]
    assert all(caption_mentions(s.caption) == set(s.labels) for s in scenes)
    assert {s.kind for s in scenes} == {"single", "mixture", "sequence"}
    counts = Counter(label for s in scenes for label in s.labels)
    assert set(counts) == set(BASE_CLASSES) and min(counts.values()) >= 20
    seq = next(s for s in scenes if s.kind == "sequence")
    assert ", then " in seq.caption and all(a.end <= b.start for a, b in zip(seq.events, seq.events[1:]))


def test_mismatched_caption_has_other_labels():
    scene = plan_scene(0, 5)
    other = mismatched_caption(scene, 1)
    assert caption_mentions(other) != set(scene.labels)


def _band_energies(audio: np.ndarray, rate: int) -> np.ndarray:
    frames = audio[: len(audio) // 1024 * 1024].reshape(-1, 1024)
    spec = np.abs(np.fft.rfft(frames * np.hanning(1024), axis=1)) ** 2
    edges = np.geomspace(20, rate / 2, 25)
    freqs = np.fft.rfftfreq(1024, 1 / rate)
    bands = np.stack([spec[:, (freqs >= lo) & (freqs < hi)].sum(1) for lo, hi in zip(edges, edges[1:])], 1)
    active = bands[bands.sum(1) > np.percentile(bands.sum(1), 60)]  # frames where the event sounds
    logb = np.log(active + 1e-9)
    return np.concatenate([logb.mean(0), logb.std(0)])


def test_classes_are_distinguishable_by_a_nearest_centroid():
    """Evidence that a small model can tell the classes apart: single events, held-out indices."""
    rate = 16000
    singles = [s for s in (plan_scene(0, i, duration=4.0) for i in range(400)) if s.kind == "single"]
    feats = [(s.labels[0], _band_energies(render_scene(s, rate), rate)) for s in singles]
    train, test = feats[: len(feats) // 2], feats[len(feats) // 2:]
    classes = sorted({c for c, _ in train})
    X = np.stack([f for _, f in train])
    mu, sd = X.mean(0), X.std(0) + 1e-6
    cent = {c: np.mean([(f - mu) / sd for k, f in train if k == c], 0) for c in classes}
    hits = sum(min(classes, key=lambda c: np.linalg.norm((f - mu) / sd - cent[c])) == k for k, f in test)
    assert hits / len(test) >= 0.9
