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
import time
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field

from soundlake.core.config import Section
from soundlake.core.errors import UserError
from soundlake.sources import licenses
from soundlake.sources.base import input_row, register
from soundlake.sources.fetch import (
    API_KEY_ENV,
    OAUTH_ENV,
    DownloadSpec,
    FetchError,
    http_get_json,
    redact,
)
from soundlake.sources.politeness import LocalRateLimiter, backoff, wait_turn


def auth_headers(url: str, api_url: str, original: bool = False) -> dict[str, str]:
    """Credentials for ``url``, only when it is on the API's host (never leak to a CDN)."""
    if urlparse(url).netloc != urlparse(api_url).netloc:
        return {}
    if original and os.environ.get(OAUTH_ENV):
        return {"Authorization": f"Bearer {os.environ[OAUTH_ENV]}"}
    key = os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Token {key}"} if key else {}


class FreesoundSpec(Section):
    api_url: str = "https://freesound.org/apiv2"
    query: str = ""
    filter: str | None = Field(None, description="Solr filter, e.g. 'duration:[1 TO 30]'")
    sort: str = "score"
    page_size: int = Field(150, ge=1, le=150)
    fields: str = "id,name,tags,description,license,username,duration,previews,created,url"
    license: list[str] | None = Field(None, description="keep only these licenses, e.g. [CC0, CC-BY]")
    preview: Literal["hq-ogg", "hq-mp3", "lq-ogg", "lq-mp3"] = "hq-ogg"
    original: bool = Field(False, description="download originals (needs FREESOUND_OAUTH_TOKEN)")
    max_results: int | None = Field(None, ge=1)


def search(fs: FreesoundSpec, dl: DownloadSpec, limiter=None):
    """Yield result dicts of the text search, following ``next``; polite and retried."""
    if not os.environ.get(API_KEY_ENV):
        raise UserError(f"freesound: set the API key in env {API_KEY_ENV} (https://freesound.org/apiv2/apply)")
    limiter = limiter or LocalRateLimiter(dl.rate_per_minute)
    url = fs.api_url.rstrip("/") + "/search/text/"
    params: dict | None = {"query": fs.query, "sort": fs.sort, "page": 1, "page_size": fs.page_size,
                           "fields": fs.fields}
    if fs.filter:
        params["filter"] = fs.filter
    seen = 0
    while url:
        for attempt in range(dl.retries + 1):
            wait_turn(limiter, url)
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


def freesound_inputs(fs: FreesoundSpec, dl: DownloadSpec, limiter=None) -> list[dict]:
    """Input rows for the search, license-filtered. Sounds without a usable URL are skipped."""
    rows = []
    for s in search(fs, dl, limiter):
        if "id" not in s:
            continue
        row = sound_row(s, fs)
        if row["uri"] and licenses.matches(row["license"], fs.license):
            rows.append(row)
    return rows


@register("freesound", fetch="http")
def list_freesound(spec) -> tuple[list[dict], int]:
    return freesound_inputs(spec.freesound, spec.download), 0
