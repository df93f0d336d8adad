"""Evaluation sets in their official formats -> items (what a lake clip must not be).

Each item has an ``item_id`` and what identifies its recording: a YouTube id and time range
(AudioCaps, VGGSound) or a Freesound sound id (Clotho, ESC-50), and the ``file`` its audio has
in the set's audio folder (for content fingerprints and embeddings)::

    AudioCaps  test.csv                 audiocap_id,youtube_id,start_time,caption   (5 rows per clip)
    Clotho     clotho_captions_*.csv    file_name,caption_1,...,caption_5
               clotho_metadata_*.csv    file_name,keywords,sound_id,sound_link,start_end_samples,manufacturer,license
    ESC-50     meta/esc50.csv           filename,fold,target,category,esc10,src_file,take   (src_file: Freesound id)
    VGGSound   vggsound.csv             youtube_id,start_seconds,label,split   (no header; split=test kept)
    ids        one id a line: a YouTube id or URL, ``freesound:N`` or a Freesound URL, optionally
               ``,start[,end]`` seconds; ``#`` starts a comment

A Clotho captions file needs its metadata file (the Freesound ids): given as ``metadata``, or
found beside it under the official name (``clotho_captions_X.csv`` -> ``clotho_metadata_X.csv``).
Bad input is one :class:`UserError` line naming the file and line.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from pathlib import Path

from soundlake.catalog.identity import EVAL_SEGMENT_S, FREESOUND_URL_RE, YOUTUBE_URL_RE
from soundlake.core.errors import UserError

FORMATS = ("audiocaps", "clotho", "esc50", "vggsound", "ids")
_YTID = re.compile(r"[A-Za-z0-9_-]{11}")
_HEADERS = {  # first header field(s) -> format
    ("audiocap_id",): "audiocaps", ("file_name", "caption_1"): "clotho",
    ("file_name", "keywords"): "clotho", ("filename", "fold"): "esc50",
}


def read_text(path: str | Path, what: str = "--csv") -> str:
    """A CSV's text: UTF-8 (a BOM is dropped), else Latin-1 (older Clotho metadata files)."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def detect_format(text: str) -> str:
    """The format of a CSV from its first line (VGGSound and id lists have no header)."""
    first = next(csv.reader(io.StringIO(text.lstrip())), [])
    fields = tuple(f.strip().lower() for f in first)
    for head, fmt in _HEADERS.items():
        if fields[: len(head)] == head:
            return fmt
    if len(fields) == 4 and fields[3] in ("train", "test"):
        return "vggsound"
    return "ids"


def _item(item_id: str, youtube_id=None, start_s=None, end_s=None, freesound_id=None, file=None,
          captions=None) -> dict:
    return {"item_id": item_id, "youtube_id": youtube_id, "start_s": start_s, "end_s": end_s,
            "freesound_id": freesound_id, "file": file, "captions": captions or []}


def _seconds(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a time in seconds") from None
    if not math.isfinite(v) or v < 0:
        raise UserError(f"{where}: {text!r} is not a time in seconds")
    return v


def _ytid(text: str, where: str) -> str:
    text = text.strip()
    if not _YTID.fullmatch(text):
        raise UserError(f"{where}: {text!r} is not a YouTube id (11 characters A-Z a-z 0-9 - _)")
    return text


def _dict_rows(text: str, path: str, required: tuple[str, ...]):
    """(line number, row dict) of a CSV with a header holding ``required``."""
    reader = csv.DictReader(io.StringIO(text))
    names = [n.strip() for n in reader.fieldnames or []]
    missing = [r for r in required if r not in names]
    if missing:
        raise UserError(f"{path}: expected the columns {', '.join(required)}; missing {', '.join(missing)}")
    reader.fieldnames = names
    for row in reader:
        yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}


def _youtube_segment(ytid: str, start: float, end: float | None = None) -> str:
    return f"{ytid}_{int(round(start * 1000))}" + ("" if end is None else f"_{int(round(end * 1000))}")


def parse_audiocaps(text: str, path: str) -> list[dict]:
    """One item per (youtube_id, start_time), with its captions (AudioCaps has 5 per test clip)."""
    items: dict[str, dict] = {}
    for line, r in _dict_rows(text, path, ("audiocap_id", "youtube_id", "start_time", "caption")):
        where = f"{path}:{line}"
        ytid, start = _ytid(r["youtube_id"], where), _seconds(r["start_time"], where)
        key = _youtube_segment(ytid, start)
        item = items.setdefault(key, _item(key, ytid, start, start + EVAL_SEGMENT_S, file=ytid))
        if r["caption"]:
            item["captions"].append(r["caption"])
    return list(items.values())


def parse_clotho_metadata(text: str, path: str) -> dict[str, str]:
    """file_name -> Freesound id (``sound_id``, else the id in ``sound_link``)."""
    out = {}
    for line, r in _dict_rows(text, path, ("file_name", "sound_id")):
        sid = r["sound_id"] or (re.search(FREESOUND_URL_RE, r.get("sound_link", "")) or [None, ""])[1]
        sid = sid.split(".")[0]  # some exports write ids as floats
        if not sid.isdigit():
            raise UserError(f"{path}:{line}: sound_id {r['sound_id']!r} is not a Freesound id")
        out[r["file_name"]] = sid
    return out


def parse_clotho(text: str, path: str, metadata: str | None = None) -> list[dict]:
    """Clotho's captions file (with its metadata file), or the metadata file alone."""
    head = next(csv.reader(io.StringIO(text)), [])
    if "sound_id" in [h.strip() for h in head]:
        ids, captions = parse_clotho_metadata(text, path), {}
    else:
        meta = metadata or str(Path(path).with_name(Path(path).name.replace("captions", "metadata")))
        if meta == path or not Path(meta).expanduser().is_file():
            raise UserError(f"{path}: a Clotho captions file needs its metadata file (the Freesound ids): "
                            "give --metadata clotho_metadata_<split>.csv")
        ids = parse_clotho_metadata(read_text(meta, "--metadata"), meta)
        captions = {}
        for _, r in _dict_rows(text, path, ("file_name", "caption_1")):
            captions[r["file_name"]] = [v for k, v in sorted(r.items()) if k.startswith("caption_") and v]
        missing = sorted(set(captions) - set(ids))
        if missing:
            raise UserError(f"{meta}: no Freesound id for {len(missing)} files of {path}, e.g. {missing[0]!r}")
    names = captions or ids
    return [_item(name, freesound_id=ids[name], file=name, captions=captions.get(name)) for name in names]


def parse_esc50(text: str, path: str) -> list[dict]:
    items = []
    for line, r in _dict_rows(text, path, ("filename", "src_file")):
        if not r["src_file"].isdigit():
            raise UserError(f"{path}:{line}: src_file {r['src_file']!r} is not a Freesound id")
        items.append(_item(r["filename"], freesound_id=r["src_file"], file=r["filename"],
                           captions=[r["category"].replace("_", " ")] if r.get("category") else []))
    return items


def parse_vggsound(text: str, path: str, split: str = "test") -> list[dict]:
    """The ``split`` rows of vggsound.csv (no header: youtube_id,start_seconds,label,split)."""
    items: dict[str, dict] = {}
    for line, fields in enumerate(csv.reader(io.StringIO(text)), 1):
        if not fields or not "".join(fields).strip():
            continue
        where = f"{path}:{line}"
        if len(fields) != 4:
            raise UserError(f"{where}: expected 4 fields (youtube_id, start_seconds, label, split), got {len(fields)}")
        if fields[3].strip() != split:
            continue
        ytid, start = _ytid(fields[0], where), _seconds(fields[1], where)
        key = _youtube_segment(ytid, start)
        # Official file names: <ytid>_<start, 6 digits>.mp4
        items.setdefault(key, _item(key, ytid, start, start + EVAL_SEGMENT_S, file=f"{ytid}_{int(start):06d}",
                                    captions=[fields[2].strip()]))
    return list(items.values())


def parse_ids(text: str, path: str) -> list[dict]:
    """One id a line (see the module docstring)."""
    items: dict[str, dict] = {}
    for line, raw in enumerate(text.splitlines(), 1):
        body = raw.split("#", 1)[0].strip()
        if not body:
            continue
        where = f"{path}:{line}"
        fields = [f.strip() for f in next(csv.reader([body]))]
        ident = fields[0]
        start = _seconds(fields[1], where) if len(fields) > 1 and fields[1] else None
        end = _seconds(fields[2], where) if len(fields) > 2 and fields[2] else None
        fs = re.search(FREESOUND_URL_RE, ident)
        yt = re.search(YOUTUBE_URL_RE, ident)
        if ident.lower().startswith("freesound:") or fs or (ident.isdigit() and len(ident) != 11):
            sid = fs[1] if fs else ident.split(":", 1)[-1]
            if not sid.isdigit():
                raise UserError(f"{where}: {ident!r} is not a Freesound id")
            items.setdefault(f"freesound:{sid}", _item(f"freesound:{sid}", freesound_id=sid, file=sid))
            continue
        ytid = yt[1] if yt else _ytid(ident.removeprefix("youtube:"), where)
        if end is not None and start is not None and end <= start:
            raise UserError(f"{where}: end {end} is not after start {start}")
        key = ytid if start is None else _youtube_segment(ytid, start, end)
        items.setdefault(key, _item(key, ytid, start, end, file=ytid))
    return list(items.values())


def parse_eval_set(path: str, fmt: str | None = None, metadata: str | None = None) -> tuple[str, list[dict]]:
    """(format, items) of an evaluation set file; ``fmt`` None detects it from the header."""
    text = read_text(path)
    fmt = fmt or detect_format(text)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "clotho":
        items = parse_clotho(text, path, metadata)
    else:
        items = {"audiocaps": parse_audiocaps, "esc50": parse_esc50, "vggsound": parse_vggsound,
                 "ids": parse_ids}[fmt](text, path)
    if not items:
        raise UserError(f"{path}: no {fmt} items" + (" of split test" if fmt == "vggsound" else ""))
    return fmt, items
