"""Storage: one opener for local paths and object-store URIs, and one atomic write.

Every path soundlake reads or writes (the lake, export folders, training shards, model
folders on object stores) goes through :func:`open_uri`; every file that must never be
seen half-written goes through :func:`atomic_output`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import BinaryIO, Iterator

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path (``~`` expanded, made absolute) or an object-store URI (``s3://...``,
    ``gs://...``) as (filesystem, path)."""
    if is_remote(uri):
        if uri.startswith("s3://") and "allow_delayed_open" not in uri:
            # Delayed open lets uploads under one part size go out as a single PutObject
            # instead of a multipart upload (larger ones stay multipart: still atomic).
            uri += ("&" if "?" in uri else "?") + "allow_delayed_open=true"
        return pafs.FileSystem.from_uri(uri)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def open_input(uri: str) -> BinaryIO:
    """A binary stream reading ``uri`` (a local path or an object-store URI)."""
    if is_remote(uri):
        fs, path = open_uri(uri)
        return fs.open_input_stream(path)
    return open(uri[len("file://"):] if uri.startswith("file://") else uri, "rb")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file name beside ``path`` for a library that writes by name (safetensors,
    numpy); renamed to ``path`` when the block ends cleanly, removed when it fails."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


@contextmanager
def atomic_output(fs: pafs.FileSystem, path: str, sync: bool = False) -> Iterator[BinaryIO]:
    """A binary stream whose bytes appear at ``path`` only once the block ends cleanly.

    Locally: written to ``<path>.tmp`` and renamed (a killed process leaves at most a
    ``.tmp`` file, which readers never glob); ``sync`` fsyncs first, for files that must
    survive a power loss. Object stores: one upload, visible when the stream closes."""
    if not is_local(fs):
        with fs.open_output_stream(path) as out:
            yield out
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        if sync:
            f.flush()
            os.fsync(f.fileno())


def put_bytes(fs: pafs.FileSystem, path: str, data: bytes, sync: bool = True) -> None:
    """Write a small file atomically (see :func:`atomic_output`)."""
    with atomic_output(fs, path, sync) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small local text file atomically (no fsync)."""
    put_bytes(pafs.LocalFileSystem(), os.path.abspath(os.fspath(path)), text.encode("utf-8"), sync=False)
