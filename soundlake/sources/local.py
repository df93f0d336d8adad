"""The ``local`` source: every audio/video file under a folder, with sidecar or folder metadata."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from soundlake.core.audio import AUDIO_EXTS
from soundlake.core.errors import UserError
from soundlake.sources.base import input_row, register

_ESCAPE = re.compile(rb"\\(\\|x[0-9a-fA-F]{2})")
_META_KEYS = {"title", "description", "tags", "labels", "license", "uploader", "upload_date", "url"}


def escape_name(name: str) -> str:
    """A file name as valid UTF-8 text, reversibly (Arrow refuses the lone surrogates that
    os.walk gives for bytes that are not UTF-8): such bytes become ``\\xNN`` and a backslash
    is doubled, so that no two names meet; a UTF-8 name without a backslash is unchanged.
    :func:`unescape_name` is the inverse."""
    return os.fsencode(name).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def unescape_name(text: str) -> str:
    """The file name (str as os.fsdecode gives it) that :func:`escape_name` turned into ``text``."""
    raw = _ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1][1:], 16)]), text.encode("utf-8"))
    return os.fsdecode(raw)


def file_uri(path: Path) -> str:
    """The path itself, or a ``file://`` URL (bytes percent-escaped) when it is not valid UTF-8."""
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return path.absolute().as_uri()


def walk_files(root: Path, follow_symlinks: bool = True) -> Iterator[Path]:
    """Every file under root; directory symlink loops are visited once."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError:
            dirnames[:] = []
            continue
        if key in seen:
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _folder_metadata(folder: Path) -> dict[str, dict]:
    """metadata.csv / metadata.jsonl in a folder: file name -> fields."""
    out: dict[str, dict] = {}
    csv_path, jsonl_path = folder / "metadata.csv", folder / "metadata.jsonl"
    records: list[dict] = []
    try:
        if csv_path.is_file():
            with open(csv_path, newline="", encoding="utf-8") as f:
                records += list(csv.DictReader(f))
        if jsonl_path.is_file():
            with open(jsonl_path, encoding="utf-8") as f:
                records += [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, UnicodeDecodeError):
        return out  # unreadable metadata must not stop the job: files get none
    for rec in records:
        name = rec.get("file") or rec.get("file_name") or rec.get("filename") or rec.get("path")
        if name:
            out[str(name)] = rec
    return out


def _as_list(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        sep = ";" if ";" in value else ","
        return [v.strip() for v in value.split(sep) if v.strip()]
    return [str(v) for v in value]


def _metadata_fields(rec: dict) -> dict:
    fields: dict[str, Any] = {}
    for key in _META_KEYS:
        if rec.get(key) not in (None, ""):
            fields[key] = _as_list(rec[key]) if key in ("tags", "labels") else str(rec[key])
    caption = rec.get("caption")
    if caption:
        fields["ref_caption"], fields["ref_caption_model"] = str(caption), "human"
    extra = {k: v for k, v in rec.items()
             if k not in _META_KEYS | {"caption", "file", "file_name", "filename", "path"}}
    if extra:
        fields["meta_json"] = json.dumps(extra, default=str, ensure_ascii=False)
    return fields


def local_inputs(folder: str, follow_symlinks: bool = True) -> tuple[list[dict], int]:
    """(input rows, number of non-audio files skipped) for every audio file under folder."""
    root = Path(folder).expanduser().absolute()   # workers on other nodes (or in other folders) open the URI
    if not root.is_dir():
        raise UserError(f"--input {folder}: not a folder")
    rows, skipped = [], 0
    meta_cache: dict[Path, dict[str, dict]] = {}
    for path in walk_files(root, follow_symlinks):
        if path.suffix.lower() not in AUDIO_EXTS:
            skipped += path.name not in ("metadata.csv", "metadata.jsonl") and not path.name.endswith(".json")
            continue
        rel = path.relative_to(root).as_posix()
        if path.parent not in meta_cache:
            meta_cache[path.parent] = _folder_metadata(path.parent)
        rec = dict(meta_cache[path.parent].get(path.name) or meta_cache[path.parent].get(rel) or {})
        sidecar = Path(str(path) + ".json")
        if sidecar.is_file():
            try:
                rec.update(json.loads(sidecar.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                pass
        rows.append(input_row(source="local", source_id=escape_name(rel), uri=file_uri(path),
                              **_metadata_fields(rec)))
    return rows, int(skipped)


@register("local")
def list_local(spec) -> tuple[list[dict], int]:
    return local_inputs(spec.source.input, spec.source.follow_symlinks)
