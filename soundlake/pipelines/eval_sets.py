"""`soundlake eval-sets add|list`: register evaluation sets, and keep the lake's leakage into them current.

    add_eval_set("./lake", "audiocaps-test", "test.csv")                   # ids only: identity leakage
    add_eval_set("./lake", "clotho-eval", "clotho_captions_evaluation.csv", audio="clotho/evaluation")

The file is parsed (:mod:`soundlake.catalog.eval_sets`); with ``audio``, each item's file in
that folder is decoded here (eval sets are small: a few thousand clips) and fingerprinted,
and embedded with the CLAP model of the lake's newest embeddings (or ``clap_model``), so
content leakage can be found. The set is committed with the leakage of every registered set
recomputed from what the lake holds (identity always; fingerprint and semantic from the
fingerprints and embeddings already computed: run ``soundlake dedup`` to complete them), in
one snapshot step. Adding a name again replaces that set.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from soundlake.catalog import snapshots
from soundlake.catalog.eval_sets import file_sha256, parse_eval_set
from soundlake.catalog.lake import Lake
from soundlake.catalog.schema import EVAL_SET_ITEMS, EVAL_SETS
from soundlake.catalog.sql import close, connect
from soundlake.core.audio import AUDIO_EXTS, decode, resample
from soundlake.core.errors import RowError, UserError
from soundlake.dedup.detail import THRESHOLDS as DETAIL
from soundlake.pipelines import matches
from soundlake.pipelines.dedup import commit_levels, fingerprinter, write_leakage
from soundlake.pipelines.runner import RunSummary, new_run_id, recorded_run

EVAL_TABLES = ("eval_sets", "eval_set_items")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class EvalSetResult:
    name: str
    format: str
    items: int
    fingerprinted: int = 0
    embedded: int = 0
    missing_audio: list[str] = field(default_factory=list)   # items without a file in --audio
    undecodable: list[str] = field(default_factory=list)
    clap_model: str | None = None
    leakage: dict[str, dict[str, int]] = field(default_factory=dict)   # eval set -> level -> clips
    levels: list[str] = field(default_factory=list)                    # leakage levels checked


def audio_files(folder: str) -> dict[str, Path]:
    """Audio files under ``folder`` by name and by stem (the formats name items either way)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"--audio {folder}: not a folder")
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in AUDIO_EXTS:
            out.setdefault(p.name, p)
            out.setdefault(p.stem, p)
    return out


def item_audio(item: dict, files: dict[str, Path]) -> Path | None:
    """The file of an item: its file name (any extension), or for YouTube items ``<id>``, ``Y<id>``, ``<id>_<start>``."""
    names = [item["file"], item["item_id"]]
    if item["youtube_id"]:
        names += [f"Y{item['file']}", f"Y{item['item_id']}", item["youtube_id"], f"Y{item['youtube_id']}"]
    names += [Path(n).stem for n in names if n]   # the same file in another container (x.wav -> x.flac)
    for n in names:
        if n and n in files:
            return files[n]
    return None


def content_features(items: list[dict], folder: str, clap_model: str | None, result: EvalSetResult) -> None:
    """Fill each item's fingerprint (and embedding, when ``clap_model``) from its audio file."""
    name, _ = fingerprinter(required=True)
    from soundlake.dedup.fingerprint import clip_features

    model = None
    if clap_model:
        from soundlake.models.clap.load import load_clap

        try:
            model = load_clap(clap_model)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the CLAP model {clap_model!r} to embed the eval audio ({e}); "
                            "pass --clap-model PATH") from None
        result.clap_model = clap_model
    files = audio_files(folder)
    pending: list[tuple[dict, np.ndarray]] = []   # embedded 16 at a time: memory stays one batch

    def embed_pending() -> None:
        for (item, _), v in zip(pending, model.embed_audio([a for _, a in pending])):
            item["clap_model_id"], item["clap_model_hash"] = clap_model, str(model.identity.get("checkpoint_sha256", ""))
            item["embedding"] = np.asarray(v, np.float32).tolist()
            result.embedded += 1
        pending.clear()

    for item in items:
        path = item_audio(item, files)
        if path is None:
            result.missing_audio.append(item["item_id"])
            continue
        try:
            dec = decode(str(path))
        except RowError as e:
            result.undecodable.append(f"{path.name}: {e.error}")
            continue
        mono = dec.audio.mean(axis=1).astype(np.float32)
        fp, env, fine = clip_features(mono, dec.sample_rate)
        item["fingerprinter"], item["fp"], item["env"] = name, np.asarray(fp, np.uint32).tolist(), env.tolist()
        item["contour"], item["pitch"] = fine.contour, fine.pitch
        result.fingerprinted += 1
        if model is not None:
            pending.append((item, resample(mono[:, None], dec.sample_rate, model.sample_rate)[:, 0]))
            if len(pending) == 16:
                embed_pending()
    if pending:
        embed_pending()


def lake_clap_model(lake: Lake) -> str | None:
    con = connect(lake)
    try:
        newest = matches.newest_clap_model(con)
    finally:
        close(con)
    return newest[0] if newest else None


def add_eval_set(lake_uri: str, name: str, csv_path: str, fmt: str | None = None, metadata: str | None = None,
                 audio: str | None = None, clap_model: str | None = None, wait: bool = False) -> EvalSetResult:
    if not _NAME.fullmatch(name) or name == "all":
        raise UserError(f"eval set name {name!r}: use letters, digits, '-', '_' or '.' (not 'all')")
    lake = Lake(lake_uri)
    if not lake.exists():
        raise UserError(f"no lake at {lake.uri}: run `soundlake curate demo --lake {lake.uri}` first")
    fmt, items = parse_eval_set(csv_path, fmt, metadata)
    result = EvalSetResult(name, fmt, len(items))
    if audio:
        content_features(items, audio, clap_model or lake_clap_model(lake), result)
    run_id = new_run_id()
    now = datetime.now(timezone.utc)
    n = len(items)
    rows = pa.Table.from_pylist([{**{k: None for k in EVAL_SET_ITEMS.names}, **it, "name": name, "set_id": run_id}
                                 for it in items], schema=EVAL_SET_ITEMS)
    record = pa.Table.from_pylist([{"name": name, "format": fmt, "source_file": str(Path(csv_path).resolve()),
                                    "source_file_sha256": file_sha256(csv_path), "items": n,
                                    "fingerprinted": result.fingerprinted, "embedded": result.embedded,
                                    "set_id": run_id, "created": now}], schema=EVAL_SETS)
    progress = RunSummary(run_id=run_id, pipeline="eval-sets", lake=lake.uri)
    config = json.dumps({"name": name, "csv": str(csv_path), "format": fmt, "audio": audio, "clap_model": result.clap_model})
    with lake.lock(run_id, wait=wait), recorded_run(lake, "eval-sets", config, progress):
        lake.clean_tmp()
        # The set's parts replace those of an earlier set of the same name (by_name in the meta).
        by_name = (snapshots.table_info(lake, "eval_sets") or {}).get("meta", {}).get("by_name", {})
        by_name[name] = {t: lake.write_part(t, data, run_id) for t, data in (("eval_sets", record),
                                                                               ("eval_set_items", rows))}
        tables = {t: sorted(parts[t] for parts in by_name.values()) for t in EVAL_TABLES}
        con = connect(lake, parts={t: [lake.path(p) for p in tables[t]] for t in EVAL_TABLES})   # the new sets
        try:
            leakage = refresh_leakage(lake, con, run_id, result)
        finally:
            close(con)
        commit_levels(lake, run_id, None, leakage, extra=tables,
                      extra_meta={t: {"by_name": by_name} for t in EVAL_TABLES})
    return result


def refresh_leakage(lake: Lake, con, run_id: str, result: EvalSetResult) -> dict[str, dict]:
    """Leakage records of every level the lake has data for, against every registered set."""
    now = datetime.now(timezone.utc)
    previous = (snapshots.table_info(lake, "leakage") or {}).get("meta", {}).get("levels", {})
    records: dict[str, dict] = {}
    found: dict[str, dict[str, set]] = {}

    def record(level: str, leaks: list[tuple], meta: dict) -> None:
        records[level] = write_leakage(lake, con, level, leaks, meta, run_id, now)
        for clip, set_name, *_ in leaks:
            found.setdefault(set_name, {}).setdefault(level, set()).add(clip)

    record("identity", matches.identity_leakage(con), {"method": "freesound_id, youtube_id"})
    clips = con.execute("SELECT count(DISTINCT clip_id) FROM clips").fetchall()[0][0]
    fp_name, fp_threshold = fingerprinter()
    index = matches.clip_fingerprint_index(con, fp_name)
    if len(index):
        record("fingerprint", matches.fingerprint_leakage(con, index, fp_name, fp_threshold),
               {"method": fp_name, "threshold": fp_threshold, "env_threshold": index.env_threshold, "detail": DETAIL,
                "clips_without": clips - len(index)})
    model = matches.newest_clap_model(con, (previous.get("semantic") or {}).get("method"))
    if model is not None:
        threshold = float((previous.get("semantic") or {}).get("threshold", 0.95))
        ids = matches.clip_embedding_ids(con, model)
        record("semantic", matches.semantic_leakage(con, ids, model, threshold),
               {"method": model[0], "model_hash": model[1], "threshold": threshold, "clips_without": clips - len(ids)})
    result.levels = list(records)
    result.leakage = {n: {lv: len(c) for lv, c in by.items()} for n, by in found.items()}
    return records


def list_eval_sets(lake_uri: str) -> list[dict]:
    con = connect(Lake(lake_uri))
    try:
        cols = ["name", "format", "items", "fingerprinted", "embedded", "source_file", "created"]
        rows = con.execute(f"SELECT {', '.join(cols)} FROM eval_sets ORDER BY name").fetchall()
    finally:
        close(con)
    return [dict(zip(cols, r)) for r in rows]
