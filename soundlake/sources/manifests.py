"""AudioSet and VGGSound manifests in their official formats -> input rows.

AudioSet segment CSVs (``balanced_train_segments.csv``, ``eval_segments.csv``,
``unbalanced_train_segments.csv``)::

    # Segments csv created Sun Mar  5 10:54:31 2017
    # num_ytids=20371, num_segs=20371, num_unique_labels=527, num_positive_labels=51804
    # YTID, start_seconds, end_seconds, positive_labels
    --PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"

Label ids are named through ``ontology.json`` (the real one ships as
``soundlake/data/audioset_ontology.json``, the default).

VGGSound's ``vggsound.csv`` has no header; each line is ``YTID,start_seconds,label,split``
(labels with commas are quoted, e.g. ``"male speech, man speaking"``); segments are 10 s.

Identity: one video can hold several annotated segments, so
``source_id = f"{ytid}_{start_ms}"`` and clip ids are
``clip_id(source, source_id, start_s)`` with the *absolute* start in the video.
A line that cannot be parsed becomes an input with ``uri = "malformed://"`` and
``source_id = "<file>:L<line>"``; the download stage turns it into a ``malformed``
failure row, so inputs = clips + failures still holds and nothing crashes.
"""
from __future__ import annotations

import csv
import json
import math
from functools import lru_cache
from pathlib import Path

from soundlake.core.errors import UserError
from soundlake.sources.base import input_row, register

DEFAULT_ONTOLOGY = Path(__file__).resolve().parents[1] / "data" / "audioset_ontology.json"
YOUTUBE_URL = "https://www.youtube.com/watch?v={ytid}"
VGGSOUND_SECONDS = 10.0
MALFORMED = "malformed://"


@lru_cache(maxsize=4)
def load_ontology(path: str | None = None) -> dict[str, str]:
    """AudioSet label id -> display name."""
    p = Path(path).expanduser() if path else DEFAULT_ONTOLOGY
    try:
        entries = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"source.ontology {p}: cannot read the ontology ({e.__class__.__name__})") from None
    return {e["id"]: e["name"] for e in entries if "id" in e and "name" in e}


def _open_manifest(path: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"source.manifest {path}: no such file (give --manifest FILE)")
    return p.read_text(encoding="utf-8", errors="replace").splitlines()


def _valid_ytid(ytid: str) -> bool:
    return 0 < len(ytid) <= 64 and all(c.isalnum() or c in "-_" for c in ytid)


def _seconds(text: str) -> float:
    v = float(text)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"bad time {text!r}")
    return v


def malformed_row(source: str, manifest: str, lineno: int, line: str, why: str) -> dict:
    return input_row(source=source, source_id=f"{Path(manifest).name}:L{lineno}", uri=MALFORMED,
                     meta_json=json.dumps({"line": line[:300], "why": why, "manifest": Path(manifest).name}))


def _remote_row(source: str, ytid: str, start: float, end: float, url_template: str, **kw) -> dict:
    return input_row(source=source, source_id=f"{ytid}_{int(round(start * 1000))}",
                     uri=url_template.format(ytid=ytid), start_s=start, end_s=end,
                     url=YOUTUBE_URL.format(ytid=ytid), **kw)


def audioset_inputs(manifest: str, url_template: str, ontology: str | None = None) -> list[dict]:
    names = load_ontology(ontology)
    rows: list[dict] = []
    for lineno, line in enumerate(_open_manifest(manifest), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        # skipinitialspace: the official files put a space after each comma.
        fields = next(csv.reader([line], skipinitialspace=True))
        try:
            if len(fields) != 4:
                raise ValueError(f"expected 4 fields (YTID, start, end, labels), got {len(fields)}")
            ytid, start, end = fields[0].strip(), _seconds(fields[1]), _seconds(fields[2])
            if not _valid_ytid(ytid):
                raise ValueError(f"bad YouTube id {ytid!r}")
            if end <= start:
                raise ValueError(f"end {end} is not after start {start}")
            ids = [x.strip() for x in fields[3].split(",") if x.strip()]
            if not ids:
                raise ValueError("no labels")
        except ValueError as e:
            rows.append(malformed_row("audioset", manifest, lineno, line, str(e)))
            continue
        rows.append(_remote_row("audioset", ytid, start, end, url_template,
                                labels=[names.get(i, i) for i in ids],
                                meta_json=json.dumps({"ytid": ytid, "label_ids": ids})))
    return rows


def vggsound_inputs(manifest: str, url_template: str) -> list[dict]:
    rows: list[dict] = []
    for lineno, line in enumerate(_open_manifest(manifest), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = next(csv.reader([line]))
        try:
            if len(fields) != 4:
                raise ValueError(f"expected 4 fields (YTID, start, label, split), got {len(fields)}")
            ytid, start, label, split = fields[0].strip(), _seconds(fields[1]), fields[2].strip(), fields[3].strip()
            if not _valid_ytid(ytid):
                raise ValueError(f"bad YouTube id {ytid!r}")
            if not label:
                raise ValueError("empty label")
        except ValueError as e:
            rows.append(malformed_row("vggsound", manifest, lineno, line, str(e)))
            continue
        rows.append(_remote_row("vggsound", ytid, start, start + VGGSOUND_SECONDS, url_template, labels=[label],
                                meta_json=json.dumps({"ytid": ytid, "split": split})))
    return rows


def _manifest_of(spec) -> str:
    if not spec.source.manifest:
        raise UserError(f"source.manifest: the {spec.source.kind} source needs a segment CSV (--manifest FILE)")
    return spec.source.manifest


@register("audioset", fetch="youtube")
def list_audioset(spec) -> tuple[list[dict], int]:
    return audioset_inputs(_manifest_of(spec), spec.download.url_template, spec.source.ontology), 0


@register("vggsound", fetch="youtube")
def list_vggsound(spec) -> tuple[list[dict], int]:
    return vggsound_inputs(_manifest_of(spec), spec.download.url_template), 0
