"""Evaluation-set parsers on samples of each official format, their one-line errors, and
`eval-sets add|list` on a lake (the leakage against a planted lake is in test_dedup.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from soundlake.catalog.eval_sets import detect_format, parse_eval_set
from soundlake.catalog.sql import fetchall
from soundlake.cli import app
from soundlake.core.errors import UserError
from soundlake.testing import make_synth_lake

DATA = Path(__file__).parent / "data" / "eval_sets"


def items_of(name: str, fmt: str | None = None, **kw) -> tuple[str, dict[str, dict]]:
    got_fmt, items = parse_eval_set(str(DATA / name), fmt, **kw)
    return got_fmt, {i["item_id"]: i for i in items}


def test_formats_are_detected_from_the_header():
    detected = {name: detect_format((DATA / name).read_text()) for name in
                ("audiocaps_test.csv", "clotho_captions_evaluation.csv", "clotho_metadata_evaluation.csv",
                 "esc50.csv", "vggsound.csv", "ids.txt")}
    assert detected == {"audiocaps_test.csv": "audiocaps", "clotho_captions_evaluation.csv": "clotho",
                        "clotho_metadata_evaluation.csv": "clotho", "esc50.csv": "esc50",
                        "vggsound.csv": "vggsound", "ids.txt": "ids"}


def test_audiocaps_one_item_per_segment_with_its_captions():
    fmt, items = items_of("audiocaps_test.csv")
    assert fmt == "audiocaps" and sorted(items) == ["6BJ455B1aAs_0", "7fmOlUlwoNg_20000", "dQw4w9WgXcQ_31000"]
    rattle = items["7fmOlUlwoNg_20000"]
    assert (rattle["youtube_id"], rattle["start_s"], rattle["end_s"]) == ("7fmOlUlwoNg", 20.0, 30.0)
    assert len(rattle["captions"]) == 2 and rattle["freesound_id"] is None
    assert items["6BJ455B1aAs_0"]["captions"][0] == "A goat bleating repeatedly, then a man speaks"


def test_clotho_captions_take_their_freesound_ids_from_the_metadata_beside_them():
    fmt, items = items_of("clotho_captions_evaluation.csv")
    assert fmt == "clotho"
    assert {k: v["freesound_id"] for k, v in items.items()} == {
        "Santa Motor.wav": "110298", "Radio Garble.wav": "80399", "bell copy.wav": "4242"}
    assert len(items["Santa Motor.wav"]["captions"]) == 5 and items["bell copy.wav"]["file"] == "bell copy.wav"
    # The metadata file alone is a set too (no captions).
    _, meta_only = items_of("clotho_metadata_evaluation.csv")
    assert meta_only["Radio Garble.wav"]["freesound_id"] == "80399" and meta_only["Radio Garble.wav"]["captions"] == []


def test_esc50_vggsound_and_id_lists():
    _, esc = items_of("esc50.csv")
    assert {k: v["freesound_id"] for k, v in esc.items()} == {
        "1-100032-A-0.wav": "100032", "1-100038-A-14.wav": "100038", "5-9032-A-0.wav": "9032"}
    assert esc["1-100038-A-14.wav"]["captions"] == ["chirping birds"]
    _, vgg = items_of("vggsound.csv")   # the train row is left out
    assert sorted(vgg) == ["---g-f_I2yQ_1000", "dQw4w9WgXcQ_33000"]
    assert vgg["dQw4w9WgXcQ_33000"]["captions"] == ["male speech, man speaking"]
    assert vgg["---g-f_I2yQ_1000"]["file"] == "---g-f_I2yQ_000001"   # the official file name
    _, ids = items_of("ids.txt")
    assert ids["7fmOlUlwoNg"]["youtube_id"] == "7fmOlUlwoNg" and ids["7fmOlUlwoNg"]["start_s"] is None
    assert (ids["dQw4w9WgXcQ_30000_40000"]["start_s"], ids["dQw4w9WgXcQ_30000_40000"]["end_s"]) == (30.0, 40.0)
    assert ids["freesound:4242"]["freesound_id"] == "4242" and ids["freesound:110298"]["freesound_id"] == "110298"


@pytest.mark.parametrize("name, text, fmt, message", [
    ("a.csv", "audiocap_id,youtube_id,start_time,caption\n1,not-an-id,0,x\n", None, "a.csv:2: 'not-an-id' is not a YouTube id"),
    ("a.csv", "audiocap_id,youtube_id,start_time,caption\n1,7fmOlUlwoNg,soon,x\n", None, "a.csv:2: 'soon' is not a time"),
    ("e.csv", "filename,fold,target,category,esc10,src_file,take\nx.wav,1,0,dog,True,abc,A\n", None,
     "e.csv:2: src_file 'abc' is not a Freesound id"),
    ("v.csv", "7fmOlUlwoNg,1,test\n", "vggsound", "v.csv:1: expected 4 fields"),
    ("c.csv", "file_name,caption_1\nx.wav,hello\n", None, "needs its metadata file"),
    ("e.csv", "filename,fold\nx.wav,1\n", None, "expected the columns filename, src_file; missing src_file"),
    ("v.csv", "7fmOlUlwoNg,1,dog,train\n", "vggsound", "no vggsound items of split test"),
    ("x.csv", "x", "audioset", "--format 'audioset': expected one of"),
])
def test_bad_files_are_one_line_errors(tmp_path, name, text, fmt, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as e:
        parse_eval_set(str(path), fmt)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_add_and_list_through_the_cli(tmp_path):
    lake = make_synth_lake(tmp_path, 3)
    runner = CliRunner()
    for name, csv in (("audiocaps-test", "audiocaps_test.csv"), ("clotho-eval", "clotho_captions_evaluation.csv")):
        r = runner.invoke(app, ["eval-sets", "add", name, "--csv", str(DATA / csv), "--lake", lake.uri])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval-sets", "add", "audiocaps-test", "--csv", str(DATA / "ids.txt"), "--lake", lake.uri])
    assert r.exit_code == 0, r.output   # a name added again replaces the set
    sets = fetchall(lake, "SELECT name, format, items FROM eval_sets ORDER BY name")
    assert sets == [("audiocaps-test", "ids", 4), ("clotho-eval", "clotho", 3)]
    items = fetchall(lake, "SELECT name, count(*) FROM eval_set_items GROUP BY 1 ORDER BY 1")
    assert items == [("audiocaps-test", 4), ("clotho-eval", 3)]
    # Synth clips come from no shared recording: no identity leakage, and the check is recorded.
    assert fetchall(lake, "SELECT count(*) FROM leakage") == [(0,)]
    pointer = json.loads(Path(lake.uri, "_snapshots.json").read_text())
    checked = pointer["leakage"]["meta"]["levels"]["identity"]["eval_sets"]
    assert sorted(checked) == ["audiocaps-test", "clotho-eval"]
    r = runner.invoke(app, ["eval-sets", "list", "--lake", lake.uri])
    assert r.exit_code == 0 and "audiocaps-test" in r.output and "clotho-eval" in r.output
    r = runner.invoke(app, ["eval-sets", "add", "all", "--csv", str(DATA / "ids.txt"), "--lake", lake.uri])
    assert r.exit_code == 2 and "eval set name 'all'" in r.output
