"""The fingerprint stage: a Chromaprint fingerprint, a loudness envelope and the fine detail
(:mod:`soundlake.dedup.detail`) of each clip's real audio, into ``fingerprints``.

Runs as Ray tasks over clips already in the lake (the workers read and decode the FLAC; only
the fingerprints, a few KB a clip, travel on). Only the clip's content is
fingerprinted (``content_s``, not the padding), so two short clips padded with silence do
not match on their silence. A clip whose audio does not decode becomes a ``failures`` row
(stage ``fingerprint``) and is not tried again by later runs.
"""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from soundlake.catalog.schema import FINGERPRINTS
from soundlake.core.audio import decode_flac
from soundlake.stages.base import Resources, Stage, failure_row, failures_table

# Clip columns the stage reads (for runner.lake_clips_dataset).
COLUMNS = ["clip_id", "source", "source_id", "content_s", "flac"]


def mono_content(flac: bytes, content_s: float | None) -> tuple[np.ndarray, int]:
    """(mono float32 audio without the padding, sample rate) of stored FLAC bytes."""
    audio, sr = decode_flac(flac)
    mono = audio.mean(axis=1).astype(np.float32)
    if content_s:
        mono = mono[: max(1, int(round(content_s * sr)))]
    return mono, sr


class FingerprintStage(Stage):
    name = "fingerprint"

    def __init__(self, run_id: str, batch_size: int = 64):
        self.run_id, self.batch_size = run_id, batch_size

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=self.batch_size)

    def setup(self) -> None:
        from soundlake.dedup import fingerprint

        self.algorithm = fingerprint

    def process(self, batch: pa.Table) -> pa.Table:
        cols: dict[str, list] = {"fp": [], "env": [], "contour": [], "pitch": []}
        errors = []
        for flac, content_s in zip(batch["flac"].to_pylist(), batch["content_s"].to_pylist()):
            try:
                audio, sr = mono_content(flac, content_s)
                fp, env, fine = self.algorithm.clip_features(audio, sr)
                got, error = {"fp": fp, "env": env, "contour": fine.contour, "pitch": fine.pitch}, None
            except (RuntimeError, ValueError, OSError) as e:  # undecodable audio: one row, not the block
                got, error = dict.fromkeys(cols), f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            for name, values in cols.items():
                values.append(got[name])
            errors.append(error)
        batch = batch.drop_columns(["flac"])
        for name, values in cols.items():   # numpy arrays straight into Arrow lists: no Python ints
            batch = batch.append_column(name, pa.array(values, FINGERPRINTS.field(name).type))
        batch = batch.append_column("fingerprinter", pa.array([self.algorithm.FINGERPRINTER] * batch.num_rows))
        return batch.append_column("fp_error", pa.array(errors, pa.string()))

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        # Runs on the write step's own copy of the stage (no setup): everything comes from the batch.
        now = datetime.now(timezone.utc)
        failed = batch.filter(pc.is_valid(batch["fp_error"])).select(["clip_id", "source", "source_id", "fp_error"])
        out = failures_table([failure_row(r, self.name, self.run_id, "corrupt", r["fp_error"], now)
                              for r in failed.to_pylist()])
        ok = batch.filter(pc.is_null(batch["fp_error"]))
        if ok.num_rows:
            n = ok.num_rows
            out["fingerprints"] = pa.table({
                **{c: ok[c] for c in ("clip_id", "fingerprinter", "fp", "env", "contour", "pitch")},
                "run_id": [self.run_id] * n, "created": pa.array([now] * n, FINGERPRINTS.field("created").type),
            }).cast(FINGERPRINTS)
        return out


def group_members(con, pairs: list[tuple[str, str]], among: set[str] | None = None) -> list[tuple[str, list[str]]]:
    """(kept clip, members) per connected group of ``pairs`` (only the members in ``among``, when
    given; groups left with one member are not groups there). The kept clip is chosen by
    :func:`soundlake.dedup.groups.pick_kept` from each member's license, caption score (the
    ``dataset`` view's preferred caption) and length, read through ``con``."""
    from soundlake.dedup.groups import connected_groups, pick_kept

    comps: dict = {}
    for clip, g in connected_groups(pairs).items():
        if among is None or clip in among:
            comps.setdefault(g, []).append(clip)
    comps = {g: sorted(m) for g, m in comps.items() if len(m) > 1}
    clips = sorted(c for m in comps.values() for c in m)
    con.register("_group_members", pa.table({"clip_id": pa.array(clips, pa.string())}))
    info = {r[0]: {"clip_id": r[0], "license": r[1], "score": r[2], "duration_s": r[3]} for r in con.execute(
        """SELECT d.clip_id, any_value(d.license), max(d.score), max(coalesce(d.content_s, d.duration_s))
           FROM dataset d JOIN _group_members USING (clip_id) GROUP BY d.clip_id""").fetchall()}
    con.unregister("_group_members")
    blank = {"license": None, "score": None, "duration_s": None}
    out = [(pick_kept([info.get(c, {"clip_id": c, **blank}) for c in m]), m) for m in comps.values()]
    return sorted(out)
