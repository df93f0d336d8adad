"""Untrusted shards cost bounded memory, and a bad sample names its shard and key.

Memory is measured in a fresh subprocess (peak RSS before/after the one read) so that
nothing else the test session did shows up in the measure.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import random
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import soundfile as sf

from soundlake.core.audio import resample
from soundlake.export import shards
from soundlake.generation.train import data

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]


def peak_rss_growth_mb(script: str, *args: str) -> dict:
    """Run ``script`` (which sets ``result``) after a peak-RSS reading; its JSON report has
    ``grew_mb``, the growth of the peak, and ``result``."""
    code = ("import json, resource, sys\n"
            "from soundlake.core import audio\n"          # the loaded modules count in the baseline
            "from soundlake.generation.train import data\n"
            "from soundlake.export import shards\n"
            "def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
            "before = peak()\n"
            f"{script}\n"
            "print(json.dumps({'grew_mb': peak() - before, 'result': result}))\n")
    run = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


# ---- 1. extended headers are size-checked before they are read -----------------------
def block(name: str, typeflag: bytes, size: int) -> bytes:
    """One raw ustar header block (the size field is trusted by nothing but the reader)."""
    h = bytearray(512)
    h[: len(name)] = name.encode()
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


PAX_PATH = b"15 path=k.flac\n"
HEADERS = {   # tar start, and the header that claims 1 GiB
    "pax": (block("././@PaxHeader", b"x", GIB) + PAX_PATH, "././@PaxHeader"),
    "gnu-longname": (block("././@LongLink", b"L", GIB) + b"k.flac\0", "././@LongLink"),
    "pax-then-longname": (block("././@PaxHeader", b"x", len(PAX_PATH)) + PAX_PATH.ljust(512, b"\0")
                          + block("././@LongLink", b"L", GIB) + b"k.flac\0", "././@LongLink"),
}


def huge_header_tar(path: Path, kind: str, payload: bool) -> str:
    """The header of ``kind`` and a few bytes; with ``payload``, the 1 GiB it claims follows
    for real (zeros, as a sparse file: no disk used)."""
    start, _ = HEADERS[kind]
    with open(path, "wb") as f:
        f.write(start)
        if payload:
            f.truncate(len(start) + GIB + 1024)
    return str(path)


@pytest.mark.parametrize("kind", sorted(HEADERS))
def test_oversize_extended_header_is_refused_by_name(tmp_path, kind):
    url = huge_header_tar(tmp_path / f"{kind}.tar", kind, payload=False)
    with pytest.raises(Exception) as e:
        list(data.make_dataset([url], shuffle=0))
    assert isinstance(e.value, shards.UnsafeTarError), repr(e.value)
    assert url in str(e.value) and repr(HEADERS[kind][1]) in str(e.value) and "header" in str(e.value)


READ_TAR = """
import io
class Unseekable(io.RawIOBase):   # an object-store stream: no seek
    def __init__(self, f): self.f = f
    def readable(self): return True
    def readinto(self, b): return self.f.readinto(b)
path, mode = sys.argv[1:]
try:
    with open(path, "rb") as f:
        list(shards.iter_samples(f if mode == "file" else io.BufferedReader(Unseekable(f)), path))
    result = None
except Exception as e:
    result = [type(e).__name__, str(e)]
"""


@pytest.mark.parametrize("kind,mode", [("pax", "file"), ("gnu-longname", "file"), ("pax-then-longname", "file"),
                                       ("pax", "stream")])
def test_oversize_extended_header_costs_no_memory(tmp_path, kind, mode):
    url = huge_header_tar(tmp_path / f"{kind}.tar", kind, payload=True)
    report = peak_rss_growth_mb(READ_TAR, url, mode)
    assert report["result"] is not None and report["result"][0] == "UnsafeTarError", report
    assert url in report["result"][1] and HEADERS[kind][1] in report["result"][1]
    assert report["grew_mb"] < 100, report


def test_reader_still_reads_long_names_and_compressed_shards(tmp_path):
    """Guard for the reader rewrite: PAX and GNU long names and gzip shards read as before."""
    long = "k" * 150
    path = tmp_path / "names.tar"
    for fmt, name in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")):
        with tarfile.open(path, "w", format=fmt) as tar:
            for member, payload in ((f"{long}{name}.json", b"{}"), ("dir/\u00e9t\u00e9.json", b"[]")):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        with open(path, "rb") as f:
            got = list(shards.iter_samples(f, str(path)))
        assert [(s["__key__"], s["json"]) for s in got] == [(f"{long}{name}", b"{}"), ("dir/\u00e9t\u00e9", b"[]")]
        gz = tmp_path / "names.tar.gz"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        with open(gz, "rb") as f:
            assert list(shards.iter_samples(f, str(path))) == got


# ---- 2. only the crop is decoded -----------------------------------------------------
@pytest.fixture(scope="module")
def hour_flac(tmp_path_factory) -> Path:
    """One hour of 8 kHz mono silence: under 100 KB of FLAC, 115 MB decoded as float32."""
    path = tmp_path_factory.mktemp("long") / "hour.flac"
    with sf.SoundFile(path, "w", 8000, 1, "PCM_16", format="FLAC") as f:
        minute = np.zeros(60 * 8000, np.float32)
        for _ in range(60):
            f.write(minute)
    return path


DECODE_CROP = """
flac = open(sys.argv[1], "rb").read()
sample = {"__key__": "k", "__url__": "u", "flac": flac, "json": b'{"caption": "x"}'}
before = peak()
result = [list(data.Decode(10.0, rate, seed=1)(sample)["audio"].shape) for rate in (None, 16000)]
"""


def test_crop_of_a_long_flac_decodes_only_the_crop(hour_flac):
    report = peak_rss_growth_mb(DECODE_CROP, str(hour_flac))
    assert report["result"] == [[1, 80000], [1, 160000]]
    assert report["grew_mb"] < 40, report    # the full decode alone is 115 MB (230 MB resampled)


def old_crop(flac: bytes, seconds: float, seed: int, sample_rate: int | None) -> tuple[np.ndarray, int]:
    """What the loader returned before it decoded crops only: a full decode, then the crop drawn
    from the (seed, rank 0, worker 0) RNG."""
    rng = random.Random(zlib.crc32(f"{seed}:0:0".encode()))
    audio, sr = sf.read(io.BytesIO(flac), dtype="float32", always_2d=True)
    if sample_rate and sr != sample_rate:
        audio, sr = resample(audio, sr, sample_rate), sample_rate
    n = int(round(seconds * sr))
    offset = rng.randrange(len(audio) - n + 1)
    return audio[offset: offset + n].T, offset


@pytest.mark.parametrize("sample_rate", [None, 48000, 22050])
def test_crop_equals_the_full_decode_slice(sample_rate):
    """Guard: same offsets as the full-decode loader drew (training stays reproducible), same samples
    (bit-identical without resampling, to float rounding with it)."""
    rng = np.random.default_rng(0)
    clip = (0.3 * rng.standard_normal((44100 * 3, 2))).clip(-1, 1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, clip, 44100, format="FLAC", subtype="PCM_16")
    sample = {"__key__": "k", "__url__": "u", "flac": buf.getvalue(), "json": b'{"caption": "x"}'}
    offsets = set()
    for seed in range(8):
        want, offset = old_crop(sample["flac"], 0.5, seed, sample_rate)
        got = data.Decode(0.5, sample_rate, seed=seed)(sample)
        sr = sample_rate or 44100
        assert got["offset_s"] * sr == pytest.approx(offset) and got["sample_rate"] == sr
        if sample_rate is None:
            np.testing.assert_array_equal(got["audio"], want)
        else:
            np.testing.assert_allclose(got["audio"], want, atol=1e-5)
        offsets.add(offset)
    assert len(offsets) > 4
    start = data.Decode(0.5, sample_rate, crop="start")(sample)["audio"]
    np.testing.assert_allclose(start, old_crop(sample["flac"], 3.0, 0, sample_rate)[0][:, : start.shape[1]],
                               atol=0 if sample_rate is None else 1e-5)


# ---- 3. bad samples: named, then raised or skipped ------------------------------------
def flac(seconds: float = 1.0, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.sin(np.arange(int(seconds * sr)) / 5.0), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def good(key: str) -> tuple[str, dict]:
    return key, {"flac": flac(), "json": json.dumps({"caption": key}).encode()}


BAD = {
    "garbage-flac": {"flac": b"not a flac file " * 64, "json": b'{"caption": "x"}'},
    "bad-json": {"flac": flac(), "json": b'{"caption": '},
    "no-json": {"flac": flac()},
    # its header says 2 s; the bytes left hold under 0.5 s, so every crop reaches past the cut
    "cut-flac": {"flac": flac(2.0)[:2000], "json": b'{"caption": "x"}'},
}


def write(path: Path, samples: list[tuple[str, dict]], cut_in: str | None = None) -> str:
    """A shard of ``samples``; ``cut_in``: the file ends halfway through that member's data."""
    shards.write_shard(pafs.LocalFileSystem(), str(path), samples)
    if cut_in:
        with tarfile.open(path) as tar:
            m = tar.getmember(cut_in)
        path.write_bytes(path.read_bytes()[: m.offset_data + m.size // 2])
    return str(path)


@pytest.mark.parametrize("case", [*BAD, "truncated-member"])
def test_bad_sample_error_names_shard_and_key(tmp_path, case):
    if case == "truncated-member":
        url = write(tmp_path / "s.tar", [good("good0"), good("clip7")], cut_in="clip7.flac")
    else:
        url = write(tmp_path / "s.tar", [good("good0"), ("clip7", BAD[case]), good("good1")])
    with pytest.raises(Exception) as e:
        list(data.make_dataset([url], seconds=0.5, shuffle=0))
    assert type(e.value).__name__ == "BadSampleError", repr(e.value)
    assert url in str(e.value) and "clip7" in str(e.value)


@pytest.fixture()
def damaged(tmp_path) -> tuple[str, str]:
    """Shard a: 2 good samples and the four bad ones; shard b: a good one, then a member cut short."""
    a = write(tmp_path / "a.tar", [good("a0"), *((f"a-{k}", v) for k, v in BAD.items()), good("a1")])
    b = write(tmp_path / "b.tar", [good("b0"), good("b1")], cut_in="b1.json")
    return a, b


@pytest.mark.parametrize("shuffle", [0, 10])
def test_skip_drops_counts_and_warns_once_per_shard(damaged, caplog, shuffle):
    a, b = damaged
    ds = data.make_dataset([a, b], seconds=0.5, shuffle=shuffle, on_error="skip")
    with caplog.at_level(logging.WARNING):
        keys = sorted(s["__key__"] for s in ds)
    assert keys == ["a0", "a1", "b0"]
    assert ds.skipped == {a: 4, b: 1}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2, warned
    assert any(a in w and "4 bad samples" in w for w in warned) and any(b in w and "1 bad sample" in w for w in warned)


def test_loader_threads_on_error(damaged):
    a, b = damaged
    loader = data.make_loader([a, b], batch_size=2, seconds=0.5, shuffle=0, on_error="skip")
    assert sorted(k for batch in loader for k in batch.keys) == ["a0", "a1", "b0"]
    assert loader.dataset.skipped == {a: 4, b: 1}
    with pytest.raises(ValueError, match="on_error"):
        data.make_loader([a, b], batch_size=2, on_error="ignore")


def test_unsafe_members_raise_even_when_skipping(tmp_path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("k.flac")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(shards.UnsafeTarError, match="links"):
        list(data.make_dataset([str(path)], shuffle=0, on_error="skip"))
