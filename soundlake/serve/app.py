"""The Starlette app: the page, its JSON, clip audio (with HTTP ranges) and spectrograms.

Everything served comes from the catalog (:class:`~soundlake.serve.queries.Catalog`) or from
the package's own ``static/`` folder (Starlette's StaticFiles refuses paths outside it): no
other file is ever read. Routes:

    GET  /                                   the page (list, clip page and dashboards in one app)
    GET  /api/meta                           filters' choices, review mode, text search availability
    GET  /api/clips?source=&label=&...       one page of the clip list
    GET  /api/clips/{clip_id}                a clip: captions, scores, tags, metadata, runs, exports, reviews
    GET  /api/clips/{clip_id}/audio          its FLAC (Range requests: 206 Partial Content)
    GET  /api/clips/{clip_id}/spectrogram.png
    GET  /api/dashboard                      clips per source, failures, score histograms, thresholds, exports
    POST /api/reviews                        a review (only with --review)
"""
from __future__ import annotations

import json
import re
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from soundlake.catalog.lake import Lake
from soundlake.core.errors import UserError
from soundlake.serve import auth, queries, reviews
from soundlake.serve.spectrogram import spectrogram_png

STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; media-src 'self'; "
                                 b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=_plain, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _plain(v):
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return str(v)


def _finite(rows):
    """NaN scores are null in JSON."""
    if isinstance(rows, list):
        return [_finite(r) for r in rows]
    if isinstance(rows, dict):
        return {k: _finite(v) for k, v in rows.items()}
    return None if isinstance(rows, float) and rows != rows else rows


def error(status: int, message: str) -> JSON:
    return JSON({"error": message}, status_code=status, headers={"cache-control": "no-store"})


def create_app(lake: Lake | str, host: str = "127.0.0.1", token: str | None = None, review: bool = False,
               reviewer: str | None = None, load_model: Callable[[str], Any] | None = None,
               clap_model: str | None = None, limit_s: float = 5.0):
    """The ASGI app behind :class:`~soundlake.serve.auth.Guard`. ``token``: required from every
    client (when None, the server must listen on loopback only); ``review``: accept reviews,
    recorded as ``reviewer``; ``load_model``/``clap_model``: text search (see
    :func:`soundlake.catalog.sql.add_text_search`); ``limit_s``: each query's time limit."""
    if token is None and not auth.is_loopback(host):
        raise UserError(f"listening on {host} (beyond this machine) needs a token: pass --token or let serve make one")
    if review and not reviewer:
        raise UserError("--review needs a reviewer name (--reviewer)")
    catalog = queries.Catalog(lake, load_model=load_model, clap_model=clap_model, limit_s=limit_s)
    spectrograms, audio_cache = queries.LRU(256), queries.LRU(16)

    def handle(fn):
        """A sync endpoint (run in Starlette's thread pool) whose UserError is a 400 with one line."""
        def endpoint(request: Request):
            try:
                return fn(request)
            except UserError as e:
                return error(400, str(e))
        return endpoint

    def index(request):
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    def meta(request):
        state = catalog.current()
        return JSON({"lake": catalog.lake.uri, "review": review, "reviewer": reviewer if review else None,
                     "text_search": catalog.text_search, "facets": state.facets, "page_sizes": queries.PAGE_SIZES,
                     "sorts": queries.SORTS, "limit_s": limit_s, "state": state.key,
                     "caption_verdicts": reviews.CAPTION_VERDICTS, "clip_verdicts": reviews.CLIP_VERDICTS})

    def clips(request):
        params = dict(request.query_params)
        return JSON(_finite(catalog.page(params, fresh=params.get("fresh") == "1")),
                    headers={"cache-control": "no-store"})

    def clip(request):
        found = catalog.clip(request.path_params["clip_id"])
        return JSON(_finite(found)) if found else error(404, "no such clip")

    def _flac(clip_id: str):
        """(FLAC bytes, audio key): cached per clip while the clips table stays the same."""
        audio_key = catalog.current().audio_key
        found = audio_cache.get((clip_id, audio_key))
        if found is None:
            found = catalog.audio(clip_id)
            if found is not None:
                audio_cache.put((clip_id, found[1]), found)
        return found

    def audio(request):
        found = _flac(request.path_params["clip_id"])
        if found is None:
            return error(404, "no such clip")
        data, audio_key = found
        headers = {"accept-ranges": "bytes", "content-type": "audio/flac", "cache-control": "private, max-age=3600",
                   "etag": f'"{audio_key}"'}
        wanted = request.headers.get("range")
        if not wanted:
            return Response(data, headers=headers)
        span = byte_range(wanted, len(data))
        if span is None:
            return Response(b"", status_code=416, headers={**headers, "content-range": f"bytes */{len(data)}"})
        start, end = span
        return Response(data[start:end + 1], status_code=206,
                        headers={**headers, "content-range": f"bytes {start}-{end}/{len(data)}"})

    def spectrogram(request):
        clip_id = request.path_params["clip_id"]
        found = _flac(clip_id)
        if found is None:
            return error(404, "no such clip")
        data, audio_key = found
        png = spectrograms.get((clip_id, audio_key))
        if png is None:
            png = spectrogram_png(data)
            spectrograms.put((clip_id, audio_key), png)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    def dashboard(request):
        return JSON(_finite(catalog.dashboard()))

    async def post_review(request):
        if not review:
            return error(403, "read-only server: start it with --review to record reviews")
        try:
            body = await request.json()
        except ValueError:
            return error(400, "a review is a JSON object")
        from starlette.concurrency import run_in_threadpool

        try:
            row = reviews.review_row(body, reviewer)
            if row["target"] == "caption":
                found = await run_in_threadpool(catalog.has_caption, row["clip_id"], row["captioner"],
                                                row["caption_text"])
                if found is None:
                    return error(404, "no such caption")
                row.update(caption_model_id=found["model_id"], prompt_version=found["prompt_version"])
            elif not await run_in_threadpool(catalog.has_clip, row["clip_id"]):
                return error(404, "no such clip")
            part = await run_in_threadpool(reviews.write_review, catalog.lake, row)
            catalog.state_key(fresh=True)     # the next state (preferred captions) starts building now
            catalog.current()
        except UserError as e:
            return error(400, str(e))
        return JSON({"review_id": row["review_id"], "part": part, "verdict": row["verdict"],
                     "created": row["created"]})

    @asynccontextmanager
    async def lifespan(app):
        yield
        catalog.close()

    app = Starlette(routes=[
        Route("/", index),
        Route("/api/meta", handle(meta)),
        Route("/api/clips", handle(clips)),
        Route("/api/clips/{clip_id:path}/audio", handle(audio)),
        Route("/api/clips/{clip_id:path}/spectrogram.png", handle(spectrogram)),
        Route("/api/clips/{clip_id:path}", handle(clip)),
        Route("/api/dashboard", handle(dashboard)),
        Route("/api/reviews", post_review, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], lifespan=lifespan)
    guard = auth.Guard(secure_headers(app), host, token)
    guard.catalog = catalog
    return guard


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``Range: bytes=a-b`` (``a-``, ``-n`` too) within ``size``;
    None when it cannot be satisfied. Several ranges are answered with the first."""
    m = RANGE.match(header.split(",")[0].strip())
    if not m or (not m.group(1) and not m.group(2)) or size == 0:
        return None
    if not m.group(1):                       # the last n bytes
        n = int(m.group(2))
        return (max(0, size - n), size - 1) if n > 0 else None
    start = int(m.group(1))
    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    return (start, end) if start <= end and start < size else None


def secure_headers(app):
    """Every response: a strict Content-Security-Policy (own scripts only), no sniffing, no framing."""
    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)
        await app(scope, receive, send_with_headers)
    return wrapped


def _server(app, host: str, port: int):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                         server_header=False))


def serve(app, host: str, port: int) -> None:
    """Run ``app`` with uvicorn until Ctrl-C."""
    _server(app, host, port).run()


@contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0):
    """Serve ``app`` from a thread of this process (tests, benchmarks, screenshots); yields its base
    URL (``port`` 0: a free one) and stops the server when the block ends."""
    server = _server(app, host, port)
    thread = threading.Thread(target=server.run, daemon=True, name="soundlake-serve")
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
