"""Running on a Ray cluster rather than a local one."""
from __future__ import annotations

import os
import re
import subprocess

from conftest import soundlake_cmd


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
