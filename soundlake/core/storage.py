"""Storage: one opener for local paths and object-store URIs, one atomic write, and the
one place that tells a storage problem the user can fix from a bug.

Every path soundlake reads or writes (the lake, export folders, training shards, model
folders on object stores) goes through :func:`open_uri`; every file that must never be
seen half-written goes through :func:`atomic_output`. An ``OSError`` whose errno says the
user can fix it (read-only file system, full disk, permissions, a file where a folder
should be) becomes one :class:`UserError` line through :func:`storage_error`; any other
error keeps its traceback.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import BinaryIO, Iterator

import pyarrow.fs as pafs

from soundlake.core.errors import UserError, one_line

_FULL = "free some space (or use a bigger disk) and run the same command again: finished work is kept"
_PERMISSIONS = "fix its permissions, or use another folder"
# errno -> (what is wrong, how to fix it), for the OSErrors a user can fix.
USER_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.EROFS: ("read-only file system", "use a writable folder, or remount it read-write"),
    errno.ENOSPC: ("no space left on device", _FULL),
    errno.EDQUOT: ("disk quota exceeded", _FULL),
    errno.EACCES: ("permission denied", _PERMISSIONS),
    errno.EPERM: ("operation not permitted", _PERMISSIONS),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "give a path made of folders"),
    errno.EISDIR: ("a folder where a file was expected", "give a file path"),
}


def os_error_problem(e: BaseException) -> tuple[str, str] | None:
    """(what is wrong, how to fix it) when ``e`` is an OSError the user can fix (by its errno);
    None for anything else: a bug, which must keep its traceback."""
    if isinstance(e, OSError) and e.errno in USER_OS_ERRORS:
        return USER_OS_ERRORS[e.errno]
    return None


def storage_error(e: BaseException, where: str | None = None) -> UserError | None:
    """One line for an OSError the user can fix: ``<where>: <what> (<file>); <fix>``, where
    ``where`` names what the command was writing (e.g. ``lake ./lake``); None for anything else."""
    problem = os_error_problem(e)
    if problem is None:
        return None
    filename = getattr(e, "filename", None)
    subject = where or filename
    detail = f" ({filename})" if filename and filename != subject else ""
    return UserError(f"{subject + ': ' if subject else ''}{problem[0]}{detail}; {problem[1]}")


@contextmanager
def user_storage_errors(where: str) -> Iterator[None]:
    """Inside: an OSError the user can fix ends the command as one UserError line naming
    ``where``; any other error propagates unchanged."""
    try:
        yield
    except OSError as e:
        err = storage_error(e, where)
        if err is None:
            raise
        raise err from None


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """A local path or ``file://`` URI as an absolute path, ``~`` expanded."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def check_folder(uri: str, option: str) -> None:
    """Refuse, as one UserError line, a folder argument (``option``: ``--lake``, ``--out``)
    that is empty or, locally, a file or under one. A missing folder is fine: it is created."""
    if not uri.strip():
        raise UserError(f"{option} is empty: give a folder path (a missing folder is created)")
    if is_remote(uri):
        return
    existing = local_path(uri)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if os.path.exists(existing) and not os.path.isdir(existing):
        raise UserError(f"{option} {uri}: {existing} is a file, not a folder; give a folder path "
                        "(a missing folder is created)")


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path (``~`` expanded, made absolute) or an object-store URI (``s3://...``,
    ``gs://...``) as (filesystem, path)."""
    if is_remote(uri):
        if uri.startswith("s3://") and "allow_delayed_open" not in uri:
            # Delayed open lets uploads under one part size go out as a single PutObject
            # instead of a multipart upload (larger ones stay multipart: still atomic).
            uri += ("&" if "?" in uri else "?") + "allow_delayed_open=true"
        try:
            return pafs.FileSystem.from_uri(uri)
        except OSError as e:
            if e.errno is not None:
                raise
            # pyarrow resolves an S3 bucket's region on open: an unreachable endpoint ends here
            raise UserError(f"cannot open {uri.split('?')[0]}: {one_line(e)} (is AWS_ENDPOINT_URL set to the "
                            "store's address, with AWS_REGION, and is it up?)") from None
    return pafs.LocalFileSystem(), local_path(uri)
    return pafs.LocalFileSystem(), local_path(uri)


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
