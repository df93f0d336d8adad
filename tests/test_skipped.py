"""Filtering is not failing: policy decisions (too short, too long, silent) are recorded as
skipped with their reason and setting, not as failures; one-shot sound effects have a spec;
file names become captions when a file has no metadata (issue: hardening, item 9)."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import soundfile as sf

from soundlake.catalog import schema
from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import fetchall
from soundlake.pipelines.runner import run_pipeline
from soundlake.pipelines.spec import load_spec
from soundlake.testing import tone_mix


def sound_effects(folder):
    """Short game-like sounds (0.3-0.8 s), two normal 3 s sounds and one silent file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["dog_bark_02.wav", "door-slam.wav", "UI Click 3.wav", "coin pickup.wav"]):
        sf.write(str(folder / name), tone_mix(0.3 + 0.15 * i, 16000, i), 16000)
    for i in range(2):
        sf.write(str(folder / f"ambience_{i}.wav"), tone_mix(3.0, 16000, 10 + i), 16000)
    sf.write(str(folder / "quiet.wav"), np.zeros(16000 * 2, np.float32), 16000)
    return folder


def test_policy_decisions_are_skipped_not_failed(ray_session, tmp_path):
    folder = sound_effects(tmp_path / "sfx")
    lake = str(tmp_path / "lake")
    spec = load_spec("local", sets=[f"source.input={folder}", "segment.sample_rate=16000", "segment.window=2.0",
                                    "segment.policy=first"])
    s = run_pipeline(spec, lake)
    assert s.clips == 2 and s.failed_inputs == 0 and not s.errors
    assert dict(s.skipped) == {"too_short": 4, "silent": 1}
    assert fetchall(lake, "SELECT count(*) FROM failures_open") == [(0,)]
    rows = fetchall(lake, "SELECT source_id, reason, setting FROM skipped ORDER BY source_id")
    assert [(r[1], r[2]) for r in rows].count(("too_short", "segment.min_duration")) == 4
    assert ("quiet.wav", "silent", "segment.silence_dbfs") in rows
    # every input is accounted for: clips + failures + skipped, and a re-run adds nothing
    assert fetchall(lake, """SELECT count(DISTINCT source_id) FROM (SELECT source_id FROM clips UNION ALL
                             SELECT source_id FROM failures UNION ALL SELECT source_id FROM skipped)""") == [(7,)]
    again = run_pipeline(spec, lake)
    assert again.inputs_skipped == 7 and again.clips == 0 and not again.skipped


def test_old_policy_failures_move_to_skipped(ray_session, tmp_path):
    """A lake written before skipped existed: its too_short/silent failure rows are moved on the next run."""
    folder = sound_effects(tmp_path / "sfx")
    lake = Lake(str(tmp_path / "lake"))
    now = datetime.now(timezone.utc)
    old = [{"source": "local", "source_id": n, "clip_id": None, "stage": "segment", "error": e, "permanent": True,
            "message": "old row", "attempt": 1, "run_id": "old", "time": now}
           for n, e in [("door-slam.wav", "too_short"), ("quiet.wav", "silent"), ("gone.wav", "not_found")]]
    lake.write_part("failures", pa.Table.from_pylist(old, schema=schema.FAILURES), "old")
    assert fetchall(lake.uri, "SELECT count(*) FROM failures_open")[0][0] == 1   # policy rows are not failures
    run_pipeline(load_spec("local", sets=[f"source.input={folder}", "segment.sample_rate=16000"]), lake.uri)
    moved = fetchall(lake.uri, "SELECT source_id, reason FROM skipped WHERE run_id <> 'old' ORDER BY 1")
    assert ("door-slam.wav", "too_short") in moved and ("quiet.wav", "silent") in moved
    assert fetchall(lake.uri, "SELECT source_id FROM failures_open") == [("gone.wav",)]


def test_sfx_spec_keeps_one_shots_at_their_length_with_file_name_captions(ray_session, tmp_path):
    folder = sound_effects(tmp_path / "sfx")
    lake = str(tmp_path / "lake")
    s = run_pipeline(load_spec("sfx", sets=[f"source.input={folder}", "segment.sample_rate=16000"]), lake)
    assert s.clips == 6 and not s.errors and dict(s.skipped) == {"silent": 1}
    durations = dict(fetchall(lake, "SELECT source_id, duration_s FROM clips"))
    assert abs(durations["dog_bark_02.wav"] - 0.3) < 0.01          # not padded to a 10 s window
    assert abs(durations["ambience_0.wav"] - 3.0) < 0.01
    caps = dict(fetchall(lake, """SELECT c.source_id, k.text FROM clips c JOIN captions k USING (clip_id)
                                  WHERE k.captioner = 'filename'"""))
    assert caps["dog_bark_02.wav"] == "dog bark"
    assert caps["UI Click 3.wav"] == "ui click"
    assert caps["coin pickup.wav"] == "coin pickup"
