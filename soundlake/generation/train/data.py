"""Streaming training data from exported WebDataset shards.

    urls = shard_urls("./shards/v1", split="train")          # from the export's manifest
    loader = make_loader(urls, batch_size=16, seconds=10.0, num_workers=2)
    for batch in loader:   # Batch(audio [B, C, T] float32, captions [B], offsets_s [B], lengths [B], meta [B])
        ...

Pipeline (webdataset): shard list (or ``wds.ResampledShards`` for endless,
seeded resampling) -> split by node (rank/world size) and by DataLoader worker ->
our own tar reader, which checks every member (see :mod:`soundlake.export.shards`) before
reading its bytes -> shuffle buffer -> FLAC decode of the crop only (soundfile seeks to
it) -> crop/pad to N seconds, keeping the crop offset -> caption choice (seeded random
among the clip's captions, or the preferred one) -> batches via :func:`collate`.

A bad sample (garbage FLAC or JSON, a missing member, a damaged tar) raises
:class:`BadSampleError` naming the shard and key, or with ``on_error="skip"`` is dropped
and counted (:class:`SampleErrors`). Unsafe tar members always raise.

Without resampling every (rank, worker) reads a disjoint subset of the shards, so
there must be at least ranks x workers shards: fewer is a clear error instead of
the DDP hang webdataset is known for.

``read_shards_ray(paths)`` reads the same shards as a Ray Dataset (distributed
pre-encoding, e.g. VAE latents).
"""
from __future__ import annotations

import io
import json
import logging
import math
import random
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import soundfile as sf
import torch
import webdataset as wds

from soundlake.core.errors import UserError
from soundlake.core.storage import open_input
from soundlake.export import shards

CaptionChoice = Literal["random", "preferred"]
OnError = Literal["raise", "skip"]
log = logging.getLogger(__name__)


def shard_urls(source: str, split: str | None = "train") -> list[str]:
    """Shard URLs of an export folder/URI (from its manifest), or a list given as a brace pattern."""
    if source.endswith(".tar") or "{" in source:
        import braceexpand

        return list(braceexpand.braceexpand(source))
    manifest = shards.read_manifest(source)
    if manifest is None:
        raise UserError(f"{source}: no manifest.json; give a folder that `soundlake export` wrote")
    base = source.rstrip("/")
    return [f"{base}/{s['name']}" for s in manifest["shards"] if split is None or s["split"] == split]


class BadSampleError(ValueError):
    """A sample that cannot be loaded (garbage FLAC or JSON, a missing member, a damaged tar);
    the message names the shard and the key."""


class SampleErrors:
    """The loader's policy for bad samples, shared by its read and decode steps (one per
    process: each DataLoader worker has its own).

    ``"raise"``: the BadSampleError stops the loader. ``"skip"``: the sample is dropped and
    counted in ``skipped`` (shard URL -> samples); once a shard is read and its samples are
    all through decoding (the shuffle buffer holds some back), one warning gives its count."""

    def __init__(self, policy: OnError = "raise"):
        if policy not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {policy!r}")
        self.policy = policy
        self.skipped: Counter[str] = Counter()
        self._reading: str | None = None
        self._undecoded: Counter[str] = Counter()    # shard -> samples read, not yet decoded
        self._unreported: dict[str, list] = {}       # shard -> [skipped, first error]

    def bad(self, url: str, error: BadSampleError) -> None:
        if self.policy == "raise":
            raise error
        self.skipped[url] += 1
        self._unreported.setdefault(url, [0, error])[0] += 1

    def reading(self, url: str | None) -> None:
        """The read step starts a shard (None: it has finished the last one)."""
        done, self._reading = self._reading, url
        if done:
            self._report(done)

    def read(self, url: str) -> None:
        self._undecoded[url] += 1

    def decoded(self, url: str) -> None:
        self._undecoded[url] -= 1
        self._report(url)

    def _report(self, url: str) -> None:
        if url == self._reading or self._undecoded[url] > 0:
            return
        del self._undecoded[url]
        if url in self._unreported:
            n, first = self._unreported.pop(url)
            log.warning("%s: skipped %d bad sample%s; the first: %s", url, n, "s" * (n != 1), first)


def safe_tar_samples(src: Iterator[dict], max_member_bytes: int = shards.DEFAULT_MAX_MEMBER_BYTES,
                     errors: SampleErrors | None = None) -> Iterator[dict]:
    """webdataset pipeline step: {"url"} -> samples, each tar member checked before it is read.

    An unsafe member raises :class:`soundlake.export.shards.UnsafeTarError` naming the shard,
    whatever the policy. A damaged tar (cut short, bad header) ends its shard: the sample being
    read is a bad sample for ``errors`` (default: raise)."""
    errors = errors or SampleErrors()
    for item in src:
        url = item["url"]
        errors.reading(url)
        with open_input(url) as stream:
            try:
                for sample in shards.iter_samples(stream, url, max_member_bytes):
                    errors.read(url)
                    yield sample
            except tarfile.ReadError as e:
                errors.bad(url, BadSampleError(str(e)))
        errors.reading(None)


def _decoded(src: Iterator[dict], decode: Decode, errors: SampleErrors) -> Iterator[dict]:
    """Pipeline step: each sample through ``decode``; a bad one goes to ``errors``."""
    for sample in src:
        url = sample.get("__url__", "")
        try:
            out = decode(sample)
        except BadSampleError as e:
            errors.bad(url, e)
            out = None
        errors.decoded(url)
        if out is not None:
            yield out


def _check_enough_shards(urls: list[str]):
    def check(src):
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        if len(urls) < world * workers:
            raise ValueError(f"{len(urls)} shards cannot feed {world} ranks x {workers} workers "
                             f"= {world * workers} readers: export with a smaller --shard-size/--shard-count, "
                             "use fewer workers, or resample=True")
        yield from src
    return check


def _meta(sample: dict) -> dict:
    meta = json.loads(sample["json"])
    if not isinstance(meta, dict):
        raise ValueError("its .json member is not a JSON object")
    return meta


def _resampled_length(frames: int, rate: int, sr: int) -> int:
    return int(frames * sr / rate + 0.5)   # the length soxr's one-shot resample() returns


def _source_window(offset: int, length: int, frames: int, rate: int, sr: int) -> tuple[int, int, int]:
    """Source frames [start, stop) to resample for output frames [offset, offset + length), and
    where those begin in the window's output. The window reaches 0.1 s past both ends (far more
    than the resampling filter) and starts where input and output samples coincide, so its
    output equals the full resampling's to float rounding."""
    g = math.gcd(rate, sr)
    step = rate // g                       # input frames per whole number of output frames
    start = max(0, (offset * rate // sr - rate // 10) // step * step)
    stop = min(frames, -(-(offset + length) * rate // sr) + rate // 10)
    return start, stop, offset - start // step * (sr // g)


@dataclass
class Decode:
    """Decode FLAC, crop/pad to ``seconds``, choose a caption; a callable class so that each
    DataLoader worker keeps its own RNG seeded from (seed, rank, worker). A sample that does
    not decode raises BadSampleError naming its shard and key."""

    seconds: float | None = 10.0
    sample_rate: int | None = None      # resample to this rate when the shards differ
    caption: CaptionChoice = "random"
    crop: Literal["random", "start"] = "random"
    seed: int = 0
    _rng: random.Random | None = field(default=None, init=False, repr=False)
    members = ("flac", "json")          # the sample's members decode() reads

    def _get_rng(self) -> random.Random:
        if self._rng is None:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            self._rng = random.Random(zlib.crc32(f"{self.seed}:{rank}:{worker}".encode()))
        return self._rng

    def __call__(self, sample: dict) -> dict:
        where = f"{sample.get('__url__', '')}: sample {sample.get('__key__')!r}"
        missing = [f".{m}" for m in self.members if m not in sample]
        if missing:
            raise BadSampleError(f"{where} has no {' or '.join(missing)} member")
        try:
            return self.decode(sample, self._get_rng())
        except (ValueError, TypeError, KeyError, EOFError, RuntimeError, sf.SoundFileError) as e:
            raise BadSampleError(f"{where}: {type(e).__name__}: {e}") from e

    def decode(self, sample: dict, rng: random.Random) -> dict:
        meta = _meta(sample)
        audio, sr, offset, length = self._audio(sample["flac"], rng)
        return {"__key__": sample["__key__"], "audio": audio, "caption": choose_caption(meta, self.caption, rng),
                "offset_s": offset / sr, "length": length, "sample_rate": sr, "meta": meta}

    def _audio(self, flac: bytes, rng: random.Random) -> tuple[np.ndarray, int, int, int]:
        """([C, T] float32, rate, crop offset, unpadded length), decoding only the crop: the
        header gives the length and libsndfile seeks in FLAC. The offset is drawn from the
        (resampled) length as from a full decode, so training stays reproducible."""
        with sf.SoundFile(io.BytesIO(flac)) as f:
            rate, frames = f.samplerate, f.frames
            sr = self.sample_rate or rate
            total = frames if sr == rate else _resampled_length(frames, rate, sr)
            n = total if self.seconds is None else int(round(self.seconds * sr))
            offset = rng.randrange(total - n + 1) if total > n and self.crop == "random" else 0
            length = min(n, total)
            if sr == rate:
                start, stop, skip = offset, offset + length, 0
            else:
                start, stop, skip = _source_window(offset, length, frames, rate, sr)
            if f.seek(start) != start:
                raise ValueError(f"cannot seek to frame {start} of {frames}")
            audio = f.read(stop - start, dtype="float32", always_2d=True)  # [T, C]
        if len(audio) != stop - start:
            raise ValueError(f"the FLAC stream ends at frame {start + len(audio)}; its header says {frames}")
        if sr != rate:
            from soundlake.core.audio import resample

            audio = resample(audio, rate, sr)[skip: skip + length]
        return np.ascontiguousarray(np.pad(audio.T, ((0, 0), (0, n - length)))), sr, offset, length


def choose_caption(meta: dict, how: CaptionChoice, rng: random.Random) -> str:
    captions = meta.get("captions") or [meta.get("caption", "")]
    return rng.choice(captions) if how == "random" else meta.get("caption", captions[0])


@dataclass
class DecodeLatents(Decode):
    """Latent shards (``soundlake encode``): ``<key>.latents.npy`` [C, F] cropped/padded to
    ``frames`` (``seconds`` is unused), keeping the crop offset in frames."""

    frames: int | None = None
    members = ("latents.npy", "json")

    def decode(self, sample: dict, rng: random.Random) -> dict:
        meta = _meta(sample)
        z = np.load(io.BytesIO(sample["latents.npy"]), allow_pickle=False).astype(np.float32, copy=False)
        length, offset = z.shape[1], 0
        if self.frames is not None:
            if length > self.frames:
                offset = rng.randrange(length - self.frames + 1) if self.crop == "random" else 0
                z, length = z[:, offset: offset + self.frames], self.frames
            elif length < self.frames:
                z = np.pad(z, ((0, 0), (0, self.frames - length)))
        return {"__key__": sample["__key__"], "latents": np.ascontiguousarray(z),
                "caption": choose_caption(meta, self.caption, rng), "offset": offset, "length": length,
                "meta": meta}


@dataclass
class LatentBatch:
    latents: torch.Tensor        # [B, C, F] float32
    captions: list[str]
    offsets: torch.Tensor        # [B] crop start, frames
    lengths: torch.Tensor        # [B] real (unpadded) frames
    meta: list[dict]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def collate_latents(samples: list[dict]) -> LatentBatch:
    f = max(s["latents"].shape[1] for s in samples)
    z = np.stack([np.pad(s["latents"], ((0, 0), (0, f - s["latents"].shape[1]))) for s in samples])
    return LatentBatch(torch.from_numpy(z), [s["caption"] for s in samples],
                       torch.tensor([s["offset"] for s in samples]), torch.tensor([s["length"] for s in samples]),
                       [s["meta"] for s in samples], [s["__key__"] for s in samples])


@dataclass
class Batch:
    audio: torch.Tensor          # [B, C, T] float32
    captions: list[str]
    offsets_s: torch.Tensor      # [B] crop start in the clip, seconds
    lengths: torch.Tensor        # [B] real (unpadded) samples
    sample_rate: int
    meta: list[dict]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def collate(samples: list[dict]) -> Batch:
    rates = {s["sample_rate"] for s in samples}
    if len(rates) != 1:
        raise ValueError(f"a batch mixes sample rates {sorted(rates)}: pass sample_rate= to resample")
    channels = {s["audio"].shape[0] for s in samples}
    if len(channels) != 1:
        raise ValueError(f"a batch mixes channel counts {sorted(channels)}: export clips of one layout")
    t = max(s["audio"].shape[1] for s in samples)
    # One zeroed batch array, each clip copied in once (no per-clip padded copy).
    audio = np.zeros((len(samples), channels.pop(), t), np.float32)
    for i, s in enumerate(samples):
        audio[i, :, : s["audio"].shape[1]] = s["audio"]
    return Batch(torch.from_numpy(audio), [s["caption"] for s in samples],
                 torch.tensor([s["offset_s"] for s in samples], dtype=torch.float64),
                 torch.tensor([s["length"] for s in samples]), rates.pop(),
                 [s["meta"] for s in samples], [s["__key__"] for s in samples])


def make_dataset(urls: list[str], *, batch_size: int | None = None, seconds: float | None = 10.0,
                 sample_rate: int | None = None, caption: CaptionChoice = "random",
                 crop: Literal["random", "start"] = "random", shuffle: int = 1000, seed: int = 0,
                 resample: bool = False, partial: bool = True,
                 max_member_bytes: int = shards.DEFAULT_MAX_MEMBER_BYTES,
                 latent_frames: int | None = None, on_error: OnError = "raise") -> wds.DataPipeline:
    """The webdataset pipeline (an IterableDataset). With ``batch_size`` it yields Batches,
    else decoded sample dicts. ``shuffle=0`` keeps shard order (deterministic reads).
    ``latent_frames``: read latent shards instead (LatentBatch, cropped to that many frames).
    ``on_error``: a bad sample raises BadSampleError, or is skipped; ``.skipped`` counts the
    skips per shard when read in this process (DataLoader workers log theirs, see SampleErrors)."""
    urls = list(urls)
    if not urls:
        raise ValueError("no shards to read")
    errors = SampleErrors(on_error)
    if resample:
        # Every reader draws shards independently (seeded per rank/worker): no split needed.
        pipeline = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        pipeline = [wds.SimpleShardList(urls), _check_enough_shards(urls), wds.split_by_node, wds.split_by_worker]
    pipeline.append(lambda src: safe_tar_samples(src, max_member_bytes, errors))
    if shuffle:
        pipeline.append(wds.shuffle(shuffle, initial=min(shuffle, 100), seed=seed))
    if latent_frames:
        decode, collation = DecodeLatents(None, None, caption, crop, seed, frames=latent_frames), collate_latents
    else:
        decode, collation = Decode(seconds, sample_rate, caption, crop, seed), collate
    pipeline.append(lambda src: _decoded(src, decode, errors))
    if batch_size:
        pipeline.append(wds.batched(batch_size, collation_fn=collation, partial=partial))
    dataset = wds.DataPipeline(*pipeline)
    dataset.skipped = errors.skipped
    return dataset


def make_loader(urls: list[str], batch_size: int, num_workers: int = 0, *, world_size: int | None = None,
                on_error: OnError = "raise", **kw) -> torch.utils.data.DataLoader:
    """A DataLoader over :func:`make_dataset` (batching happens in the workers). ``on_error="skip"``
    drops bad samples: each worker logs one warning per shard with its count."""
    if world_size is None:
        world_size = wds.utils.pytorch_worker_info()[1]   # RANK/WORLD_SIZE env or torch.distributed
    if not kw.get("resample") and len(urls) < world_size * max(1, num_workers):
        raise ValueError(f"{len(urls)} shards cannot feed {world_size} ranks x {max(1, num_workers)} workers: "
                         "export more, smaller shards, use fewer workers, or resample=True")
    ds = make_dataset(urls, batch_size=batch_size, on_error=on_error, **kw)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, collate_fn=None)


def read_shards_ray(paths: str | list[str], split: str | None = None, **kw):
    """The shards as a Ray Dataset, one row per sample (``__key__``, ``flac`` and ``json`` bytes),
    for distributed pre-encoding. ``paths``: shard paths/URIs, or an export folder (all its
    shards, or those of ``split``). Extra keyword arguments go to ``ray.data.read_webdataset``.

    Ray's reader does its own tar parsing: read only shards you trust (your own exports);
    untrusted shards go through :func:`make_dataset`, which checks every member."""
    import ray.data

    if isinstance(paths, str) and not paths.endswith(".tar"):
        paths = shard_urls(paths, split=split)
    kw.setdefault("decoder", None)
    ds = ray.data.read_webdataset(paths, **kw)
    return ds
