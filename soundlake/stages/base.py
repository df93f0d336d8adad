"""The stage contract.

A stage declares the resources it needs, sets itself up once per worker (``setup``),
and turns an Arrow batch into an Arrow batch (``process``); ``tables`` says which catalog
rows its output adds. One bad row never raises: it comes back as a failed flow row
(:func:`flow_failure`) or adds a ``failures`` row (:func:`failure_row`), with a classified
``error`` and a one-line ``message``. Rows that arrive failed pass through untouched.
A genuine bug (anything that is not a :class:`~soundlake.core.errors.RowError`) still fails loudly.

A new stage is a module in this folder with a :class:`Stage` subclass; the runner
(:mod:`soundlake.pipelines.runner`) places it in the dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import ClassVar

import pyarrow as pa

from soundlake.catalog.schema import CLIPS, FAILURES
from soundlake.core.errors import ERROR_CLASSES, SKIP_REASONS

# The rows that flow between stages: a clip (or a failed input) and its bookkeeping.
FLOW = pa.schema(list(CLIPS) + [
    ("status", pa.string()),           # ok | failed | skipped
    ("stage", pa.string()),            # the stage that failed the row
    ("error", pa.string()),
    ("message", pa.string()),
    ("attempt", pa.int32()),
    ("ref_caption", pa.string()),
    ("ref_caption_model", pa.string()),
])


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int | None = None     # actor pool size (model stages)
    batch_size: int | None = None      # rows per call; None = whole block


class Stage:
    name: ClassVar[str] = "stage"
    uses_actors: ClassVar[bool] = False   # model stages: one actor keeps the model loaded

    def resources(self) -> Resources:
        return Resources()

    def setup(self) -> None:
        """Load models and open clients here: once per worker, not per batch."""

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        """Rows this stage adds to catalog tables, from its output batch (ok rows)."""
        return {}


class ModelStage(Stage):
    """A stage backed by a model folder: an actor pool, the model loaded once per actor in ``setup``.
    (Captioners among them also derive from :class:`~soundlake.stages.caption.CaptionerStage`.)"""

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


def flow_failure(row: dict, stage: str, run_id: str, error: str, message: str) -> dict:
    """An input that yields no clip, as a flow row: failed (a ``failures`` row at write), or
    skipped when ``error`` is a policy decision (a ``skipped`` row: see SKIP_REASONS)."""
    base = {k: row.get(k) for k in ("source", "source_id", "title", "url", "attempt")}
    return {**base, "run_id": run_id, "status": "skipped" if error in SKIP_REASONS else "failed", "stage": stage,
            "error": error, "message": message, "created": datetime.now(timezone.utc)}


def failure_row(row: dict, stage: str, run_id: str, error: str, message: str,
                time: datetime | None = None) -> dict:
    """A ``failures`` row for one clip that a stage could not process (its clip stays)."""
    return {"source": row["source"], "source_id": row["source_id"], "clip_id": row["clip_id"], "stage": stage,
            "error": error, "permanent": ERROR_CLASSES[error], "message": message, "attempt": 1,
            "run_id": run_id, "time": time or datetime.now(timezone.utc)}


def failures_table(rows: list[dict]) -> dict[str, pa.Table]:
    """``{"failures": table}`` for :meth:`Stage.tables`, or nothing when there are none."""
    return {"failures": pa.Table.from_pylist(rows, schema=FAILURES)} if rows else {}
