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


_MISSING = object()


def declared(script: Path, name: str, default=_MISSING):
    """The script's module-level ``name = <literal>``, read without importing it."""
    for node in ast.parse(script.read_text(), str(script)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                pytest.fail(f"{script.name}: {name} must be a literal")
    if default is _MISSING:
        pytest.fail(f"{script.name}: no module-level {name} = ...")
    return default


def declared_figures(script: Path) -> tuple[str, ...]:
    """The script's ``FIGURES``: a literal tuple naming the figure lines it prints."""
    value = declared(script, "FIGURES")
    if not (isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)):
        pytest.fail(f"{script.name}: FIGURES must be a non-empty tuple of names, got {value!r}")
    return value


# Quick runs of scripts that declare ``USES_RAY = False`` run in a background thread, one at a
# time, beside the others: they are mostly single-threaded, and a run that joins the session's
# 2-CPU Ray next to another could wait on the other's CPUs. Ray runs come first, so the two overlap.
RAY_FREE = [s for s in SCRIPTS if declared(s, "USES_RAY", True) is False]
QUICK_ORDER = [s for s in SCRIPTS if s not in RAY_FREE] + RAY_FREE


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
            if "SOUNDLAKE_TEST_RAY_ADDRESS" not in env:
                print(f"{script} declares USES_RAY = False but started Ray", file=sys.stderr)
                sys.exit(3)
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


def _quick_run(ctx, script: Path, env: dict[str, str], folder: Path) -> tuple[int | None, float, str, str]:
    """One quick run in a process forked from ``ctx``: (exit code, None past TIMEOUT_S), seconds,
    stdout, stderr."""
    out_path, err_path = folder / f"{script.stem}.stdout", folder / f"{script.stem}.stderr"
    t0 = time.perf_counter()
    proc = ctx.Process(target=_run_quick, args=(str(script), env, str(out_path), str(err_path)))
    proc.start()
    proc.join(TIMEOUT_S)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        code = None
    else:
        code = proc.exitcode
    return (code, time.perf_counter() - t0, out_path.read_text(errors="replace"),
            err_path.read_text(errors="replace"))


def _quick_env(ray_address: str | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["SOUNDLAKE_TEST_RAY_ADDRESS"] = ray_address  # benchmarks join this Ray instead of starting one
    return env


@pytest.fixture(scope="module")
def background_runs(request, warm_python, tmp_path_factory):
    """Starts the selected Ray-free quick runs, one after another in a thread; the value maps
    each script to a future of its :func:`_quick_run` result."""
    from concurrent.futures import ThreadPoolExecutor

    selected = {item.callspec.params["script"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_quick_run_prints_its_figures"}
    folder = tmp_path_factory.mktemp("background_quick_runs")
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield {s: pool.submit(_quick_run, warm_python, s, _quick_env(None), folder)
               for s in RAY_FREE if s in selected}


@pytest.mark.slow
@pytest.mark.parametrize("script", QUICK_ORDER, ids=lambda p: p.stem)
def test_quick_run_prints_its_figures(script, ray_session, warm_python, background_runs, tmp_path):
    figures = declared_figures(script)
    if script in background_runs:
        code, took, stdout, stderr = background_runs[script].result()
    else:
        code, took, stdout, stderr = _quick_run(warm_python, script, _quick_env(ray_session), tmp_path)
    if code is None:
        pytest.fail(f"{script.name} --quick ran past {TIMEOUT_S} s; its output:\n{stdout[-3000:]}\n"
                    f"--- stderr ---\n{stderr[-3000:]}")
    out = stdout + "\n--- stderr ---\n" + stderr[-4000:]
    assert code == 0, f"{script.name} --quick failed (exit {code}, {took:.0f} s):\n{out[-6000:]}"
    printed = _common().figure_names(stdout)
    assert sorted(printed) == sorted(figures), (
        f"{script.name} --quick printed figures {printed}, declared FIGURES {list(figures)} ({took:.0f} s):\n"
        f"{stdout[-3000:]}")
    print(f"{script.name} --quick: {took:.1f} s")
