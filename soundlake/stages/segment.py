"""Segment: decode an input, resample, cut fixed windows, drop silence, measure, FLAC-encode.

Reads input rows (see ``sources.INPUT_SCHEMA``); writes one FLOW row per kept
window, or one failed row per input that yields no clip.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Literal
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from soundlake.catalog.schema import CAPTIONS, CLIPS, FAILURES, SKIPPED
from soundlake.core import audio as audio_io
from soundlake.core.config import Section
from soundlake.core.errors import PERMANENT, SKIP_REASONS, RowError
from soundlake.stages.base import FLOW, Stage, flow_failure


class SegmentSpec(Section):
    sample_rate: int = Field(32000, ge=8000, le=192000)
    channels: Literal[1, 2] = 1
    window: float = Field(10.0, gt=0, description="clip length in seconds")
    policy: Literal["annotated", "first", "sliding", "random"] = "first"
    hop: float | None = Field(None, gt=0, description="sliding: hop in seconds (default: window)")
    max_windows: int | None = Field(None, ge=1, description="at most this many clips per input")
    remainder: Literal["pad", "drop", "keep"] = Field("pad", description="the last partial window (or an "
                                                      "input shorter than one): padded to the window, dropped, or "
                                                      "kept at its own length (one-shot sound effects)")
    min_duration: float = Field(1.0, ge=0, description="shorter content is a too_short failure")
    max_duration: float = Field(3600.0, gt=0, description="longer inputs are a too_long failure")
    silence_dbfs: float = Field(-60.0, le=0, description="windows with RMS below this are dropped")
    loudness: bool = Field(True, description="measure integrated loudness (LUFS)")
    truncated: Literal["fail", "keep"] = Field(
        "fail", description="a file holding less than its header promises: a corrupt failure, or "
                            "keep its clips flagged in meta_json")
    seed: int = 0
    ffmpeg_timeout: float = Field(60.0, gt=0)


def describe_skips(skipped: dict[str, int], spec: SegmentSpec) -> str:
    """'110 shorter than 1 s (segment.min_duration), 2 silent below -60 dBFS (segment.silence_dbfs)'."""
    what = {"too_short": f"shorter than {spec.min_duration:g} s", "too_long": f"longer than {spec.max_duration:g} s",
            "silent": f"silent below {spec.silence_dbfs:g} dBFS", "excluded": "excluded"}
    return ", ".join(f"{n} {what.get(r, r)} ({SKIP_REASONS.get(r, r)})"
                     for r, n in sorted(skipped.items(), key=lambda kv: -kv[1]))


def clip_id(source: str, source_id: str, start_s: float) -> str:
    """Stable id from the source identity: re-running a job never duplicates a clip."""
    ms = int(round(start_s * 1000))
    if len(source_id) <= 64 and source_id.isascii() and source_id.isprintable() and " " not in source_id \
            and ":" not in source_id and "/" not in source_id:
        return f"{source}:{source_id}:{ms}"
    digest = hashlib.blake2b(source_id.encode("utf-8"), digest_size=10).hexdigest()
    return f"{source}:{digest}:{ms}"


def window_starts(content_s: float, spec: SegmentSpec, source_id: str,
                  start_s: float | None = None) -> list[float]:
    """Window start times (s) for an input of ``content_s`` seconds under the spec's policy."""
    win = spec.window
    if spec.policy == "annotated" and start_s is not None:
        starts = [max(0.0, min(start_s, content_s))]
    elif spec.policy == "random":
        seed = int.from_bytes(hashlib.blake2b(f"{spec.seed}:{source_id}".encode(), digest_size=8).digest(), "little")
        rng = np.random.default_rng(seed)
        starts = [float(rng.uniform(0.0, content_s - win))] if content_s > win else [0.0]
    elif spec.policy == "sliding":
        hop = spec.hop or win
        starts, t = [], 0.0
        while t < content_s - 1e-9:
            starts.append(round(t, 6))
            t += hop
    else:  # first (and annotated without an annotation)
        starts = [0.0]
    return starts[: spec.max_windows] if spec.max_windows else starts


def _load(row: dict, spec: SegmentSpec) -> audio_io.Decoded:
    uri = row["uri"]
    if uri.startswith("synth://"):
        from soundlake.sources.synth import plan_scene, render_scene

        u = urlparse(uri)
        q = parse_qs(u.query)
        seed, index = int(u.netloc), int(u.path.strip("/"))
        scene = plan_scene(seed, index, duration=float(q.get("duration", ["10"])[0]),
                           speech=q.get("speech", ["0"])[0] == "1")
        audio = render_scene(scene, sample_rate=spec.sample_rate)
        return audio_io.Decoded(audio[:, None].astype(np.float32), spec.sample_rate, "synth")
    return audio_io.decode(audio_io.local_path(uri), ffmpeg_timeout=spec.ffmpeg_timeout,
                           max_duration=spec.max_duration)


class SegmentStage(Stage):
    name = "segment"

    def __init__(self, spec: SegmentSpec, run_id: str):
        self.spec = spec
        self.run_id = run_id

    def process(self, batch: pa.Table) -> pa.Table:
        out: list[dict] = []
        for row in batch.to_pylist():
            try:
                out.extend(self.segment_one(row))
            except RowError as e:
                out.append(flow_failure(row, self.name, self.run_id, e.error, e.message))
        return pa.Table.from_pylist(out, schema=FLOW)

    def segment_one(self, row: dict) -> list[dict]:
        spec = self.spec
        dec = _load(row, spec)
        if dec.audio.shape[0] == 0:
            raise RowError("corrupt", "decoder produced no samples")
        meta_json = row.get("meta_json")
        if dec.truncated:
            if spec.truncated == "fail":
                raise RowError("corrupt", dec.truncation)
            meta_json = json.dumps({**json.loads(meta_json or "{}"), "truncated": True,
                                    "held_s": round(dec.duration, 6), "promised_s": dec.promised_s},
                                   ensure_ascii=False)
        src_sr, src_ch, src_dur = dec.sample_rate, dec.audio.shape[1], dec.duration
        if src_dur < spec.min_duration:
            raise RowError("too_short", f"{src_dur:.2f} s is under segment.min_duration={spec.min_duration} s")
        if src_dur > spec.max_duration:
            raise RowError("too_long", f"{src_dur:.0f} s is over segment.max_duration={spec.max_duration:.0f} s")
        audio = audio_io.to_channels(dec.audio, spec.channels)
        audio = audio_io.resample(audio, src_sr, spec.sample_rate)
        sr = spec.sample_rate
        win_n = int(round(spec.window * sr))
        content_s = audio.shape[0] / sr
        clips, silent = [], 0
        now = datetime.now(timezone.utc)
        for start in window_starts(content_s, spec, row["source_id"], row.get("start_s")):
            a = int(round(start * sr))
            chunk = audio[a: a + win_n]
            real = chunk.shape[0] / sr
            if chunk.shape[0] < win_n:
                if spec.remainder == "drop" or real < spec.min_duration:
                    continue
                if spec.remainder == "pad":
                    chunk = np.pad(chunk, ((0, win_n - chunk.shape[0]), (0, 0)))
            peak, rms, lufs = audio_io.levels(chunk[: int(real * sr)], sr, spec.loudness)
            if rms < spec.silence_dbfs:
                silent += 1
                continue
            flac = audio_io.encode_flac(chunk, sr)
            clips.append({
                **{k: row.get(k) for k in ("source", "source_id", "title", "description", "tags", "labels",
                                           "license", "uploader", "upload_date", "url",
                                           "ref_caption", "ref_caption_model", "attempt")},
                "meta_json": meta_json,
                "clip_id": clip_id(row["source"], row["source_id"], start),
                "run_id": self.run_id, "start_s": float(start), "duration_s": chunk.shape[0] / sr,
                "content_s": round(real, 6), "sample_rate": sr, "channels": spec.channels,
                "src_sample_rate": src_sr, "src_channels": src_ch, "src_codec": dec.codec,
                "src_duration_s": src_dur, "peak_dbfs": peak, "rms_dbfs": rms, "loudness_lufs": lufs,
                "flac": flac, "flac_bytes": len(flac), "audio_sha256": hashlib.sha256(flac).hexdigest(),
                "created": now, "status": "ok",
            })
        if not clips:
            if silent:
                raise RowError("silent", f"all {silent} window(s) are below segment.silence_dbfs={spec.silence_dbfs} dBFS")
            raise RowError("too_short", f"no window of at least {spec.min_duration} s fits in {content_s:.2f} s")
        return clips

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        return segment_tables(batch)


def segment_tables(batch: pa.Table) -> dict[str, pa.Table]:
    """Split a FLOW batch into clips (with audio), reference captions, failures and skipped inputs."""
    ok = batch.filter(pc.equal(batch["status"], "ok"))
    bad = batch.filter(pc.equal(batch["status"], "failed"))
    skipped = batch.filter(pc.equal(batch["status"], "skipped"))
    out: dict[str, pa.Table] = {}
    if ok.num_rows:
        out["clips"] = ok.select(CLIPS.names).cast(CLIPS)
        refs = ok.filter(pc.invert(pc.is_null(ok["ref_caption"])))
        if refs.num_rows:
            out["captions"] = pa.table({
                "clip_id": refs["clip_id"], "captioner": pa.array(["reference"] * refs.num_rows),
                "model_id": refs["ref_caption_model"], "model_hash": pa.nulls(refs.num_rows, pa.string()),
                "prompt_version": pa.nulls(refs.num_rows, pa.string()), "text": refs["ref_caption"],
                "run_id": refs["run_id"], "created": refs["created"]}, schema=CAPTIONS)
    if bad.num_rows:
        out["failures"] = pa.table({
            "source": bad["source"], "source_id": bad["source_id"], "clip_id": bad["clip_id"],
            "stage": bad["stage"], "error": bad["error"],
            "permanent": pa.array([e in PERMANENT for e in bad["error"].to_pylist()]),
            "message": bad["message"], "attempt": pc.fill_null(bad["attempt"], 1),
            "run_id": bad["run_id"], "time": bad["created"]}, schema=FAILURES)
    if skipped.num_rows:
        out["skipped"] = pa.table({
            "source": skipped["source"], "source_id": skipped["source_id"], "clip_id": skipped["clip_id"],
            "stage": skipped["stage"], "reason": skipped["error"],
            "setting": pa.array([SKIP_REASONS[e] for e in skipped["error"].to_pylist()], pa.string()),
            "message": skipped["message"], "run_id": skipped["run_id"], "time": skipped["created"]}, schema=SKIPPED)
    return out
