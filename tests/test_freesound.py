"""Freesound API v2 against a loopback Freesound-shaped server: search + pagination,
license filter, preview and original download, faults, request rate, and secrets
never reaching the lake, the run config or the logs."""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import pytest

from soundlake.catalog.sql import connect
from soundlake.pipelines.runner import run_pipeline
from soundlake.pipelines.spec import PipelineSpec
from soundlake.sources.freesound import auth_headers

sys.path.insert(0, str(Path(__file__).parent))
from servers import Fault, FreesoundServer, Sound, make_media  # noqa: E402

pytestmark = pytest.mark.timeout(120)
KEY, OAUTH = "fs-test-key-9f8e7d6c", "oauth-tok-1a2b3c4d5e"
CC0 = "http://creativecommons.org/publicdomain/zero/1.0/"
LIC = {107: "http://creativecommons.org/licenses/by-nc/3.0/", 108: "https://creativecommons.org/licenses/by/4.0/",
       109: "http://creativecommons.org/licenses/sampling+/1.0/"}


@pytest.fixture()
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("FREESOUND_API_KEY", KEY)
    monkeypatch.setenv("FREESOUND_OAUTH_TOKEN", OAUTH)
    ogg = make_media(tmp_path, "preview", 4.0, "ogg", 523.0)
    with FreesoundServer(KEY, OAUTH) as s:
        for i in range(101, 111):
            s.add(Sound(i, f"sound {i}", ogg, license=LIC.get(i, CC0), tags=["field-recording", f"t{i}"],
                        username=f"user{i}", description=f"a recording number {i}"))
        yield s


def _spec(server, **freesound) -> PipelineSpec:
    return PipelineSpec.model_validate({
        "name": "freesound-test", "source": {"kind": "freesound"},
        "freesound": {"api_url": server.api_url, "query": "sound", "page_size": 4,
                      "license": ["CC0", "CC-BY"], **freesound},
        "segment": {"sample_rate": 16000, "window": 3.0, "policy": "first", "min_duration": 0.5},
        "download": {"timeout_s": 2.0, "retries": 1, "backoff_s": 0.1, "rate_per_minute": {"127.0.0.1": 120},
                     "concurrency": 4},
        "stages": ["download", "segment"], "ray": {"inputs_per_task": 8}})


def _assert_no_secret(lake: Path, *texts: str) -> None:
    for path in glob.glob(str(lake / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            data = Path(path).read_bytes()
            assert KEY.encode() not in data and OAUTH.encode() not in data, path
    for text in texts:
        assert KEY not in text and OAUTH not in text


def test_freesound_previews(ray_session, server, tmp_path, capfd):
    server.faults.update({"search": Fault("429", times=1, retry_after=0.3), "102": Fault("429", times=1, retry_after=0.5),
                          "103": Fault("truncated", times=1), "104": Fault("404"), "105": Fault("500")})
    lake = tmp_path / "lake"
    s = run_pipeline(_spec(server), str(lake))
    # 10 found, 2 dropped by the license filter (CC-BY-NC, Sampling+), 8 listed.
    assert s.inputs_total == 8
    assert s.clips == 6 and dict(s.errors) == {"not_found": 1, "server_error": 1}
    con = connect(str(lake))
    rows = con.execute("SELECT source_id, license, title, uploader, tags, url FROM clips ORDER BY source_id").fetchall()
    assert [r[0] for r in rows] == ["101", "102", "103", "106", "108", "110"]
    assert {r[0]: r[1] for r in rows}["108"] == "CC-BY" and {r[1] for r in rows} == {"CC0", "CC-BY"}
    assert rows[0][2:5] == ("sound 101", "user101", ["field-recording", "t101"])
    assert rows[0][5] == "https://freesound.org/people/user101/sounds/101/"
    # Pagination followed through `next`, every API call authenticated with the token;
    # the search's 429 was retried.
    search = server.hits("search")
    assert [h.status for h in search] == [429, 200, 200, 200]
    assert all(h.auth == f"Token {KEY}" for h in search[1:])
    # Retry-After, the truncated body retried, permanent 404 asked once, 500 retried then recorded.
    h102 = server.hits("102")
    assert h102[0].status == 429 and h102[1].t - h102[0].t >= 0.45
    assert len(server.hits("103")) == 2 and len(server.hits("104")) == 1 and len(server.hits("105")) == 2
    # The per-host rate the server saw: 120/min = one request slot per 0.5 s. The limiter
    # spaces the starts; a request delayed on the client arrives late and shortens the next
    # gap, so check windows of two gaps (>= 1.0 s less one slot of slack) and the whole span.
    starts = sorted(h.t for h in server.hits() if h.path.startswith("/previews/"))
    pairs = [c - a for a, c in zip(starts, starts[2:])]
    assert len(starts) == 11 and min(pairs) >= 0.6, pairs
    assert starts[-1] - starts[0] >= 10 * 0.5 - 0.5
    # Secrets: nowhere in the lake (parts, run config), in the captured output, or in Ray's logs.
    config = con.execute("SELECT string_agg(config_json, ' ') FROM runs").fetchone()[0]
    out, err = capfd.readouterr()
    ray_logs = ""
    for path in glob.glob("/tmp/ray/session_latest/logs/worker*"):
        ray_logs += Path(path).read_text(errors="replace")
    _assert_no_secret(lake, config, out, err, ray_logs)


def test_freesound_originals_with_oauth(ray_session, server, tmp_path):
    lake = tmp_path / "lake"
    s = run_pipeline(_spec(server, original=True, max_results=2, license=None), str(lake))
    assert s.clips == 2
    downloads = [h for h in server.hits() if "/download/" in h.path]
    assert len(downloads) == 2 and all(h.auth == f"Bearer {OAUTH}" for h in downloads)
    _assert_no_secret(lake)


def test_auth_only_for_the_api_host(monkeypatch):
    monkeypatch.setenv("FREESOUND_API_KEY", KEY)
    api = "https://freesound.org/apiv2"
    assert auth_headers("https://freesound.org/apiv2/search/text/", api) == {"Authorization": f"Token {KEY}"}
    assert auth_headers("https://cdn.freesound.org/previews/1/1_1-hq.ogg", api) == {}
