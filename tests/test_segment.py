"""Segment stage without Ray: decoding every format, window policies, levels, bad inputs."""
import io

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from soundlake.catalog.schema import INPUT_SCHEMA
from soundlake.core.errors import SKIP_REASONS, RowError
from soundlake.sources.base import input_row
from soundlake.sources.local import local_inputs
from soundlake.stages.segment import (
    SegmentSpec,
    SegmentStage,
    clip_id,
    segment_tables,
    window_starts,
)
from soundlake.testing import FORMATS, tone_mix, write_audio


def _stage(**kw):
    return SegmentStage(SegmentSpec(**kw), "run-test")


@pytest.mark.parametrize("ext", list(FORMATS))
def test_every_format_decodes_resamples_and_encodes(tmp_path, ext):
    path = write_audio(tmp_path / f"x.{ext}", tone_mix(4.0, 44100, 1, channels=2), 44100)
    clips = _stage(sample_rate=16000, window=3.0, channels=1).segment_one(
        input_row(source="local", source_id=path.name, uri=str(path)))
    assert len(clips) == 1
    audio, sr = sf.read(io.BytesIO(clips[0]["flac"]))
    assert sr == 16000 and audio.shape == (48000,)
    assert clips[0]["src_channels"] == 2 and clips[0]["src_duration_s"] == pytest.approx(4.0, abs=0.1)
    assert -20 < clips[0]["rms_dbfs"] < 0 and clips[0]["loudness_lufs"] is not None


def test_stereo_output_and_resampled_content(tmp_path):
    sr_in = 48000
    t = np.arange(sr_in * 2) / sr_in
    x = np.stack([0.5 * np.sin(2 * np.pi * 1000 * t), 0.5 * np.sin(2 * np.pi * 3000 * t)], 1).astype(np.float32)
    p = tmp_path / "st.wav"
    sf.write(p, x, sr_in)
    clip = _stage(sample_rate=16000, window=2.0, channels=2).segment_one(
        input_row(source="local", source_id="st.wav", uri=str(p)))[0]
    audio, sr = sf.read(io.BytesIO(clip["flac"]))
    assert audio.shape == (32000, 2)
    spec = np.abs(np.fft.rfft(audio[:, 1]))
    assert np.argmax(spec) * sr / len(audio) == pytest.approx(3000, abs=5)  # right channel kept its tone


def test_window_policies():
    spec = SegmentSpec(window=10, policy="sliding", hop=5)
    assert window_starts(27.0, spec, "a") == [0, 5, 10, 15, 20, 25]
    assert window_starts(27.0, SegmentSpec(window=10, policy="first"), "a") == [0.0]
    assert window_starts(27.0, SegmentSpec(window=10, policy="annotated"), "a", start_s=12.5) == [12.5]
    r1 = window_starts(60.0, SegmentSpec(window=10, policy="random", seed=3), "a")
    assert r1 == window_starts(60.0, SegmentSpec(window=10, policy="random", seed=3), "a")
    assert r1 != window_starts(60.0, SegmentSpec(window=10, policy="random", seed=4), "a")
    assert 0 <= r1[0] <= 50
    assert len(window_starts(100.0, SegmentSpec(window=10, policy="sliding", max_windows=3), "a")) == 3


def test_remainder_pad_and_drop(tmp_path):
    p = tmp_path / "t.wav"
    sf.write(p, tone_mix(25.0, 16000, 0), 16000)
    row = input_row(source="local", source_id="t.wav", uri=str(p))
    padded = _stage(sample_rate=16000, policy="sliding").segment_one(row)
    assert [c["start_s"] for c in padded] == [0, 10, 20]
    assert padded[-1]["content_s"] == pytest.approx(5.0) and padded[-1]["duration_s"] == 10.0
    dropped = _stage(sample_rate=16000, policy="sliding", remainder="drop").segment_one(row)
    assert [c["start_s"] for c in dropped] == [0, 10]


def test_silent_windows_dropped(tmp_path):
    x = tone_mix(20.0, 16000, 0)
    x[160000:] = 0  # second half silent
    p = tmp_path / "half.wav"
    sf.write(p, x, 16000)
    clips = _stage(sample_rate=16000, policy="sliding").segment_one(
        input_row(source="local", source_id="half.wav", uri=str(p)))
    assert [c["start_s"] for c in clips] == [0]


def test_clip_ids_stable_and_safe():
    assert clip_id("audioset", "abc123", 30.0) == "audioset:abc123:30000"
    odd = clip_id("local", "dir/naïve name.wav", 0)
    assert odd == clip_id("local", "dir/naïve name.wav", 0) and " " not in odd and odd.isascii()


def test_bad_inputs_are_classified(bad_inputs):
    folder, expect = bad_inputs
    rows, _ = local_inputs(str(folder))
    assert {r["source_id"] for r in rows} == set(expect)  # the directory loop was walked once
    stage = _stage(sample_rate=16000, policy="sliding")
    got = {}
    for r in rows:
        try:
            stage.segment_one(r)
            got[r["source_id"]] = None
        except RowError as e:
            got[r["source_id"]] = e.error
    assert got == expect


def test_batch_never_raises_for_bad_rows_and_splits_into_tables(bad_inputs):
    folder, expect = bad_inputs
    rows, _ = local_inputs(str(folder))
    out = _stage(sample_rate=16000).process(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA))
    tables = segment_tables(out)
    failed = tables["failures"].to_pylist()
    skipped = tables["skipped"].to_pylist()
    assert {f["source_id"] for f in failed} == {k for k, v in expect.items() if v and v not in SKIP_REASONS}
    assert all(f["message"] and f["permanent"] for f in failed)
    # policy decisions are recorded apart, with the setting that decided them
    assert {(s["source_id"], s["reason"]) for s in skipped} == {(k, v) for k, v in expect.items() if v in SKIP_REASONS}
    assert all(s["setting"] == SKIP_REASONS[s["reason"]] and s["message"] for s in skipped)
    assert set(tables["clips"]["source_id"].to_pylist()) == {k for k, v in expect.items() if v is None}
    assert "flac" in tables["clips"].column_names


def test_local_metadata_sidecar_and_folder_files(tmp_path):
    for name in ("a.wav", "b.wav", "c.wav"):
        sf.write(tmp_path / name, tone_mix(2.0, 16000, 0), 16000)
    (tmp_path / "a.wav.json").write_text('{"title": "A", "tags": ["x", "y"], "license": "CC0", "mic": "zoom"}')
    (tmp_path / "metadata.csv").write_text("file,title,labels,caption\nb.wav,Bee,dog;bark,a dog barks\n")
    rows = {r["source_id"]: r for r in local_inputs(str(tmp_path))[0]}
    assert rows["a.wav"]["title"] == "A" and rows["a.wav"]["tags"] == ["x", "y"]
    assert '"mic": "zoom"' in rows["a.wav"]["meta_json"]
    assert rows["b.wav"]["labels"] == ["dog", "bark"] and rows["b.wav"]["ref_caption"] == "a dog barks"
    assert rows["c.wav"]["title"] is None


def test_a_relative_input_folder_lists_absolute_uris(tmp_path, monkeypatch):
    """Workers open the URI in their own working folder (on a cluster, another machine's), so
    a relative --input must not reach them relative; the source id stays the path inside it."""
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "a.wav", tone_mix(2.0, 16000, 0), 16000)
    monkeypatch.chdir(tmp_path)
    [row] = local_inputs("in")[0]
    assert row["uri"] == str(tmp_path / "in" / "a.wav") and row["source_id"] == "a.wav"
