"""Download: fetch remote media to the worker's local disk, then segment it there.

Remote sources (audioset, vggsound, freesound) list small input rows whose ``uri``
is a media URL. :class:`DownloadStage` fetches each one (:mod:`soundlake.sources.fetch`)
into a temporary folder on the worker's own disk, points ``uri`` at the file and hands
the batch to the segment stage *in the same task and thread*; the file is removed in a
``finally`` as soon as the segment stage has made its FLAC clips (``download.concurrency``
threads per task, so decoding one input overlaps the downloads of the others). Fusing the
two steps is the design choice that makes deletion safe: a temp path is meaningless on
another node, and Ray Data may schedule two separate map stages on different nodes.

Permanent errors (``not_found``, ``private``, ``forbidden``) are recorded at once;
transient ones (``rate_limited``, ``server_error``, ``timeout``, ``network``) are retried
up to ``download.retries`` times with exponential backoff and jitter (Retry-After is a
floor and holds the host for every worker), then recorded; ``bot_wall`` trips the shared
circuit breaker (:mod:`soundlake.sources.politeness`): every download pauses for
``download.bot_wall_pause_s``. Every message is redacted: no key, token or cookie reaches
the catalog or the logs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from soundlake.catalog.schema import INPUT_SCHEMA
from soundlake.core.errors import PERMANENT, RowError
from soundlake.sources import licenses
from soundlake.sources.base import get_source
from soundlake.sources.fetch import (
    SECRET_ENVS,
    DownloadSpec,
    Fetched,
    FetchError,
    http_fetch,
    log,
    redact,
    ytdlp_fetch,
)
from soundlake.sources.freesound import auth_headers
from soundlake.sources.manifests import MALFORMED
from soundlake.sources.politeness import backoff, host_of, make_rate_limiter, wait_turn
from soundlake.stages.base import FLOW, Resources, Stage, flow_failure
from soundlake.stages.segment import SegmentStage, clip_id, segment_tables

_INFO_FIELDS = {"title": "title", "description": "description", "uploader": "uploader",
                "upload_date": "upload_date", "license": "license"}


class DownloadStage(Stage):
    """Fetch each input (politely, with retries), then run ``segment`` on the local files."""

    name = "download"

    def __init__(self, source: str, download: DownloadSpec, api_url: str, run_id: str, segment: SegmentStage,
                 limiter=None):
        self.fetch_kind = get_source(source).fetch   # youtube | http
        self.download = download
        self.api_url = api_url        # Freesound's API host: the only one that gets credentials
        self.run_id = run_id
        self.segment = segment
        # The rate limiter shared by all workers: a named Ray actor, created here on the driver
        # when Ray is already up, else by the first worker (setup).
        self.limiter = limiter or make_rate_limiter(self._limiter_name(), download.rate_per_minute, need_ray=True)
        # Credentials travel to the workers with the stage (never into a table or a log):
        # workers on other nodes do not share the driver's environment.
        self._env = {k: os.environ[k] for k in SECRET_ENVS if os.environ.get(k)}

    def __repr__(self) -> str:  # never show credentials
        return f"DownloadStage(run_id={self.run_id!r})"

    def _limiter_name(self) -> str:
        return f"soundlake-politeness-{self.run_id}"

    def resources(self) -> Resources:
        return Resources(num_cpus=1.0)

    def setup(self) -> None:
        for k, v in self._env.items():
            os.environ.setdefault(k, v)
        if self.limiter is None:
            self.limiter = make_rate_limiter(self._limiter_name(), self.download.rate_per_minute)
        if self.fetch_kind == "youtube":
            # Load yt-dlp's extractors now: a first download would otherwise spend seconds
            # importing them after its rate-limit slot, and bunch requests together.
            from yt_dlp.extractor import gen_extractor_classes

            gen_extractor_classes()
        self.segment.setup()

    # -- one input ------------------------------------------------------------------
    def fetch(self, row: dict, folder: str) -> Fetched:
        """Fetch one input with retries; raises RowError (classified) when it gives up."""
        dl = self.download
        uri = row["uri"]
        if not uri:
            raise RowError("not_found", "the source gave no media URL")
        if uri.startswith(MALFORMED):
            why = json.loads(row.get("meta_json") or "{}").get("why", "cannot parse the line")
            raise RowError("malformed", f"manifest line: {why}")
        youtube = self.fetch_kind == "youtube"
        original = bool(json.loads(row.get("meta_json") or "{}").get("original")) if not youtube else False
        last: FetchError | None = None
        for attempt in range(dl.retries + 1):
            wait_turn(self.limiter, uri)
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            try:
                if youtube:
                    return ytdlp_fetch(uri, row.get("start_s"), row.get("end_s"), dl, folder,
                                       last_try=attempt == dl.retries,
                                       probe_timeout=self.segment.spec.ffmpeg_timeout)
                return http_fetch(uri, dl, folder, auth_headers(uri, self.api_url, original))
            except FetchError as e:
                last = e
                if e.error in PERMANENT or attempt == dl.retries:
                    break
                if e.error == "bot_wall":
                    until = self.limiter.trip(dl.bot_wall_pause_s, "bot wall: " + e.message[:80])
                    log.warning("download stage paused for %.0f s after a bot wall on %s; resuming at %s "
                                "(set download.cookies_file, lower download.rate_per_minute)",
                                dl.bot_wall_pause_s, host_of(uri), time.strftime("%H:%M:%S", time.localtime(until)))
                    continue
                delay = backoff(attempt, dl.backoff_s, dl.max_backoff_s, e.retry_after)
                if e.retry_after is not None:
                    self.limiter.hold(host_of(uri), e.retry_after)
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
                    failed = flow_failure(row, self.name, self.run_id, e.error, redact(e.message))
                    return pa.Table.from_pylist([failed], schema=FLOW)
                try:
                    offset = ready.pop("_offset")
                    segs = self.segment.process(pa.Table.from_pylist([ready], schema=INPUT_SCHEMA))
                    return _absolute(segs, {row["source_id"]: offset})
                finally:
                    shutil.rmtree(folder, ignore_errors=True)

            with ThreadPoolExecutor(max_workers=self.download.concurrency) as pool:
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
