"""Shared fixtures: one local Ray per test session, small corpora on disk."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
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
