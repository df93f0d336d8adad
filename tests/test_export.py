"""Export: selection policies, shards, determinism, resume after SIGKILL, provenance, S3."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from soundlake.catalog import schema
from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import connect
from soundlake.core.errors import UserError
from soundlake.core.splits import split_of
from soundlake.export import shards
from soundlake.export.exporter import (
    ExportArgs,
    parse_size,
    parse_splits,
    run_export,
)
from soundlake.sources.base import input_row
from soundlake.stages.base import FLOW
from soundlake.stages.segment import SegmentSpec, SegmentStage, segment_tables
from soundlake.testing import tone_mix, write_audio

SR = 16000


def build_lake(root: Path, ids: range, lake: Lake | None = None, run: str = "r1") -> Lake:
    """Clips from real 1 s FLAC files through the segment stage, written straight to the lake
    (no Ray): every third clip is CC-BY-NC, every clip has a reference caption and the
    even ones a template caption too."""
    lake = lake or Lake(str(root / "lake"))
    stage = SegmentStage(SegmentSpec(sample_rate=SR, window=1.0, loudness=False), run)
    rows = []
    for i in ids:
        path = write_audio(root / "files" / f"f{i:04d}.flac", tone_mix(1.0, SR, i), SR)
        rows += stage.segment_one(input_row(
            source="local", source_id=f"id{i:04d}", uri=str(path), license="CC-BY-NC" if i % 3 == 0 else "CC0",
            ref_caption=f"a tone number {i}", ref_caption_model="gt"))
    tables = segment_tables(pa.Table.from_pylist(rows, schema=FLOW))
    lake.write_part("clips", tables["clips"], run)
    caps = tables["captions"].to_pylist()
    caps += [{**c, "captioner": "template", "model_id": "tpl", "text": f"template {c['clip_id']}"}
             for c in caps if int(c["clip_id"].split(":")[1][2:]) % 2 == 0]
    lake.write_part("captions", pa.Table.from_pylist(caps, schema=schema.CAPTIONS), run)
    return lake


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Lake:
    return build_lake(tmp_path_factory.mktemp("lake"), range(30))


def read_tar(path) -> list[dict]:
    with open(path, "rb") as f:
        return list(shards.iter_samples(f, str(path)))


def read_export(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for sh in manifest["shards"]:
        for s in read_tar(out / sh["name"]):
            meta = json.loads(s["json"])
            samples[meta["clip_id"]] = {**s, "meta": meta, "shard": sh["name"]}
    return samples


def lake_audio(lake: Lake) -> dict[str, bytes]:
    t = lake.read("clips", ["clip_id", "flac"])
    return dict(zip(t["clip_id"].to_pylist(), t["flac"].to_pylist()))


def test_round_trip_bytes_captions_and_layout(lake, tmp_path):
    r = run_export(lake, ExportArgs(out=str(tmp_path / "v1"), shard_size=None, shard_count=4))
    assert r.clips == 30 and r.shards == 8 and r.written == 8
    audio = lake_audio(lake)
    got = read_export(tmp_path / "v1")
    assert set(got) == set(audio)
    for cid, s in got.items():
        assert s["flac"] == audio[cid]                       # byte-identical FLAC
        assert s["__key__"] == shards.tar_key(cid) and "." not in s["__key__"] and ":" not in s["__key__"]
        assert s["meta"]["caption"] == f"a tone number {int(cid.split(':')[1][2:])}"  # reference beats template
        assert s["meta"]["sample_rate"] == SR and s["meta"]["license"] in ("CC0", "CC-BY-NC")
    # shards named by split and index, clips in clip_id order, each key's members contiguous
    names = sorted(p.name for p in (tmp_path / "v1").glob("*.tar"))
    assert names == [f"train-{i:06d}.tar" for i in range(8)]
    order = [json.loads(s["json"])["clip_id"] for n in names for s in read_tar(tmp_path / "v1" / n)]
    assert order == sorted(audio)
    with tarfile.open(tmp_path / "v1" / names[0]) as tar:
        members = tar.getmembers()
        assert [m.name.split(".")[0] for m in members][::2] == [m.name.split(".")[0] for m in members][1::2]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o644 for m in members)


def test_policies_where_license_and_all_captions(lake, tmp_path):
    r = run_export(lake, ExportArgs(out=str(tmp_path / "a"), where="start_s = 0 AND source_id < 'id0020'",
                                    licenses=["CC0", "CC-BY"], caption="all", shard_count=100, shard_size=None))
    got = read_export(tmp_path / "a")
    want = {f"local:id{i:04d}:0" for i in range(20) if i % 3}
    assert set(got) == want and r.clips == len(want)
    for cid, s in got.items():
        i = int(cid.split(":")[1][2:])
        assert len(s["meta"]["captions"]) == (2 if i % 2 == 0 else 1)
        assert s["meta"]["captions"][0].startswith("a tone")
    run_export(lake, ExportArgs(out=str(tmp_path / "t"), caption="template", shard_count=100, shard_size=None))
    got = read_export(tmp_path / "t")
    assert len(got) == 15 and all(s["meta"]["captions"] == [f"template {c}"] for c, s in got.items())
    with pytest.raises(UserError, match="SQL error"):
        run_export(lake, ExportArgs(out=str(tmp_path / "bad"), where="no_such_column = 1"))


def test_exclusion_lists(lake, tmp_path):
    excl = tmp_path / "audiocaps_test.txt"
    excl.write_text("# AudioCaps test ids\nid0001\n\nlocal:id0002:0   # a clip id\nlocal:id0003\n")
    r = run_export(lake, ExportArgs(out=str(tmp_path / "x"), exclude=[str(excl)], shard_count=100, shard_size=None))
    got = read_export(tmp_path / "x")
    assert not {"local:id0001:0", "local:id0002:0", "local:id0003:0"} & set(got)
    assert len(got) == 27 and r.dropped["excluded"] == 3
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["query"]["exclude"][0]["ids"] == 3


def test_determinism_and_shard_size(lake, tmp_path):
    args = dict(shard_size=parse_size("100KB"), splits={"valid": 0.2})
    a = run_export(lake, ExportArgs(out=str(tmp_path / "a"), **args))
    b = run_export(lake, ExportArgs(out=str(tmp_path / "b"), **args))
    assert b.shards == a.shards
    ma, mb = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert [(s["name"], s["sha256"]) for s in ma["shards"]] == [(s["name"], s["sha256"]) for s in mb["shards"]]
    for s in ma["shards"]:
        assert (tmp_path / "a" / s["name"]).read_bytes() == (tmp_path / "b" / s["name"]).read_bytes()
        assert hashlib.sha256((tmp_path / "a" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert a.shards > 2 and {s["split"] for s in ma["shards"]} == {"train", "valid"}
    # no shard but the last of a split goes over the size
    assert all(s["bytes"] <= 100 * 1024 + 10240 for s in ma["shards"])


def test_split_stability_when_catalog_grows(tmp_path):
    lake = build_lake(tmp_path, range(40))
    splits = parse_splits("valid=0.15,test=0.15")
    run_export(lake, ExportArgs(out=str(tmp_path / "v1"), splits=splits, shard_count=100, shard_size=None))
    build_lake(tmp_path, range(40, 80), lake=lake, run="r2")
    run_export(lake, ExportArgs(out=str(tmp_path / "v2"), splits=splits, shard_count=100, shard_size=None))
    v1 = {c: s["meta"]["split"] for c, s in read_export(tmp_path / "v1").items()}
    v2 = {c: s["meta"]["split"] for c, s in read_export(tmp_path / "v2").items()}
    assert len(v1) == 40 and len(v2) == 80
    assert all(v2[c] == v1[c] for c in v1)
    assert {"train", "valid", "test"} <= set(v2.values())
    assert all(split_of(c, splits) == s for c, s in v2.items())


def test_provenance_recorded_once(lake, tmp_path):
    args = ExportArgs(out=str(tmp_path / "p"), name="prov-v1", splits={"valid": 0.2}, shard_count=7, shard_size=None)
    r1 = run_export(lake, args)
    r2 = run_export(lake, args)
    assert r1.recorded and not r2.recorded and r2.written == 0 and r2.kept == r1.shards
    con = connect(lake)
    rows = con.execute("SELECT export_id, name, clips, shards, manifest_sha256, catalog_sha256 FROM exports "
                       "WHERE name = 'prov-v1'").fetchall()
    assert len(rows) == 1 and rows[0][2] == 30 and rows[0][3] == r1.shards
    members = con.execute("SELECT clip_id, split, shard FROM export_members WHERE export_id = ? ORDER BY clip_id",
                          [r1.export_id]).fetchall()
    exported = read_export(tmp_path / "p")
    assert [(c, exported[c]["meta"]["split"], exported[c]["shard"]) for c in sorted(exported)] == members
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["catalog"]["sha256"] == rows[0][5]
    assert manifest["catalog"]["parts"]["clips"] == sorted(
        p[len(lake.root) + 1:] for p in lake.parts("clips"))
    # another export into the same folder is refused, not mixed in
    with pytest.raises(UserError, match="holds another export"):
        run_export(lake, ExportArgs(out=str(tmp_path / "p"), shard_count=3, shard_size=None))


def test_min_score_needs_scores_table(lake, tmp_path):
    with pytest.raises(UserError, match="needs CLAP scores") as e:
        run_export(lake, ExportArgs(out=str(tmp_path / "s"), min_score=0.4))
    assert "\n" not in str(e.value)


def _copy(lake: Lake, tmp_path) -> Lake:
    """A copy of the module's lake (its logs list parts by relative path), to change freely."""
    copy = Lake(str(tmp_path / "lake-copy"))
    shutil.copytree(lake.root, copy.root)
    return copy


def test_min_score_joins_scores_when_present(lake, tmp_path):
    """Scores as the score stage writes them: per (clip, caption text, CLAP model)."""
    from soundlake.stages.clap import SCORES as scores

    lake = _copy(lake, tmp_path)                                   # the module's lake stays unscored
    caps = lake.read("captions", ["clip_id", "captioner", "text"]).to_pylist()
    rows = []
    for c in caps:
        i = int(c["clip_id"].split(":")[1][2:])
        good = 0.9 if c["captioner"] == "template" or i < 10 else 0.1
        rows.append({"clip_id": c["clip_id"], "captioner": c["captioner"], "caption_text": c["text"],
                     "clap_model_id": "clap-a", "score": good,
                     "created": datetime.now(timezone.utc)})
        rows.append({**rows[-1], "clap_model_id": "clap-b", "score": 1.0 - good,
                     "created": datetime(2030, 1, 1, tzinfo=timezone.utc)})   # the newest model
    lake.write_part("scores", pa.Table.from_pylist(rows, schema=scores), "s1")
    with pytest.raises(UserError, match="--score-model"):
        run_export(lake, ExportArgs(out=str(tmp_path / "n"), min_score=0.4))
    run_export(lake, ExportArgs(out=str(tmp_path / "m"), min_score=0.4, score_model="clap-a",
                                shard_count=100, shard_size=None))
    got = read_export(tmp_path / "m")
    # preferred under clap-a: its best caption (ties by captioner priority), kept if >= 0.4;
    # clap-b, the newest model, would pick the other caption: it plays no part.
    assert set(got) == {f"local:id{i:04d}:0" for i in range(30) if i < 10 or i % 2 == 0}
    for cid, s in got.items():
        i = int(cid[8:12])
        assert s["meta"]["captions"] == [f"a tone number {i}" if i < 10 else f"template {cid}"]
        assert s["meta"]["scores"] == [{"text": s["meta"]["caption"], "model_id": "clap-a",
                                        "score": pytest.approx(0.9)}]
    run_export(lake, ExportArgs(out=str(tmp_path / "all"), caption="all", min_score=0.4, score_model="clap-a",
                                shard_count=100, shard_size=None))
    got = read_export(tmp_path / "all")
    # reference captions of clips >= 10 fail, their template captions pass
    assert set(got) == {f"local:id{i:04d}:0" for i in range(30) if i < 10 or i % 2 == 0}
    assert all(s["meta"]["captions"] == [f"template {c}"] for c, s in got.items() if int(c[8:12]) >= 10)
    assert all(len(s["meta"]["captions"]) == 2 for c, s in got.items() if int(c[8:12]) < 10 and int(c[8:12]) % 2 == 0)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "soundlake.cli", "export", *args]


def test_sigkill_then_resume_rewrites_no_finished_shard(tmp_path):
    lake = build_lake(tmp_path, range(100))
    args = ["--lake", lake.uri, "--shard-count", "1", "--split", "valid=0.1", "-q"]
    out = tmp_path / "killed"
    manifest = out / "manifest.json"
    for _attempt in range(5):  # a busy machine may let the export finish between two polls: try again
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(_cli(*args, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(json.loads(manifest.read_text())["shards"]) >= 5:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
    else:
        pytest.fail("the export finished before it could be killed, five times")
    before = json.loads(manifest.read_text())
    assert before["status"] == "incomplete" and 5 <= len(before["shards"]) < 100
    finished = {s["name"]: os.stat(out / s["name"]) for s in before["shards"]}
    subprocess.run(_cli(*args, "--out", str(out)), check=True, capture_output=True, timeout=120)
    for name, st in finished.items():
        now = os.stat(out / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{name} was rewritten"
    run_export(lake, ExportArgs(out=str(tmp_path / "clean"), shard_size=None, shard_count=1,
                                splits={"valid": 0.1}))   # the same export, uninterrupted
    after = json.loads(manifest.read_text())
    clean = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert after["status"] == "complete" and len(after["shards"]) == 100
    assert [(s["name"], s["sha256"]) for s in after["shards"]] == [(s["name"], s["sha256"]) for s in clean["shards"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    # the catalog got exactly one record of this export
    n = connect(lake).execute("SELECT count(*) FROM export_members WHERE shard LIKE 'valid-%'").fetchall()[0][0]
    assert n == 2 * sum(1 for s in clean["shards"] if s["split"] == "valid")


def test_corrupted_finished_shard_is_rewritten(lake, tmp_path):
    args = ExportArgs(out=str(tmp_path / "c"), shard_count=10, shard_size=None)
    run_export(lake, args)
    victim = tmp_path / "c" / "train-000001.tar"
    good = victim.read_bytes()
    victim.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    r = run_export(lake, args)
    assert r.written == 1 and r.kept == 2 and victim.read_bytes() == good


def test_export_to_object_store(lake, tmp_path, s3):
    import pyarrow.fs as pafs

    args = dict(shard_count=10, shard_size=None, splits={"valid": 0.2})
    r = run_export(lake, ExportArgs(out="s3://shards/v1", **args))
    run_export(lake, ExportArgs(out=str(tmp_path / "local"), **args))
    fs = pafs.S3FileSystem(endpoint_override=s3, scheme="http", region="us-east-1",
                           access_key="test", secret_key="test")
    with fs.open_input_stream("shards/v1/manifest.json") as f:
        remote = json.loads(f.read())
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert [(s["name"], s["sha256"]) for s in remote["shards"]] == [(s["name"], s["sha256"]) for s in local["shards"]]
    with fs.open_input_stream("shards/v1/" + remote["shards"][0]["name"]) as f:
        assert f.read() == (tmp_path / "local" / remote["shards"][0]["name"]).read_bytes()
    assert run_export(lake, ExportArgs(out="s3://shards/v1", **args)).kept == r.shards


def test_argument_parsing():
    assert parse_size("512MB") == 512 * 2**20 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("1000") == 1000
    assert parse_splits("valid=0.01,test=0.02") == {"valid": 0.01, "test": 0.02}
    for bad in ("train=0.1", "valid=x", "valid=0.7,test=0.7"):
        with pytest.raises(UserError):
            parse_splits(bad)
    with pytest.raises(UserError):
        parse_size("lots")
    for cid in ("audioset:abc_DEF-1:10000", "a/b.c:é", "x__y"):
        k = shards.tar_key(cid)
        assert shards.clip_id_from_key(k) == cid and not set(k) & set("./:")


def test_preferred_follows_the_dataset_view(lake, tmp_path):
    """`preferred` is the dataset view's caption: with scores, the best-scored one."""
    from soundlake.stages.clap import SCORES

    scored = _copy(lake, tmp_path)                                 # the module's lake stays unscored
    caps = scored.read("captions", ["clip_id", "captioner", "text"]).to_pylist()
    rows = [{"clip_id": c["clip_id"], "captioner": c["captioner"], "caption_text": c["text"],
             "clap_model_id": "clap-a", "score": 0.9 if c["captioner"] == "template" else 0.2,
             "created": datetime.now(timezone.utc)} for c in caps]
    scored.write_part("scores", pa.Table.from_pylist(rows, schema=SCORES), "s2")
    run_export(scored, ExportArgs(out=str(tmp_path / "d"), shard_count=100, shard_size=None))
    got = read_export(tmp_path / "d")
    assert len(got) == 30
    for cid, s in got.items():
        i = int(cid.split(":")[1][2:])
        assert s["meta"]["caption"] == (f"template {cid}" if i % 2 == 0 else f"a tone number {i}")


def test_tar_writer_matches_tarfile(tmp_path):
    """The writer's own headers, buffering and file slices give tarfile's exact bytes: short
    and long names, non-ASCII, members on and across 512-byte and buffer boundaries."""
    import io
    import random

    rng = random.Random(0)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(rng.randbytes(50_000))
    sizes = [0, 1, 511, 512, 513, 4095, 4096, 4097, 9000, 20_000]
    samples = [(f"k{i}-" + "x" * (i * 11),
                {"flac": shards.FileSlice(str(blob), 37 * i, n), "json": rng.randbytes(i * 97)})
               for i, n in enumerate(sizes)]
    samples.append(("k-é-" + "y" * 120, {"a": b"long non-ASCII name", "b": rng.randbytes(1000)}))
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, fields in samples:
            for ext in sorted(fields):
                data = fields[ext]
                if isinstance(data, shards.FileSlice):
                    data = blob.read_bytes()[data.offset: data.offset + data.length]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(data))
    for writer in (shards.TarWriter(chunk=4096, depth=2), shards.TarWriter()):
        with writer:
            for _ in range(2):  # buffers reused for a second tar
                out = io.BytesIO()
                count, n, digest = writer.write(out, samples)
                assert out.getvalue() == ref.getvalue()
                want = ref.getvalue()
                assert (count, n, digest.result()) == (len(samples), len(want), hashlib.sha256(want).hexdigest())
    with pytest.raises(OSError, match="ended before"), shards.TarWriter() as writer:
        writer.write(io.BytesIO(), [("k", {"flac": shards.FileSlice(str(blob), 49_000, 2000)})])


def test_parquet_value_ranges_match_pyarrow(tmp_path):
    import random

    import pyarrow.parquet as pq

    from soundlake.export.parquet_pages import value_ranges

    rng = random.Random(1)
    values = [rng.randbytes(rng.randint(0, 30_000)) for _ in range(40)]
    table = pa.table({"n": list(range(40)), "flac": pa.array(values, pa.large_binary())})
    required = pa.table({"flac": pa.array(values, pa.binary())},
                        schema=pa.schema([pa.field("flac", pa.binary(), nullable=False)]))
    path = tmp_path / "t.parquet"

    def ranges(t, **kw):
        pq.write_table(t, path, **kw)
        fd = os.open(path, os.O_RDONLY)
        try:
            return value_ranges(fd, pq.read_metadata(path), "flac"), fd
        finally:
            os.close(fd)

    plain = dict(compression="none", use_dictionary=False)
    for t, kw in [(table, {}), (table, dict(data_page_version="2.0")), (table, dict(data_page_size=1000)),
                  (table, dict(row_group_size=7, data_page_version="2.0", data_page_size=5000)),
                  (table, dict(write_page_checksum=True, write_page_index=True)), (required, {})]:
        got, _ = ranges(t, **plain, **kw)
        data = path.read_bytes()
        assert got is not None and [data[o: o + n] for o, n in got] == values, kw
    nulls = pa.table({"flac": pa.array([b"a", None, b"bc"], pa.large_binary())})
    for t, kw in [(table, dict(compression="zstd", use_dictionary=False)),
                  (table, dict(compression="none", use_dictionary=True)), (nulls, plain)]:
        assert ranges(t, **kw)[0] is None, kw      # other layouts: the export reads them with pyarrow


def test_export_bytes_do_not_depend_on_the_part_layout(lake, tmp_path):
    """A lake whose clips parts hold zstd-compressed, dictionary-encoded FLAC values (read
    through pyarrow, not as file slices) exports exactly the same shards."""
    import pyarrow.parquet as pq

    from soundlake.export.parquet_pages import value_ranges

    other = Lake(str(tmp_path / "lake"))
    shutil.copytree(lake.root, other.root)
    for part in other.parts("clips"):
        pq.write_table(pq.read_table(part), part, compression="zstd", use_dictionary=True)

    def sliced(part: str) -> bool:
        fd = os.open(part, os.O_RDONLY)
        try:
            return value_ranges(fd, pq.read_metadata(part), "flac") is not None
        finally:
            os.close(fd)

    assert all(map(sliced, lake.parts("clips"))) and not any(map(sliced, other.parts("clips")))
    args = dict(shard_size=parse_size("150KB"), splits={"valid": 0.2})
    run_export(lake, ExportArgs(out=str(tmp_path / "plain"), **args))
    run_export(other, ExportArgs(out=str(tmp_path / "zstd"), **args))
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("plain", "zstd"))
    assert len(a["shards"]) > 2
    assert [(s["name"], s["sha256"]) for s in a["shards"]] == [(s["name"], s["sha256"]) for s in b["shards"]]


def test_part_committed_while_the_export_plans(tmp_path, monkeypatch):
    """Audio is located from the part list seen before the selection; a part committed in
    between is still found (the selection's own list wins)."""
    from soundlake.export import exporter as export
    lake = build_lake(tmp_path, range(5))
    real = export.plan_export

    def plan_after_a_commit(lk, args):
        build_lake(tmp_path, range(5, 9), lake=lake, run="r2")
        return real(lk, args)

    monkeypatch.setattr(export, "plan_export", plan_after_a_commit)
    r = run_export(lake, ExportArgs(out=str(tmp_path / "o"), shard_count=100, shard_size=None))
    audio = lake_audio(lake)
    got = read_export(tmp_path / "o")
    assert r.clips == 9 and set(got) == set(audio) and all(s["flac"] == audio[c] for c, s in got.items())


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_export_as_of_an_earlier_export_or_run_is_byte_identical_after_later_runs(tmp_path):
    """Every export records the table versions it read: `export --as-of EXPORT_ID` (or the run
    that left the lake that way) writes the same shards, byte for byte, after later runs
    added clips and captions."""
    from soundlake.catalog.sql import fetchall

    lake = build_lake(tmp_path, range(12), run="r1")
    first = run_export(lake, ExportArgs(out=str(tmp_path / "first"), shard_size=None, shard_count=5))
    as_of = json.loads(fetchall(lake, "SELECT as_of FROM exports")[0][0])
    assert set(as_of) >= {"clips", "captions"}
    build_lake(tmp_path, range(12, 20), lake=lake, run="r2")                  # a later run: more clips
    lake.write_part("captions", pa.Table.from_pylist([{                       # and a better caption
        "clip_id": "local:id0001:0", "captioner": "human", "model_id": "h", "text": "a new caption",
        "run_id": "r3"}], schema=schema.CAPTIONS), "r3")
    now = run_export(lake, ExportArgs(out=str(tmp_path / "now"), shard_size=None, shard_count=5))
    assert now.clips == 20 and _shard_bytes(tmp_path / "now") != _shard_bytes(tmp_path / "first")
    again = run_export(lake, ExportArgs(out=str(tmp_path / "again"), shard_size=None, shard_count=5,
                                        as_of=first.export_id))
    assert again.clips == first.clips == 12
    assert _shard_bytes(tmp_path / "again") == _shard_bytes(tmp_path / "first")
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["catalog"]["as_of"] == as_of and manifest["catalog"]["sha256"] == first_catalog(tmp_path)
    by_run = run_export(lake, ExportArgs(out=str(tmp_path / "by-run"), shard_size=None, shard_count=5, as_of="r1"))
    assert by_run.clips == 12 and _shard_bytes(tmp_path / "by-run") == _shard_bytes(tmp_path / "first")
    with pytest.raises(UserError, match="--as-of 'exp-nosuch'"):
        run_export(lake, ExportArgs(out=str(tmp_path / "x"), shard_count=5, shard_size=None, as_of="exp-nosuch"))


def test_export_as_of_an_earlier_export_screens_with_the_dedup_snapshot_it_read(tmp_path):
    """A later `soundlake dedup` replaces the duplicate groups whole: `export --as-of` used to
    screen with the new ones. The export records the snapshot commit it read (seq)."""
    from soundlake.catalog import snapshots

    lake = build_lake(tmp_path, range(8), run="r1")

    def dedup_run(run: str, pairs: list[tuple[int, int]]) -> None:
        rows = [{"clip_a": f"local:id{a:04d}:0", "clip_b": f"local:id{b:04d}:0", "level": "identity", "score": 1.0,
                 "method": "youtube_id", "model_hash": None, "run_id": run, "created": None} for a, b in pairs]
        with lake.lock(run):
            rel = lake.write_part("duplicates", pa.Table.from_pylist(rows, schema=schema.DUPLICATES), run,
                                  commit=False)
            snapshots.commit(lake, {"duplicates": [rel]}, run,
                             {"duplicates": {"levels": {"identity": {"run_id": run, "threshold": 1.0}}}})

    def export(out: str, **kw):
        return run_export(lake, ExportArgs(out=str(tmp_path / out), shard_size=None, shard_count=3, dedup="identity",
                                           **kw))

    dedup_run("d1", [(0, 1)])
    first = export("first")
    dedup_run("d2", [(2, 3), (4, 5)])
    assert first.clips == 7 and export("now").clips == 6
    again = export("again", as_of=first.export_id)
    assert again.clips == 7 and _shard_bytes(tmp_path / "again") == _shard_bytes(tmp_path / "first")
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["catalog"]["as_of"][snapshots.KEY] == 1
    assert manifest["dedup"]["runs"] == {"identity": "d1"}


def first_catalog(tmp_path: Path) -> str:
    return json.loads((tmp_path / "first" / "manifest.json").read_text())["catalog"]["sha256"]


def test_an_export_killed_between_its_two_records_is_recorded_once(tmp_path, monkeypatch):
    """`export_members` and `exports` are two Delta commits: a kill between them used to leave
    the members visible without their export, and the re-run recorded them a second time."""
    from soundlake.catalog import delta
    from soundlake.catalog.sql import fetchall

    lake = build_lake(tmp_path, range(6))
    real = delta.commit

    def killed_before_exports(lake_, table, parts, run_id):
        if table == "exports":
            raise KeyboardInterrupt
        real(lake_, table, parts, run_id)

    monkeypatch.setattr(delta, "commit", killed_before_exports)
    args = ExportArgs(out=str(tmp_path / "v1"), shard_size=None, shard_count=4)
    with pytest.raises(KeyboardInterrupt):
        run_export(lake, args)
    monkeypatch.undo()
    assert fetchall(lake, "SELECT (SELECT count(*) FROM exports), (SELECT count(*) FROM export_members)") == [(0, 0)]
    r = run_export(lake, args)
    assert r.written == 0 and r.kept == 2
    assert fetchall(lake, "SELECT (SELECT count(*) FROM exports), (SELECT count(*) FROM export_members)") == [(1, 6)]
