"""Sources: the registry of source kinds, the input row and the ``source`` config section.

A source lists a job's inputs as small rows (identity, location, metadata) on the
driver, touching no audio. Every input row has the fields of :data:`INPUT_FIELDS`;
``source_id`` is the stable identity that resume and the accounting (inputs = distinct
source_ids in clips ∪ failures) rely on.

A new source is one module in this folder: a function ``(pipeline spec) -> (rows,
non-audio files skipped)`` decorated with ``@register("kind")``, and its module named in
``soundlake/sources/__init__.py``. Remote sources also say how their media is fetched
(``fetch="youtube"`` through yt-dlp, or ``"http"``); the download stage does the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import Field, field_validator

from soundlake.catalog.schema import INPUT_SCHEMA
from soundlake.core.config import Section
from soundlake.core.errors import UserError

INPUT_FIELDS = INPUT_SCHEMA.names


def input_row(**kw: Any) -> dict:
    row = {k: None for k in INPUT_FIELDS}
    row["attempt"] = 1
    row.update(kw)
    return row


@dataclass(frozen=True)
class Source:
    kind: str
    list_inputs: Callable[[Any], tuple[list[dict], int]]
    fetch: Literal["youtube", "http"] | None = None   # remote media; None: the uri is a local file or synth://


SOURCES: dict[str, Source] = {}


def register(kind: str, fetch: Literal["youtube", "http"] | None = None):
    """Decorator: ``lister(spec) -> (rows, skipped)`` becomes the source ``kind``."""
    def add(fn):
        SOURCES[kind] = Source(kind, fn, fetch)
        return fn
    return add


def get_source(kind: str) -> Source:
    if kind not in SOURCES:
        raise UserError(f"source.kind={kind!r} is not available: expected one of {', '.join(sorted(SOURCES))}")
    return SOURCES[kind]


class SourceSpec(Section):
    kind: str = Field("synth", description="a registered source: synth, local, audioset, vggsound, freesound")
    input: str | None = Field(None, description="local: folder scanned recursively")
    count: int = Field(200, ge=1, description="synth: number of scenes")
    seed: int = Field(0, description="synth: corpus seed")
    duration: float = Field(10.0, gt=0, description="synth: scene length in seconds")
    speech: bool = Field(False, description="synth: allow espeak-ng speech events")
    limit: int | None = Field(None, ge=1, description="process at most this many inputs")
    follow_symlinks: bool = True
    manifest: str | None = Field(None, description="audioset/vggsound: segment CSV (local path)")
    ontology: str | None = Field(None, description="audioset: ontology.json (default: the bundled one)")

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in SOURCES:
            raise ValueError(f"source.kind: {kind!r} is not a source; expected one of {', '.join(sorted(SOURCES))}")
        return kind
