#!/usr/bin/env bash
# Set up everything soundlake needs on a fresh Debian/Ubuntu machine with Python >= 3.10:
# ffmpeg, espeak-ng, Chromaprint (libchromaprint-tools), Chromium with its driver (for
# `soundlake serve`'s browser tests), a Java runtime (METEOR) and PostgreSQL's server (a catalog
# server for the tests of the writer lock) from apt, then a virtual
# environment in .venv with the project.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ffmpeg >/dev/null || ! command -v espeak-ng >/dev/null || ! command -v fpcalc >/dev/null \
   || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v java >/dev/null \
   || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg espeak-ng libsndfile1 libchromaprint-tools \
    chromium chromium-driver default-jre-headless postgresql >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[test,meteor]"
# Byte-compile the (editable) package once: where PYTHONDONTWRITEBYTECODE is set, every CLI
# process and Ray worker would otherwise compile it again (~0.5 CPU-s each).
.venv/bin/python -m compileall -q soundlake
# librosa compiles its numba kernels on first use and caches them in its package (~40 CPU-s
# once): do it here rather than in the first mel command (a no-op when the cache is there).
.venv/bin/python -c "import numpy as np; from soundlake.generation.mel import MelSpec, griffin_lim
s = MelSpec(); griffin_lim(np.zeros((s.n_mels, 16), np.float32), s, n_iter=2)"
echo "soundlake is set up: .venv/bin/soundlake --help"
