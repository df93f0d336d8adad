"""Running on a Ray cluster rather than a local one."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import soundlake_cmd

from soundlake.catalog.sql import fetchall


def test_ray_address_environment_joins_that_cluster(ray_session, tmp_path):
    """RAY_ADDRESS is how Ray programs are pointed at a cluster: the CLI joins it (it used to
    crash passing local-only settings to ray.init)."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray_session, "COLUMNS": "500"}
    r = subprocess.run(soundlake_cmd("curate", "demo", "--lake", str(tmp_path / "lake"), "--set", "source.count=1",
                                     "-q"), capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    log = re.search(r"ray log\s*│\s*(\S+)", r.stderr)
    assert log, r.stderr
    # Ray's output went to the log folder of the session it joined: the test session's.
    assert ray.get_runtime_context().get_session_name() in log.group(1), (log.group(1), r.stderr)


TOKEN = "soundlaketesttoken0123456789abcd"


@pytest.fixture(scope="module")
def token_cluster():
    """A second Ray cluster on this machine, started as an operator would (`ray start --head
    --block`) with token authentication and none of the driver's environment (no AWS_*
    settings); stopped by its PID. Yields its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")   # short: Ray's socket paths live under it
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": TOKEN, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--port", str(port),
                             "--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--include-dashboard",
                             "false", "--disable-usage-stats", "--temp-dir", temp, "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    ready = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import time, ray._raylet
        for _ in range(120):
            try:
                ray._raylet.GcsClient(address="{address}")
                break
            except Exception:
                time.sleep(0.5)""")], env={**env, "PATH": os.environ["PATH"]}, capture_output=True)
    assert ready.returncode == 0, ready.stderr
    yield address, temp
    proc.terminate()   # `ray start --block` stops the processes it started
    proc.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)


def _driver_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}   # not the test session's Ray
    return {**env, "COLUMNS": "300", **extra}


def test_token_auth_failure_is_one_line_naming_the_fix(token_cluster, tmp_path):
    address, _ = token_cluster
    r = subprocess.run(soundlake_cmd("curate", "demo", "--lake", str(tmp_path / "lake"), "--set", "source.count=1",
                                     "--address", address), capture_output=True, text=True, timeout=300,
                       env=_driver_env())
    assert r.returncode == 2, r.stderr   # a user error
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "requires token authentication" in errors[0], r.stderr
    assert "RAY_AUTH_MODE=token" in errors[0] and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run(soundlake_cmd("curate", "demo", "--lake", str(tmp_path / "lake"), "--set", "source.count=1",
                                     "--address", address), capture_output=True, text=True, timeout=300,
                       env=_driver_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not" + TOKEN[3:]))
    assert r.returncode == 2 and "is not the cluster's" in r.stderr, r.stderr


def test_object_store_settings_reach_the_workers_and_are_written_nowhere(token_cluster, s3, tmp_path, monkeypatch):
    """The cluster's nodes know nothing of the S3 endpoint or credentials: the driver's reach
    its workers through the job's runtime environment (without it the workers would try
    AWS itself). The secret appears in no file of the cluster's session folder nor the lake."""
    address, temp = token_cluster
    import boto3

    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="lakes")
    secret = "secret-" + os.urandom(8).hex()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    r = subprocess.run(soundlake_cmd("curate", "demo", "--lake", "s3://lakes/demo", "--set", "source.count=3",
                                     "--address", address), capture_output=True, text=True, timeout=300,
                       env=_driver_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = fetchall("s3://lakes/demo", "SELECT count(DISTINCT source_id) AS inputs, count(*) AS clips FROM clips")
    assert rows[0][0] == 3 and rows[0][1] >= 3, rows
    leaked = [str(p) for p in Path(temp).rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, leaked
