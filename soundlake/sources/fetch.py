"""Fetching remote media: yt-dlp for YouTube ids, plain HTTP for the rest; classified errors.

* YouTube ids go through yt-dlp's Python API (``yt_dlp.YoutubeDL``): format
  ``download.format`` (``bestaudio/best``), only the annotated section when
  ``download.sections`` (``download_ranges`` + ``download_range_func``, keyframe
  forcing off: audio has no keyframes to force), cookies file, socket timeout plus a
  watchdog, the URL from ``download.url_template``. When yt-dlp reports that it cut the
  section, the annotated start becomes 0 in the file; otherwise the file's duration
  (ffprobe) tells whether the whole video came back.
* HTTP downloads stream to disk with a watchdog over the whole transfer and detect
  truncated bodies.
* Errors are classified (:func:`classify`, :func:`http_error_class`) into the classes of
  :mod:`soundlake.core.errors`, with the server's Retry-After when it sent one.
* :func:`redact` scrubs every known secret (env ``FREESOUND_API_KEY``,
  ``FREESOUND_OAUTH_TOKEN``) and any token-looking parameter from text.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import requests
from pydantic import Field

from soundlake.core import audio
from soundlake.core.config import Section
from soundlake.core.errors import RowError
from soundlake.sources.politeness import parse_retry_after

log = logging.getLogger("soundlake.download")
API_KEY_ENV = "FREESOUND_API_KEY"
OAUTH_ENV = "FREESOUND_OAUTH_TOKEN"
SECRET_ENVS = (API_KEY_ENV, OAUTH_ENV)


class DownloadSpec(Section):
    url_template: str = Field("https://www.youtube.com/watch?v={ytid}", description="media URL for a YouTube id")
    format: str = "bestaudio/best"
    sections: bool = Field(True, description="fetch only the annotated section (yt-dlp download_ranges)")
    timeout_s: float = Field(60.0, gt=0, description="socket timeout; the watchdog allows 4x per download")
    retries: int = Field(3, ge=0, description="extra attempts for transient failures")
    backoff_s: float = Field(2.0, ge=0, description="first backoff; doubles per attempt, with jitter")
    max_backoff_s: float = Field(120.0, ge=0)
    cookies_file: str | None = Field(None, description="Netscape cookies file for yt-dlp")
    rate_per_minute: dict[str, float] = Field(default_factory=lambda: {"*": 30.0},
                                              description="requests per minute per host ('*' = any other)")
    bot_wall_pause_s: float = Field(900.0, ge=0, description="pause all downloads after a bot wall")
    concurrency: int = Field(4, ge=1, description="downloads in flight per worker")


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


# ---- error classes -----------------------------------------------------------------
_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("bot_wall", ("confirm you're not a bot", "confirm you’re not a bot", "sign in to confirm you")),
    ("private", ("private video", "video is private", "members-only", "join this channel")),
    ("rate_limited", ("http error 429", "too many requests")),
    ("not_found", ("http error 404", "http error 410", "video unavailable", "has been removed", "does not exist",
                   "account associated with this video has been terminated", "no video formats found",
                   "is not a valid url", "unsupported url")),
    ("forbidden", ("http error 403", "http error 401", "in your country",
                   "geo restrict", "sign in to confirm your age", "copyright")),
    ("server_error", ("http error 5",)),
    ("timeout", ("timed out", "timeout")),
    ("network", ("connection reset", "connection refused", "incompleteread", "content too short",
                 "bytes read", "remote end closed", "did not get any data", "truncated", "broken pipe")),
]


def classify(message: str) -> str:
    """The error class of a yt-dlp/ffmpeg/HTTP error message (unknown ones: ``network``)."""
    low = message.lower()
    for cls, needles in _RULES:
        if any(n in low for n in needles):
            return cls
    return "network"


def _retry_after(exc: BaseException) -> float | None:
    """Retry-After from the HTTP response buried in a yt-dlp exception chain."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        resp = getattr(e, "response", None)
        headers = getattr(resp, "headers", None) or getattr(e, "headers", None)
        if headers is not None and hasattr(headers, "get"):
            value = parse_retry_after(headers.get("Retry-After"))
            if value is not None:
                return value
        info = getattr(e, "exc_info", None)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__,
                 info[1] if isinstance(info, tuple) and len(info) > 1 else None]
    return None


# ---- yt-dlp ----------------------------------------------------------------------
class _YdlLogger:
    """yt-dlp's messages go to our logger, redacted; errors are classified by us."""

    def debug(self, msg):
        log.debug(redact(msg))

    info = debug

    def warning(self, msg):
        log.debug(redact(msg))

    def error(self, msg):
        log.debug(redact(msg))


@dataclass
class Fetched:
    path: str
    offset_s: float          # where the file starts in the source media
    nbytes: int
    info: dict


def ytdlp_fetch(url: str, start: float | None, end: float | None, dl: DownloadSpec, folder: str,
                last_try: bool = True, probe_timeout: float = 60.0) -> Fetched:
    import yt_dlp
    from yt_dlp.utils import download_range_func

    opts = {"format": dl.format, "outtmpl": os.path.join(folder, "media.%(ext)s"), "quiet": True,
            "no_warnings": True, "noprogress": True, "logger": _YdlLogger(), "socket_timeout": dl.timeout_s,
            "retries": 0, "fragment_retries": 0, "extractor_retries": 0, "noplaylist": True,
            "overwrites": True, "cachedir": False, "writethumbnail": False,
            # ffmpeg (the section downloader) gets a network timeout of its own, in microseconds.
            "external_downloader_args": {"ffmpeg_i": ["-rw_timeout", str(int(dl.timeout_s * 1e6))]}}
    section = dl.sections and start is not None and end is not None
    if section:
        opts["download_ranges"] = download_range_func(None, [(start, end)])
        opts["force_keyframes_at_cuts"] = False
    if dl.cookies_file:
        opts["cookiefile"] = os.path.expanduser(dl.cookies_file)
    box: dict = {}

    def work():
        try:
            with yt_dlp.YoutubeDL(opts) as ydl:
                box["info"] = ydl.sanitize_info(ydl.extract_info(url, download=True))
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    # Watchdog: yt-dlp has socket timeouts but no overall deadline.
    t = threading.Thread(target=work, daemon=True, name="ytdlp")
    t.start()
    t.join(4 * dl.timeout_s + (end - start if section else 0))
    if t.is_alive():
        raise FetchError("timeout", f"download still running after {4 * dl.timeout_s:g} s (watchdog)")
    if "error" in box:
        e = box["error"]
        msg = redact(str(e).replace("ERROR: ", "", 1).splitlines()[0] if str(e) else e.__class__.__name__)
        raise FetchError(classify(msg), msg[:400], _retry_after(e))
    files = [os.path.join(folder, f) for f in os.listdir(folder) if not f.endswith((".part", ".ytdl"))]
    if not files:
        raise FetchError("network", "yt-dlp finished without a file")
    path = max(files, key=os.path.getsize)
    offset = 0.0
    info = box.get("info") or {}
    done = (info.get("requested_downloads") or [{}])[0]
    if section and (done.get("section_start") is not None or info.get("section_start") is not None):
        offset = start   # yt-dlp cut the section: it starts at 0 in the file (segment decodes and checks it)
    elif section:
        try:
            _, _, got, _ = audio.probe(path, probe_timeout)
        except RowError:
            got = 0.0
        want = end - start
        if got > want + 1.0 and got >= end - 0.5:
            offset = 0.0            # the whole video came back: the annotated start applies as is
        else:
            offset = start          # the section came back: it starts at 0 in the file
            if got < want - 1.0 and not last_try:
                raise FetchError("network", f"section is {got:.2f} s of the requested {want:.2f} s")
    return Fetched(path, offset, os.path.getsize(path), info)


def http_fetch(url: str, dl: DownloadSpec, folder: str, headers: dict[str, str]) -> Fetched:
    ext = os.path.splitext(url.split("?")[0])[1][:6] or ".bin"
    path = os.path.join(folder, "media" + ext)
    n = http_download(url, path, headers, dl.timeout_s)
    return Fetched(path, 0.0, n, {})
