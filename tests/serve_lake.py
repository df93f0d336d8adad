"""A small lake for the `soundlake serve` tests: synth clips with reference and template captions
(``make_synth_lake``), plus CLAP scores, tags, a failure and a run record written with the
lake's own writer, so every page has something to show."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from soundlake.catalog import schema
from soundlake.catalog.sql import fetchall
from soundlake.testing import make_synth_lake

CLAP = "clap-test"


def make_serve_lake(root: Path, n: int = 8):
    lake = make_synth_lake(root, n, template=True)
    now = datetime.now(timezone.utc)
    caps = fetchall(lake, "SELECT clip_id, captioner, model_id, text FROM captions ORDER BY clip_id, captioner")
    # The template caption scores higher on even clips, the reference one on odd clips.
    scores = [{"clip_id": c, "captioner": cap, "caption_model_id": m, "caption_text": t, "clap_model_id": CLAP,
               "clap_model_hash": "0" * 8, "score": (0.6 if (cap == "template") == (i // 2 % 2 == 0) else 0.3) + i / 1000,
               "run_id": "score-run", "created": now} for i, (c, cap, m, t) in enumerate(caps)]
    lake.write_part("scores", pa.Table.from_pylist(scores, schema=schema.SCORES), "score-run")
    labels = fetchall(lake, "SELECT clip_id, labels FROM clips ORDER BY clip_id")
    tags = [{"clip_id": c, "model_id": CLAP, "model_hash": "0" * 8, "label_set": "synth", "rank": r,
             "label": "tagged_" + lab, "prob": 0.9 - r / 10, "run_id": "score-run", "created": now}
            for c, labs in labels for r, lab in enumerate(labs)]
    lake.write_part("tags", pa.Table.from_pylist(tags, schema=schema.TAGS), "score-run")
    lake.write_part("failures", pa.Table.from_pylist([{
        "source": "synth", "source_id": "broken", "clip_id": None, "stage": "segment", "error": "corrupt",
        "permanent": True, "message": "could not decode", "attempt": 1, "run_id": "synth", "time": now}],
        schema=schema.FAILURES), "synth")
    lake.write_part("runs", pa.Table.from_pylist([{
        "run_id": "synth", "pipeline": "demo", "status": "finished", "config_json": "{}", "code_version": "test",
        "host": "test", "started": now, "ended": now, "counts_json": "{}", "parts": []}], schema=schema.RUNS), "synth")
    return lake
