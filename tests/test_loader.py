"""The training loader over exported shards, and the untrusted-tar checks."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from soundlake.catalog import schema
from soundlake.catalog.lake import Lake
from soundlake.core.audio import decode_flac
from soundlake.export import shards
from soundlake.export.exporter import ExportArgs, run_export
from soundlake.generation.train.data import (
    Batch,
    collate,
    make_dataset,
    make_loader,
    read_shards_ray,
    shard_urls,
)
from soundlake.sources.base import input_row
from soundlake.stages.base import FLOW
from soundlake.stages.segment import SegmentSpec, SegmentStage, segment_tables
from soundlake.testing import tone_mix, write_audio

torch.set_num_threads(1)
SR = 16000
N = 24


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """24 two-second stereo clips, each with a reference and a template caption, in 6 shards."""
    root = tmp_path_factory.mktemp("loader")
    lake = Lake(str(root / "lake"))
    stage = SegmentStage(SegmentSpec(sample_rate=SR, channels=2, window=2.0, loudness=False), "r1")
    rows = []
    for i in range(N):
        path = write_audio(root / "f" / f"{i}.flac", tone_mix(2.0, SR, i, channels=2), SR)
        rows += stage.segment_one(input_row(source="local", source_id=f"s{i:03d}", uri=str(path), license="CC0",
                                            ref_caption=f"reference {i}", ref_caption_model="gt"))
    t = segment_tables(pa.Table.from_pylist(rows, schema=FLOW))
    lake.write_part("clips", t["clips"], "r1")
    caps = t["captions"].to_pylist()
    caps += [{**c, "captioner": "template", "text": c["text"].replace("reference", "template")} for c in caps]
    lake.write_part("captions", pa.Table.from_pylist(caps, schema=schema.CAPTIONS), "r1")
    out = root / "shards"
    run_export(lake, ExportArgs(out=str(out), caption="all", shard_count=4, shard_size=None))
    audio = lake.read("clips", ["clip_id", "flac"])
    return out, dict(zip(audio["clip_id"].to_pylist(), audio["flac"].to_pylist()))


def samples(urls, **kw) -> list[dict]:
    return list(make_dataset(urls, shuffle=0, **kw))


def test_round_trip_audio_and_captions(export):
    out, flac = export
    urls = shard_urls(str(out))
    assert len(urls) == 6
    got = samples(urls, seconds=None, caption="preferred")
    assert sorted(s["meta"]["clip_id"] for s in got) == sorted(flac)
    for s in got:
        ref, sr = decode_flac(flac[s["meta"]["clip_id"]])
        assert sr == SR and s["audio"].shape == (2, ref.shape[0])
        np.testing.assert_array_equal(s["audio"], ref.T)
        assert s["caption"] == s["meta"]["caption"] and s["caption"].startswith("reference")


def test_crop_pad_offsets_and_collate(export):
    out, flac = export
    urls = shard_urls(str(out))
    full = {s["__key__"]: s["audio"] for s in samples(urls, seconds=None)}
    crops = samples(urls, seconds=0.5, seed=3)
    offsets = set()
    for s in crops:
        off = int(round(s["offset_s"] * SR))
        offsets.add(off)
        assert s["audio"].shape == (2, SR // 2)
        np.testing.assert_array_equal(s["audio"], full[s["__key__"]][:, off: off + SR // 2])
    assert len(offsets) > 1                              # random crops, not always the start
    padded = samples(urls[:1], seconds=3.0)
    assert all(s["audio"].shape == (2, 3 * SR) and s["length"] == 2 * SR and s["offset_s"] == 0
               and not s["audio"][:, 2 * SR:].any() for s in padded)
    batches = list(make_dataset(urls, batch_size=5, seconds=1.0, shuffle=8))
    assert all(isinstance(b, Batch) for b in batches) and sum(len(b) for b in batches) == N
    b = batches[0]
    assert b.audio.shape == (5, 2, SR) and b.audio.dtype == torch.float32 and len(b.captions) == 5
    assert b.offsets_s.shape == (5,) and len(b.meta) == 5 and b.sample_rate == SR


def test_collate_pads_shorter_clips_with_zeros():
    def item(c: int, n: int, v: float) -> dict:
        return {"__key__": f"k{n}", "audio": np.full((c, n), v, np.float32), "caption": "x", "offset_s": 0.0,
                "length": n, "sample_rate": SR, "meta": {}}

    b = collate([item(2, 5, 1.0), item(2, 3, 2.0)])
    assert b.audio.shape == (2, 2, 5) and b.lengths.tolist() == [5, 3]
    assert (b.audio[0] == 1).all() and (b.audio[1, :, :3] == 2).all() and not b.audio[1, :, 3:].any()
    with pytest.raises(ValueError, match="channel counts"):
        collate([item(2, 5, 1.0), item(1, 5, 1.0)])


def test_caption_choice_is_seeded(export):
    out, _ = export
    urls = shard_urls(str(out))
    runs = [[s["caption"] for s in samples(urls, seconds=1.0, seed=seed)] for seed in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert {c.split()[0] for c in runs[0]} == {"reference", "template"}   # picks among all captions
    assert runs[0] != runs[2]


def test_split_by_node_and_worker(export, monkeypatch):
    out, flac = export
    urls = shard_urls(str(out))
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys.append({s["meta"]["clip_id"] for s in samples(urls, seconds=1.0)})
    assert not keys[0] & keys[1] and keys[0] | keys[1] == set(flac)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    loader = make_loader(urls, batch_size=4, num_workers=2, seconds=1.0)
    seen = [m["clip_id"] for b in loader for m in b.meta]
    assert sorted(seen) == sorted(flac)                  # each clip exactly once across workers


def test_too_few_shards_is_a_clear_error(export, monkeypatch):
    out, _ = export
    urls = shard_urls(str(out))[:3]
    with pytest.raises(ValueError, match="3 shards cannot feed 1 ranks x 4 workers"):
        make_loader(urls, batch_size=2, num_workers=4)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="3 shards cannot feed 4 ranks"):
        samples(urls)
    # resampling draws shards at random per reader, so it needs no split
    it = iter(make_dataset(urls, batch_size=4, seconds=0.5, resample=True))
    assert all(len(next(it)) == 4 for _ in range(10))    # endless: more samples than the shards hold


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return str(path)


def _info(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.linkname = kind, link
    return i


@pytest.mark.parametrize("case,members,message", [
    ("absolute", [(_info("/etc/evil.json"), b"{}")], "absolute"),
    ("dotdot", [(_info("../../evil.flac"), b"x")], "'..'"),
    ("dotdot-inner", [(_info("a/../../evil.flac"), b"x")], "'..'"),
    ("symlink", [(_info("k.flac", tarfile.SYMTYPE, "/etc/passwd"), b"")], "links"),
    ("hardlink", [(_info("k.json"), b"{}"), (_info("k.flac", tarfile.LNKTYPE, "k.json"), b"")], "links"),
    ("chardev", [(_info("k.flac", tarfile.CHRTYPE), b"")], "device"),
    ("blockdev", [(_info("k.flac", tarfile.BLKTYPE), b"")], "device"),
    ("fifo", [(_info("k.flac", tarfile.FIFOTYPE), b"")], "FIFO"),
    ("oversize", [(_info("k.flac"), b"x" * 5000)], "member limit"),
])
def test_malicious_tars_are_rejected(tmp_path, case, members, message):
    url = _tar(tmp_path / f"{case}.tar", members)
    with pytest.raises(shards.UnsafeTarError, match=message) as e:
        samples([url], max_member_bytes=4096)
    assert url in str(e.value)
    with open(url, "rb") as f, pytest.raises(shards.UnsafeTarError, match=message):
        list(shards.iter_samples(f, url, max_member_bytes=4096))
    with _stream(url) as f, pytest.raises(shards.UnsafeTarError, match=message):
        list(shards.iter_samples(f, url, max_member_bytes=4096))


class _Unseekable(io.RawIOBase):
    """A file read as a stream (as from an object store): tarfile's stream mode reads it."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._data.readinto(b)


def _stream(path) -> io.BufferedReader:
    return io.BufferedReader(_Unseekable(Path(path).read_bytes()))


def test_safe_tar_reads_normally(tmp_path, export):
    out, _ = export
    url = shard_urls(str(out))[0]
    with open(url, "rb") as f:
        got = list(shards.iter_samples(f, url, max_member_bytes=10 ** 6))
    assert len(got) == 4 and all({"flac", "json"} <= set(s) for s in got)
    with _stream(url) as f:
        assert not f.seekable() and list(shards.iter_samples(f, url, max_member_bytes=10 ** 6)) == got
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(url).read_bytes()[:3000])
    for f in (open(cut, "rb"), _stream(cut)):
        with f, pytest.raises(tarfile.ReadError):
            list(shards.iter_samples(f, str(cut)))
    with open(url, "rb") as f, pytest.raises(shards.UnsafeTarError, match="member limit"):
        list(shards.iter_samples(f, url, max_member_bytes=1000))


def test_read_shards_ray(export, ray_session):
    out, flac = export
    rows = read_shards_ray(str(out)).take_all()
    assert len(rows) == N
    for r in rows:
        meta = r["json"] if isinstance(r["json"], dict) else json.loads(r["json"])
        assert r["flac"] == flac[meta["clip_id"]]
