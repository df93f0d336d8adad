"""Running on a Ray cluster rather than a local one."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import soundlake_cmd

from soundlake.catalog.sql import fetchall
from soundlake.testing import tone_mix, write_audio


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


RAY_BIN = str(Path(sys.executable).with_name("ray"))
NODE_ARGS = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats", "--block"]


@contextmanager
def ray_cluster(env: dict, worker_prefix: list[str] | None = None, nodes: list | None = None):
    """A Ray cluster on this machine, started as an operator would (`ray start --head --block`,
    and with ``worker_prefix`` a second node, `ray start --address ... --block` run under that
    command, e.g. in its own mount namespace), with ``env`` as its whole environment (none of
    the driver's); every process stopped by its PID. Yields (address, temp folder); ``nodes``
    receives each node's process (its own process group: kill it to lose that node)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")   # short: Ray's socket paths live under it
    env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1", **env}
    address = f"127.0.0.1:{port}"
    # each node in its own process group, stopped through it: every Ray process of the node
    # gets the signal at once
    procs = [subprocess.Popen([RAY_BIN, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                               "--temp-dir", temp, *NODE_ARGS], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        if worker_prefix is not None:
            procs.append(subprocess.Popen([*worker_prefix, RAY_BIN, "start", "--address", address, *NODE_ARGS],
                                          env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        ready = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import time, ray
            for _ in range(240):
                try:
                    ray.init(address="{address}", logging_level="ERROR")
                    if sum(n["Alive"] for n in ray.nodes()) == {len(procs)}:
                        break
                    ray.shutdown()
                except Exception:
                    pass
                time.sleep(0.5)
            else:
                raise SystemExit("the cluster did not come up")""")], env=env, capture_output=True, text=True)
        assert ready.returncode == 0, ready.stderr[-2000:]
        if nodes is not None:
            nodes.extend(procs)
        yield address, temp
    finally:
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        for proc in procs:   # a raylet drains for ~30 s on SIGTERM: nothing of these test nodes needs it
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:   # that node was killed already (a test's own doing)
        pass


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A second cluster with token authentication and no AWS_* settings."""
    home = tmp_path_factory.mktemp("home")
    with ray_cluster({"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}) as cluster:
        yield cluster


def _driver_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}   # not the test session's Ray
    env["HOME"] = tempfile.mkdtemp(prefix="home")   # no ~/.ray/auth_token: Ray would turn token auth on
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


def test_object_store_settings_reach_the_workers_and_are_written_nowhere(token_cluster, s3, postgres, tmp_path,
                                                                         monkeypatch):
    """The cluster's nodes know nothing of the S3 endpoint or credentials: the driver's reach
    its workers through the job's runtime environment (without it the workers would try
    AWS itself). The lake's writer lock is in a PostgreSQL catalog, named with its password in
    SOUNDLAKE_CATALOG. Neither secret appears in any file of the cluster's session folder nor
    the lake, which records the catalog without the password."""
    address, temp = token_cluster
    import boto3

    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="lakes")
    secret = "secret-" + os.urandom(8).hex()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    r = subprocess.run(soundlake_cmd("curate", "demo", "--lake", "s3://lakes/demo", "--set", "source.count=3",
                                     "--address", address), capture_output=True, text=True, timeout=300,
                       env=_driver_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, SOUNDLAKE_CATALOG=postgres))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = fetchall("s3://lakes/demo", "SELECT count(DISTINCT source_id) AS inputs, count(*) AS clips FROM clips")
    assert rows[0][0] == 3 and rows[0][1] >= 3, rows
    password = urlsplit(postgres).password.encode()
    leaked = [str(p) for p in Path(temp).rglob("*") if p.is_file() and (secret.encode() in (b := p.read_bytes())
                                                                         or password in b)]
    assert not leaked, leaked
    s3c = boto3.client("s3", endpoint_url=s3)
    keys = [o["Key"] for o in s3c.list_objects_v2(Bucket="lakes", Prefix="demo/")["Contents"]]
    assert "demo/_catalog.json" in keys
    assert not [k for k in keys if password in s3c.get_object(Bucket="lakes", Key=k)["Body"].read()]


def test_a_node_that_sees_its_own_disk_stops_the_run_naming_it(ray_session, tmp_path):
    """Two nodes; the second runs in its own mount namespace with a private tmpfs over a
    folder: a lake or an input there is the driver's on one node and another disk on the
    other. The run stops before any work, naming the node and the path; with the lake and
    inputs where both nodes see them, the same run finishes."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("unshare -m is not available here (it needs root or user namespaces)")
    private = Path(tempfile.mkdtemp(prefix="nl", dir="/tmp"))
    shared = tmp_path / "shared"
    inputs = shared / "in"
    inputs.mkdir(parents=True)
    for i in range(3):
        write_audio(inputs / f"tone{i}.wav", tone_mix(2.0, 16000, i), 16000)
    home = tempfile.mkdtemp(prefix="home")
    prefix = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs {private} && exec "$0" "$@"']
    try:
        with ray_cluster({"HOME": home}, worker_prefix=prefix) as (address, _):
            def curate(lake, folder):
                return subprocess.run(soundlake_cmd("curate", "local", "--input", str(folder), "--lake", str(lake),
                                                    "--address", address), capture_output=True, text=True,
                                      timeout=300, env=_driver_env())
            r = curate(private / "lake", inputs)
            assert r.returncode == 2, r.stderr[-3000:]
            assert re.search(r"error: node \S+ \(\w+\) sees another folder .*: " + re.escape(str(private / "lake")),
                             r.stderr), r.stderr[-3000:]
            shutil.copytree(inputs, private / "in")
            r = curate(shared / "lake", private / "in")
            assert r.returncode == 2 and "cannot read the input: " + str(private / "in") in r.stderr, r.stderr[-3000:]
            assert fetchall(str(shared / "lake"), "SELECT count(*) FROM clips") == [(0,)]
            r = curate(shared / "lake", inputs)
            assert r.returncode == 0, r.stderr[-3000:]
            assert fetchall(str(shared / "lake"), "SELECT count(DISTINCT source_id) FROM clips") == [(3,)]
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_a_node_killed_right_after_its_tasks_wrote_loses_and_duplicates_nothing(tmp_path):
    """Two nodes; the second is SIGKILLed as soon as the run's first parts are on disk. Its
    tasks' parts whose summaries never reached the driver are never committed, and Ray redoes
    those blocks elsewhere: every input ends up with its clips once (a re-run finishes what a
    failed run could not), and each run's record counts exactly the clips it committed. (With
    every worker committing its own part, the retried tasks showed their clips twice.)"""
    import json
    import time

    lake = tmp_path / "lake"
    nodes: list = []
    with ray_cluster({"HOME": tempfile.mkdtemp(prefix="home")}, worker_prefix=[], nodes=nodes) as (address, _):
        cmd = soundlake_cmd("curate", "demo", "--lake", str(lake), "--address", address, "-q", "--set", "source.count=12",
                            "--set", "source.duration=2", "--set", "segment.window=2", "--set", "ray.inputs_per_task=1")
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_driver_env())
        deadline = time.monotonic() + 240
        while len(list((lake / "clips").glob("part-*.parquet"))) < 2 and run.poll() is None:
            assert time.monotonic() < deadline, "no part was written"
            time.sleep(0.05)
        _signal_group(nodes[1], signal.SIGKILL)
        nodes[1].wait()
        out, err = run.communicate(timeout=300)
        if run.returncode != 0:   # the run may stop with the node; the re-run finishes it
            again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_driver_env())
            assert again.returncode == 0, again.stderr[-3000:]
        else:                     # what the lost node wrote and never reported is gone
            from soundlake.catalog.lake import Lake

            assert Lake(str(lake)).glob_parts("clips") == Lake(str(lake)).parts("clips")
    rows = fetchall(str(lake), "SELECT count(*), count(DISTINCT clip_id), count(DISTINCT source_id) FROM clips")
    assert rows[0][0] == rows[0][1] and rows[0][2] == 12, rows
    committed = dict(fetchall(str(lake), "SELECT run_id, count(*) FROM clips GROUP BY 1"))
    for run_id, counts in fetchall(str(lake), "SELECT run_id, counts_json FROM runs"):
        assert json.loads(counts)["clips"] == committed.get(run_id, 0), (run_id, counts, committed)


def test_node_check_reads_the_marker_and_inputs_named_as_the_listing_names_them(tmp_path):
    """The per-node check (run here, without a cluster): the marker's token, and the sampled
    inputs as the listing names them, a file:// URL with percent-escaped bytes for a name that
    is not UTF-8 included; remote inputs are not sampled."""
    from soundlake.catalog.lake import Lake
    from soundlake.pipelines.probe import check_node, sample_inputs
    from soundlake.sources.local import file_uri

    lake = Lake(str(tmp_path / "lake"))
    lake.create()
    (tmp_path / "lake" / "_probe-x").write_text("tok")
    odd = os.fsencode(str(tmp_path)) + b"/caf\xe9.wav"
    open(odd, "wb").close()
    rows = [{"uri": "https://example.org/a.wav"}, {"uri": file_uri(Path(os.fsdecode(odd)))}]
    assert rows[1]["uri"].startswith("file://")
    inputs = sample_inputs(rows)
    assert inputs == [os.fsdecode(odd)]
    assert check_node(lake.uri, lake.path("_probe-x"), "tok", inputs) is None
    assert check_node(lake.uri, lake.path("_probe-x"), "other", [])[0].startswith("sees another folder")
    assert check_node(lake.uri, lake.path("_probe-x"), "tok", [str(tmp_path / "gone.wav")]) == \
        ("cannot read the input", str(tmp_path / "gone.wav"))
