"""CLAP stages in the pipeline, with a tiny random transformers ClapModel loaded through the hf path."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from soundlake.catalog.sql import fetchall
from soundlake.core import audio as audio_io
from soundlake.models.clap.load import load_clap
from soundlake.pipelines.runner import run_pipeline
from soundlake.pipelines.spec import load_spec
from soundlake.testing import make_tiny_hf_clap, tone_mix

pytestmark = pytest.mark.slow
CAPTIONS = ["a low hum", "a high whistle", "a buzzing tone", "a soft tone", "a bright tone", "a deep tone"]


@pytest.fixture(scope="module")
def captioned_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioned")
    lines = ["file,caption,license"]
    for i, cap in enumerate(CAPTIONS):
        sf.write(folder / f"f{i}.wav", tone_mix(4.0 + i, 22050, i), 22050)
        lines.append(f"f{i}.wav,{cap},CC0")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory):
    return make_tiny_hf_clap(tmp_path_factory.mktemp("clap") / "tiny")


def _spec(folder, model=None, stages="[segment]"):
    sets = [f"source.input={folder}", "segment.sample_rate=16000", "segment.window=3.0", "segment.policy=first",
            f"stages={stages}", "clap.tag_labels=[dog barking,rain,engine idling,whistle]", "clap.top_k=2",
            "clap.batch_size=4"]
    return load_spec("local", sets=sets + ([f"clap.model={model}"] if model else []))


def test_backfill_then_streaming_give_the_same_rows(ray_session, captioned_folder, tiny_clap, tmp_path):
    lake = str(tmp_path / "lake")
    first = run_pipeline(_spec(captioned_folder), lake)
    n_clips = first.clips
    assert n_clips >= len(CAPTIONS) and fetchall(lake, "SELECT count(*) FROM embeddings") == [(0,)]

    # Same lake, CLAP stages on: nothing to segment, existing clips are embedded, tagged, scored.
    second = run_pipeline(_spec(captioned_folder, tiny_clap, "[segment,embed,tag,score]"), lake)
    assert second.clips == 0 and second.rows["embeddings"] == n_clips
    assert second.rows["tags"] == 2 * n_clips and second.rows["scores"] == n_clips == len(CAPTIONS)
    emb = fetchall(lake, "SELECT clip_id, embedding, dim, backend, model_hash FROM embeddings ORDER BY clip_id")
    assert all(d == 12 and b == "hf" and h for _, _, d, b, h in emb)

    # The stored vector is what the model gives for that clip alone (no batch effects).
    model = load_clap(str(tiny_clap))
    clip_id, flac = fetchall(lake, f"SELECT clip_id, flac FROM audio WHERE clip_id = '{emb[0][0]}'")[0]
    audio, sr = audio_io.decode_flac(flac)
    direct = model.embed_audio([audio_io.resample(audio, sr, model.sample_rate)[:, 0]])[0]
    np.testing.assert_allclose(np.array(emb[0][1]), direct, atol=1e-5)

    # Scores are the cosine of the caption's text vector and the audio vector.
    clip, text, score = fetchall(lake, "SELECT clip_id, caption_text, score FROM scores ORDER BY clip_id LIMIT 1")[0]
    vec = dict((c, np.array(e)) for c, e, *_ in emb)[clip]
    t = model.embed_text([text])[0]
    assert score == pytest.approx(float(vec @ t / np.linalg.norm(vec) / np.linalg.norm(t)), abs=1e-5)

    # Tags: top-2 of the configured labels, probabilities in order.
    tags = fetchall(lake, "SELECT clip_id, rank, label, prob FROM tags ORDER BY clip_id, rank")
    assert {l for _, _, l, _ in tags} <= {"dog barking", "rain", "engine idling", "whistle"}
    assert all(tags[i][3] >= tags[i + 1][3] for i in range(0, len(tags), 2))

    # Re-running does nothing more; a fresh lake with the stages streaming gives the same vectors.
    third = run_pipeline(_spec(captioned_folder, tiny_clap, "[segment,embed,tag,score]"), lake)
    assert not third.rows
    lake2 = str(tmp_path / "lake2")
    run_pipeline(_spec(captioned_folder, tiny_clap, "[segment,embed,tag,score]"), lake2)
    emb2 = fetchall(lake2, "SELECT clip_id, embedding FROM embeddings ORDER BY clip_id")
    for (c1, v1, *_), (c2, v2) in zip(emb, emb2):
        assert c1 == c2
        np.testing.assert_allclose(v1, v2, atol=1e-5)

    # Text search in SQL orders clips by similarity to a text.
    ranked = fetchall(lake, "SELECT clip_id, text_similarity(clip_id, 'a low hum') AS s FROM clips ORDER BY s DESC",
                      load_model=load_clap)
    assert len(ranked) == n_clips and ranked[0][1] >= ranked[-1][1]
    t = model.embed_text(["a low hum"])[0]
    vec = dict((c, np.array(e)) for c, e, *_ in emb)[ranked[0][0]]
    assert ranked[0][1] == pytest.approx(float(vec @ t / np.linalg.norm(vec) / np.linalg.norm(t)), abs=1e-4)
