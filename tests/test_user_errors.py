"""Mistakes and broken environments a user can fix end in one `error:` line and exit code 2,
never a traceback: a malformed --set value, a lake path that is a file or empty, a read-only
lake, a full disk. Ray's own warnings stay off the terminal unless --verbose.

Read-only and full file systems are real: a tmpfs mounted (read-only, or with a small size)
in a private mount namespace (`unshare -m`, needs root), never chmod (root ignores it).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import soundlake_cmd

from soundlake.export import shards as shard_format
from soundlake.testing import make_synth_lake

# Mount a tmpfs on $MNT (size $SIZE) in a private mount namespace, run $SETUP, remount it
# read-only when $RO is set, run the command, then copy what the tmpfs holds to $SNAP (the
# tmpfs disappears with the namespace) and exit with the command's status.
NAMESPACE_SCRIPT = """
set -e
mount -t tmpfs -o "size=$SIZE" tmpfs "$MNT"
eval "$SETUP"
if [ -n "$RO" ]; then mount -o remount,ro "$MNT"; fi
set +e
"$@"
rc=$?
if [ -n "$SNAP" ]; then cp -a "$MNT/." "$SNAP/"; fi
exit $rc
"""


@lru_cache(maxsize=1)
def namespace_problem() -> str | None:
    """Why a private tmpfs cannot be mounted here (None: it can)."""
    with tempfile.TemporaryDirectory() as d:
        try:
            r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                'mount -t tmpfs -o size=1m tmpfs "$0"', d],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            return f"unshare is unavailable: {e}"
    if r.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace (needs root): {r.stderr.strip()}"
    return None


def in_tmpfs(mnt: Path, cmd: list[str], size: str = "1m", setup: str = ":", read_only: bool = False,
             snapshot: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run ``cmd`` with a fresh tmpfs mounted on ``mnt`` (see NAMESPACE_SCRIPT); skips the test
    when this machine cannot do that."""
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    mnt.mkdir(parents=True, exist_ok=True)
    if snapshot is not None:
        snapshot.mkdir(parents=True, exist_ok=True)
    env = {**(env if env is not None else os.environ), "MNT": str(mnt), "SIZE": size, "SETUP": setup,
           "RO": "1" if read_only else "", "SNAP": str(snapshot or "")}
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT, "sh", *cmd],
                          capture_output=True, text=True, env=env, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed as a user error: exit code 2, no traceback, exactly one `error:` line
    holding every one of ``words``."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def read_tar(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return list(shard_format.iter_samples(f, str(path)))


def no_partial_files(root: Path) -> None:
    """Nothing half-written is visible: no .tmp left, every Parquet part readable."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")], files
    for p in files:
        if p.suffix == ".parquet":
            pq.read_metadata(p)


@pytest.fixture(scope="module")
def synth_lake(tmp_path_factory) -> Path:
    """A small lake written without Ray (12 clips of 2 s with reference captions)."""
    return Path(make_synth_lake(tmp_path_factory.mktemp("synth"), 12, silence_dbfs=-90).root)


def test_malformed_set_value_names_the_key(tmp_path):
    lake = tmp_path / "lake"
    r = subprocess.run(soundlake_cmd("curate", "demo", "--lake", str(lake), "--set", "segment.sample_rate=[1,2"),
                       capture_output=True, text=True, timeout=120)
    one_error_line(r, "segment.sample_rate", "not valid YAML")
    assert not lake.exists()


LAKE_COMMANDS = {
    "curate": ("curate", "demo"),
    "sql": ("sql", "SELECT 1"),
    "status": ("status",),
    "export": ("export", "--out", "{tmp}/shards"),
}


@pytest.mark.parametrize("command", LAKE_COMMANDS)
@pytest.mark.parametrize("under", [False, True], ids=["file", "under-a-file"])
def test_lake_path_that_is_a_file(tmp_path, command, under):
    somefile = tmp_path / "somefile"
    somefile.write_text("not a lake\n")
    lake = somefile / "lake" if under else somefile
    args = [a.format(tmp=tmp_path) for a in LAKE_COMMANDS[command]]
    r = subprocess.run(soundlake_cmd(*args, "--lake", str(lake)), capture_output=True, text=True, timeout=120)
    one_error_line(r, "--lake", str(somefile), "is a file")
    assert somefile.read_text() == "not a lake\n"


def test_an_unreachable_object_store_is_one_line():
    """pyarrow asks S3 for the bucket's region as it opens the lake: with no endpoint reachable
    that was a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    r = subprocess.run(soundlake_cmd("status", "--lake", "s3://no-such-soundlake-bucket/lake"), capture_output=True,
                       text=True, timeout=120, env={**env, "AWS_EC2_METADATA_DISABLED": "true"})
    one_error_line(r, "cannot open s3://no-such-soundlake-bucket/lake", "AWS_ENDPOINT_URL")


@pytest.mark.parametrize("command", LAKE_COMMANDS)
def test_empty_lake_path_is_refused(tmp_path, command):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [a.format(tmp=tmp_path) for a in LAKE_COMMANDS[command]]
    if command == "curate":  # an empty input folder: before the fix this ran into the current folder, no Ray
        (tmp_path / "empty").mkdir()
        args = ["curate", "local", "--input", str(tmp_path / "empty")]
    r = subprocess.run(soundlake_cmd(*args, "--lake", ""), capture_output=True, text=True, timeout=120, cwd=cwd)
    one_error_line(r, "--lake", "empty")
    assert list(cwd.iterdir()) == []


def test_curate_into_read_only_lake(tmp_path, synth_lake):
    mnt = tmp_path / "ro"
    r = in_tmpfs(mnt, soundlake_cmd("curate", "demo", "--lake", str(mnt / "lake"), "-q"), read_only=True,
                 setup=f'cp -a "{synth_lake}" "$MNT/lake" && : > "$MNT/lake/_lock"')
    one_error_line(r, str(mnt / "lake"), "read-only file system", "writable")


def test_export_record_on_read_only_lake_keeps_the_shards(tmp_path, synth_lake):
    mnt, out = tmp_path / "ro", tmp_path / "shards"
    export = ("export", "--out", str(out), "--shard-count", "4", "-q")
    r = in_tmpfs(mnt, soundlake_cmd(*export, "--lake", str(mnt / "lake")), read_only=True,
                 setup=f'cp -a "{synth_lake}" "$MNT/lake"')
    line = one_error_line(r, "complete", str(out), "read-only file system", "writable")
    assert "record" in line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["clips"] == 12
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["name"] for s in manifest["shards"])
    no_partial_files(out)

    # What the message says to do: the same export with a writable lake (here the original,
    # same parts) keeps every finished shard and records the export.
    r = subprocess.run(soundlake_cmd(*export, "--lake", str(synth_lake)), capture_output=True, text=True,
                       timeout=120, env={**os.environ, "COLUMNS": "500"})  # summary lines unwrapped
    assert r.returncode == 0, r.stderr
    assert f"(0 written, {len(manifest['shards'])} already done)" in r.stderr, r.stderr
    assert "recorded in the lake: yes" in r.stderr, r.stderr


def test_curate_into_full_disk(tmp_path):
    """Workers fill the lake's disk (local Ray inside the namespace, so that they see the tmpfs)."""
    mnt, snap = tmp_path / "full", tmp_path / "snapshot"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SOUNDLAKE_TEST_RAY_ADDRESS")}
    r = in_tmpfs(mnt, soundlake_cmd("curate", "demo", "--lake", str(mnt / "lake"), "--set", "source.count=12",
                                    "--num-cpus", "1", "-q"), size="1m", snapshot=snap, env=env)
    one_error_line(r, str(mnt / "lake"), "no space left on device", "run the same command again")
    assert "WARNING" not in r.stderr, r.stderr  # Ray's own log lines go to the run's log
    no_partial_files(snap)


def test_export_to_full_disk(tmp_path, synth_lake):
    mnt, snap = tmp_path / "full", tmp_path / "snapshot"
    r = in_tmpfs(mnt, soundlake_cmd("export", "--lake", str(synth_lake), "--out", str(mnt / "shards"),
                                    "--shard-count", "2", "-q"), size="160k", snapshot=snap)
    one_error_line(r, f"--out {mnt / 'shards'}", "no space left on device", "run the same command again")
    no_partial_files(snap)
    # Every visible shard is whole (the manifest lists those whose record was written too).
    shards = {p.name: p for p in (snap / "shards").glob("*.tar")}
    for path in shards.values():
        samples = read_tar(path)
        assert len(samples) == 2 and all({"flac", "json"} <= set(s) for s in samples)
    if (snap / "shards" / "manifest.json").exists():
        manifest = json.loads((snap / "shards" / "manifest.json").read_text())
        assert manifest["status"] == "incomplete"
        for entry in manifest["shards"]:
            assert hashlib.sha256(shards[entry["name"]].read_bytes()).hexdigest() == entry["sha256"]


def test_ray_warnings_only_with_verbose(tmp_path):
    """A new local Ray cluster warns that it turned token authentication on (when RAY_AUTH_MODE
    is unset): like every Ray log line, that goes to the run's log unless --verbose."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["COLUMNS"] = "500"  # the summary table unwrapped

    def curate(lake: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(soundlake_cmd("curate", "demo", "--lake", lake, "--set", "source.count=1",
                                              "--num-cpus", "1", "-q", *extra),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    # Each run starts a cluster of its own, so the two can overlap their (mostly Ray start-up) time.
    runs = [curate(str(tmp_path / "quiet")), curate(str(tmp_path / "verbose"), "--verbose")]
    try:
        (quiet, quiet_rc), (verbose, verbose_rc) = [(p.communicate(timeout=300)[1], p.returncode) for p in runs]
    finally:
        for p in runs:
            p.kill()
    assert quiet_rc == 0, quiet
    assert "Token authentication" not in quiet and "WARNING" not in quiet, quiet
    m = re.search(r"ray log\s*│\s*(\S+)", quiet)
    assert m, quiet
    assert "Token authentication" in Path(m.group(1)).read_text()

    assert verbose_rc == 0, verbose
    assert "Token authentication" in verbose


@pytest.mark.parametrize("code", [errno.EROFS, errno.EIO], ids=["read-only", "io-error"])
def test_os_errors_by_errno(monkeypatch, tmp_path, code):
    """The CLI's one handler: an OSError the user can fix (by errno) is one line and exit 2;
    any other (here EIO) is a bug and keeps its traceback."""
    from typer.testing import CliRunner

    import soundlake.catalog.status as status
    from soundlake.cli import app

    def broken(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "lake" / "runs"))

    monkeypatch.setattr(status, "lake_status", broken)
    r = CliRunner().invoke(app, ["status", "--lake", str(tmp_path / "lake")])
    if code == errno.EIO:
        assert isinstance(r.exception, OSError) and r.exception.errno == errno.EIO
        return
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "read-only file system" in errors[0] and str(tmp_path / "lake") in errors[0]
