"""Download: fetch remote media to the worker's local disk, then segment it there.

Remote sources (audioset, vggsound, freesound) list small input rows whose ``uri``
is a media URL. :class:`DownloadStage` fetches each one into a temporary folder on
the worker's own disk, points ``uri`` at the file and hands the batch to the
segment stage *in the same task and thread*; the file is removed in a ``finally`` as
soon as the segment stage has made its FLAC clips (``download.concurrency`` threads
per task, so decoding one input overlaps the downloads of the others). Fusing the two steps is the design choice
that makes deletion safe: a temp path is meaningless on another node, and Ray Data
may schedule two separate map stages on different nodes.

* YouTube ids go through yt-dlp's Python API (``yt_dlp.YoutubeDL``): format
  ``download.format`` (``bestaudio/best``), only the annotated section when
  ``download.sections`` (``download_ranges`` + ``download_range_func``, keyframe
  forcing off: audio has no keyframes to force), cookies file, socket timeout plus a
  watchdog, the URL from ``download.url_template``. When yt-dlp reports that it cut the
  section, the annotated start becomes 0 in the file; otherwise the file's duration
  (ffprobe) tells whether the whole video came back. The segment stage then decodes,
  trims to the annotated window and records the real content length (``content_s``). Title, description,
  uploader, upload date, license and tags from the info dict fill in the row.
* Freesound rows are plain HTTP (``freesound.http_download``) with token/bearer auth.
* Errors are classified (:func:`classify`): permanent ones (``not_found``,
  ``private``, ``forbidden``) are recorded at once; transient ones (``rate_limited``,
  ``server_error``, ``timeout``, ``network``) are retried up to ``download.retries``
  times with exponential backoff and jitter (Retry-After is a floor and holds the
  host for every worker), then recorded; ``bot_wall`` trips the shared circuit
  breaker (``politeness``): every download pauses for ``download.bot_wall_pause_s``.
* Every message is passed through :func:`freesound.redact`: no key, token or cookie
  reaches the catalog or the logs.

Retry of recorded failures: every run writes its input rows to the ``inputs`` table
(:data:`INPUTS`), so :func:`retry_inputs` can rebuild the inputs whose open failures
have the chosen classes and the runner processes them again with ``attempt + 1``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from soundlake.catalog import schema
from soundlake.errors import PERMANENT, RowError
from soundlake.pipelines.spec import PipelineSpec
from soundlake.stages import audio_io, licenses
from soundlake.stages.base import FLOW, Resources, Stage
from soundlake.stages.freesound import SECRET_ENVS, FetchError, auth_headers, http_download, redact
from soundlake.stages.manifests import MALFORMED
from soundlake.stages.politeness import backoff, host_of, make_gate, wait_turn
from soundlake.stages.segment import SegmentStage, clip_id, segment_tables
from soundlake.stages.sources import INPUT_SCHEMA

log = logging.getLogger("soundlake.download")
REMOTE_KINDS = frozenset({"audioset", "vggsound", "freesound"})

# The inputs of every run, as listed: what retry-failed needs to rebuild an input.
INPUTS = schema.INPUTS


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
    from soundlake.stages.politeness import parse_retry_after

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


def ytdlp_fetch(url: str, start: float | None, end: float | None, spec: PipelineSpec, folder: str,
                last_try: bool = True) -> Fetched:
    import yt_dlp
    from yt_dlp.utils import download_range_func

    dl = spec.download
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
            _, _, got, _ = audio_io.probe(path, spec.segment.ffmpeg_timeout)
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


def http_fetch(url: str, spec: PipelineSpec, folder: str, original: bool) -> Fetched:
    ext = os.path.splitext(url.split("?")[0])[1][:6] or ".bin"
    path = os.path.join(folder, "media" + ext)
    n = http_download(url, path, auth_headers(url, spec.freesound.api_url, original), spec.download.timeout_s)
    return Fetched(path, 0.0, n, {})


# ---- the stage -------------------------------------------------------------------------
_INFO_FIELDS = {"title": "title", "description": "description", "uploader": "uploader",
                "upload_date": "upload_date", "license": "license"}


class DownloadStage(Stage):
    """Fetch each input (politely, with retries), then run ``segment`` on the local files."""

    name = "download"
    reads = ("uri", "source", "source_id", "start_s", "end_s")
    writes = tuple(FLOW.names)

    def __init__(self, spec: PipelineSpec, run_id: str, segment: SegmentStage, gate=None):
        self.spec = spec
        self.run_id = run_id
        self.segment = segment
        # The gate shared by all workers: a named Ray actor, created here on the driver
        # when Ray is already up, else by the first worker (setup).
        self.gate = gate or make_gate(self._gate_name(), spec.download.rate_per_minute, need_ray=True)
        # Credentials travel to the workers with the stage (never into a table or a log):
        # workers on other nodes do not share the driver's environment.
        self._env = {k: os.environ[k] for k in SECRET_ENVS if os.environ.get(k)}

    def __repr__(self) -> str:  # never show credentials
        return f"DownloadStage(run_id={self.run_id!r})"

    def _gate_name(self) -> str:
        return f"soundlake-politeness-{self.run_id}"

    def resources(self) -> Resources:
        return Resources(num_cpus=1.0)

    def setup(self) -> None:
        for k, v in self._env.items():
            os.environ.setdefault(k, v)
        if self.gate is None:
            self.gate = make_gate(self._gate_name(), self.spec.download.rate_per_minute)
        if self.spec.source.kind in ("audioset", "vggsound"):
            # Load yt-dlp's extractors now: a first download would otherwise spend seconds
            # importing them after its rate-limit slot, and bunch requests together.
            from yt_dlp.extractor import gen_extractor_classes

            gen_extractor_classes()
        self.segment.setup()

    # -- one input ------------------------------------------------------------------
    def fetch(self, row: dict, folder: str) -> Fetched:
        """Fetch one input with retries; raises RowError (classified) when it gives up."""
        dl = self.spec.download
        uri = row["uri"]
        if not uri:
            raise RowError("not_found", "the source gave no media URL")
        if uri.startswith(MALFORMED):
            why = json.loads(row.get("meta_json") or "{}").get("why", "cannot parse the line")
            raise RowError("malformed", f"manifest line: {why}")
        youtube = row["source"] in ("audioset", "vggsound")
        original = bool(json.loads(row.get("meta_json") or "{}").get("original")) if not youtube else False
        last: FetchError | None = None
        for attempt in range(dl.retries + 1):
            wait_turn(self.gate, uri)
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            try:
                if youtube:
                    return ytdlp_fetch(uri, row.get("start_s"), row.get("end_s"), self.spec, folder,
                                       last_try=attempt == dl.retries)
                return http_fetch(uri, self.spec, folder, original)
            except FetchError as e:
                last = e
                if e.error in PERMANENT or attempt == dl.retries:
                    break
                if e.error == "bot_wall":
                    until = self.gate.trip(dl.bot_wall_pause_s, "bot wall: " + e.message[:80])
                    log.warning("download stage paused for %.0f s after a bot wall on %s; resuming at %s "
                                "(set download.cookies_file, lower download.rate_per_minute)",
                                dl.bot_wall_pause_s, host_of(uri), time.strftime("%H:%M:%S", time.localtime(until)))
                    continue
                delay = backoff(attempt, dl.backoff_s, dl.max_backoff_s, e.retry_after)
                if e.retry_after is not None:
                    self.gate.hold(host_of(uri), e.retry_after)
                time.sleep(delay)
        assert last is not None
        tries = f" after {dl.retries + 1} tries" if last.error not in PERMANENT else ""
        raise RowError(last.error, redact(last.message + tries))

    def _ready(self, row: dict, got: Fetched) -> dict:
        """The input row pointing at the local file, with times relative to it."""
        ready = dict(row)
        ready["uri"] = got.path
        if row.get("start_s") is not None:
            ready["start_s"] = row["start_s"] - got.offset_s
            ready["end_s"] = (row.get("end_s") or row["start_s"]) - got.offset_s
        for field, key in _INFO_FIELDS.items():
            if not ready.get(field) and got.info.get(key):
                ready[field] = str(got.info[key])
        meta = json.loads(row.get("meta_json") or "{}")
        if not row.get("license") and got.info.get("license"):
            meta["license_text"] = got.info["license"]
            ready["license"] = licenses.normalize(got.info["license"]) or got.info["license"]
        date = ready.get("upload_date") or ""
        if len(date) == 8 and date.isdigit():   # yt-dlp's YYYYMMDD
            ready["upload_date"] = f"{date[:4]}-{date[4:6]}-{date[6:]}"
        if not ready.get("tags") and got.info.get("tags"):
            ready["tags"] = [str(t) for t in got.info["tags"]]
        meta["download"] = {"bytes": got.nbytes, "offset_s": got.offset_s}
        ready["meta_json"] = json.dumps(meta)
        ready["_offset"] = got.offset_s
        return ready

    def _failed(self, row: dict, error: str, message: str) -> dict:
        base = {k: row.get(k) for k in ("source", "source_id", "title", "url", "attempt")}
        return {**base, "run_id": self.run_id, "status": "failed", "stage": self.name, "error": error,
                "message": redact(message), "created": datetime.now(timezone.utc)}

    # -- a batch ----------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        work = tempfile.mkdtemp(prefix="soundlake-dl-")   # the worker's local disk
        try:
            def one(i_row) -> pa.Table:
                # Download, segment and delete each input in its own thread, so that
                # decoding one file overlaps the downloads of the others.
                i, row = i_row
                folder = os.path.join(work, str(i))
                try:
                    ready = self._ready(row, self.fetch(row, folder))
                except RowError as e:
                    return pa.Table.from_pylist([self._failed(row, e.error, e.message)], schema=FLOW)
                try:
                    offset = ready.pop("_offset")
                    segs = self.segment.process(pa.Table.from_pylist([ready], schema=INPUT_SCHEMA))
                    return _absolute(segs, {row["source_id"]: offset})
                finally:
                    shutil.rmtree(folder, ignore_errors=True)

            with ThreadPoolExecutor(max_workers=self.spec.download.concurrency) as pool:
                parts = list(pool.map(one, enumerate(rows)))
            return pa.concat_tables(parts) if parts else FLOW.empty_table()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        return segment_tables(batch)


def _absolute(segs: pa.Table, offsets: dict[str, float]) -> pa.Table:
    """Clip starts (and ids) back in the source media's time, not the temp file's."""
    if not segs.num_rows or not any(offsets.values()):
        return segs
    rows = segs.to_pylist()
    for r in rows:
        off = offsets.get(r["source_id"], 0.0)
        if r["status"] == "ok" and off:
            r["start_s"] = round(r["start_s"] + off, 6)
            r["clip_id"] = clip_id(r["source"], r["source_id"], r["start_s"])
    return pa.Table.from_pylist(rows, schema=FLOW)


# ---- inputs table and retry-failed ---------------------------------------------------
def inputs_table(rows: list[dict], run_id: str) -> pa.Table:
    """Input rows as stored in the ``inputs`` table (secrets never appear in rows)."""
    return pa.Table.from_pylist([{**r, "run_id": run_id} for r in rows], schema=INPUTS)


def retry_inputs(lake, classes: list[str], source: str | None = None) -> dict[str, list[dict]]:
    """Inputs whose open failures have one of ``classes``: run_id of the spec to use -> rows.

    Each row is the newest listed version of the input with ``attempt`` set to the
    failure's attempt + 1. Inputs that now have a clip are not returned.
    """
    from soundlake.catalog.sql import connect

    con = connect(lake)
    cls = ", ".join("'" + c.replace("'", "''") + "'" for c in classes)
    where = f"f.error IN ({cls})" + (" AND f.source = ?" if source else "")
    sql = f"""
        WITH f AS (SELECT source, source_id, max(attempt) AS attempt FROM failures_open f
                   WHERE {where} AND f.clip_id IS NULL GROUP BY 1, 2),
             i AS (SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER (
                   PARTITION BY source, source_id ORDER BY run_id DESC) AS rn FROM inputs) WHERE rn = 1)
        SELECT i.* EXCLUDE (attempt), f.attempt + 1 AS attempt
        FROM f JOIN i USING (source, source_id) ORDER BY i.source, i.source_id"""
    cur = con.execute(sql, [source] if source else [])
    names = [d[0] for d in cur.description]
    groups: dict[str, list[dict]] = {}
    for r in (dict(zip(names, values)) for values in cur.fetchall()):
        run_id = r.pop("run_id")
        groups.setdefault(run_id, []).append({k: r.get(k) for k in INPUT_SCHEMA.names})
    return groups


def spec_of_run(lake, run_id: str) -> PipelineSpec:
    from soundlake.catalog.sql import connect

    row = connect(lake).execute("SELECT config_json FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if not row:
        from soundlake.errors import UserError
        raise UserError(f"run {run_id} has no recorded config")
    return PipelineSpec.model_validate_json(row[0])
