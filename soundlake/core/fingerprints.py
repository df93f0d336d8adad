"""Fingerprints: stable hashes of weight files and the code version, recorded with every
caption, score, model folder and run so that numbers from two models are never mixed."""
from __future__ import annotations

import hashlib
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import soundlake


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(paths: list[Path] | Path, n: int = 16) -> str:
    """Short sha256 over the contents of one or more weight files (sorted by name).

    Cached per (path, size, mtime) so reloading a model does not rehash 100s of MB.
    """
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    paths = sorted(Path(p) for p in paths)
    if len(paths) == 1:
        st = paths[0].stat()
        return _file_sha256(str(paths[0]), st.st_size, st.st_mtime_ns)[:n]
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(_file_sha256(str(p), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()[:n]


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a transformers-style folder (safetensors preferred)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, pytorch_model*.bin) in {folder}")
    return files


def code_version() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(soundlake.__file__)))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return f"soundlake {soundlake.__version__}" + (f" ({sha})" if sha else "")
