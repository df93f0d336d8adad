"""Qwen2-Audio recaptioning and LLM refinement through the real loading paths (tiny random models)."""
from __future__ import annotations

import numpy as np
import pytest

from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import fetchall
from soundlake.models.captioners.qwen import QwenCaptioner, lint
from soundlake.pipelines.recaption import RecaptionArgs, clips_to_caption, recaption
from soundlake.testing import (
    make_synth_lake,
    make_tiny_causal_lm,
    make_tiny_qwen2_audio,
)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return (make_tiny_qwen2_audio(root / "tiny-qwen2-audio-instruct", instruct=True),
            make_tiny_qwen2_audio(root / "tiny-qwen2-audio", instruct=False),
            make_tiny_causal_lm(root / "tiny-lm"))


def test_lint_rules():
    assert lint("A dog barks in the distance.") == []
    assert set(lint('I hear "hello" (label: Speech) with 90% probability')) >= {
        "first_person", "speech_content", "brackets", "label", "probability"}
    assert lint("- a dog\n- a cat") == ["list_marker"]
    assert lint("  ") == ["empty"] and lint("A synth creating tones") == ["creating"]


def test_prompt_versions_and_batching(tiny_models):
    instruct, base, _ = tiny_models
    q_i, q_b = QwenCaptioner(str(instruct), max_new_tokens=5), QwenCaptioner(str(base), max_new_tokens=5)
    assert q_i.prompt_version == "qwen-instruct-v1" and "<|im_start|>" in q_i.prompt()
    assert q_b.prompt_version == "qwen-base-v1" and q_b.prompt().endswith("Generate the caption in English:")
    assert q_i.sample_rate == 16000 and len(q_i.model_hash) == 16
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(16000 * s).astype(np.float32) for s in (1, 3, 2)]
    # Left padding: a clip's caption does not depend on the other clips in its batch.
    assert q_b.caption(clips) == [q_b.caption([c])[0] for c in clips]


def test_recaption_rows_refine_lint_and_resume(ray_session, tiny_models, tmp_path):
    instruct, _, lm = tiny_models
    lake = make_synth_lake(tmp_path, 6, seconds=3.0).uri  # 6 synth clips, written without Ray
    args = RecaptionArgs(model=str(instruct), refine=str(lm), batch_size=2, limit=3)
    first = recaption(lake, args)
    assert first.inputs_total == 3
    qwen = fetchall(lake, "SELECT clip_id, model_id, model_hash, prompt_version FROM captions WHERE captioner = 'qwen'")
    assert len(qwen) == 3 and all(m == str(instruct) and h and v == "qwen-instruct-v1" for _, m, h, v in qwen)
    # Every refined clip has a refine caption or a lint failure, never both, never neither.
    refined = {c for (c,) in fetchall(lake, "SELECT clip_id FROM captions WHERE captioner = 'refine'")}
    linted = {c for (c,) in fetchall(lake, "SELECT clip_id FROM failures WHERE stage = 'refine' AND error = 'lint'")}
    assert refined | linted == {c for c, *_ in qwen} and not refined & linted

    # Resume: the next run captions only the rest; then nothing is left (no refiner: one actor less).
    second = recaption(lake, RecaptionArgs(model=str(instruct), batch_size=2))
    assert second.inputs_total == 3
    assert fetchall(lake, "SELECT count(DISTINCT clip_id) FROM captions WHERE captioner = 'qwen'") == [(6,)]
    assert recaption(lake, RecaptionArgs(model=str(instruct))).inputs_total == 0
    runs = fetchall(lake, "SELECT pipeline, status FROM runs WHERE pipeline = 'recaption'")
    assert len(runs) == 3 and {s for _, s in runs} == {"finished"}
    # --where selects; a new prompt version is new work (the selection a run would make).
    one = "c.source_id = '0-1'"
    assert clips_to_caption(Lake(lake), RecaptionArgs(model=str(instruct), where=one)) == []
    assert len(clips_to_caption(Lake(lake), RecaptionArgs(model=str(instruct), prompt_version="qwen-base-v1"))) == 6
    assert len(clips_to_caption(Lake(lake), RecaptionArgs(model=str(instruct), where=one,
                                                          prompt_version="qwen-base-v1"))) == 1


def test_sigkilled_recaption_resumes_without_duplicates(ray_session, soundlake_here, tiny_models, tmp_path):
    import signal
    import subprocess
    import time

    from conftest import soundlake_cmd

    instruct, _, _ = tiny_models
    n = 8
    # n one-clip synth scenes, each in a clips part of its own (so the run commits clip by clip),
    # written through the real segment stage without Ray (no `demo` pipeline run of its own needed).
    lake = str(tmp_path / "lake")
    for seed in range(n):
        make_synth_lake(tmp_path, 1, seconds=3.0, seed=seed, run=f"synth{seed}")
    assert len(Lake(lake).parts("clips")) == n and fetchall(lake, "SELECT count(*) FROM clips") == [(n,)]
    args = ["recaption", "--lake", lake, "--model", str(instruct), "--batch-size", "1", "--address", ray_session]
    before = set(Lake(lake).parts("captions"))  # the reference captions
    proc = subprocess.Popen(soundlake_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not set(Lake(lake).parts("captions")) - before:    # killed right after a commit
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = {c for (c,) in fetchall(lake, "SELECT clip_id FROM captions WHERE captioner = 'qwen'")}
    assert 0 < len(done) < n, "the run must be killed part-way for this test to mean anything"
    time.sleep(1.0)
    r = soundlake_here(*args)  # the same command again (in this process: only the killed one needs its own)
    assert r.exit_code == 0, r.output
    assert f"{n - len(done)} clips to caption" in r.output
    # Every clip captioned once: no duplicate rows even in the raw parts.
    raw = fetchall(lake, "SELECT clip_id, count(*) FROM _captions_all WHERE captioner = 'qwen' GROUP BY 1")
    assert len(raw) == n and all(count == 1 for _, count in raw)
