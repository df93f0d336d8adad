"""AudioSet / VGGSound manifests, license normalisation, error classification (no Ray, no network)."""
from __future__ import annotations

import json

import pytest

from soundlake.core.errors import UserError
from soundlake.sources import licenses
from soundlake.sources.fetch import classify, redact
from soundlake.sources.manifests import (
    MALFORMED,
    audioset_inputs,
    load_ontology,
    vggsound_inputs,
)

TEMPLATE = "http://127.0.0.1:1/media/{ytid}.m4a"

AUDIOSET = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=4, num_unique_labels=3, num_positive_labels=5
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
--ZhevVpy1s, 50.000, 60.000, "/m/012xff"
--ZhevVpy1s, 70.000, 80.000, "/m/04rlf,/m/09x0r"
bad line without enough fields
--aE2O5G5WE, 0.000, nan, "/m/03fwl"
ok_id_zz, 20.000, 10.000, "/m/09x0r"
"""


def test_audioset_manifest(tmp_path):
    man = tmp_path / "balanced_train_segments.csv"
    man.write_text(AUDIOSET)
    rows = audioset_inputs(str(man), TEMPLATE)
    good = [r for r in rows if r["uri"] != MALFORMED]
    bad = [r for r in rows if r["uri"] == MALFORMED]
    assert [r["source_id"] for r in good] == ["--PJHxphWEs_30000", "--ZhevVpy1s_50000", "--ZhevVpy1s_70000"]
    first = good[0]
    assert first["uri"] == "http://127.0.0.1:1/media/--PJHxphWEs.m4a"
    assert first["url"] == "https://www.youtube.com/watch?v=--PJHxphWEs"
    assert (first["start_s"], first["end_s"]) == (30.0, 40.0)
    names = load_ontology()
    assert first["labels"] == [names["/m/09x0r"], names["/t/dd00088"]]
    assert names["/m/09x0r"] == "Speech"
    assert json.loads(good[2]["meta_json"])["label_ids"] == ["/m/04rlf", "/m/09x0r"]
    # Three malformed lines, each with a stable id naming its line, none crashed the listing.
    assert [r["source_id"] for r in bad] == ["balanced_train_segments.csv:L7", "balanced_train_segments.csv:L8",
                                             "balanced_train_segments.csv:L9"]
    assert "expected 4 fields" in json.loads(bad[0]["meta_json"])["why"]
    assert "not after start" in json.loads(bad[2]["meta_json"])["why"]


def test_vggsound_manifest(tmp_path):
    man = tmp_path / "vggsound.csv"
    man.write_text('---g-f_I2yQ,1,people marching,test\n--0PQM4-hqg,30,"male speech, man speaking",train\n'
                   'x1,notanumber,dog barking,train\n--U7joUcTCo,0,,train\n')
    rows = vggsound_inputs(str(man), TEMPLATE)
    assert [r["source_id"] for r in rows[:2]] == ["---g-f_I2yQ_1000", "--0PQM4-hqg_30000"]
    assert rows[1]["labels"] == ["male speech, man speaking"]
    assert (rows[1]["start_s"], rows[1]["end_s"]) == (30.0, 40.0)
    assert json.loads(rows[0]["meta_json"])["split"] == "test"
    assert [r["uri"] for r in rows[2:]] == [MALFORMED, MALFORMED]


def test_manifest_missing_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        audioset_inputs(str(tmp_path / "nope.csv"), TEMPLATE)


@pytest.mark.parametrize("text,want", [
    ("http://creativecommons.org/publicdomain/zero/1.0/", "CC0"),
    ("https://creativecommons.org/licenses/by/4.0/", "CC-BY"),
    ("http://creativecommons.org/licenses/by-nc/3.0/", "CC-BY-NC"),
    ("http://creativecommons.org/licenses/by-nc-sa/4.0/deed.en", "CC-BY-NC-SA"),
    ("http://creativecommons.org/licenses/sampling+/1.0/", "Sampling+"),
    ("Attribution Noncommercial", "CC-BY-NC"),
    ("Creative Commons 0", "CC0"),
    ("Creative Commons Attribution license (reuse allowed)", "CC-BY"),
    ("YouTube Standard License", "YouTube"),
    ("cc-by", "CC-BY"),
    ("some custom terms", None),
    (None, None),
])
def test_license_normalize(text, want):
    assert licenses.normalize(text) == want


def test_license_filter():
    assert licenses.matches("CC0", ["CC0", "CC-BY"])
    assert not licenses.matches("CC-BY-NC", ["CC0", "Attribution"])
    assert licenses.matches("CC-BY", ["Attribution"])   # names in the filter are normalised too
    assert licenses.matches(None, None)


@pytest.mark.parametrize("msg,cls", [
    ("[youtube] abc: Sign in to confirm you're not a bot. Use --cookies-from-browser", "bot_wall"),
    ("[youtube] abc: Private video. Sign in if you've been granted access", "private"),
    ("[youtube] abc: Video unavailable. This video has been removed by the uploader", "not_found"),
    ("[generic] x: Unable to download webpage: HTTP Error 404: Not Found", "not_found"),
    ("[youtube] abc: The uploader has not made this video available in your country", "forbidden"),
    ("unable to download video data: HTTP Error 403: Forbidden", "forbidden"),
    ("[generic] x: Unable to download webpage: HTTP Error 429: Too Many Requests", "rate_limited"),
    ("[generic] x: Unable to download webpage: HTTP Error 503: Service Unavailable", "server_error"),
    ("[generic] x: Unable to download webpage: The read operation timed out", "timeout"),
    ("[Errno 104] Connection reset by peer", "network"),
])
def test_classify(msg, cls):
    assert classify(msg) == cls


def test_redact(monkeypatch):
    monkeypatch.setenv("FREESOUND_API_KEY", "sEcReTkEy123")
    text = redact("GET https://x/apiv2/search/?token=sEcReTkEy123&q=a failed; Authorization: Bearer abc.def")
    assert "sEcReTkEy123" not in text and "abc.def" not in text
    assert "token=***" in text
