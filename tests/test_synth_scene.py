"""event_in_scene: a short clip presented as a 10 s single-event synth scene (the demo's generated clip)."""
import numpy as np
import pytest

from soundlake.sources.synth import FLOOR_DBFS, event_in_scene, plan_scene, render_scene

SR = 16000


def _db(x) -> float:
    return float(20 * np.log10(x))


def _tone(seconds: float = 1.28, freq: float = 900.0) -> np.ndarray:
    t = np.arange(int(round(seconds * SR))) / SR
    return (0.01 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_length_level_and_placement():
    clip = _tone()
    out = event_in_scene(clip, SR)
    assert out.dtype == np.float32 and out.shape == (10 * SR,)
    assert abs(_db(np.abs(out).max()) + 4.5) < 0.05  # a quiet clip comes out at the scene's level
    a = (len(out) - len(clip)) // 2
    inside = out[a:a + len(clip)]
    outside = np.concatenate([out[:a], out[a + len(clip):]])
    assert np.sqrt(np.mean(inside ** 2)) > 100 * np.sqrt(np.mean(outside ** 2))
    assert np.all(outside != 0)  # a faint background, never digital silence


def test_start_places_the_clip():
    out = event_in_scene(_tone(1.0), SR, duration=4.0, start=0.5)
    assert out.shape == (4 * SR,)
    loud = np.nonzero(np.abs(out) > 0.05)[0]
    assert abs(loud[0] / SR - 0.5) < 0.01 and abs(loud[-1] / SR - 1.5) < 0.01


def test_deterministic_for_a_seed():
    clip = _tone()
    assert np.array_equal(event_in_scene(clip, SR, seed=3), event_in_scene(clip, SR, seed=3))
    assert not np.array_equal(event_in_scene(clip, SR, seed=3), event_in_scene(clip, SR, seed=4))


def test_background_like_a_rendered_scene():
    """The floor sits as far below the event as in render_scene's single-event scenes."""
    scene = next(s for s in (plan_scene(0, i) for i in range(50)) if s.kind == "single")
    scene.sample_rate = SR
    audio = render_scene(scene, SR)
    e = scene.events[0]
    quiet = np.concatenate([audio[:int(e.start * SR)], audio[int(e.end * SR) + 1:]])
    rendered = _db(np.sqrt(np.mean(quiet.astype(np.float64) ** 2)) / np.abs(audio).max())
    out = event_in_scene(_tone(), SR)
    a = (len(out) - int(1.28 * SR)) // 2
    ours = _db(np.sqrt(np.mean(out[:a].astype(np.float64) ** 2)) / np.abs(out).max())
    assert abs(ours - rendered) < 1.0
    assert abs(ours - FLOOR_DBFS) < 1.0


def test_refuses_a_clip_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        event_in_scene(_tone(11.0), SR)
    with pytest.raises(ValueError, match="outside"):
        event_in_scene(_tone(1.0), SR, duration=4.0, start=3.5)
