"""Bad files from the hardening issue: non-UTF-8 names, NaN/Inf samples, truncated containers."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from soundlake.catalog.schema import INPUT_SCHEMA
from soundlake.catalog.sql import fetchall
from soundlake.core.errors import RowError
from soundlake.pipelines.runner import run_pipeline
from soundlake.pipelines.spec import load_spec
from soundlake.sources.local import local_inputs
from soundlake.stages.segment import SegmentSpec, SegmentStage, segment_tables
from soundlake.testing import tone_mix

BAD_NAME = b"bad\xffname.wav"      # not valid UTF-8
BAD_ID = "bad\\xffname.wav"         # its escaped source_id


# ---- makers: real files from soundfile, cut or patched with plain Python ---------
def write_bad_name(folder: Path, source: Path) -> None:
    with open(source, "rb") as src, open(os.path.join(os.fsencode(folder), BAD_NAME), "wb") as dst:
        shutil.copyfileobj(src, dst)


def write_non_finite(path: Path, value: float) -> None:
    x = tone_mix(3.0, 16000, 7)
    x[1000:1003] = value
    sf.write(path, x, 16000, subtype="FLOAT")


def wav_data_offset(data: bytes) -> int:
    return data.index(b"data") + 8


def write_cut_wav(path: Path) -> None:
    """A 12 s 16 kHz PCM_16 WAV whose data stops after 4.69 s."""
    full = path.with_suffix(".full.wav")
    sf.write(full, tone_mix(12.0, 16000, 8), 16000, subtype="PCM_16")
    data = full.read_bytes()
    path.write_bytes(data[: wav_data_offset(data) + int(4.69 * 16000) * 2])
    full.unlink()


def write_ten_hour_header(path: Path) -> None:
    """2 s of data behind a header claiming 10 hours."""
    sf.write(path, tone_mix(2.0, 16000, 9), 16000, subtype="PCM_16")
    b = bytearray(path.read_bytes())
    claimed = 10 * 3600 * 16000 * 2
    at = wav_data_offset(b) - 4
    b[at: at + 4] = struct.pack("<I", claimed)
    b[4:8] = struct.pack("<I", at + 4 + claimed - 8)
    path.write_bytes(bytes(b))


def write_cut_ogg(path: Path) -> None:
    full = path.with_suffix(".full.ogg")
    sf.write(full, tone_mix(12.0, 44100, 10), 44100, format="OGG", subtype="VORBIS")
    data = full.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.4)])   # 40 % of the bytes
    full.unlink()


def _stage(**kw) -> SegmentStage:
    return SegmentStage(SegmentSpec(sample_rate=16000, **kw), "run-test")


def _row(path: Path) -> dict:
    rows, _ = local_inputs(str(path.parent))
    return next(r for r in rows if r["source_id"] == path.name)


def _error(stage: SegmentStage, row: dict) -> RowError:
    with pytest.raises(RowError) as e:
        stage.segment_one(row)
    return e.value


# ---- 1. names that are not UTF-8 ----------------------------------------------------
def test_non_utf8_name_is_listed_escaped_and_becomes_clips(tmp_path):
    sf.write(tmp_path / "good.wav", tone_mix(3.0, 16000, 1), 16000)
    write_bad_name(tmp_path, tmp_path / "good.wav")
    (tmp_path / "back\\slash.wav").write_bytes((tmp_path / "good.wav").read_bytes())
    rows, _ = local_inputs(str(tmp_path))
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)   # Arrow accepts every row
    assert sorted(table["source_id"].to_pylist()) == ["back\\\\slash.wav", BAD_ID, "good.wav"]
    out = segment_tables(_stage().process(table))
    assert "failures" not in out
    assert sorted(out["clips"]["source_id"].to_pylist()) == ["back\\\\slash.wav", BAD_ID, "good.wav"]


def test_source_id_escape_is_reversible():
    # imported here: these names are new, and the file's other tests must still run without them
    from soundlake.sources.local import escape_name, unescape_name

    odd = (b"bad\xffname.wav", b"a\\xffb.wav", b"a\\\\b\xc3.wav", "naïve ñame 音.wav".encode(), b"d/e\x80f.wav")
    for raw in odd:
        name = os.fsdecode(raw)
        text = escape_name(name)
        text.encode("utf-8")  # valid UTF-8: Arrow and DuckDB take it
        assert unescape_name(text) == name
    assert escape_name("naïve ñame 音.wav") == "naïve ñame 音.wav"   # valid names are unchanged
    assert escape_name(os.fsdecode(b"a\\xffb.wav")) != escape_name(os.fsdecode(b"a\xffb.wav"))


# ---- 2. NaN / Inf samples -----------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_corrupt(tmp_path, value):
    path = tmp_path / "nonfinite.wav"
    write_non_finite(path, value)
    err = _error(_stage(), _row(path))
    assert err.error == "corrupt" and "3 non-finite samples" in err.message


# ---- 3. truncated files ---------------------------------------------------------------
@pytest.mark.parametrize("maker, promised, held", [
    (write_cut_wav, "12.00 s", "4.69 s"),
    (write_ten_hour_header, "36000.00 s", "2.00 s"),
    (write_cut_ogg, None, None),
])
def test_truncated_files_are_corrupt_by_default(tmp_path, maker, promised, held):
    path = tmp_path / f"{maker.__name__}.{'ogg' if 'ogg' in maker.__name__ else 'wav'}"
    maker(path)
    err = _error(_stage(), _row(path))
    assert err.error == "corrupt" and err.message.startswith("truncated")
    if promised:
        assert err.message == f"truncated: the header promises {promised}, the file holds {held}"
    assert "\n" not in err.message


def test_truncated_keep_flags_the_clip_and_complete_files_are_not_flagged(tmp_path):
    write_cut_wav(tmp_path / "cut.wav")
    write_cut_ogg(tmp_path / "cut.ogg")
    x = tone_mix(4.0, 44100, 11)
    for ext, fmt, sub in (("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"),
                          ("opus", "OGG", "OPUS")):
        sf.write(tmp_path / f"whole.{ext}", x if ext != "opus" else x[: 4 * 16000], 44100 if ext != "opus" else 16000,
                 format=fmt, subtype=sub)
    rows, _ = local_inputs(str(tmp_path))
    out = segment_tables(_stage(truncated="keep").process(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)))
    assert "failures" not in out
    meta = {r["source_id"]: json.loads(r["meta_json"] or "{}") for r in out["clips"].to_pylist()}
    assert meta["cut.wav"] == {"truncated": True, "promised_s": 12.0, "held_s": pytest.approx(4.69, abs=0.01)}
    assert meta["cut.ogg"]["truncated"] is True and meta["cut.ogg"]["promised_s"] is None
    assert 0 < meta["cut.ogg"]["held_s"] < 12 * 0.45
    assert all(meta[f"whole.{ext}"] == {} for ext in ("wav", "flac", "ogg", "opus"))
    # Under the default the complete files still pass.
    rows = [r for r in rows if r["source_id"].startswith("whole")]
    assert all(_stage().segment_one(r) for r in rows)


# ---- through the real pipeline on Ray ------------------------------------------------
def _curate_twice(folder: Path, lake: str) -> tuple[set, dict]:
    """Curate ``folder`` (every input in one block), then again: the re-run must add nothing.
    Returns (source_ids with clips, source_id -> (error, message) of failures)."""
    n = sum(1 for _ in os.scandir(folder))
    spec = load_spec("local", overrides={"source.input": str(folder)},
                     sets=["segment.sample_rate=16000", f"ray.inputs_per_task={n}"])
    summary = run_pipeline(spec, lake)
    assert summary.status == "finished" and summary.inputs_done == n
    clips = {r[0] for r in fetchall(lake, "SELECT DISTINCT source_id FROM clips")}
    failures = {r[0]: (r[1], r[2]) for r in fetchall(lake, "SELECT source_id, error, message FROM failures")}
    n_clips = fetchall(lake, "SELECT count(*) FROM clips")
    again = run_pipeline(spec, lake)
    assert again.inputs_skipped == n and again.clips == 0 and again.failed_inputs == 0
    assert fetchall(lake, "SELECT count(*) FROM clips") == n_clips
    assert fetchall(lake, "SELECT count(*) FROM failures") == [(len(failures),)]
    return clips, failures


def _good_files(folder: Path, n: int = 3) -> set[str]:
    folder.mkdir()
    for i in range(n):
        sf.write(folder / f"good{i}.wav", tone_mix(3.0, 16000, 20 + i), 16000)
    return {f"good{i}.wav" for i in range(n)}


@pytest.mark.slow
def test_nan_and_inf_wavs_fail_alone_on_ray(ray_session, tmp_path):
    folder = tmp_path / "in"
    good = _good_files(folder)
    write_non_finite(folder / "nan.wav", np.nan)
    write_non_finite(folder / "inf.wav", np.inf)
    clips, failures = _curate_twice(folder, str(tmp_path / "lake"))
    assert clips == good
    assert {k: v[0] for k, v in failures.items()} == {"nan.wav": "corrupt", "inf.wav": "corrupt"}
    assert all("3 non-finite samples" in m for _, m in failures.values())


@pytest.mark.slow
def test_odd_name_and_truncated_file_on_ray(ray_session, tmp_path):
    folder = tmp_path / "in"
    good = _good_files(folder)
    write_bad_name(folder, folder / "good0.wav")
    write_cut_wav(folder / "cut.wav")
    clips, failures = _curate_twice(folder, str(tmp_path / "lake"))
    assert clips == good | {BAD_ID}
    assert failures == {"cut.wav": ("corrupt", "truncated: the header promises 12.00 s, the file holds 4.69 s")}
