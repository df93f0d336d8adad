"""Loopback protocol peers for the remote sources, with fault injection.

* :class:`MediaServer` serves real media files (encoded with ffmpeg) at
  ``/media/<id>.<ext>`` with Range support. yt-dlp's generic extractor downloads a
  direct media URL, so ``download.url_template = http://127.0.0.1:PORT/media/{ytid}.m4a``
  exercises the real yt-dlp (and its ffmpeg section downloader) end to end.
* :class:`FreesoundServer` speaks the shape of Freesound API v2: ``/apiv2/search/text/``
  (token auth, pagination via ``next``), ``/apiv2/sounds/<id>/download/`` (OAuth2
  bearer) and preview files at ``/previews/<id>-hq.ogg`` (no auth, like the CDN).

Faults are set per id (``server.faults[id] = Fault(kind, times)``): ``429`` (with
Retry-After), ``500``, ``slow`` (answers after ``delay`` s), ``truncated`` (promises
the full length, sends half, closes), ``404``, ``botwall`` (403 "Sign in to confirm
you're not a bot"). ``times`` = how many requests fail before the id recovers
(None = forever). Every request is logged with a timestamp in ``server.log``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

BOT_WALL = "Sign in to confirm you're not a bot"


@dataclass
class Fault:
    kind: str                  # 429 | 500 | slow | truncated | 404 | botwall
    times: int | None = None   # failing requests before recovery; None = always
    retry_after: float = 1.0
    delay: float = 5.0


@dataclass
class Hit:
    t: float                   # arrival time of the request
    path: str
    id: str | None
    status: int
    auth: str | None = None
    range: str | None = None
    nbytes: int = 0            # body bytes sent


def make_media(folder: Path, name: str, seconds: float, ext: str, freq: float = 440.0) -> Path:
    """A real encoded file: a tone plus noise (never silent), moov atom first for mp4."""
    path = folder / f"{name}.{ext}"
    codec = {"m4a": ["-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart"],
             "ogg": ["-c:a", "libvorbis", "-q:a", "3"], "mp3": ["-c:a", "libmp3lame", "-b:a", "96k"],
             "wav": []}[ext]
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency={freq}:duration={seconds}:sample_rate=44100",
                    "-f", "lavfi", "-i", f"anoisesrc=d={seconds}:a=0.05:r=44100",
                    "-filter_complex", "amix=inputs=2:duration=first", "-ac", "1", *codec, str(path)],
                   check=True, timeout=60)
    return path


class _Server:
    def __init__(self):
        self.files: dict[str, Path] = {}
        self.faults: dict[str, Fault] = {}
        self.log: list[Hit] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                self.arrived = time.time()
                outer._handle(self, head=True)

            def do_GET(self):
                self.arrived = time.time()
                outer._handle(self, head=False)

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients hang up on purpose (timeouts)
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- bookkeeping -----------------------------------------------------------
    def hits(self, id: str | None = None) -> list[Hit]:
        with self._lock:
            return [h for h in self.log if id is None or h.id == id]

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

    def _record(self, h, id, status, nbytes: int = 0) -> None:
        with self._lock:
            self.log.append(Hit(getattr(h, "arrived", time.time()), h.path, id, status, h.headers.get("Authorization"),
                                h.headers.get("Range"), nbytes if h.command != "HEAD" else 0))

    def _fault(self, id: str | None) -> Fault | None:
        with self._lock:
            f = self.faults.get(id) if id else None
            if f is None:
                return None
            if f.times is not None:
                if f.times <= 0:
                    return None
                f.times -= 1
            return f

    # ---- responses -------------------------------------------------------------
    def _simple(self, h, status: int, body: bytes = b"", ctype: str = "text/plain",
                headers: dict | None = None, reason: str | None = None) -> None:
        h.send_response(status, reason)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _apply_fault(self, h, id: str, f: Fault) -> bool:
        """Answer with the fault; False when the fault lets the request through (slow)."""
        if f.kind == "429":
            self._record(h, id, 429)
            self._simple(h, 429, b"Too Many Requests", headers={"Retry-After": f"{f.retry_after:g}"})
        elif f.kind == "500":
            self._record(h, id, 500)
            self._simple(h, 500, b"Internal Server Error")
        elif f.kind == "404":
            self._record(h, id, 404)
            self._simple(h, 404, b"Not Found")
        elif f.kind == "botwall":
            self._record(h, id, 403)
            self._simple(h, 403, f"<html><body>{BOT_WALL}</body></html>".encode(), "text/html", reason=BOT_WALL)
        elif f.kind == "slow":
            time.sleep(f.delay)
            return False
        elif f.kind == "truncated":
            return False
        return True

    def _send_file(self, h, id: str, path: Path, ctype: str, fault: Fault | None) -> None:
        data = path.read_bytes()
        start, end, status = 0, len(data) - 1, 200
        m = re.match(r"bytes=(\d*)-(\d*)", h.headers.get("Range") or "")
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), end) if m.group(2) else end
            else:
                start = max(0, len(data) - int(m.group(2)))
            if start >= len(data):
                self._record(h, id, 416)
                self._simple(h, 416, headers={"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
        body = data[start: end + 1]
        truncated = fault is not None and fault.kind == "truncated"
        self._record(h, id, status, len(body) // 2 if truncated else len(body))
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        if fault is not None and fault.kind == "truncated":
            h.send_header("Connection", "close")
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
            h.close_connection = True
            return
        h.end_headers()
        if h.command != "HEAD":
            try:
                h.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def _handle(self, h, head: bool) -> None:
        raise NotImplementedError


_CTYPES = {".m4a": "audio/mp4", ".ogg": "audio/ogg", ".mp3": "audio/mpeg", ".wav": "audio/wav"}


class MediaServer(_Server):
    """``/media/<id>.<ext>``: the file registered as ``files[id]``."""

    def url_template(self, ext: str = "m4a") -> str:
        return f"{self.base}/media/{{ytid}}.{ext}"

    def _handle(self, h, head: bool) -> None:
        m = re.match(r"^/media/([^/?]+?)(\.\w+)?(\?.*)?$", h.path)
        id = m.group(1) if m else None
        fault = self._fault(id)
        if fault is not None and self._apply_fault(h, id, fault):
            return
        if id not in self.files:
            self._record(h, id, 404)
            self._simple(h, 404, b"Not Found")
            return
        path = self.files[id]
        self._send_file(h, id, path, _CTYPES.get(path.suffix, "application/octet-stream"), fault)


@dataclass
class Sound:
    id: int
    name: str
    path: Path                       # preview file (ogg or mp3)
    license: str = "http://creativecommons.org/publicdomain/zero/1.0/"
    tags: list[str] = field(default_factory=list)
    description: str = ""
    username: str = "someone"
    duration: float = 5.0
    created: str = "2020-01-02T03:04:05"


class FreesoundServer(_Server):
    """Freesound API v2 shape. ``api_key`` for token auth, ``oauth_token`` for originals."""

    def __init__(self, api_key: str, oauth_token: str | None = None):
        super().__init__()
        self.api_key, self.oauth_token = api_key, oauth_token
        self.sounds: dict[str, Sound] = {}

    @property
    def api_url(self) -> str:
        return f"{self.base}/apiv2"

    def add(self, sound: Sound) -> None:
        self.sounds[str(sound.id)] = sound

    def _authorised(self, h, q: dict) -> bool:
        auth = h.headers.get("Authorization") or ""
        return auth == f"Token {self.api_key}" or q.get("token", [None])[0] == self.api_key

    def _sound_json(self, s: Sound, fields: list[str] | None) -> dict:
        d = {"id": s.id, "name": s.name, "tags": s.tags, "description": s.description, "license": s.license,
             "username": s.username, "duration": s.duration, "created": s.created,
             "url": f"https://freesound.org/people/{s.username}/sounds/{s.id}/",
             "previews": {"preview-hq-ogg": f"{self.base}/previews/{s.id}-hq.ogg",
                          "preview-hq-mp3": f"{self.base}/previews/{s.id}-hq.mp3",
                          "preview-lq-ogg": f"{self.base}/previews/{s.id}-lq.ogg",
                          "preview-lq-mp3": f"{self.base}/previews/{s.id}-lq.mp3"}}
        return {k: v for k, v in d.items() if not fields or k in fields}

    def _handle(self, h, head: bool) -> None:
        u = urlparse(h.path)
        q = parse_qs(u.query)
        if u.path.rstrip("/") == "/apiv2/search/text":
            fault = self._fault("search")
            if fault is not None and self._apply_fault(h, "search", fault):
                return
            if not self._authorised(h, q):
                self._record(h, "search", 401)
                self._simple(h, 401, b'{"detail": "Authentication credentials were not provided."}',
                             "application/json")
                return
            query = q.get("query", [""])[0].lower()
            page, size = int(q.get("page", ["1"])[0]), int(q.get("page_size", ["15"])[0])
            fields = q.get("fields", [""])[0].split(",") if q.get("fields") else None
            hits = [s for s in sorted(self.sounds.values(), key=lambda s: s.id)
                    if not query or query in s.name.lower() or query in " ".join(s.tags).lower()]
            chunk = hits[(page - 1) * size: page * size]
            nxt = None
            if page * size < len(hits):
                params = {k: v[0] for k, v in q.items() if k != "token"}
                params["page"] = str(page + 1)
                nxt = f"{self.api_url}/search/text/?" + "&".join(f"{k}={v}" for k, v in params.items())
            body = json.dumps({"count": len(hits), "next": nxt, "previous": None,
                               "results": [self._sound_json(s, fields) for s in chunk]}).encode()
            self._record(h, "search", 200)
            self._simple(h, 200, body, "application/json")
            return
        m = re.match(r"^/apiv2/sounds/(\d+)/download/?$", u.path)
        if m:
            id = m.group(1)
            fault = self._fault(id)
            if fault is not None and self._apply_fault(h, id, fault):
                return
            if self.oauth_token is None or h.headers.get("Authorization") != f"Bearer {self.oauth_token}":
                self._record(h, id, 401)
                self._simple(h, 401, b'{"detail": "Invalid token"}', "application/json")
                return
            if id not in self.sounds:
                self._record(h, id, 404)
                self._simple(h, 404, b'{"detail": "Not found."}', "application/json")
                return
            s = self.sounds[id]
            self._send_file(h, id, s.path, _CTYPES.get(s.path.suffix, "application/octet-stream"), fault)
            return
        m = re.match(r"^/previews/(\d+)-(hq|lq)\.(ogg|mp3)$", u.path)
        id = m.group(1) if m else None
        fault = self._fault(id)
        if fault is not None and self._apply_fault(h, id, fault):
            return
        if id not in self.sounds:
            self._record(h, id, 404)
            self._simple(h, 404, b"Not Found")
            return
        s = self.sounds[id]
        self._send_file(h, id, s.path, _CTYPES.get(s.path.suffix, "application/octet-stream"), fault)


class PostgresServer:
    """Debian's PostgreSQL server on loopback, as an operator would run one: a new cluster
    (``initdb``) in a temp folder, run as the ``postgres`` user (``runuser -u postgres``),
    password logins over TCP, stopped by the postmaster's PID. ``uri`` logs in as the role
    ``soundlake`` with its password."""

    def __init__(self):
        import glob
        import pwd
        import socket
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        if not bins:
            raise FileNotFoundError("PostgreSQL's server is not installed (scripts/setup.sh installs it)")
        self.bin = Path(bins[-1])
        self.folder = Path(tempfile.mkdtemp(prefix="soundlake-pg-", dir="/tmp"))
        user = pwd.getpwnam("postgres")
        os.chown(self.folder, user.pw_uid, user.pw_gid)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.password = "pw-" + os.urandom(6).hex()
        self.uri = f"postgresql://soundlake:{self.password}@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *cmd):
        return ["runuser", "-u", "postgres", "--", *cmd]

    def start(self) -> PostgresServer:
        data = self.folder / "data"
        subprocess.run(self._as_postgres(str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--no-sync",
                                         "--auth-local=trust", "--auth-host=scram-sha-256"),
                       check=True, capture_output=True)
        self.proc = subprocess.Popen(self._as_postgres(str(self.bin / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                                                       "-p", str(self.port), "-k", str(self.folder), "-F"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            ok = subprocess.run([str(self.bin / "pg_isready"), "-h", str(self.folder), "-p", str(self.port)],
                                capture_output=True).returncode == 0
            if ok:
                break
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("PostgreSQL did not start")
        subprocess.run(self._as_postgres(str(self.bin / "psql"), "-h", str(self.folder), "-p", str(self.port), "-U",
                                         "postgres", "-q", "-c",
                                         f"CREATE ROLE soundlake LOGIN PASSWORD '{self.password}'",
                                         "-c", "GRANT ALL ON SCHEMA public TO soundlake"),
                       check=True, capture_output=True)
        return self

    def stop(self) -> None:
        import shutil
        import signal

        pid_file = self.folder / "data" / "postmaster.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)   # "fast" shutdown
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.folder, ignore_errors=True)
