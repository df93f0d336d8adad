"""The lake's writer lock on object storage: a catalog (SQLite, or a real PostgreSQL server on
loopback) keeps it, the lake records which, and a killed holder frees the lake."""
import json
import os
import sqlite3
import subprocess
import sys
from urllib.parse import urlsplit

import pyarrow as pa
import pytest

from soundlake.catalog import locks, schema
from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import fetchall
from soundlake.core.errors import UserError

HOLD = ("import sys, time\nfrom soundlake.catalog.lake import Lake\n"
        "with Lake(sys.argv[1]).lock(sys.argv[2]):\n    print('locked', flush=True)\n    time.sleep(600)\n")


def _hold(uri: str, run_id: str = "holder") -> subprocess.Popen:
    """Another process that takes the lake's lock and keeps it until it is killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, uri, run_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    line = p.stdout.readline()
    assert line.strip() == "locked", p.stderr.read() if p.poll() is not None else line
    return p


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/catalog.db"
    return request.getfixturevalue("postgres")


@pytest.fixture
def bucket(s3):
    import boto3

    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="lakes")
    return "s3://lakes"


def test_one_writer_at_a_time_on_object_storage_and_a_killed_one_frees_the_lake(bucket, catalog, monkeypatch):
    """Two curates into one s3:// lake used to both be accepted (32 rows for 16 clips): object
    storage has no lock. With a catalog the second writer is refused, naming the first; the
    lake records the catalog without its password, so a later command needs only --lake (and
    the password, from PGPASSWORD); a SIGKILLed holder leaves the lake free."""
    uri = f"{bucket}/one-{urlsplit(catalog).scheme}"   # moto keeps its buckets for the whole session
    monkeypatch.setenv(locks.ENV, catalog)
    holder = _hold(uri)
    try:
        with pytest.raises(UserError, match=r"busy: run holder \(pid \d+ on .*--wait"):
            with Lake(uri).lock("second"):
                pass
        rec = json.loads(Lake(uri).fs.open_input_stream(Lake(uri).path(locks.RECORD)).read())["catalog"]
        password = urlsplit(catalog).password
        assert urlsplit(rec).scheme == urlsplit(catalog).scheme and urlsplit(rec).password is None, rec
        monkeypatch.delenv(locks.ENV)
        if password:
            monkeypatch.setenv("PGPASSWORD", password)
        assert Lake(uri).is_locked()
    finally:
        holder.kill()
        holder.wait()
    with Lake(uri).lock("third", wait=True, poll=0.05):
        assert Lake(uri).is_locked()
    assert not Lake(uri).is_locked()


def test_a_sqlite_row_left_by_a_dead_or_reused_pid_does_not_lock_the_lake(tmp_path, monkeypatch):
    """The row of a holder on this host counts only while its process is the one that took it:
    same pid, same start time (a pid the kernel gave to a new process does not hold the lake)."""
    db = tmp_path / "catalog.db"
    monkeypatch.setenv(locks.ENV, f"sqlite:///{db}")
    lake = Lake(str(tmp_path / "lake"))
    holder = _hold(lake.uri)
    try:
        assert lake.is_locked()
        con = sqlite3.connect(db)
        con.execute("UPDATE writers SET started = '1'")   # as if the pid now belonged to another process
        con.commit()
        assert not lake.is_locked()
        with lake.lock("next"):
            assert con.execute("SELECT run FROM writers").fetchall() == [("next",)]
    finally:
        holder.kill()
        holder.wait()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM writers").fetchall() == [(0,)]


def test_catalog_mistakes_are_one_line_naming_the_fix(bucket, tmp_path, soundlake_here, monkeypatch):
    monkeypatch.delenv(locks.ENV, raising=False)
    row = {"source": "local", "source_id": "a", "clip_id": None, "stage": "segment", "error": "corrupt",
           "permanent": True, "message": "m", "attempt": 1, "run_id": "r0", "time": None}
    Lake(f"{bucket}/bare").write_part("failures", pa.Table.from_pylist([row], schema=schema.FAILURES), "r0")
    r = soundlake_here("compact", "--lake", f"{bucket}/bare")
    assert r.exit_code == 2 and "object storage, which has no lock" in r.output and "--catalog" in r.output, r.output
    r = soundlake_here("compact", "--lake", f"{bucket}/bare", "--catalog", "mysql://db/x")
    assert r.exit_code == 2 and "--catalog 'mysql://db/x': not a catalog URI" in r.output, r.output
    first, other = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    assert soundlake_here("compact", "--lake", f"{bucket}/bare", "--catalog", first).exit_code == 0
    os.environ.pop(locks.ENV, None)   # --catalog set it for this process
    r = soundlake_here("compact", "--lake", f"{bucket}/bare", "--catalog", other)
    assert r.exit_code == 2 and f"in the catalog sqlite:///{tmp_path}/a.db, not" in r.output, r.output
    os.environ.pop(locks.ENV, None)
    assert soundlake_here("compact", "--lake", f"{bucket}/bare").exit_code == 0   # found by the lake's record


def test_a_run_whose_postgres_lock_was_lost_stops_committing(bucket, postgres, monkeypatch):
    """The server ends the lock's session (a restart, an admin): the lock is gone, and another
    writer may take the lake, so the run must not commit another part."""
    import psycopg

    monkeypatch.setenv(locks.ENV, postgres)
    lake = Lake(f"{bucket}/lost")
    row = {"source": "local", "source_id": "a", "clip_id": None, "stage": "segment", "error": "corrupt",
           "permanent": True, "message": "m", "attempt": 1, "run_id": "r1", "time": None}
    with lake.lock("r1"):
        lake.write_part("failures", pa.Table.from_pylist([row], schema=schema.FAILURES), "r1")
        with psycopg.connect(postgres, autocommit=True) as con:
            con.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted")
        with pytest.raises(UserError, match="lost its writer lock in the catalog postgresql://soundlake@"):
            lake.write_part("failures", pa.Table.from_pylist([{**row, "source_id": "b"}], schema=schema.FAILURES),
                            "r1")
        with Lake(lake.uri).lock("r2"):   # the lake is free for the next writer
            pass
    assert fetchall(lake, "SELECT source_id FROM failures") == [("a",)]
