"""One split function: exports and in-process model hold-outs draw from the same u range."""
from __future__ import annotations

import hashlib
import json
import tarfile

import pytest

from soundlake.catalog.training_pairs import load_pairs
from soundlake.core.splits import split_fraction, split_of
from soundlake.export.exporter import ExportArgs, run_export
from soundlake.testing import make_synth_lake


def test_u_is_sha256_of_the_clip_id():
    for cid in ("synth:0-1:0", "local:a/b.wav:2500", "audioset:abc_1000:1000"):
        digest = hashlib.sha256(cid.encode("utf-8")).digest()
        assert split_fraction(cid) == int.from_bytes(digest[:8], "big") / 2**64
    ids = [f"c{i}" for i in range(2000)]
    us = [split_fraction(c) for c in ids]
    assert all(0 <= u < 1 for u in us)
    # splits are filled upward from 0, in the order given
    splits = {"valid": 0.1, "test": 0.2}
    for c, u in zip(ids, us):
        assert split_of(c, splits) == ("valid" if u < 0.1 else "test" if u < 0.3 else "train")


@pytest.mark.parametrize("holdout", [0.1, 0.2, 0.5])
def test_model_holdout_and_export_splits_are_nested(tmp_path, holdout):
    lake = make_synth_lake(tmp_path, 24, template=True)
    out = tmp_path / "shards"
    run_export(lake, ExportArgs(out=str(out), caption="all", splits={"valid": 0.1, "test": 0.1},
                                shard_size=None, shard_count=100))
    manifest = json.loads((out / "manifest.json").read_text())
    held_out_of_export: set[str] = set()
    train_of_export: set[str] = set()

    for sh in manifest["shards"]:
        with tarfile.open(out / sh["name"]) as tar:
            ids = {json.loads(tar.extractfile(m).read())["clip_id"] for m in tar.getmembers()
                   if m.name.endswith(".json")}
        (train_of_export if sh["split"] == "train" else held_out_of_export).update(ids)
    train, held = load_pairs(lake, 16000, captioner="reference", holdout=holdout)
    model_held = {cid for cid, _, _ in held}
    model_train = {cid for cid, _, _ in train}
    assert model_held and model_train
    if holdout <= 0.2:
        # every clip the model validates on is outside the export's train split
        assert model_held <= held_out_of_export
        assert not model_held & train_of_export
    if holdout >= 0.2:
        # every clip of the export's held-out splits is outside the model's training data
        assert held_out_of_export <= model_held
        assert not held_out_of_export & model_train
