"""What every benchmark shares: figure lines, ``--quick`` sizes, and how Ray is started.

* ``figure(name, text)`` prints ``figure <name>: <text>``: one of the values a closing note
  would quote (a ratio against the baseline, a score). Each benchmark lists the names it
  prints, in any run, in a module-level ``FIGURES = (...)``; ``tests/test_benchmarks.py``
  runs every benchmark with ``--quick`` and checks that exactly those names are printed, so
  a quick run proves the full run's printing code still works.
* ``parse_args(ap, quick)`` adds ``--quick``: the same work on tiny sizes (``quick``, a
  dict of argument defaults; options given on the command line still win). A quick run
  finishes in seconds and its figures measure nothing: it is a smoke test.
* ``init_ray()`` / ``ray_sets()``: a small local Ray (2 CPUs, small object store), or
  the test session's Ray when ``SOUNDLAKE_TEST_RAY_ADDRESS`` is set (tests/conftest.py).

The scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path``.
"""
from __future__ import annotations

import argparse
import os
import re

TEST_RAY_ENV = "SOUNDLAKE_TEST_RAY_ADDRESS"
FIGURE_LINE = re.compile(r"^figure ([A-Za-z0-9_.-]+): ")


def figure(name: str, text: str) -> None:
    """Print the figure line ``figure <name>: <text>`` (``name``: one of the script's FIGURES)."""
    if not FIGURE_LINE.match(f"figure {name}: "):
        raise ValueError(f"figure name {name!r}: letters, digits, '_', '.', '-' only")
    print(f"figure {name}: {text}", flush=True)


def figure_names(output: str) -> list[str]:
    """The names of the figure lines in a benchmark's output, in order (repeats kept)."""
    return [m.group(1) for line in output.splitlines() if (m := FIGURE_LINE.match(line))]


def parse_args(ap: argparse.ArgumentParser, quick: dict) -> argparse.Namespace:
    """``ap.parse_args()`` with ``--quick`` added: when given, ``quick`` replaces the defaults."""
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (the same work on less data): finishes in seconds and prints the same "
                         "figure lines; a smoke test, not a measurement")
    known, _ = ap.parse_known_args()
    if known.quick:
        ap.set_defaults(**quick)
    return ap.parse_args()


def ray_address() -> str | None:
    """The Ray to join (the test session's), or None to start a local one."""
    return os.environ.get(TEST_RAY_ENV) or None


def init_ray(num_cpus: int = 2, object_store_mb: int = 200, log_to_driver: bool = True) -> float:
    """Start a small local Ray (or join the test session's); seconds it took, 0 if already up."""
    from soundlake.core.ray_env import RaySpec
    from soundlake.core.ray_env import init_ray as _init

    spec = RaySpec(address=ray_address(), num_cpus=num_cpus, object_store_mb=object_store_mb)
    return _init(spec, log_to_driver=log_to_driver)


def ray_sets(num_cpus: int = 2, object_store_mb: int | None = None) -> list[str]:
    """Pipeline ``--set`` overrides for Ray: join the test session's Ray, or a local one this size."""
    if addr := ray_address():
        return [f"ray.address={addr}"]
    return [f"ray.num_cpus={num_cpus}"] + ([f"ray.object_store_mb={object_store_mb}"] if object_store_mb else [])
