"""End to end on the session's local Ray: demo, bad-input accounting, SIGKILL + resume, SQL during a run."""
from __future__ import annotations

import glob
import signal
import subprocess
import time

import pytest
from conftest import invoke_here, soundlake_cmd

from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import fetchall
from soundlake.pipelines.runner import run_pipeline
from soundlake.pipelines.spec import load_spec
from soundlake.testing import make_corpus

pytestmark = pytest.mark.slow


def _accounting(lake: str) -> tuple[set, set]:
    """(inputs with clips, inputs failed or skipped)."""
    clips = {r[0] for r in fetchall(lake, "SELECT DISTINCT source_id FROM clips")}
    failed = {r[0] for r in fetchall(lake, "SELECT DISTINCT source_id FROM failures UNION "
                                           "SELECT DISTINCT source_id FROM skipped")}
    return clips, failed


def test_demo_end_to_end(ray_session, tmp_path):
    lake = str(tmp_path / "lake")
    r = subprocess.run(soundlake_cmd("curate", "demo", "--lake", lake, "--set", "source.count=12",
                                     "--address", ray_session, "-q"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "12 processed" in r.stderr and "clips" in r.stderr  # the summary
    rows = fetchall(lake, """SELECT c.clip_id, c.sample_rate, c.duration_s, cap.text, c.labels
                             FROM clips c JOIN captions cap USING (clip_id) WHERE cap.captioner = 'reference'""")
    assert len(rows) == 12
    assert all(sr == 16000 and d == 10.0 and text and labels for _, sr, d, text, labels in rows)
    # The template captioner wrote one caption per clip from its labels; nothing overwritten.
    assert fetchall(lake, "SELECT captioner, count(*) FROM captions GROUP BY 1 ORDER BY 1") == [
        ("reference", 12), ("template", 12)]
    assert fetchall(lake, "SELECT count(*) FROM dataset WHERE caption IS NOT NULL") == [(12,)]
    runs = fetchall(lake, "SELECT status, pipeline FROM runs")
    assert runs == [("finished", "demo")]
    r = invoke_here("sql", "SELECT source, count(*) AS n FROM clips GROUP BY 1", "--lake", lake, "--format", "csv")
    assert r.exit_code == 0 and r.output.splitlines()[1] == '"synth",12', r.output


def test_bad_inputs_accounted_and_job_completes(ray_session, bad_inputs, tmp_path):
    folder, expect = bad_inputs
    lake = str(tmp_path / "lake")
    spec = load_spec("local", sets=[f"source.input={folder}", "segment.sample_rate=16000", "ray.inputs_per_task=3"])
    summary = run_pipeline(spec, lake)
    assert summary.status == "finished" and summary.inputs_done == len(expect)
    clips, failed = _accounting(lake)
    assert clips | failed == set(expect) and not clips & failed
    got = dict(fetchall(lake, "SELECT source_id, error FROM failures UNION ALL SELECT source_id, reason FROM skipped"))
    assert got == {k: v for k, v in expect.items() if v}
    assert sum(summary.errors.values()) + sum(summary.skipped.values()) == len(got)
    # A second run finds everything committed and does nothing.
    again = run_pipeline(spec, lake)
    assert again.inputs_skipped == len(expect) and again.clips == 0


def test_sigkill_then_resume_and_query_during_run(ray_session, soundlake_here, tmp_path):
    n = 24
    corpus = tmp_path / "corpus"
    make_corpus(corpus, n, seconds=31.0, sr=22050, formats=("wav", "flac", "ogg"))
    lake = str(tmp_path / "lake")
    args = ["curate", "local", "--input", str(corpus), "--lake", lake, "--address", ray_session, "-q",
            "--set", "ray.inputs_per_task=1", "--set", "segment.sample_rate=16000"]
    proc = subprocess.Popen(soundlake_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        # A part counts once the driver commits it, a moment after it is on disk: wait for that.
        while not glob.glob(f"{lake}/clips/*.parquet") or not Lake(lake).parts("clips"):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        # The catalog answers another process while the job is writing (no DuckDB file lock
        # to fight); here, the test's own process, so that the job is killed soon after.
        assert proc.poll() is None, "the run ended before the query"
        assert fetchall(lake, "SELECT count(*) FROM clips")[0][0] >= 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first_parts = set(glob.glob(f"{lake}/clips/*.parquet"))
    first_inputs, first_failed = _accounting(lake)
    assert 0 < len(first_inputs) < n, "the run must be killed part-way for this test to mean anything"
    assert not first_failed
    time.sleep(1.0)  # let the killed job's workers go

    r = soundlake_here(*args)  # the same command again (in this process: only the killed one needs its own)
    assert r.exit_code == 0, r.output
    assert f"{len(first_inputs)} already in the lake · {n - len(first_inputs)} processed" in r.output
    clips, failed = _accounting(lake)
    assert len(clips) == n and not failed
    # nothing recomputed: the first run's parts are untouched and no clip appears twice
    assert first_parts <= set(glob.glob(f"{lake}/clips/*.parquet"))
    dup = fetchall(lake, "SELECT clip_id, count(*) FROM clips GROUP BY 1 HAVING count(*) > 1")
    assert dup == []
    assert fetchall(lake, "SELECT count(*) FROM clips") == [(n * 4,)]  # 31 s -> 4 windows (pad)
    statuses = sorted(s for (s,) in fetchall(lake, "SELECT status FROM runs"))
    assert statuses == ["finished", "running"]  # the killed run never wrote its end record
    assert not Lake(lake).is_locked()
