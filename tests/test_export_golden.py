"""Pinned export bytes: the sha256 of every shard of a fixed synth export.

The lake is built from the synth source through the segment and template-caption stages
(no Ray, a fixed run id: :func:`soundlake.testing.make_synth_lake`), then exported with two
held-out splits and small shards. A refactor that changes a single byte of any shard fails here. To re-pin after an
intended format change: ``SOUNDLAKE_UPDATE_GOLDEN=1 pytest tests/test_export_golden.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from soundlake.catalog.lake import Lake
from soundlake.export.exporter import ExportArgs, run_export
from soundlake.testing import make_synth_lake

GOLDEN = Path(__file__).parent / "golden" / "export_shards.json"


def build_synth_lake(root: Path) -> Lake:
    return make_synth_lake(root, 24, seconds=2.0, sr=16000, seed=7, run="golden-run", template=True)


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
