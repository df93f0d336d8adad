"""Arrow schemas of the lake's tables.

Each table is a folder of Parquet part files under the lake root. The ``clips``
parts also hold the FLAC bytes in a ``flac`` column: Parquet is columnar, so the
``clips`` view never reads them and the ``audio`` view reads nothing else, and the
audio is stored exactly once, in the same atomic file as its clip row.
"""
from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

# Source metadata, carried from the input row to the clip (and used by captioners).
METADATA = [
    ("title", pa.string()),
    ("description", pa.string()),
    ("tags", pa.list_(pa.string())),
    ("labels", pa.list_(pa.string())),
    ("license", pa.string()),
    ("uploader", pa.string()),
    ("upload_date", pa.string()),
    ("url", pa.string()),
    ("meta_json", pa.string()),       # any other source metadata, as JSON
]

# What a source lists per input (small rows on the driver; no audio).
INPUT_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("source_id", pa.string()),
    ("uri", pa.string()),              # a file path, synth://seed/index, or a media URL
    ("start_s", pa.float64()),         # annotated segment, when the source has one
    ("end_s", pa.float64()),
    *METADATA,
    ("ref_caption", pa.string()),      # a reference (human or ground-truth) caption
    ("ref_caption_model", pa.string()),
    ("attempt", pa.int32()),
])

CLIPS = pa.schema([
    ("clip_id", pa.string()),
    ("source", pa.string()),
    ("source_id", pa.string()),
    ("run_id", pa.string()),
    ("start_s", pa.float64()),        # window start in the source media
    ("duration_s", pa.float64()),     # stored length (window length, padding included)
    ("content_s", pa.float64()),      # real audio inside the window (< duration_s when padded)
    ("sample_rate", pa.int32()),
    ("channels", pa.int16()),
    ("src_sample_rate", pa.int32()),
    ("src_channels", pa.int16()),
    ("src_codec", pa.string()),
    ("src_duration_s", pa.float64()),
    *METADATA,
    ("peak_dbfs", pa.float32()),
    ("rms_dbfs", pa.float32()),
    ("loudness_lufs", pa.float32()),
    ("flac_bytes", pa.int64()),
    ("audio_sha256", pa.string()),    # of the FLAC bytes
    ("created", TS),
    ("flac", pa.large_binary()),
])
CLIP_COLUMNS = [f.name for f in CLIPS if f.name != "flac"]

FAILURES = pa.schema([
    ("source", pa.string()), ("source_id", pa.string()),
    ("clip_id", pa.string()),         # null for failures before a clip exists
    ("stage", pa.string()),
    ("error", pa.string()),           # a class from soundlake.core.errors.ERROR_CLASSES
    ("permanent", pa.bool_()), ("message", pa.string()), ("attempt", pa.int32()),
    ("run_id", pa.string()), ("time", TS),
])

# Inputs left out by a policy decision (too short, too long, silent...), with the setting
# that decided it: not failures, so failures_open and the run summary show only what went wrong.
SKIPPED = pa.schema([
    ("source", pa.string()), ("source_id", pa.string()), ("clip_id", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()),          # a key of soundlake.core.errors.SKIP_REASONS
    ("setting", pa.string()),         # e.g. segment.min_duration
    ("message", pa.string()), ("run_id", pa.string()), ("time", TS),
])

CAPTIONS = pa.schema([
    ("clip_id", pa.string()),
    ("captioner", pa.string()),       # reference | template | autocap | qwen | refine ...
    ("model_id", pa.string()), ("model_hash", pa.string()), ("prompt_version", pa.string()),
    ("text", pa.string()), ("run_id", pa.string()), ("created", TS),
])

RUNS = pa.schema([
    ("run_id", pa.string()),
    ("pipeline", pa.string()),
    ("status", pa.string()),          # running | finished | failed | interrupted
    ("config_json", pa.string()),
    ("code_version", pa.string()),
    ("host", pa.string()),
    ("started", TS),
    ("ended", TS),
    ("counts_json", pa.string()),
    ("parts", pa.list_(pa.string())),  # part files committed by this run
    ("read_as_of", pa.string()),       # {table: Delta version} the run started from (JSON)
    ("wrote_as_of", pa.string()),      # {table: version} when it ended: `--as-of RUN` reads this
])

# CLAP outputs: each row names the model that produced it (never mix two models' numbers).
EMBEDDINGS_BASE = [
    ("clip_id", pa.string()), ("model_id", pa.string()), ("model_hash", pa.string()),
    ("backend", pa.string()), ("identity_json", pa.string()), ("dim", pa.int32()),
]


def embeddings_schema(dim: int) -> pa.Schema:
    """Embeddings as FLOAT[dim] arrays, which DuckDB's array_cosine_similarity takes."""
    return pa.schema(EMBEDDINGS_BASE + [("embedding", pa.list_(pa.float32(), dim)),
                                        ("run_id", pa.string()), ("created", TS)])


TAGS = pa.schema([
    ("clip_id", pa.string()), ("model_id", pa.string()), ("model_hash", pa.string()),
    ("label_set", pa.string()), ("rank", pa.int16()), ("label", pa.string()), ("prob", pa.float32()),
    ("run_id", pa.string()), ("created", TS),
])
SCORES = pa.schema([
    ("clip_id", pa.string()), ("captioner", pa.string()), ("caption_model_id", pa.string()),
    ("caption_text", pa.string()), ("clap_model_id", pa.string()), ("clap_model_hash", pa.string()),
    ("score", pa.float32()), ("run_id", pa.string()), ("created", TS),
])

# Exports: one row per export, and which clips went to which split and shard.
EXPORTS = pa.schema([
    ("export_id", pa.string()), ("name", pa.string()), ("out", pa.string()), ("created", TS),
    ("args_json", pa.string()),
    ("catalog_sha256", pa.string()),   # hash of the part files the export read
    ("manifest_sha256", pa.string()), ("clips", pa.int64()), ("shards", pa.int64()), ("bytes", pa.int64()),
    ("splits_json", pa.string()),      # {"train": n, "valid": n, ...}
    ("as_of", pa.string()),            # {table: Delta version} it read (JSON): `export --as-of EXPORT_ID`
])
EXPORT_MEMBERS = pa.schema([
    ("export_id", pa.string()), ("clip_id", pa.string()), ("split", pa.string()), ("shard", pa.string()),
])

# Duplicates and evaluation-set leakage (soundlake.pipelines.dedup). Fingerprints are derived
# rows like embeddings (one per clip and fingerprinter, backfilled, resumable); the other
# tables are snapshots: each `soundlake dedup` or `eval-sets add` replaces them as a whole
# (soundlake.catalog.snapshots), so a query never sees half of one run and half of another.
FINGERPRINTS = pa.schema([
    ("clip_id", pa.string()), ("fingerprinter", pa.string()),   # algorithm identity (soundlake.dedup)
    ("fp", pa.list_(pa.uint32())),
    ("env", pa.list_(pa.int8())),      # loudness envelope (dB under the loudest frame); NULL in older rows
    ("contour", pa.list_(pa.int8())),  # soundlake.dedup.detail: 2.9 ms level contour; NULL in older rows
    ("pitch", pa.list_(pa.int16())),   # ... and pitch track (cents above 10 Hz, 0: not tonal)
    ("run_id", pa.string()), ("created", TS),
])
DUPLICATES = pa.schema([
    ("clip_a", pa.string()), ("clip_b", pa.string()),           # clip_a < clip_b
    ("level", pa.string()),            # identity | fingerprint | semantic
    ("score", pa.float32()),           # identity: overlap fraction; fingerprint: bit agreement; semantic: cosine
    ("method", pa.string()),           # identity: freesound_id | youtube_id; else the fingerprinter or CLAP model id
    ("model_hash", pa.string()),       # semantic: the CLAP checkpoint sha256
    ("run_id", pa.string()), ("created", TS),
])
DUPLICATE_GROUPS = pa.schema([
    ("group_id", pa.string()), ("clip_id", pa.string()), ("level", pa.string()),
    ("kept", pa.bool_()),              # the group's representative (soundlake.dedup.groups.pick_kept)
    ("size", pa.int32()), ("run_id", pa.string()), ("created", TS),
])
EVAL_SETS = pa.schema([
    ("name", pa.string()), ("format", pa.string()), ("source_file", pa.string()),
    ("source_file_sha256", pa.string()), ("items", pa.int64()),
    ("fingerprinted", pa.int64()), ("embedded", pa.int64()),    # items whose audio was given and read
    ("set_id", pa.string()), ("created", TS),
])
EVAL_SET_ITEMS = pa.schema([
    ("name", pa.string()), ("item_id", pa.string()),
    ("youtube_id", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()),
    ("freesound_id", pa.string()), ("file", pa.string()), ("captions", pa.list_(pa.string())),
    ("fingerprinter", pa.string()), ("fp", pa.list_(pa.uint32())), ("env", pa.list_(pa.int8())),
    ("contour", pa.list_(pa.int8())), ("pitch", pa.list_(pa.int16())),
    ("clap_model_id", pa.string()), ("clap_model_hash", pa.string()), ("embedding", pa.list_(pa.float32())),
    ("set_id", pa.string()),
])
LEAKAGE = pa.schema([
    ("clip_id", pa.string()), ("eval_set", pa.string()), ("item_id", pa.string()),
    ("level", pa.string()), ("score", pa.float32()), ("method", pa.string()),
    ("run_id", pa.string()), ("created", TS),
])
# Tables whose visible parts are the ones their newest snapshot lists (never a plain glob).
SNAPSHOT_TABLES = ("duplicates", "duplicate_groups", "eval_sets", "eval_set_items", "leakage")

# Human reviews from `soundlake serve --review`: append-only rows (one part per review, written
# like any part, without the lake lock, so a review lands while a curate runs). The newest row
# per target wins (``review_latest``): a later review supersedes, and undoes, an earlier one.
REVIEWS = pa.schema([
    ("review_id", pa.string()),
    ("target", pa.string()),           # clip | caption
    ("clip_id", pa.string()),
    ("captioner", pa.string()), ("caption_model_id", pa.string()),   # caption reviews only
    ("prompt_version", pa.string()), ("caption_text", pa.string()),
    ("verdict", pa.string()),          # caption: good | partly_wrong | wrong | clear; clip: exclude | keep
    ("reason", pa.string()), ("reviewer", pa.string()), ("created", TS),
])

# Every input a run listed, so `retry-failed` can rebuild the inputs it re-queues.
INPUTS = pa.schema(list(INPUT_SCHEMA) + [("run_id", pa.string())])

TABLES: dict[str, pa.Schema] = {
    "inputs": INPUTS,
    "clips": CLIPS,
    "failures": FAILURES,
    "skipped": SKIPPED,
    "captions": CAPTIONS,
    "runs": RUNS,
    "embeddings": embeddings_schema(1),  # the typed empty view's placeholder; parts carry their own dim
    "tags": TAGS,
    "scores": SCORES,
    "exports": EXPORTS,
    "export_members": EXPORT_MEMBERS,
    "fingerprints": FINGERPRINTS,
    "duplicates": DUPLICATES,
    "duplicate_groups": DUPLICATE_GROUPS,
    "eval_sets": EVAL_SETS,
    "eval_set_items": EVAL_SET_ITEMS,
    "leakage": LEAKAGE,
    "reviews": REVIEWS,
}

# Derived rows are written before the clip rows that commit their input, so a kill in
# between can leave a second copy when the input is redone: views keep the newest per key.
DEDUPE_KEYS: dict[str, tuple[str, str]] = {
    "captions": ("clip_id, captioner, model_id, prompt_version, text", "created"),
    "embeddings": ("clip_id, model_id, model_hash", "created"),
    "tags": ("clip_id, model_id, model_hash, label_set, rank", "created"),
    "scores": ("clip_id, captioner, caption_text, clap_model_id, clap_model_hash", "created"),
    "fingerprints": ("clip_id, fingerprinter", "created"),
}
