"""Recaption stages: Qwen2-Audio captions, then LLM refinement with lint (actor pools).

The Qwen stage appends its caption to the flow's ``new_captions`` and writes every new
caption of the batch; the refine stage appends the rewritten caption when it passes
:func:`~soundlake.models.captioners.qwen.lint`, and otherwise records a ``lint`` failure
(clip, rules broken, text) instead of a caption.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from soundlake.core.audio import decode_mono
from soundlake.stages.base import ModelStage, failure_row, failures_table
from soundlake.stages.caption import (
    CaptionerStage,
    add_captions,
    caption_tables,
    register_captioner,
)

LINT_TYPE = pa.list_(pa.struct([("text", pa.string()), ("rules", pa.string())]))


@register_captioner("qwen", rank=2)
class QwenCaptionStage(ModelStage, CaptionerStage):
    name = "qwen"

    def setup(self) -> None:
        from soundlake.models.captioners.qwen import QwenCaptioner

        self.model = QwenCaptioner(self.path, self.prompt_version, device=self.device())

    def process(self, batch: pa.Table) -> pa.Table:
        clips = [decode_mono(data, self.model.sample_rate) for data in batch["flac"].to_pylist()]
        texts = self.model.caption(clips)
        new = [[{"captioner": "qwen", "model_id": self.model.model_id, "model_hash": self.model.model_hash,
                 "prompt_version": self.model.prompt_version, "text": t}] if t else [] for t in texts]
        return add_captions(batch, new)

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        return caption_tables(batch, self.run_id)


@register_captioner("refine", rank=1)
class RefineStage(ModelStage, CaptionerStage):
    name = "refine"

    def setup(self) -> None:
        from soundlake.models.captioners.qwen import Refiner

        self.model = Refiner(self.path, self.prompt_version or "refine-v1", device=self.device())

    def process(self, batch: pa.Table) -> pa.Table:
        from soundlake.models.captioners.qwen import lint

        rows = batch.select(["new_captions", "title", "tags", "labels"]).to_pylist()
        items, where = [], []
        for i, r in enumerate(rows):
            raw = [c for c in r["new_captions"] or [] if c["captioner"] == "qwen"]
            if raw:
                items.append({"caption": raw[-1]["text"], "title": r["title"], "tags": r["tags"],
                              "labels": r["labels"]})
                where.append(i)
        new: list[list[dict]] = [[] for _ in rows]
        failures: list = [None] * len(rows)
        for i, text in zip(where, self.model.refine(items)):
            broken = lint(text)
            if broken:
                failures[i] = [{"text": text, "rules": ",".join(broken)}]
            else:
                new[i] = [{"captioner": "refine", "model_id": self.model.model_id, "model_hash": self.model.model_hash,
                           "prompt_version": self.model.prompt_version, "text": text}]
        batch = add_captions(batch, new)
        return batch.append_column("lint_failures", pa.array(failures, LINT_TYPE))

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        now = datetime.now(timezone.utc)
        return failures_table([failure_row(r, "refine", self.run_id, "lint", f"{f['rules']}: {f['text'][:300]}", now)
                               for r in batch.select(["source", "source_id", "clip_id", "lint_failures"]).to_pylist()
                               for f in r["lint_failures"] or []])
