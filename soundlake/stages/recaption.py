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
from soundlake.stages.base import Resources, Stage, failure_row, failures_table
from soundlake.stages.caption import _add_captions, caption_tables

LINT_TYPE = pa.list_(pa.struct([("text", pa.string()), ("rules", pa.string())]))


class _ModelStage(Stage):
    uses_actors = True

    def __init__(self, path: str, run_id: str, batch_size: int = 8, num_gpus: float = 0.0,
                 concurrency: int = 1, prompt_version: str | None = None):
        self.path, self.run_id, self.prompt_version = path, run_id, prompt_version
        self.batch_size, self.num_gpus, self.concurrency = batch_size, num_gpus, concurrency
        self.model = None

    def resources(self) -> Resources:
        return Resources(num_cpus=1, num_gpus=self.num_gpus, concurrency=self.concurrency,
                         batch_size=self.batch_size)

    def device(self) -> str:
        import torch

        return "cuda" if self.num_gpus and torch.cuda.is_available() else "cpu"


class QwenCaptionStage(_ModelStage):
    name = "qwen"

    def setup(self) -> None:
        from soundlake.models.captioners.qwen import QwenCaptioner

        self.model = QwenCaptioner(self.path, self.prompt_version, device=self.device())

    def process(self, batch: pa.Table) -> pa.Table:
        clips = [decode_mono(data, self.model.sample_rate) for data in batch["flac"].to_pylist()]
        texts = self.model.caption(clips)
        new = [[{"captioner": "qwen", "model_id": self.model.model_id, "model_hash": self.model.model_hash,
                 "prompt_version": self.model.prompt_version, "text": t}] if t else [] for t in texts]
        return _add_captions(batch, new)

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        return caption_tables(batch, self.run_id)


class RefineStage(_ModelStage):
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
        batch = _add_captions(batch, new)
        return batch.append_column("lint_failures", pa.array(failures, LINT_TYPE))

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        now = datetime.now(timezone.utc)
        return failures_table([failure_row(r, "refine", self.run_id, "lint", f"{f['rules']}: {f['text'][:300]}", now)
                               for r in batch.select(["source", "source_id", "clip_id", "lint_failures"]).to_pylist()
                               for f in r["lint_failures"] or []])
