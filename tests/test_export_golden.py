"""Pinned export bytes: the sha256 of every shard of a fixed synth export.

The lake is built from the synth source through the segment and template-caption stages
(no Ray, a fixed run id), then exported with two held-out splits and small shards. A
refactor that changes a single byte of any shard fails here. To re-pin after an
intended format change: ``SOUNDLAKE_UPDATE_GOLDEN=1 pytest tests/test_export_golden.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa

from soundlake.catalog import schema
from soundlake.catalog.lake import Lake
from soundlake.export.exporter import ExportArgs, run_export
from soundlake.sources.synth import synth_inputs
from soundlake.stages.base import FLOW
from soundlake.stages.caption import TemplateCaptionStage
from soundlake.stages.segment import SegmentSpec, SegmentStage, segment_tables

GOLDEN = Path(__file__).parent / "golden" / "export_shards.json"
RUN = "golden-run"


def build_synth_lake(root: Path) -> Lake:
    lake = Lake(str(root / "lake"))
    segment = SegmentStage(SegmentSpec(sample_rate=16000, window=2.0, loudness=False), RUN)
    rows = [r for inp in synth_inputs(24, seed=7, duration=2.0) for r in segment.segment_one(inp)]
    flow = pa.Table.from_pylist(rows, schema=FLOW)
    flow = TemplateCaptionStage(RUN).process(flow)
    tables = segment_tables(flow)
    captions = pa.concat_tables([tables["captions"], TemplateCaptionStage(RUN).tables(flow)["captions"]])
    # Fixed creation times: the export orders captions by policy, never by time, but the
    # lake should not differ between runs either.
    captions = captions.set_column(captions.schema.get_field_index("created"), "created",
                                   pa.array([0] * captions.num_rows, schema.TS))
    lake.write_part("clips", tables["clips"], RUN)
    lake.write_part("captions", captions, RUN)
    return lake


def shard_hashes(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_text())
    found = {sh["name"]: hashlib.sha256((out / sh["name"]).read_bytes()).hexdigest() for sh in manifest["shards"]}
    assert found == {sh["name"]: sh["sha256"] for sh in manifest["shards"]}
    return found


def test_export_bytes_are_pinned(tmp_path):
    lake = build_synth_lake(tmp_path)
    hashes = {}
    for caption in ("preferred", "all"):
        out = tmp_path / f"shards-{caption}"
        run_export(lake, ExportArgs(out=str(out), caption=caption, splits={"valid": 0.15, "test": 0.15},
                                    shard_size=None, shard_count=5))
        hashes[caption] = shard_hashes(out)
    if os.environ.get("SOUNDLAKE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    assert hashes == json.loads(GOLDEN.read_text())
