"""Freesound API v2: text search -> input rows; preview/original download over HTTP.

* Search: ``GET {api_url}/search/text/?query=&filter=&sort=&page=&page_size=&fields=``
  with ``Authorization: Token <FREESOUND_API_KEY>``; pages are followed through
  ``next`` until ``freesound.max_results``. Runs on the driver at listing time (a few
  small JSON requests), politely: per-host spacing, backoff with Retry-After.
* Download (in the download stage): the preview ``previews['preview-<quality>']``
  (HQ ogg by default, no OAuth needed), or with ``freesound.original: true`` the
  original file from ``{api_url}/sounds/<id>/download/`` with an OAuth2 bearer
  token from env ``FREESOUND_OAUTH_TOKEN``.
* Licenses are normalised (``licenses.normalize``) into ``clips.license`` and can be
  filtered at listing time with ``freesound.license: [CC0, CC-BY]``.

Secrets come from the environment only and are attached only to requests for the
API host; :func:`redact` scrubs them (and any token-looking parameter) from text.
"""
from __future__ import annotations

import json
import os
import re
import time
from urllib.parse import urlparse

import requests

from soundlake.errors import RowError, UserError
from soundlake.pipelines.spec import DownloadSpec, FreesoundSpec
from soundlake.stages import licenses
from soundlake.stages.politeness import LocalGate, backoff, parse_retry_after, wait_turn
from soundlake.stages.sources import input_row

API_KEY_ENV = "FREESOUND_API_KEY"
OAUTH_ENV = "FREESOUND_OAUTH_TOKEN"
SECRET_ENVS = (API_KEY_ENV, OAUTH_ENV)


def secrets() -> list[str]:
    return [v for v in (os.environ.get(k) for k in SECRET_ENVS) if v]


_TOKEN_RE = re.compile(r"(?i)((?:token|api_key|access_token|key)=)[^&\s\"']+|((?:Token|Bearer)\s+)[A-Za-z0-9._\-]+")


def redact(text: str | None, extra: list[str] | None = None) -> str | None:
    """Text with every known secret and token-shaped parameter replaced by ``***``."""
    if not text:
        return text
    for s in secrets() + list(extra or []):
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return _TOKEN_RE.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


def auth_headers(url: str, api_url: str, original: bool = False) -> dict[str, str]:
    """Credentials for ``url``, only when it is on the API's host (never leak to a CDN)."""
    if urlparse(url).netloc != urlparse(api_url).netloc:
        return {}
    if original and os.environ.get(OAUTH_ENV):
        return {"Authorization": f"Bearer {os.environ[OAUTH_ENV]}"}
    key = os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Token {key}"} if key else {}


def http_error_class(status: int) -> str:
    if status == 404 or status == 410:
        return "not_found"
    if status in (401, 403, 451):
        return "forbidden"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "server_error"
    return "network"


class FetchError(RowError):
    """A classified download failure, with the server's Retry-After when it sent one."""

    def __init__(self, error: str, message: str, retry_after: float | None = None):
        super().__init__(error, message)
        self.retry_after = retry_after


def http_get_json(url: str, params: dict, headers: dict, timeout: float) -> dict:
    try:
        r = requests.get(url, params=params, headers=headers, timeout=timeout)
    except requests.Timeout:
        raise FetchError("timeout", f"no answer within {timeout:g} s") from None
    except requests.RequestException as e:
        raise FetchError("network", redact(f"{e.__class__.__name__}: {e}")[:300]) from None
    if r.status_code != 200:
        raise FetchError(http_error_class(r.status_code), f"HTTP {r.status_code} from {urlparse(url).netloc}",
                         parse_retry_after(r.headers.get("Retry-After")))
    try:
        return r.json()
    except ValueError:
        raise FetchError("server_error", "the API answered with invalid JSON") from None


def http_download(url: str, dest: str, headers: dict, timeout: float) -> int:
    """Stream ``url`` to ``dest``; returns bytes written. Raises FetchError, classified."""
    deadline = time.monotonic() + 4 * timeout   # watchdog over the whole transfer
    n = 0
    try:
        with requests.get(url, headers=headers, timeout=timeout, stream=True) as r:
            if r.status_code not in (200, 206):
                raise FetchError(http_error_class(r.status_code), f"HTTP {r.status_code} from {urlparse(url).netloc}",
                                 parse_retry_after(r.headers.get("Retry-After")))
            expected = int(r.headers.get("Content-Length") or 0)
            with open(dest, "wb") as f:
                for chunk in r.iter_content(1 << 16):
                    f.write(chunk)
                    n += len(chunk)
                    if time.monotonic() > deadline:
                        raise FetchError("timeout", f"download took over {4 * timeout:g} s")
    except requests.Timeout:
        raise FetchError("timeout", f"no data within {timeout:g} s") from None
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
        msg = "truncated body" if "IncompleteRead" in str(e) or "incomplete" in str(e).lower() else e.__class__.__name__
        raise FetchError("network", redact(f"connection failed: {msg}")) from None
    if expected and n < expected:
        raise FetchError("network", f"truncated body: {n} of {expected} bytes")
    if n == 0:
        raise FetchError("empty", "the server sent no bytes")
    return n


def search(fs: FreesoundSpec, dl: DownloadSpec, gate=None):
    """Yield result dicts of the text search, following ``next``; polite and retried."""
    if not os.environ.get(API_KEY_ENV):
        raise UserError(f"freesound: set the API key in env {API_KEY_ENV} (https://freesound.org/apiv2/apply)")
    gate = gate or LocalGate(dl.rate_per_minute)
    url = fs.api_url.rstrip("/") + "/search/text/"
    params: dict | None = {"query": fs.query, "sort": fs.sort, "page": 1, "page_size": fs.page_size,
                           "fields": fs.fields}
    if fs.filter:
        params["filter"] = fs.filter
    seen = 0
    while url:
        for attempt in range(dl.retries + 1):
            wait_turn(gate, url)
            try:
                page = http_get_json(url, params or {}, auth_headers(url, fs.api_url), dl.timeout_s)
                break
            except FetchError as e:
                if e.error == "forbidden":
                    raise UserError(f"freesound: the API refused the key in {API_KEY_ENV} ({e.message})") from None
                if e.error not in ("rate_limited", "server_error", "timeout", "network") or attempt == dl.retries:
                    raise UserError(f"freesound search failed: {e.error}: {redact(e.message)}") from None
                time.sleep(backoff(attempt, dl.backoff_s, dl.max_backoff_s, e.retry_after))
        for result in page.get("results") or []:
            yield result
            seen += 1
            if fs.max_results and seen >= fs.max_results:
                return
        nxt = page.get("next")
        url, params = (nxt, None) if nxt else (None, None)


def sound_row(s: dict, fs: FreesoundSpec) -> dict:
    previews = s.get("previews") or {}
    sid = str(s["id"])
    uri = (fs.api_url.rstrip("/") + f"/sounds/{sid}/download/") if fs.original \
        else previews.get(f"preview-{fs.preview}") or previews.get("preview-hq-ogg") or previews.get("preview-hq-mp3")
    user = s.get("username")
    return input_row(
        source="freesound", source_id=sid, uri=uri, title=s.get("name"), description=s.get("description"),
        tags=[str(t) for t in s.get("tags") or []], license=licenses.normalize(s.get("license")),
        uploader=user, upload_date=str(s.get("created") or "")[:10] or None,
        url=s.get("url") or (f"https://freesound.org/people/{user}/sounds/{sid}/" if user else None),
        meta_json=json.dumps({"license_url": s.get("license"), "duration": s.get("duration"),
                              "original": fs.original}))


def freesound_inputs(fs: FreesoundSpec, dl: DownloadSpec, gate=None) -> list[dict]:
    """Input rows for the search, license-filtered. Sounds without a usable URL are skipped."""
    rows = []
    for s in search(fs, dl, gate):
        if "id" not in s:
            continue
        row = sound_row(s, fs)
        if row["uri"] and licenses.matches(row["license"], fs.license):
            rows.append(row)
    return rows
