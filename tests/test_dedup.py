"""Duplicates and eval-set leakage on a planted corpus, through the real pipeline.

One module lake: a synth scene and five altered copies (MP3 128k, resampled, -6 dB, first second
cut, faint noise), pairs of different clips of one class (siren, white noise, bell), and clips
of the same recordings through other sources (a local file of a YouTube video's section and a
VGGSound segment overlapping it, an AudioSet segment of that video elsewhere, a Freesound sound
and a local copy named by its URL). Every clip goes through the real segment stage (the local
files as the local source lists them, the others as their download stage hands them over),
without Ray as :func:`soundlake.testing.make_synth_lake` does; embeddings come from the embed
stage with a tiny (untrained) transformers CLAP; `soundlake dedup` fingerprints on Ray. Eval
sets: an AudioCaps file naming the video, a Clotho set whose audio holds an MP3 copy of one clip.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from typer.testing import CliRunner

from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import fetchall
from soundlake.cli import app
from soundlake.core.errors import UserError
from soundlake.export.exporter import ExportArgs, run_export
from soundlake.sources.base import input_row
from soundlake.sources.local import local_inputs
from soundlake.sources.synth import synth_clip
from soundlake.stages.base import FLOW
from soundlake.stages.segment import SegmentSpec, SegmentStage, clip_id, segment_tables

SR = 32000          # rendered; the lake stores 16 kHz
SECONDS = 8.0
YTID = "dQw4w9WgXcQ"
COPIES = ("copy-mp3", "copy-resampled", "copy-gain", "copy-trimmed", "copy-noise")
SAME_CLASS = [f"{cls}-{k}" for cls in ("siren", "white_noise", "bell") for k in (0, 1)]


def ffmpeg_mp3(src: Path, dst: Path) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), "-c:a", "libmp3lame", "-b:a", "128k",
                    str(dst)], check=True, timeout=60)
    return dst


def write(folder: Path, name: str, audio: np.ndarray, sr: int = SR, **meta) -> Path:
    path = folder / f"{name}.wav"
    sf.write(str(path), audio, sr)
    Path(str(path) + ".json").write_text(json.dumps(meta))
    return path


def segmented(corpus: Path, sections: Path, run_id: str) -> dict[str, pa.Table]:
    """The corpus's files as the local source lists them, and VGGSound, AudioSet and Freesound
    clips as their download stage hands them to segment (the section downloaded to a local
    file), with start times back in the video's time."""
    spec = SegmentSpec(sample_rate=16000, window=SECONDS, remainder="keep", loudness=False)
    stage = SegmentStage(spec, run_id)
    rows = [clip for row in local_inputs(str(corpus))[0] for clip in stage.segment_one(row)]
    for source, sid, start, index, meta in (
            ("vggsound", f"{YTID}_32000", 32.0, 40, {"ytid": YTID, "split": "train"}),
            ("audioset", f"{YTID}_50000", 50.0, 41, {"ytid": YTID, "label_ids": ["/m/03qc9zr"]}),
            ("freesound", "4242", 0.0, 42, {})):
        scene, audio = synth_clip(21, index, SECONDS, SR)
        path = write(sections, f"{source}-section", audio)
        row = input_row(source=source, source_id=sid, uri=str(path), labels=scene.labels, license="CC-BY",
                        ref_caption=scene.caption, ref_caption_model="human", meta_json=json.dumps(meta))
        for clip in stage.segment_one(row):
            clip["start_s"] += start
            clip["clip_id"] = clip_id(source, sid, clip["start_s"])
            rows.append(clip)
    return segment_tables(pa.Table.from_pylist(rows, schema=FLOW))


def embed_lake(lake: Lake, clap: Path, run_id: str) -> None:
    from soundlake.stages.clap import ClapSpec, EmbedStage

    stage = EmbedStage(ClapSpec(model=str(clap)), run_id, tag=False)
    stage.setup()
    clips = lake.read("clips", ["clip_id", "flac"])
    batch = clips.append_column("status", pa.array(["ok"] * clips.num_rows))
    for table, data in stage.tables(stage.process(batch)).items():
        lake.write_part(table, data, run_id)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, ray_session):
    from soundlake.testing import make_tiny_hf_clap

    root = tmp_path_factory.mktemp("planted")
    corpus, sections, clotho = root / "corpus", root / "sections", root / "clotho"
    for d in (corpus, sections, clotho):
        d.mkdir()
    scene, x = synth_clip(21, 8, SECONDS, SR)                     # drum, siren, bell over 0.3-6.6 s
    caption = {"caption": scene.caption, "license": "CC-BY-NC"}
    orig = write(corpus, "orig", x, **caption)
    ffmpeg_mp3(orig, corpus / "copy-mp3.mp3")
    Path(corpus / "copy-mp3.mp3.json").write_text(json.dumps(caption))
    import soxr

    write(corpus, "copy-resampled", soxr.resample(x, SR, 22050), 22050, **caption)
    write(corpus, "copy-gain", 0.5 * x, caption=scene.caption, license="CC0")   # the best license: kept
    write(corpus, "copy-trimmed", x[SR:], **caption)
    write(corpus, "copy-noise", x + 0.01 * np.random.default_rng(0).standard_normal(x.size).astype(np.float32),
          **caption)
    for name in SAME_CLASS:
        cls, k = name.rsplit("-", 1)
        s, a = synth_clip(21, 100 + int(k), SECONDS, SR, classes=[cls])
        write(corpus, name, a, caption=s.caption, license="CC-BY")
    s, a = synth_clip(21, 30, SECONDS, SR)
    write(corpus, "yt-local", a, caption=s.caption, youtube_id=YTID, start_s=30)   # the video's [30, 38) s
    s, a = synth_clip(21, 31, SECONDS, SR)
    write(corpus, "fs-local", a, caption=s.caption, url="https://freesound.org/people/someone/sounds/4242/")
    # The Clotho eval audio holds an MP3 copy of bell-1 (content leakage).
    sf.write(str(sections / "bell-1.wav"), synth_clip(21, 101, SECONDS, SR, classes=["bell"])[1], SR)
    ffmpeg_mp3(sections / "bell-1.wav", clotho / "bell copy.mp3")

    lake = Lake(str(root / "lake"))
    for table, data in segmented(corpus, sections, "planted").items():
        lake.write_part(table, data, "planted")
    assert fetchall(lake, "SELECT count(*) FROM clips") == [(17,)]
    data = Path(__file__).parent / "data" / "eval_sets"
    runner = CliRunner()
    # Added before the lake has embeddings: the eval audio is fingerprinted, not embedded (an
    # untrained CLAP finds everything alike, so its semantic leakage would be all clips).
    for args in (["audiocaps-test", "--csv", str(data / "audiocaps_test.csv")],
                 ["clotho-eval", "--csv", str(data / "clotho_captions_evaluation.csv"), "--audio", str(clotho)]):
        r = runner.invoke(app, ["eval-sets", "add", *args, "--lake", lake.uri])
        assert r.exit_code == 0, r.output
    embed_lake(lake, make_tiny_hf_clap(root / "clap"), "embed")
    r = runner.invoke(app, ["dedup", "--lake", lake.uri])
    assert r.exit_code == 0, r.output
    ids = dict(fetchall(lake, "SELECT source || ':' || source_id, clip_id FROM clips"))
    names = {f"local:{n}.wav": n for n in (["orig"] + list(COPIES) + SAME_CLASS + ["yt-local", "fs-local"])}
    names["local:copy-mp3.mp3"] = "copy-mp3"
    clip = {names.get(k, k): v for k, v in ids.items()}
    return lake, clip, r.output, root


def groups(lake: Lake, level: str) -> list[set[str]]:
    rows = fetchall(lake, f"SELECT group_id, clip_id FROM duplicate_groups WHERE level = '{level}'")
    out: dict[str, set] = {}
    for g, c in rows:
        out.setdefault(g, set()).add(c)
    return list(out.values())


def test_identity_matches_across_sources(planted):
    lake, clip, output, _ = planted
    pairs = {frozenset(p[:2]): p[2:] for p in fetchall(
        lake, "SELECT clip_a, clip_b, method, score FROM duplicates WHERE level = 'identity'")}
    local_yt, vgg, aset = clip["yt-local"], clip[f"vggsound:{YTID}_32000"], clip[f"audioset:{YTID}_50000"]
    fs_pair = frozenset([clip["fs-local"], clip["freesound:4242"]])
    # The local section [30, 38) s overlaps VGGSound's [32, 40) s by 6 s of the shorter 8 s.
    assert pairs[frozenset([local_yt, vgg])][0] == "youtube_id"
    assert pairs[frozenset([local_yt, vgg])][1] == pytest.approx(0.75, abs=1e-3)
    assert pairs[fs_pair] == ("freesound_id", 1.0)
    assert set(pairs) == {frozenset([local_yt, vgg]), fs_pair}   # AudioSet's [50, 58) s overlaps neither
    assert aset not in {c for p in pairs for c in p}
    assert "identity" in output and "fingerprint" in output and "semantic" in output


def test_fingerprints_find_the_altered_copies_and_leave_same_class_clips_apart(planted):
    lake, clip, _, _ = planted
    family = {clip[n] for n in ("orig", *COPIES)}
    found = groups(lake, "fingerprint")
    assert found == [family], found   # every copy found; no two same-class clips (or anything else) grouped
    scores = dict(fetchall(lake, f"""SELECT CASE WHEN clip_a = '{clip['orig']}' THEN clip_b ELSE clip_a END, score
                                     FROM duplicates WHERE level = 'fingerprint'
                                       AND '{clip['orig']}' IN (clip_a, clip_b)"""))
    print("fingerprint score against the original:",
          {n: round(scores.get(clip[n], float("nan")), 3) for n in COPIES})
    kept = fetchall(lake, "SELECT clip_id FROM duplicate_groups WHERE level = 'fingerprint' AND kept")
    assert kept == [(clip["copy-gain"],)]   # the best license (CC0) wins
    assert {r[0] for r in fetchall(lake, "SELECT DISTINCT size FROM duplicate_groups WHERE level = 'fingerprint'")} == {6}


def test_semantic_level_names_its_model_and_reports_same_class_grouping(planted):
    lake, clip, output, _ = planted
    rows = fetchall(lake, "SELECT DISTINCT method, model_hash FROM duplicates WHERE level = 'semantic'")
    model = fetchall(lake, "SELECT DISTINCT model_id, model_hash FROM embeddings")
    assert rows == model and rows[0][1]   # every match names the CLAP model and its checkpoint
    family = {clip[n] for n in ("orig", *COPIES)}
    assert any(family <= g for g in groups(lake, "semantic"))
    same = [(f"{c}-0", f"{c}-1") for c in ("siren", "white_noise", "bell")]
    grouped = {t: sum(any({clip[a], clip[b]} <= g for g in _groups_at(lake, t)) for a, b in same)
               for t in (0.95, 0.99)}
    print(f"semantic level, untrained tiny CLAP: same-class pairs grouped {grouped} of {len(same)}")
    assert "semantic ≥ 0.99" in output


def _groups_at(lake: Lake, threshold: float) -> list[set[str]]:
    from soundlake.dedup.groups import connected_groups

    pairs = fetchall(lake, f"SELECT clip_a, clip_b FROM duplicates WHERE level = 'semantic' AND score >= {threshold}")
    out: dict = {}
    for c, g in connected_groups(pairs).items():
        out.setdefault(g, set()).add(c)
    return list(out.values())


def test_leakage_is_queryable_by_level(planted):
    lake, clip, _, _ = planted
    r = CliRunner().invoke(app, ["sql", "SELECT clip_id, eval_set, level FROM leakage WHERE level <> 'semantic' "
                                 "ORDER BY ALL", "--lake", lake.uri, "--format", "json"])
    assert r.exit_code == 0, r.output
    got = {(d["clip_id"], d["eval_set"], d["level"]) for d in map(json.loads, r.stdout.splitlines())}
    assert got == {
        (clip["yt-local"], "audiocaps-test", "identity"),       # AudioCaps [31, 41) s of the video
        (clip[f"vggsound:{YTID}_32000"], "audiocaps-test", "identity"),
        (clip["fs-local"], "clotho-eval", "identity"),          # Clotho's Freesound id 4242
        (clip["freesound:4242"], "clotho-eval", "identity"),
        (clip["bell-1"], "clotho-eval", "fingerprint"),         # the MP3 copy in Clotho's audio
    }


def test_dedup_resumes_and_replaces_its_snapshot_atomically(planted):
    lake, clip, _, _ = planted
    before = fetchall(lake, "SELECT level, count(*) FROM duplicates GROUP BY 1 ORDER BY 1")
    fps = fetchall(lake, "SELECT count(*) FROM fingerprints")
    # A killed run's part (written, never committed) stays out of view and goes at the next commit.
    stray = lake.write_part("duplicates", pa.Table.from_pylist(
        [{"clip_a": "x", "clip_b": "y", "level": "identity", "score": 1.0}], schema=lake.read("duplicates").schema),
        "killed")
    assert fetchall(lake, "SELECT count(*) FROM duplicates WHERE clip_a = 'x'") == [(0,)]
    r = CliRunner().invoke(app, ["dedup", "--lake", lake.uri, "--levels", "identity,fingerprint"])
    assert r.exit_code == 0, r.output
    assert "fingerprints: 0 new" in r.output                      # nothing fingerprinted twice
    assert fetchall(lake, "SELECT count(*) FROM fingerprints") == fps
    assert fetchall(lake, "SELECT level, count(*) FROM duplicates GROUP BY 1 ORDER BY 1") == before  # semantic kept
    assert not Path(lake.path(stray)).exists()


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_export_dedups_excludes_leaks_and_records_both(planted):
    lake, clip, _, root = planted
    n = fetchall(lake, "SELECT count(*) FROM clips")[0][0]
    r = run_export(lake, ExportArgs(out=str(root / "exp-default"), shard_count=50, shard_size=None))
    m = manifest_of(root / "exp-default")
    # Default: fingerprint level (identity included): the family keeps 1 of 6, the two identity pairs 1 of 2.
    assert r.clips == n - 5 - 2 and m["dedup"]["dropped"] == 7 and m["dedup"]["applied"] == ["identity", "fingerprint"]
    assert m["dedup"]["remaining"]["fingerprint"] == 0 and m["dedup"]["remaining"]["identity"] == 0
    leak = m["eval_sets"]["sets"]
    assert leak["audiocaps-test"]["leaking"]["identity"] == 1 and leak["audiocaps-test"]["unchecked_levels"] == []
    assert leak["clotho-eval"]["leaking"]["fingerprint"] == 1
    assert leak["clotho-eval"]["checked_levels"] == ["identity", "fingerprint", "semantic"]
    none = run_export(lake, ExportArgs(out=str(root / "exp-none"), dedup="none", shard_count=50, shard_size=None))
    assert none.clips == n and manifest_of(root / "exp-none")["dedup"]["remaining"]["fingerprint"] == 6
    clean = run_export(lake, ExportArgs(out=str(root / "exp-clean"), exclude_eval_sets=["all"], shard_count=50,
                                        shard_size=None))
    mc = manifest_of(root / "exp-clean")
    assert all(not k for s in mc["eval_sets"]["sets"].values() for k in s["leaking"].values())
    assert mc["dropped"]["eval_leakage"] >= 4 and clip["bell-1"] not in json.dumps(mc["shards"])
    exported = {r[0] for r in fetchall(lake, f"SELECT clip_id FROM export_members WHERE export_id = '{clean.export_id}'")}
    assert not exported & {clip["bell-1"], clip["fs-local"], clip["freesound:4242"], clip["yt-local"]}
    with pytest.raises(UserError, match="no such eval set"):
        run_export(lake, ExportArgs(out=str(root / "x"), exclude_eval_sets=["esc50"], shard_count=50, shard_size=None))
    with pytest.raises(UserError, match="found at cosine >= 0.95"):
        run_export(lake, ExportArgs(out=str(root / "x"), dedup="semantic:0.9", shard_count=50, shard_size=None))


def test_train_refuses_a_leaking_export_unless_allowed(planted):
    from soundlake.generation.train.leakage import check_eval_sets
    from soundlake.generation.train.specs import load_train_spec, make_plan

    lake, _, _, root = planted
    leaky, clean = root / "exp-default", root / "exp-clean"
    for name in ("exp-default", "exp-clean"):   # made by the export test when run alone too
        if not (root / name / "manifest.json").exists():
            run_export(lake, ExportArgs(out=str(root / name), shard_count=50, shard_size=None,
                                        exclude_eval_sets=["all"] if name == "exp-clean" else []))
    r = CliRunner().invoke(app, ["train", "vae", "--shards", str(leaky), "--out", str(root / "vae"), "--steps", "1",
                                 "--eval-sets", "audiocaps-test,esc50"])
    assert r.exit_code == 2
    line = r.output.strip().splitlines()
    assert len(line) == 1 and "audiocaps-test: clips leak (identity 1)" in line[0] and "esc50: not checked" in line[0]
    assert "--exclude-eval-sets audiocaps-test,esc50" in line[0] and not (root / "vae").exists()
    assert check_eval_sets(str(clean), ["audiocaps-test", "clotho-eval"], allow=False)["problems"] == []
    # Latent shards are judged by the audio export they were encoded from (their manifest's source).
    from soundlake.generation.train.encode import FORMAT
    latents = root / "latents"
    latents.mkdir(exist_ok=True)
    (latents / "manifest.json").write_text(json.dumps({"format": FORMAT, "source": str(leaky), "shards": []}))
    with pytest.raises(UserError, match=re.escape(f"the export {leaky} fails the leakage check (audiocaps-test")):
        check_eval_sets(str(latents), ["audiocaps-test"], allow=False)
    spec = load_train_spec("vae", sets=["eval_sets=[audiocaps-test]", "allow_leakage=true"], shards=str(leaky),
                           out=str(root / "vae"), steps=1)
    plan = make_plan(spec)   # the override passes, and what it let through goes into the model's metadata
    assert plan["eval_sets"][0]["allow_leakage"] and plan["eval_sets"][0]["problems"] == \
        ["audiocaps-test: clips leak (identity 1)"]
    assert spec.model_dump()["allow_leakage"] is True   # recorded with the spec in soundlake_model.json


def test_a_lake_without_dedup_results_exports_as_before(tmp_path):
    from soundlake.testing import make_synth_lake

    lake = make_synth_lake(tmp_path, 4)
    args = ExportArgs(out=str(tmp_path / "out"), shard_count=2, shard_size=None)
    r = run_export(lake, args)
    m = manifest_of(tmp_path / "out")
    assert r.clips == 4 and m["dedup"] == {"level": "fingerprint", "default": True, "data": False, "remaining": {},
                                            "note": m["dedup"]["note"]} and "no dedup results" in m["dedup"]["note"]
    assert m["eval_sets"] == {"registered": [], "excluded": [], "sets": {}}
    assert "dedup" not in args.identity() and "exclude_eval_sets" not in args.identity()   # same export id as before
    with pytest.raises(UserError, match="no identity, fingerprint duplicates yet"):
        run_export(lake, ExportArgs(out=str(tmp_path / "o2"), dedup="fingerprint", shard_count=2, shard_size=None))


def test_fingerprints_from_before_envelopes_are_matched_by_bits_and_then_refilled(tmp_path, ray_session):
    """A lake fingerprinted by an earlier soundlake has no ``env``, ``contour`` or ``pitch``
    column: dedup still matches (by bits alone), fingerprints those clips again with envelopes
    and detail, and the new rows replace the old ones in the view."""
    import pyarrow.parquet as pq

    from soundlake.testing import make_synth_lake

    lake = make_synth_lake(tmp_path, 3, seconds=8.0)
    runner = CliRunner()
    r = runner.invoke(app, ["dedup", "--lake", lake.uri, "--levels", "fingerprint"])
    assert r.exit_code == 0 and "fingerprints: 3 new" in r.output, r.output
    for part in lake.parts("fingerprints"):                      # as an earlier version wrote them
        pq.write_table(pq.read_table(part).drop_columns(["env", "contour", "pitch"]), part)
    assert not {"env", "contour", "pitch"} & set(lake.read("fingerprints").column_names)
    r = runner.invoke(app, ["dedup", "--lake", lake.uri, "--levels", "fingerprint"])
    assert r.exit_code == 0 and "fingerprints: 3 new" in r.output, r.output
    rows = fetchall(lake, "SELECT clip_id, len(env), len(contour), len(pitch) FROM fingerprints ORDER BY 1")
    assert len(rows) == 3
    for _, env, contour, pitch in rows:   # 8 s: ~24 envelope, ~345 contour and ~43 pitch frames a second
        assert env > 100 and 2500 < contour < 2800 and 300 < pitch < 350, rows
    r = runner.invoke(app, ["dedup", "--lake", lake.uri, "--levels", "fingerprint"])
    assert r.exit_code == 0 and "fingerprints: 0 new" in r.output, r.output
