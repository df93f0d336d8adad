"""Caption stage and the captioner registry; captions are never overwritten.

Captions travel in the flow as ``new_captions`` (captioner, model id, hash, prompt
version, text) so that the score stage can score them before the write step puts
them into ``captions``. Model captioners (autocap, qwen, refine) plug in as actor
stages; ``template`` needs no model and runs as a task.

A new captioner is one stage class decorated with ``@register_captioner(name, rank)``
in a module imported by ``soundlake/stages/__init__.py``. Its rank places its captions
in the preference order of the catalog's ``dataset`` view and of exports
(:func:`captioner_ranking`, handed to the catalog as data). A captioner that runs in
``curate`` (named in ``caption.captioners``) also has ``from_spec(caption_spec, run_id)``;
one that captions clips already in the lake (a model captioner) returns its
``backfill_identity()``, and the runner captions every clip without that caption.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from soundlake.catalog.schema import CAPTIONS
from soundlake.core.config import Section
from soundlake.models.captioners.template import (
    PROMPT_VERSION,
    filename_caption,
    template_caption,
)
from soundlake.stages.base import Stage


@dataclass(frozen=True)
class Captioner:
    name: str
    rank: int                          # lower: preferred in the dataset view and in exports
    stage: type[Stage] | None = None   # None: captions that come with the source


# "reference" captions come with the source (synth scenes, human captions in local metadata).
CAPTIONERS: dict[str, Captioner] = {"reference": Captioner("reference", 0)}


def register_captioner(name: str, rank: int):
    """Class decorator: the stage writes captions with ``captioner = name``, ranked ``rank``."""
    def add(cls):
        CAPTIONERS[name] = Captioner(name, rank, cls)
        cls.captioner = name
        return cls
    return add


class CaptionerStage(Stage):
    """A stage that writes captions (see the module docstring)."""
    captioner: ClassVar[str] = ""
    backfill_columns: ClassVar[tuple[str, ...]] = ()   # clip columns it reads when captioning lake clips

    @classmethod
    def from_spec(cls, spec: "CaptionSpec", run_id: str) -> "CaptionerStage":
        raise NotImplementedError(f"the {cls.captioner} captioner does not run in curate")

    def backfill_identity(self) -> tuple[str, str, str] | None:
        """(model_id, model_hash, prompt_version) of the captions it writes, or None: no backfill."""
        return None


def captioner_ranking() -> tuple[str, ...]:
    """Captioner names, most preferred first (every module of ``soundlake.stages`` has registered)."""
    return tuple(sorted(CAPTIONERS, key=lambda n: (CAPTIONERS[n].rank, n)))


NEW_CAPTION = pa.struct([("captioner", pa.string()), ("model_id", pa.string()), ("model_hash", pa.string()),
                         ("prompt_version", pa.string()), ("text", pa.string())])



class CaptionSpec(Section):
    captioners: list[Literal["template", "filename", "autocap"]] = Field(
        ["template"], description="captioners run by the caption stage (filename: the file name's words, for "
                                  "clips with no metadata at all)")
    use_metadata: bool = Field(True, description="template: titles and tags too, not only labels; autocap: "
                                                 "metadata fields in its tags (false: every field left empty)")
    autocap_model: str | None = Field(None, description="autocap: a folder saved by `soundlake train captioner`")
    autocap_batch_size: int = Field(16, ge=1, description="autocap: clips per beam-search call")
    autocap_num_beams: int | None = Field(None, ge=1, description="autocap: beams (default: the model's)")
    autocap_num_gpus: float = Field(0.0, ge=0, description="autocap: GPUs per actor")
    autocap_concurrency: int = Field(1, ge=1, description="autocap: actors in the pool")

    @model_validator(mode="after")
    def _check_autocap(self):
        if "autocap" in self.captioners and not self.autocap_model:
            raise ValueError("caption.autocap_model: the autocap captioner needs a model folder "
                             "(train one with `soundlake train captioner`)")
        return self


@register_captioner("filename", rank=5)
class FilenameCaptionStage(CaptionerStage):
    """Captions from file names, for clips with no reference caption, labels, title or tags."""
    name = "filename"

    def __init__(self, run_id: str):
        self.run_id = run_id

    @classmethod
    def from_spec(cls, spec: CaptionSpec, run_id: str) -> "FilenameCaptionStage":
        return cls(run_id)

    def process(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.select(["source_id", "status", "ref_caption", "labels", "title", "tags"]).to_pylist():
            bare = row["status"] == "ok" and not (row["ref_caption"] or row["labels"] or row["title"] or row["tags"])
            text = filename_caption(row["source_id"] or "") if bare else None
            out.append([{"captioner": "filename", "model_id": "filename", "model_hash": None,
                         "prompt_version": "filename-v1", "text": text}] if text else [])
        return add_captions(batch, out)

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        return caption_tables(batch, self.run_id, captioner="filename")


@register_captioner("template", rank=4)
class TemplateCaptionStage(CaptionerStage):
    name = "caption"

    def __init__(self, run_id: str, use_metadata: bool = True):
        self.run_id, self.use_metadata = run_id, use_metadata

    @classmethod
    def from_spec(cls, spec: CaptionSpec, run_id: str) -> "TemplateCaptionStage":
        return cls(run_id, spec.use_metadata)

    def process(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.select(["clip_id", "status", "labels", "title", "tags"]).to_pylist():
            text = template_caption(row["clip_id"] or "", row["labels"], row["title"], row["tags"],
                                    self.use_metadata) if row["status"] == "ok" else None
            out.append([{"captioner": "template", "model_id": "template", "model_hash": None,
                         "prompt_version": PROMPT_VERSION, "text": text}] if text else [])
        return add_captions(batch, out)

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        return caption_tables(batch, self.run_id, captioner="template")


def add_captions(batch: pa.Table, new: list[list[dict]]) -> pa.Table:
    """Append to (or create) the flow's new_captions column."""
    if "new_captions" in batch.column_names:
        old = batch["new_captions"].to_pylist()
        merged = [(o or []) + n for o, n in zip(old, new)]
        i = batch.column_names.index("new_captions")
        return batch.set_column(i, "new_captions", pa.array(merged, pa.list_(NEW_CAPTION)))
    return batch.append_column("new_captions", pa.array(new, pa.list_(NEW_CAPTION)))


def caption_tables(batch: pa.Table, run_id: str, captioner: str | None = None) -> dict[str, pa.Table]:
    """captions rows from the flow's new_captions (only ``captioner``'s when given: each stage writes its own)."""
    if "new_captions" not in batch.column_names:
        return {}
    ok = batch.filter(pc.equal(batch["status"], "ok"))
    now = datetime.now(timezone.utc)
    rows = [{"clip_id": r["clip_id"], **c, "run_id": run_id, "created": now}
            for r in ok.select(["clip_id", "new_captions"]).to_pylist() for c in r["new_captions"] or []
            if captioner is None or c["captioner"] == captioner]
    return {"captions": pa.Table.from_pylist(rows, schema=CAPTIONS)} if rows else {}
