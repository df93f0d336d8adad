"""The stage contract.

A stage declares what it reads and writes and the resources it needs, sets itself
up once per worker (``setup``), and turns an Arrow batch into an Arrow batch. One
bad row never raises: it comes back with ``status='failed'``, an ``error`` class
and a ``message``. Rows that arrive failed pass through untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from soundlake.catalog.schema import CLIPS

# The rows that flow between stages: a clip (or a failed input) and its bookkeeping.
FLOW = pa.schema(list(CLIPS) + [
    ("status", pa.string()),           # ok | failed
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
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
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


def ok_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch["status"], "ok")) if batch.num_rows else batch


def failed_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch["status"], "failed")) if batch.num_rows else batch
