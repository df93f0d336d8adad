"""The lake's writer lock, kept where the lake's storage can keep it.

* **A local lake** (the default): an ``flock`` on ``<lake>/_lock``. The kernel releases it
  when the holder dies, even by SIGKILL.
* **A lake with a catalog** (``--catalog URI`` or ``SOUNDLAKE_CATALOG``). Object storage has
  no lock, so an object-store lake needs one before any command writes to it; a local lake
  may name one too (a folder shared over NFS, where ``flock`` is not to be trusted).
  - ``sqlite:////abs/path/catalog.db`` (one machine): one row per lake in ``writers``, taken
    in a transaction. A holder on this host whose process is gone (or whose pid now belongs
    to another process) is replaced, so a killed writer never leaves the lake locked.
  - ``postgresql://user@host:port/db`` (several machines): a session-level advisory lock,
    which the server releases when the holder's connection ends (a killed process's socket
    closes), with the holder's name in ``soundlake_writers``.

The first writing command records the catalog's URI, without its password, in
``<lake>/_catalog.json``, so later commands on any machine find it with ``--lake`` alone (the
password comes from ``SOUNDLAKE_CATALOG``, ``PGPASSWORD`` or ``~/.pgpass``). The lock keeps
one *writer* per lake: Delta's log already makes each commit safe, but two curates over the
same inputs could both process an input that neither had committed when it listed.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sqlite3
from urllib.parse import urlsplit, urlunsplit

from soundlake.core.errors import UserError, one_line
from soundlake.core.storage import put_bytes

ENV = "SOUNDLAKE_CATALOG"
RECORD = "_catalog.json"
SCHEMES = ("sqlite", "postgresql", "postgres")
HOW = ("name one with --catalog sqlite:////path/catalog.db (one machine) or --catalog "
       "postgresql://user@host/db (several machines), or set SOUNDLAKE_CATALOG")


def normalize(uri: str) -> str:
    """The catalog URI as recorded in a lake: no password; a SQLite path made absolute."""
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise UserError(f"--catalog {uri!r}: not a catalog URI; {HOW}")
    if parts.scheme == "sqlite":
        if not sqlite_path(uri):
            raise UserError(f"--catalog {uri!r}: names no SQLite file; {HOW}")
        return "sqlite:///" + os.path.abspath(sqlite_path(uri))
    netloc = parts.netloc.rsplit("@", 1)
    if len(netloc) == 2:
        netloc = [netloc[0].split(":", 1)[0] + "@" + netloc[1]]
    return urlunsplit(parts._replace(netloc=netloc[0]))


def sqlite_path(uri: str) -> str:
    """``sqlite:///relative.db`` and ``sqlite:////abs/path.db``, as SQLAlchemy spells them."""
    return urlsplit(uri).path[1:]


def recorded(lake) -> str | None:
    try:
        with lake.fs.open_input_stream(lake.path(RECORD)) as f:
            return json.loads(f.read())["catalog"]
    except FileNotFoundError:
        return None


def catalog_for(lake) -> str | None:
    """The catalog that keeps this lake's lock (None: the lake's own ``flock``). The one the
    user names must be the one the lake recorded: two catalogs would be two locks."""
    given = os.environ.get(ENV) or None
    have = recorded(lake)
    if given and have and normalize(given) != have:
        raise UserError(f"lake {lake.uri} keeps its writer lock in the catalog {have}, not "
                        f"{normalize(given)}: pass that one with --catalog (or unset {ENV})")
    return given or have


def record(lake) -> None:
    """Record the catalog the user named in the lake, the first time (once its lock is held:
    a mistyped catalog that never answered is not recorded)."""
    if os.environ.get(ENV) and recorded(lake) is None:
        put_bytes(lake.fs, lake.path(RECORD), json.dumps({"catalog": normalize(os.environ[ENV])}).encode())


def lock_for(lake, uri: str | None):
    """The lake's lock, given its catalog (:func:`catalog_for`): :class:`FileLock`,
    :class:`SqliteLock` or :class:`PostgresLock`."""
    if uri is None:
        if not lake.is_local:
            raise UserError(f"lake {lake.uri} is on object storage, which has no lock for its writers: {HOW}")
        return FileLock(lake.path("_lock"))
    key = lake.uri.rstrip("/") if not lake.is_local else os.path.abspath(lake.root)
    if urlsplit(uri).scheme == "sqlite":
        return SqliteLock(uri, key)
    return PostgresLock(uri, key)


def lost(lake: str, catalog: str) -> UserError:
    return UserError(f"lake {lake}: this run lost its writer lock in the catalog {catalog} (did the server "
                     "restart?) and stopped committing; what it committed is kept: run the same command again "
                     "to finish the rest")


class FileLock:
    """An ``flock`` on a file, which also holds the holder's name for the next one to read."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def try_acquire(self, run_id: str, holder: str) -> str | None:
        """None when acquired; otherwise who holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            return who or "another process"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self.fd = fd
        return None

    def check(self) -> None:
        """The kernel keeps an flock for as long as its holder lives: nothing to check."""

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def is_held(self) -> bool:
        if not os.path.exists(self.path):
            return False
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def _started(pid: int) -> str | None:
    """When the process started (clock ticks since boot, from /proc), to tell a reused pid;
    None when no such process. Without /proc: "?" for any live pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"


class SqliteLock:
    """A row per lake in a SQLite file's ``writers`` table (one machine)."""

    def __init__(self, uri: str, lake: str):
        self.file, self.lake, self.mine = os.path.abspath(sqlite_path(uri)), lake, None

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.file, timeout=30, isolation_level=None)
            con.execute("CREATE TABLE IF NOT EXISTS writers (lake TEXT PRIMARY KEY, run TEXT, holder TEXT,"
                        " host TEXT, pid INTEGER, started TEXT)")
        except sqlite3.Error as e:
            raise UserError(f"catalog sqlite:///{self.file}: {e}; {HOW}") from None
        return con

    def _live_holder(self, con) -> str | None:
        row = con.execute("SELECT holder, host, pid, started FROM writers WHERE lake = ?", (self.lake,)).fetchone()
        if row is None:
            return None
        holder, host, pid, started = row
        if host == socket.gethostname() and _started(pid) not in (started, "?"):
            return None   # its process is gone: a killed writer
        return holder

    def try_acquire(self, run_id: str, holder: str) -> str | None:
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")   # one acquirer at a time reads and takes the row
            who = self._live_holder(con)
            if who is not None:
                con.execute("ROLLBACK")
                return who
            self.mine = (run_id, socket.gethostname(), os.getpid(), _started(os.getpid()))
            con.execute("INSERT OR REPLACE INTO writers VALUES (?, ?, ?, ?, ?, ?)", (self.lake, self.mine[0], holder,
                                                                                   *self.mine[1:]))
            con.execute("COMMIT")
            return None
        finally:
            con.close()

    def check(self) -> None:
        con = self._connect()
        try:
            row = con.execute("SELECT run, host, pid, started FROM writers WHERE lake = ?", (self.lake,)).fetchone()
        finally:
            con.close()
        if row != self.mine:
            raise lost(self.lake, f"sqlite:///{self.file}")

    def release(self) -> None:
        if self.mine is not None:
            con = self._connect()
            try:
                con.execute("DELETE FROM writers WHERE lake = ? AND run = ? AND host = ? AND pid = ? AND started = ?",
                            (self.lake, *self.mine))
            finally:
                con.close()
            self.mine = None

    def is_held(self) -> bool:
        if not os.path.exists(self.file):
            return False
        con = self._connect()
        try:
            return self._live_holder(con) is not None
        finally:
            con.close()


class PostgresLock:
    """A PostgreSQL session-level advisory lock per lake (several machines)."""

    def __init__(self, uri: str, lake: str):
        self.uri, self.lake, self.con = uri, lake, None
        # Advisory locks are keyed by a bigint: the lake's name, hashed.
        self.key = int.from_bytes(hashlib.blake2b(lake.encode(), digest_size=8).digest(), "big", signed=True)

    def _connect(self):
        import psycopg

        try:
            con = psycopg.connect(self.uri, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise UserError(f"catalog {normalize(self.uri)}: cannot connect ({one_line(e)}); is the server up, and "
                            f"the password in SOUNDLAKE_CATALOG, PGPASSWORD or ~/.pgpass?") from None
        with con.transaction():   # one creator at a time: CREATE ... IF NOT EXISTS can race
            con.execute("SELECT pg_advisory_xact_lock(0)")
            con.execute("CREATE TABLE IF NOT EXISTS soundlake_writers (lake text PRIMARY KEY, run text, "
                        "holder text, since timestamptz)")
        return con

    def try_acquire(self, run_id: str, holder: str) -> str | None:
        con = self._connect()
        if not con.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]:
            row = con.execute("SELECT holder FROM soundlake_writers WHERE lake = %s", (self.lake,)).fetchone()
            con.close()
            return row[0] if row else "another process"
        con.execute("INSERT INTO soundlake_writers VALUES (%s, %s, %s, now()) ON CONFLICT (lake) DO UPDATE "
                    "SET run = excluded.run, holder = excluded.holder, since = excluded.since",
                    (self.lake, run_id, holder))
        self.con = con   # the lock lives as long as this connection
        return None

    def check(self) -> None:
        import psycopg

        try:
            held = self.con.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                                    "AND pid = pg_backend_pid()").fetchone()[0]
        except psycopg.Error:
            held = 0   # the connection, and with it the lock, is gone
        if not held:
            raise lost(self.lake, normalize(self.uri))

    def release(self) -> None:
        if self.con is not None:
            import psycopg

            try:
                with contextlib.suppress(psycopg.Error):   # a lost connection has lost the lock too
                    self.con.execute("DELETE FROM soundlake_writers WHERE lake = %s", (self.lake,))
            finally:
                self.con.close()   # ending the session releases the advisory lock
                self.con = None

    def is_held(self) -> bool:
        con = self._connect()
        try:
            free = con.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]
            if free:
                con.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            return not free
        finally:
            con.close()
