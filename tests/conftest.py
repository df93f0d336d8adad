"""Shared fixtures: one local Ray per test session, small corpora on disk."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One BLAS thread here and in every process the tests start (CLI runs, benchmarks, Ray's
# workers): on two shared cores OpenBLAS's threads mostly wait for each other (scipy's sqrtm,
# behind every FD, runs ~25x slower with two on a busy machine). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, small object store) for the whole session.

    Its address is exported as RAY_ADDRESS so CLI subprocesses join it with
    --address instead of starting a cluster of their own.
    """
    import logging

    import ray

    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
             logging_level=logging.WARNING)
    address = ray.get_runtime_context().gcs_address
    os.environ["SOUNDLAKE_TEST_RAY_ADDRESS"] = address
    yield address
    ray.shutdown()


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory):
    from soundlake.testing import make_bad_inputs

    folder = tmp_path_factory.mktemp("bad")
    return folder, make_bad_inputs(folder)


def soundlake_cmd(*args: str) -> list[str]:
    """The CLI as a subprocess command line (the installed entry point's module)."""
    return [sys.executable, "-m", "soundlake.cli", *args]


def invoke_here(*args, env: dict | None = None):
    """The command line run in this process (``CliRunner``), for a command that needs no process
    of its own: one that starts Ray joins the session's, in this process's Ray job, so it costs
    no new Python and no new Ray workers. Returns click's Result (``exit_code``, ``output``)."""
    from typer.testing import CliRunner

    from soundlake.cli import app
    from soundlake.core import ray_env

    verbose = ray_env._verbose  # --verbose's callback sets it for the whole process: keep the session's
    try:
        return CliRunner().invoke(app, [str(a) for a in args], env=env)
    finally:
        ray_env._verbose = verbose


@pytest.fixture
def soundlake_here():
    """:func:`invoke_here` as a fixture: call it with the arguments (and ``env=``)."""
    return invoke_here


@pytest.fixture
def s3(monkeypatch):
    """A local S3-compatible server (moto) on loopback, with a bucket "shards"; this process's
    AWS_* variables point at it. Yields its endpoint URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="shards")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on loopback for the session (tests/servers.py); yields a URI that
    logs in with a password."""
    from servers import PostgresServer

    try:
        server = PostgresServer().start()
    except (FileNotFoundError, PermissionError, KeyError) as e:   # not installed, not root, no postgres user
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no PostgreSQL server can be started here ({e}); scripts/setup.sh installs it (run as root)")
    yield server.uri
    server.stop()
