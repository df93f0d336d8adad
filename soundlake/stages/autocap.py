"""The autocap caption stage: an actor pool captions clips with a trained autocap folder.

The model loads once per actor (``setup``); each batch is decoded, cut to the model's window
and captioned in one beam-search call, with the clips' metadata (title, description, labels or
tags, and a ``video_caption`` from ``meta_json`` when a source has one) inside the tag tokens,
or with every field empty when ``caption.use_metadata`` is false. A clip whose audio cannot be
decoded gets no caption and a ``failures`` row (stage ``autocap``); the batch goes on.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from soundlake.core.audio import decode_mono
from soundlake.core.errors import UserError
from soundlake.stages.base import ModelStage, failure_row, failures_table
from soundlake.stages.caption import (
    CaptionerStage,
    add_captions,
    caption_tables,
    register_captioner,
)

DECODE_ERRORS = (RuntimeError, ValueError, TypeError, OSError)   # soundfile raises RuntimeError subclasses


def autocap_identity(path: str, use_metadata: bool) -> tuple[str, str, str]:
    """(model_id, model_hash, prompt_version) of a saved autocap folder, read on the driver."""
    from soundlake.core.fingerprints import weights_sha256
    from soundlake.models.captioners.autocap import META_FILE, WEIGHTS, prompt_version

    folder = Path(path)
    if not (folder / META_FILE).is_file():
        raise UserError(f"caption.autocap_model: {path} is not an autocap folder (no {META_FILE}); "
                        "train one with `soundlake train captioner` or convert GenAU's with `soundlake convert autocap`")
    weights = folder / json.loads((folder / META_FILE).read_text()).get("weights", WEIGHTS)
    return str(path), weights_sha256(weights), prompt_version(use_metadata)


def clip_meta(row: dict) -> dict:
    """The metadata fields autocap reads, from a flow or clips row."""
    extra = {}
    if row.get("meta_json"):
        try:
            extra = json.loads(row["meta_json"]) or {}
        except (TypeError, ValueError):
            extra = {}
    return {"title": row.get("title"), "description": row.get("description"), "labels": row.get("labels"),
            "tags": row.get("tags"), "video_caption": extra.get("video_caption") if isinstance(extra, dict) else None}


@register_captioner("autocap", rank=3)
class AutocapCaptionStage(ModelStage, CaptionerStage):
    name = "autocap"
    backfill_columns = ("clip_id", "source", "source_id", "flac", "title", "description", "labels", "tags",
                        "meta_json")

    def __init__(self, path: str, run_id: str, use_metadata: bool = True, num_beams: int | None = None,
                 batch_size: int = 16, num_gpus: float = 0.0, concurrency: int = 1):
        from soundlake.models.captioners.autocap import prompt_version

        super().__init__(path, run_id, batch_size=batch_size, num_gpus=num_gpus, concurrency=concurrency,
                         prompt_version=prompt_version(use_metadata))
        self.use_metadata, self.num_beams = use_metadata, num_beams

    @classmethod
    def from_spec(cls, spec, run_id: str) -> "AutocapCaptionStage":
        autocap_identity(spec.autocap_model, spec.use_metadata)   # a bad folder fails here, not in an actor
        return cls(spec.autocap_model, run_id, spec.use_metadata, spec.autocap_num_beams, spec.autocap_batch_size,
                   spec.autocap_num_gpus, spec.autocap_concurrency)

    def backfill_identity(self) -> tuple[str, str, str]:
        return autocap_identity(self.path, self.use_metadata)

    def setup(self) -> None:
        from soundlake.models.captioners.autocap import Autocap

        self.model = Autocap.load(self.path, device=self.device())

    def process(self, batch: pa.Table) -> pa.Table:
        cols = [c for c in ("clip_id", "status", "flac", "title", "description", "labels", "tags", "meta_json")
                if c in batch.column_names]
        rows = batch.select(cols).to_pylist()
        clips, metas, where = [], [], []
        errors: list = [None] * len(rows)
        for i, r in enumerate(rows):
            if r.get("status", "ok") != "ok" or not r.get("flac"):
                continue
            try:
                clips.append(decode_mono(r["flac"], self.model.sample_rate))
            except DECODE_ERRORS as e:
                errors[i] = f"cannot decode the stored FLAC: {str(e).splitlines()[0][:200]}"
                continue
            metas.append(clip_meta(r) if self.use_metadata else None)
            where.append(i)
        new: list[list[dict]] = [[] for _ in rows]
        for k in range(0, len(clips), self.batch_size):
            texts = self.model.caption(clips[k:k + self.batch_size], metas[k:k + self.batch_size], self.num_beams)
            for i, text in zip(where[k:k + self.batch_size], texts):
                if text:
                    new[i] = [{"captioner": "autocap", "model_id": self.model.model_id,
                               "model_hash": self.model.model_hash, "prompt_version": self.prompt_version,
                               "text": text}]
        batch = add_captions(batch, new)
        return batch.append_column("autocap_errors", pa.array(errors, pa.string()))

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        out = caption_tables(batch, self.run_id, captioner="autocap")
        now = datetime.now(timezone.utc)
        out.update(failures_table([failure_row(r, "autocap", self.run_id, "corrupt", r["autocap_errors"], now)
                                   for r in batch.select(["source", "source_id", "clip_id", "autocap_errors"]).to_pylist()
                                   if r["autocap_errors"]]))
        return out

