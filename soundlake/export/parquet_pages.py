"""Where each value of an uncompressed PLAIN binary column lies inside a Parquet file.

The lake writes the ``flac`` column without compression or dictionary (see
:mod:`soundlake.catalog.lake`), so in every data page each FLAC value is a 4-byte
length followed by the bytes themselves. Reading the page headers and those lengths
gives each value's byte range in the file; the export then copies the ranges into tar
shards through a reused buffer instead of decoding the column into Arrow arrays (which
fills fresh memory, and page faults cost more than the copies here).

    value_ranges(fd, metadata, "flac") -> [(offset, length)] per row, or None

``None`` means the column chunk is laid out some other way (compressed, dictionary
encoded, with nulls, nested, an unknown page type); the caller then reads the column
with pyarrow. Page headers are Thrift compact-protocol structs; only the few integer
fields needed are decoded, everything else is skipped.
"""
from __future__ import annotations

import os
import struct

import pyarrow.parquet as pq

_DATA_PAGE, _DATA_PAGE_V2 = 0, 3      # parquet.thrift PageType
_PLAIN, _RLE = 0, 3                   # parquet.thrift Encoding
_MAX_HEADER = 1 << 20                 # a page header larger than this is not ours


def _varint(b: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        x = b[pos]
        pos += 1
        out |= (x & 0x7F) << shift
        if x < 0x80:
            return out, pos
        shift += 7


def _zigzag(v: int) -> int:
    return (v >> 1) ^ -(v & 1)


def _value(b: bytes, pos: int, kind: int):
    """One compact-protocol value of type ``kind`` at ``pos``: (value or None if skipped, next pos)."""
    if kind in (1, 2):                 # bool, carried in the field header
        return kind == 1, pos
    if kind == 3:                      # byte
        return b[pos], pos + 1
    if kind in (4, 5, 6):              # i16, i32, i64
        v, pos = _varint(b, pos)
        return _zigzag(v), pos
    if kind == 7:                      # double
        return None, pos + 8
    if kind == 8:                      # binary / string
        n, pos = _varint(b, pos)
        return None, pos + n
    if kind in (9, 10):                # list, set
        head = b[pos]
        pos += 1
        n, elem = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(b, pos)
        for _ in range(n):
            pos = pos + 1 if elem in (1, 2) else _value(b, pos, elem)[1]
        return None, pos
    if kind == 11:                     # map
        n, pos = _varint(b, pos)
        if n:
            kinds = b[pos]
            pos += 1
            for _ in range(n):
                for k in (kinds >> 4, kinds & 0x0F):
                    pos = pos + 1 if k in (1, 2) else _value(b, pos, k)[1]
        return None, pos
    if kind == 12:                     # struct
        return _struct(b, pos)
    raise ValueError(f"unknown thrift compact type {kind}")


def _struct(b: bytes, pos: int) -> tuple[dict[int, object], int]:
    """A struct as {field id: value} (nested structs as dicts; binaries, lists, maps skipped)."""
    fields: dict[int, object] = {}
    fid = 0
    while True:
        head = b[pos]
        pos += 1
        if head == 0:
            return fields, pos
        kind, delta = head & 0x0F, head >> 4
        if delta:
            fid += delta
        else:
            v, pos = _varint(b, pos)
            fid = _zigzag(v)
        fields[fid], pos = _value(b, pos, kind)


def _page_header(fd: int, pos: int) -> tuple[dict[int, object], int]:
    """The PageHeader at ``pos`` and the offset where its page body starts."""
    size = 256
    while True:
        b = os.pread(fd, size, pos)
        try:
            header, n = _struct(b, 0)
            return header, pos + n
        except IndexError:             # the header runs past what was read
            if len(b) < size or size >= _MAX_HEADER:
                raise ValueError("truncated page header") from None
            size *= 4


def value_ranges(fd: int, meta: pq.FileMetaData, column: str) -> list[tuple[int, int]] | None:
    """(offset, length) in the file of each row's value of a flat binary column, in row
    order, when every page is uncompressed PLAIN without nulls; else None."""
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if column not in names:
        return None
    j = names.index(column)
    col = meta.schema.column(j)
    if col.physical_type != "BYTE_ARRAY" or col.max_repetition_level != 0 or col.max_definition_level > 1:
        return None
    out: list[tuple[int, int]] = []
    try:
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            chunk = group.column(j)
            stats = chunk.statistics
            if chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page \
                    or not set(chunk.encodings) <= {"PLAIN", "RLE", "BIT_PACKED"}:
                return None
            if col.max_definition_level and (stats is None or not stats.has_null_count or stats.null_count):
                return None  # nulls would need the definition levels decoded
            pos, end, rows = chunk.data_page_offset, chunk.data_page_offset + chunk.total_compressed_size, 0
            while pos < end:
                header, body = _page_header(fd, pos)
                kind, size = header.get(1), header.get(3)
                if kind == _DATA_PAGE and isinstance(header.get(5), dict):
                    page = header[5]
                    n, enc, level_enc = page.get(1), page.get(2), page.get(3)
                    if enc != _PLAIN or (col.max_definition_level and level_enc != _RLE):
                        return None
                    at = body
                    if col.max_definition_level:  # RLE levels: a 4-byte length, then the runs
                        at += 4 + struct.unpack("<I", os.pread(fd, 4, at))[0]
                elif kind == _DATA_PAGE_V2 and isinstance(header.get(8), dict):
                    page = header[8]
                    n = page.get(1)
                    if page.get(2, 0) != 0 or page.get(4) != _PLAIN:
                        return None
                    at = body + page.get(5, 0) + page.get(6, 0)
                else:
                    return None
                if not isinstance(n, int) or not isinstance(size, int):
                    return None
                page_end = body + size
                for _ in range(n):
                    length = struct.unpack("<I", os.pread(fd, 4, at))[0]
                    out.append((at + 4, length))
                    at += 4 + length
                    if at > page_end:
                        return None
                if at != page_end:     # the values must fill the page exactly
                    return None
                rows += n
                pos = page_end
            if rows != group.num_rows:
                return None
    except (ValueError, IndexError, struct.error):
        return None
    return out
