"""`soundlake serve` through its HTTP API (Starlette's test client, no browser): the list and its
filters, the read-only SQL box with its time limit, the clip page, FLAC with range requests,
spectrograms, dashboards, the token/Host/Origin checks and reviews written to the lake."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from starlette.testclient import TestClient

from soundlake.catalog.sql import fetchall
from soundlake.core.errors import UserError
from soundlake.serve.app import byte_range, create_app

sys.path.insert(0, str(Path(__file__).parent))
from serve_lake import make_serve_lake  # noqa: E402

BASE = "http://127.0.0.1:8765"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    return make_serve_lake(tmp_path_factory.mktemp("serve"), 8)


@pytest.fixture(scope="module")
def client(lake):
    app = create_app(lake, review=True, reviewer="ann", limit_s=1.0)
    with TestClient(app, base_url=BASE) as c:
        c.catalog = app.catalog
        yield c


def clips(client, **params) -> dict:
    r = client.get("/api/clips", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_list_pages_sorts_and_shows_the_preferred_caption(client, lake):
    data = clips(client, page_size=10)
    assert data["total"] == 8 and [r["clip_id"] for r in data["rows"]] == sorted(r["clip_id"] for r in data["rows"])
    # The dataset view's caption (highest CLAP score), with its score.
    best = dict(fetchall(lake, "SELECT clip_id, caption FROM dataset"))
    assert {r["clip_id"]: r["caption"] for r in data["rows"]} == best
    assert all(r["score"] > 0.5 and r["n_captions"] == 2 for r in data["rows"])
    second = clips(client, page_size=10, page=1, sort="score", order="desc")
    assert second["rows"] == [] and second["total"] == 8
    by_score = clips(client, page_size=10, sort="score", order="desc")["rows"]
    assert [r["score"] for r in by_score] == sorted((r["score"] for r in by_score), reverse=True)
    assert len(clips(client, page_size=10, page=0)["rows"]) == 8


@pytest.mark.parametrize("params, sql", [
    ({"label": "hum"}, "list_contains(labels, 'hum')"),
    ({"label": "tagged_bell"}, "list_contains(labels, 'bell')"),      # a CLAP tag, not a source label
    ({"score_min": "0.605"}, "clip_id IN (SELECT clip_id FROM dataset WHERE score >= 0.605)"),
    ({"source": "synth", "license": "CC0", "dur_min": "1.5", "dur_max": "2.5"}, "TRUE"),
    ({"captioner": "nobody"}, "FALSE"),
    ({"run": "score-run"}, "FALSE"),         # scores do not make a clip's run; captions and clips do
    ({"where": "source_id IN ('0-1', '0-2')"}, "source_id IN ('0-1', '0-2')"),
])
def test_filters_narrow_the_list(client, lake, params, sql):
    expected = sorted(r[0] for r in fetchall(lake, f"SELECT clip_id FROM clips WHERE {sql}"))
    got = clips(client, page_size=50, **params)
    assert sorted(r["clip_id"] for r in got["rows"]) == expected and got["total"] == len(expected)
    assert 0 < len(expected) < 8 or sql in ("TRUE", "FALSE")


@pytest.mark.parametrize("where, message", [
    ("1=1) UNION SELECT * FROM clips --", "must be one SQL condition"),
    ("1=1; DROP TABLE list_rows", "must be one SQL condition"),
    ("(SELECT count(*) FROM read_csv('/etc/passwd')) > 0", "SQL error"),
    ("no_such_column = 1", "SQL error"),
])
def test_the_where_box_is_read_only_and_errors_are_one_line(client, where, message):
    r = client.get("/api/clips", params={"where": where})
    assert r.status_code == 400 and message in r.json()["error"] and "\n" not in r.json()["error"]


def test_a_slow_query_is_interrupted_and_the_server_goes_on(client):
    slow = "(SELECT sum(a.range * b.range) FROM range(200000) a, range(200000) b) > 0"
    r = client.get("/api/clips", params={"where": slow})
    assert r.status_code == 400 and "time limit" in r.json()["error"]
    assert clips(client)["total"] == 8


@pytest.mark.parametrize("params, message", [
    ({"sort": "flac"}, "sort"), ({"page_size": "100000"}, "page_size"), ({"score_min": "high"}, "score_min"),
    ({"text": "a dog"}, "--clap"),
])
def test_bad_list_parameters(client, params, message):
    r = client.get("/api/clips", params=params)
    assert r.status_code == 400 and message in r.json()["error"]


def test_clip_page(client, lake):
    clip_id = "synth:0-2:0"
    d = client.get(f"/api/clips/{clip_id}").json()
    assert d["clip"]["clip_id"] == clip_id and "flac" not in d["clip"]
    assert {(c["captioner"], c["clap_model_id"]) for c in d["captions"]} == {("reference", "clap-test"), ("template", "clap-test")}
    assert [c["score"] for c in d["captions"]] == sorted((c["score"] for c in d["captions"]), reverse=True)
    labels = fetchall(lake, f"SELECT labels FROM clips WHERE clip_id = '{clip_id}'")[0][0]
    assert [t["label"] for t in d["tags"]] == ["tagged_" + x for x in labels]
    assert {r["run_id"] for r in d["runs"]} == {"synth", "score-run"}
    assert next(r for r in d["runs"] if r["run_id"] == "synth")["pipeline"] == "demo"
    assert client.get("/api/clips/no:such:clip").status_code == 404


def test_audio_with_ranges(client, lake):
    clip_id = "synth:0-3:0"
    flac = fetchall(lake, f"SELECT flac FROM audio WHERE clip_id = '{clip_id}'")[0][0]
    url = f"/api/clips/{clip_id}/audio"
    full = client.get(url)
    assert full.status_code == 200 and full.content == flac and full.headers["accept-ranges"] == "bytes"
    assert full.headers["content-type"] == "audio/flac"
    audio, sr = sf.read(io.BytesIO(full.content))
    assert sr == 16000 and len(audio) == 32000
    part = client.get(url, headers={"range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == flac[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(flac)}"
    tail = client.get(url, headers={"range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == flac[-10:]
    beyond = client.get(url, headers={"range": f"bytes={len(flac)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(flac)}"
    assert client.get("/api/clips/nope/audio").status_code == 404


def test_byte_range():
    assert byte_range("bytes=0-", 10) == (0, 9)
    assert byte_range("bytes=5-100", 10) == (5, 9)
    assert byte_range("bytes=-3", 10) == (7, 9)
    assert byte_range("bytes=-30", 10) == (0, 9)
    for bad in ("bytes=10-", "bytes=5-2", "bytes=-", "items=0-1", "bytes=-0"):
        assert byte_range(bad, 10) is None, bad


def test_spectrogram_is_a_png_of_the_clip_and_cached(client):
    from matplotlib import image

    url = "/api/clips/synth:0-4:0/spectrogram.png"
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    pixels = image.imread(io.BytesIO(r.content))
    assert pixels.shape[0] == 257 and pixels.shape[1] > 100       # n_fft 512: 257 bins; 2 s of frames
    assert np.ptp(pixels[..., :3]) > 0.3                          # not a blank picture
    assert client.get(url).content == r.content


def test_dashboard(client):
    d = client.get("/api/dashboard").json()
    assert d["sources"] == [{"source": "synth", "clips": 8, "hours": round(16 / 3600, 3)}]
    assert [(f["error"], f["inputs"]) for f in d["failures"]] == [("corrupt", 1)]
    assert sum(h["n"] for h in d["histograms"]) == 16
    rows = {r["captioner"]: r for r in d["thresholds"]}
    assert rows["template"]["pairs"] == 8 and rows["template"]["0.50"] + rows["reference"]["0.50"] == 8


def test_reviews_land_in_the_lake_and_the_newest_wins(client, lake):
    clip_id = "synth:0-5:0"
    before = client.catalog.current(wait=True)
    d = client.get(f"/api/clips/{clip_id}").json()
    preferred = d["best"]
    other = next(c for c in d["captions"] if c["text"] != preferred["caption"])
    post = lambda body: client.post("/api/reviews", json={"clip_id": clip_id, **body})  # noqa: E731
    assert post({"target": "caption", "captioner": preferred["captioner"], "caption_text": preferred["caption"],
                 "verdict": "wrong"}).status_code == 200
    assert post({"target": "caption", "captioner": other["captioner"], "caption_text": other["text"],
                 "verdict": "good"}).status_code == 200
    assert fetchall(lake, f"SELECT captioner, verdict, reviewer FROM caption_reviews WHERE clip_id = '{clip_id}' "
                          "ORDER BY verdict") == [(other["captioner"], "good", "ann"), (preferred["captioner"], "wrong", "ann")]
    # The dataset view prefers the approved caption now, and so does the list (its next state).
    assert fetchall(lake, f"SELECT caption FROM dataset WHERE clip_id = '{clip_id}'") == [(other["text"],)]
    row = next(r for r in clips(client, fresh="1")["rows"] if r["clip_id"] == clip_id)
    assert row["caption"] == other["text"] and row["caption_verdict"] == "good"
    after = client.catalog.current()
    assert after.key != before.key and after.audio_key == before.audio_key    # audio caches stay valid
    # Undo: a newer review supersedes.
    assert post({"target": "caption", "captioner": other["captioner"], "caption_text": other["text"],
                 "verdict": "clear"}).status_code == 200
    assert fetchall(lake, f"SELECT captioner FROM caption_reviews WHERE clip_id = '{clip_id}'") == [(preferred["captioner"],)]
    assert post({"target": "clip", "verdict": "exclude", "reason": "speech in the background"}).status_code == 200
    assert fetchall(lake, "SELECT clip_id, reason FROM excluded_clips") == [(clip_id, "speech in the background")]
    assert post({"target": "clip", "verdict": "keep"}).status_code == 200
    assert fetchall(lake, "SELECT count(*) FROM excluded_clips") == [(0,)]
    assert fetchall(lake, f"SELECT count(*) FROM reviews WHERE clip_id = '{clip_id}'") == [(5,)]


@pytest.mark.parametrize("body, status, message", [
    ({"target": "clip", "clip_id": "synth:0-0:0", "verdict": "exclude"}, 400, "reason"),
    ({"target": "clip", "clip_id": "synth:0-0:0", "verdict": "delete"}, 400, "verdict"),
    ({"target": "row", "clip_id": "synth:0-0:0", "verdict": "good"}, 400, "target"),
    ({"target": "clip", "clip_id": "no:such:clip", "verdict": "keep"}, 404, "no such clip"),
    ({"target": "caption", "clip_id": "synth:0-0:0", "captioner": "reference", "caption_text": "made up",
      "verdict": "good"}, 404, "no such caption"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_reviews_are_refused(client, body, status, message):
    r = client.post("/api/reviews", json=body)
    assert r.status_code == status and message in r.json()["error"]


def test_a_review_lands_while_a_run_holds_the_lake_lock(client, lake):
    """A curate holds the lake lock for its whole run: reviews neither wait for it nor take it."""
    with lake.lock("curate-run"):
        r = client.post("/api/reviews", json={"target": "clip", "clip_id": "synth:0-6:0", "verdict": "exclude",
                                              "reason": "clipping"})
        assert r.status_code == 200 and lake.holds_lock("curate-run")
    assert ("synth:0-6:0",) in fetchall(lake, "SELECT clip_id FROM excluded_clips")


def test_export_where_leaves_out_excluded_clips(client, lake, tmp_path):
    from soundlake.export.exporter import ExportArgs, run_export

    client.post("/api/reviews", json={"target": "clip", "clip_id": "synth:0-7:0", "verdict": "exclude", "reason": "x"})
    excluded = {r[0] for r in fetchall(lake, "SELECT clip_id FROM excluded_clips")}
    assert "synth:0-7:0" in excluded
    run_export(lake, ExportArgs(out=str(tmp_path / "shards"), shard_count=8, shard_size=None, name="reviewed",
                                where="clip_id NOT IN (SELECT clip_id FROM excluded_clips)"))
    members = {r[0] for r in fetchall(lake, "SELECT clip_id FROM export_members")}
    assert len(members) == 8 - len(excluded) and not members & excluded
    # The clip page and the dashboard show the export (the server's next lake state).
    clips(client, fresh="1")
    kept = sorted(members)[0]
    assert [e["name"] for e in client.get(f"/api/clips/{kept}").json()["exports"]] == ["reviewed"]
    assert [e["clips"] for e in client.get("/api/dashboard").json()["exports"]] == [len(members)]


def test_read_only_server_refuses_reviews(lake):
    with TestClient(create_app(lake), base_url=BASE) as c:
        r = c.post("/api/reviews", json={"target": "clip", "clip_id": "synth:0-0:0", "verdict": "keep"})
        assert r.status_code == 403 and "--review" in r.json()["error"]
        assert c.get("/api/meta").json()["review"] is False


def test_host_and_origin_checks(client):
    assert client.get("/api/meta", headers={"host": "evil.example:8765"}).status_code == 403   # DNS rebinding
    assert client.get("/api/meta", headers={"host": "localhost:8765"}).status_code == 200
    body = {"target": "clip", "clip_id": "synth:0-0:0", "verdict": "keep"}
    assert client.post("/api/reviews", json=body, headers={"origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/reviews", json=body, headers={"sec-fetch-site": "cross-site"}).status_code == 403
    form = client.post("/api/reviews", content=b"target=clip", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 403
    assert client.post("/api/reviews", json=body, headers={"origin": BASE}).status_code == 200
    page = client.get("/")
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_token_is_required_beyond_loopback(lake):
    with pytest.raises(UserError, match="token"):
        create_app(lake, host="0.0.0.0")
    app = create_app(lake, host="0.0.0.0", token="s3cret-token")
    with TestClient(app, base_url="http://192.0.2.7:8765") as c:
        for path in ("/", "/api/meta", "/api/clips", "/api/clips/synth:0-0:0/audio", "/static/app.js"):
            assert c.get(path).status_code == 401, path
        assert c.get("/api/meta", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/meta", headers={"authorization": "Bearer s3cret-token"}).status_code == 200
        assert c.get("/login", params={"token": "wrong"}).status_code == 401
        login = c.get("/login", params={"token": "s3cret-token"})
        cookie = login.headers["set-cookie"]
        assert login.status_code == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert c.get("/api/clips/synth:0-0:0/audio").status_code == 200     # the client keeps the cookie


def test_state_is_precomputed_once_and_follows_the_lake(client, lake):
    catalog = client.catalog
    state = catalog.current(wait=True)
    clips(client)
    assert catalog.current() is state                 # nothing changed: the same precomputed table
    extra = fetchall(lake, "SELECT * FROM clips WHERE clip_id = 'synth:0-0:0'")
    assert extra
    cols = fetchall(lake, "SELECT column_name FROM (DESCRIBE clips)")
    row = dict(zip([c[0] for c in cols], extra[0]))
    row.update(clip_id="synth:extra:0", source_id="extra", source="other")
    from soundlake.catalog import schema

    lake.write_part("clips", pa.Table.from_pylist([row], schema=schema.CLIPS), "extra-run")
    data = clips(client, fresh="1", source="other")
    assert [r["clip_id"] for r in data["rows"]] == ["synth:extra:0"] and data["state"] != state.key
    assert catalog.current().facets["sources"] == ["other", "synth"]


def test_serve_help():
    from typer.testing import CliRunner

    from soundlake.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--lake", "--host", "--port", "--token", "--review", "--reviewer", "--clap"):
        assert option in out


def test_text_similarity_box(tmp_path):
    """With --clap, the box ranks clips by the cosine of their audio embedding with the text's
    (a tiny untrained in-house CLAP: the order is arbitrary, the numbers are checked)."""
    from datetime import datetime, timezone

    from soundlake.catalog.schema import embeddings_schema
    from soundlake.core.audio import decode_mono
    from soundlake.models.clap.load import load_clap
    from soundlake.testing import make_synth_lake, make_tiny_inhouse_clap

    lake = make_synth_lake(tmp_path, 4)
    model_dir = str(make_tiny_inhouse_clap(tmp_path / "clap"))
    model = load_clap(model_dir)
    ids, flacs = zip(*fetchall(lake, "SELECT clip_id, flac FROM audio ORDER BY clip_id"))
    emb = model.embed_audio([decode_mono(f, model.sample_rate) for f in flacs]).astype(np.float32)
    n, dim = emb.shape
    lake.write_part("embeddings", pa.table({
        "clip_id": list(ids), "model_id": [model_dir] * n, "model_hash": ["x"] * n, "backend": ["soundlake"] * n,
        "identity_json": ["{}"] * n, "dim": [dim] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
        "run_id": ["e"] * n, "created": [datetime.now(timezone.utc)] * n}, schema=embeddings_schema(dim)), "e")
    text = model.embed_text(["a bell rings"])[0]
    cosine = emb @ text / np.linalg.norm(emb, axis=1) / np.linalg.norm(text)
    with TestClient(create_app(lake, load_model=load_clap, clap_model=model_dir), base_url=BASE) as c:
        assert c.get("/api/meta").json()["text_search"] is None
        rows = c.get("/api/clips", params={"text": "a bell rings", "sort": "similarity", "order": "desc"}).json()["rows"]
        assert [r["clip_id"] for r in rows] == [ids[i] for i in np.argsort(-cosine)]
        assert [r["similarity"] for r in rows] == pytest.approx(sorted(cosine, reverse=True), abs=1e-4)
