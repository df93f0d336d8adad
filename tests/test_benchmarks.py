"""Every script in benchmarks/ still runs: ``--quick`` (tiny sizes) prints exactly its FIGURES.

A benchmark declares, at module level, ``FIGURES = ("name", ...)``: the names of the figure
lines (``figure <name>: <text>``, printed by ``benchmarks/common.py``'s ``figure``) it prints
in any run. A quick run does the same work on less data, so printing exactly those names
proves the full run's code still works. No timings are asserted: a quick run measures nothing.
Scripts are found by glob, so a new one is covered (and must declare FIGURES). Each quick run
is a process forked from a Python that imported torch and transformers once (``warm_python``).
"""
from __future__ import annotations

import ast
import importlib.util
import multiprocessing
import os
import runpy
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
HELPERS = {"common.py"}  # shared code, not a benchmark
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name not in HELPERS and not p.name.startswith("_"))
TIMEOUT_S = 480  # quick runs take 5-160 s here (Ray Train start-up dominates); this only catches a hang
WARM_IMPORTS = ["torch", "transformers.modeling_utils"]  # what nearly every benchmark imports first


def _common():
    spec = importlib.util.spec_from_file_location("soundlake_benchmarks_common", BENCH / "common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def declared_figures(script: Path) -> tuple[str, ...]:
    """The script's module-level ``FIGURES`` (a literal tuple of names), read without importing it."""
    for node in ast.parse(script.read_text(), str(script)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "FIGURES" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                pytest.fail(f"{script.name}: FIGURES must be a literal tuple of names")
            if not (isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)):
                pytest.fail(f"{script.name}: FIGURES must be a non-empty tuple of names, got {value!r}")
            return value
    pytest.fail(f"{script.name}: no module-level FIGURES = (...) naming the figure lines it prints")


def test_benchmarks_found():
    assert SCRIPTS, f"no benchmark scripts in {BENCH}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_declares_figures(script):
    names = declared_figures(script)
    assert len(set(names)) == len(names), f"{script.name}: repeated names in FIGURES {names}"
    common = _common()
    for name in names:
        assert common.FIGURE_LINE.match(f"figure {name}: "), f"{script.name}: bad figure name {name!r}"
    assert "--quick" in script.read_text() or "parse_args(" in script.read_text(), \
        f"{script.name}: takes no --quick (use common.parse_args)"


def _run_quick(script: str, env: dict[str, str], out: str, err: str) -> None:
    """``python <script> --quick`` in this (forked) process: ``env`` as its environment, stdout
    and stderr to the files ``out`` and ``err``; an exception or ``sys.exit`` sets the exit code."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [script, "--quick"]
    sys.path.insert(0, os.path.dirname(script))
    multiprocessing.set_start_method(None, force=True)  # the platform's default again, not the forkserver
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # what the interpreter's exit does for a script
        sys.stdout.flush()
        sys.stderr.flush()


@pytest.fixture(scope="module")
def warm_python():
    """Forks each quick run from a Python that has imported torch and transformers once: those
    imports are most of a quick run's CPU time (~8 s each here), not what it tests. A run is
    still a process of its own, with its own environment, arguments and output."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WARM_IMPORTS)
    return ctx


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_quick_run_prints_its_figures(script, ray_session, warm_python, tmp_path):
    figures = declared_figures(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "SOUNDLAKE_TEST_RAY_ADDRESS": ray_session}  # benchmarks join this Ray instead of starting one
    env.pop("RAY_ADDRESS", None)
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    t0 = time.perf_counter()
    proc = warm_python.Process(target=_run_quick, args=(str(script), env, str(out_path), str(err_path)))
    proc.start()
    proc.join(TIMEOUT_S)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail(f"{script.name} --quick ran past {TIMEOUT_S} s; its output:\n{out_path.read_text()[-3000:]}\n"
                    f"--- stderr ---\n{err_path.read_text(errors='replace')[-3000:]}")
    took = time.perf_counter() - t0
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    out = stdout + "\n--- stderr ---\n" + stderr[-4000:]
    assert proc.exitcode == 0, f"{script.name} --quick failed (exit {proc.exitcode}, {took:.0f} s):\n{out[-6000:]}"
    printed = _common().figure_names(stdout)
    assert sorted(printed) == sorted(figures), (
        f"{script.name} --quick printed figures {printed}, declared FIGURES {list(figures)} ({took:.0f} s):\n"
        f"{stdout[-3000:]}")
    print(f"{script.name} --quick: {took:.1f} s")
