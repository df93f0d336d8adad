"""WebDataset tar shards: deterministic writing and safe reading.

Writing: members get fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644)
and are written in the order given, so the same samples always give the same bytes.
A shard is written under ``<name>.tmp`` and renamed (local), or as one object that
appears only when the upload completes (object stores via ``pyarrow.fs``).

Reading shards from elsewhere is reading untrusted input: :func:`check_member`
rejects, before any bytes are extracted, members with absolute paths, ``..``
components, symbolic or hard links, device files/FIFOs, and sizes over a limit.

Public API:
    tar_key(clip_id) -> str, clip_id_from_key(key) -> str
    write_shard(fs, path, samples) -> ShardInfo          samples: [(key, {ext: bytes})]
    open_uri(uri) -> (pyarrow FileSystem, path)
    check_member(info, max_member_bytes)                 raises UnsafeTarError
    iter_members(fileobj, max_member_bytes) -> (name, bytes)...
    iter_samples(fileobj, url, max_member_bytes) -> {"__key__", "__url__", ext: bytes}...
    sha256_file(fs, path) -> str
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

import pyarrow.fs as pafs

DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20  # a 10 min stereo 48 kHz FLAC is ~60 MiB
_SAFE = re.compile(r"[A-Za-z0-9-]")


class UnsafeTarError(ValueError):
    """A tar member that must not be read (path escape, link, device, oversize)."""


# ---- keys ----------------------------------------------------------------------
def tar_key(clip_id: str) -> str:
    """A reversible tar-safe key: letters, digits and '-' kept, '_' doubled, anything
    else ``_xx`` (hex of its UTF-8 bytes). No dots (webdataset splits keys at the first
    dot), slashes or colons, and two clip ids never share a key."""
    out = []
    for ch in clip_id:
        if _SAFE.fullmatch(ch):
            out.append(ch)
        elif ch == "_":
            out.append("__")
        else:
            out.extend(f"_{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def clip_id_from_key(key: str) -> str:
    raw, i = bytearray(), 0
    while i < len(key):
        if key[i] != "_":
            raw += key[i].encode()
            i += 1
        elif key[i + 1] == "_":
            raw += b"_"
            i += 2
        else:
            raw.append(int(key[i + 1: i + 3], 16))
            i += 3
    return raw.decode("utf-8")


# ---- filesystems -----------------------------------------------------------------
def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path or an object-store URI (s3://..., gs://...) as (filesystem, path)."""
    if "://" in uri and not uri.startswith("file://"):
        if uri.startswith("s3://") and "allow_delayed_open" not in uri:
            # Delayed open lets uploads under one part size go out as a single PutObject
            # instead of a multipart upload (larger ones stay multipart: still atomic).
            uri += ("&" if "?" in uri else "?") + "allow_delayed_open=true"
        return pafs.FileSystem.from_uri(uri)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def put_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a small file atomically (tmp + rename locally; one PUT on object stores)."""
    if is_local(fs):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def sha256_file(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(4 * 2**20):
            h.update(chunk)
    return h.hexdigest()


# ---- writing ---------------------------------------------------------------------
@dataclass
class ShardInfo:
    path: str
    count: int
    bytes: int
    sha256: str


def _member(name: str, size: int) -> bytes:
    """The tar header block(s) of a regular file with fixed metadata (no time, owner or name)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_tar(sink, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[int, int, str]:
    """Write samples to a binary sink as a deterministic tar; returns (count, bytes, sha256).

    Each sample's members are contiguous, in sorted extension order. tarfile makes the
    headers; the data goes out in one write per member (tarfile's stream mode would cut
    it into 10 KiB records, a third of the export time)."""
    h, n, count = hashlib.sha256(), 0, 0
    # Hashing runs on its own thread, overlapped with the writes (both release the GIL);
    # a one-worker executor keeps the updates in order.
    hasher = ThreadPoolExecutor(max_workers=1)

    def put(b) -> None:
        nonlocal n
        sink.write(b)
        hasher.submit(h.update, b)
        n += len(b)

    try:
        for key, fields in samples:
            if not key or "." in key or "/" in key:
                raise ValueError(f"bad shard key {key!r}: keys may not contain '.' or '/'")
            for ext in sorted(fields):
                data = fields[ext]
                put(_member(f"{key}.{ext}", len(data)))
                put(data)
                if len(data) % tarfile.BLOCKSIZE:
                    put(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))
            count += 1
        # End of archive: two zero blocks, padded to a whole record as tar(1) and tarfile do.
        end = 2 * tarfile.BLOCKSIZE
        end += (-(n + end)) % tarfile.RECORDSIZE
        put(tarfile.NUL * end)
    finally:
        hasher.shutdown(wait=True)
    return count, n, h.hexdigest()


def write_shard(fs: pafs.FileSystem, path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> ShardInfo:
    """Write one shard atomically: readers never see a partial tar under its final name."""
    if is_local(fs):
        tmp = path + ".tmp"
        # No fsync: the rename alone keeps a killed process from leaving a partial shard,
        # and resume re-checks every finished shard's sha256, so a shard damaged by a power
        # loss is rewritten rather than trusted.
        with open(tmp, "wb") as f:
            count, size, sha = write_tar(f, samples)
        os.replace(tmp, path)
    else:
        # An object-store upload becomes visible only when the stream closes cleanly.
        with fs.open_output_stream(path) as out:
            count, size, sha = write_tar(out, samples)
    return ShardInfo(path, count, size, sha)


# ---- reading -----------------------------------------------------------------------
def check_member(info: tarfile.TarInfo, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> None:
    """Raise UnsafeTarError unless ``info`` is a plain file with a relative, contained name."""
    name = info.name
    if info.issym() or info.islnk():
        raise UnsafeTarError(f"unsafe tar member {name!r}: links are not allowed (-> {info.linkname!r})")
    if info.ischr() or info.isblk() or info.isfifo() or info.isdev():
        raise UnsafeTarError(f"unsafe tar member {name!r}: device files and FIFOs are not allowed")
    if not name or name.startswith("/") or posixpath.isabs(name) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeTarError(f"unsafe tar member {name!r}: absolute paths are not allowed")
    if ".." in name.replace("\\", "/").split("/"):
        raise UnsafeTarError(f"unsafe tar member {name!r}: '..' path components are not allowed")
    if not (info.isreg() or info.isdir()):
        raise UnsafeTarError(f"unsafe tar member {name!r}: unsupported member type {info.type!r}")
    if info.size > max_member_bytes:
        raise UnsafeTarError(f"unsafe tar member {name!r}: {info.size} bytes is over the "
                             f"{max_member_bytes}-byte member limit")


def iter_members(fileobj: IO[bytes], max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member of a tar stream, every TarInfo checked first."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            check_member(info, max_member_bytes)
            if info.isdir():
                continue
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if len(data) != info.size:
                raise UnsafeTarError(f"truncated tar member {info.name!r}")
            yield info.name, data
            tar.members = []  # streaming: do not keep every TarInfo


def iter_samples(fileobj: IO[bytes], url: str = "",
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Group contiguous members by key (the basename up to its first dot), as webdataset does."""
    current: dict | None = None
    for name, data in iter_members(fileobj, max_member_bytes):
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            continue
        prefix = name[: len(name) - len(base)] + base.split(".", 1)[0]
        ext = base.split(".", 1)[1].lower()
        if current is None or current["__key__"] != prefix:
            if current is not None:
                yield current
            current = {"__key__": prefix, "__url__": url}
        if ext in current:
            raise UnsafeTarError(f"duplicate tar member {name!r} in {url or 'tar'}")
        current[ext] = data
    if current is not None:
        yield current
