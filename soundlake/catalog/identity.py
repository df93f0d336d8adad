"""Which recording a clip comes from: its Freesound sound id, or its YouTube video and time range.

The keys come from what the sources store (SQL over the ``clips`` view, so any source counts):

* Freesound: ``source = 'freesound'`` (its ``source_id`` is the sound id), a ``freesound_id`` or
  ``sound_id`` field in ``meta_json`` (local metadata), or a freesound.org sound URL in ``url``.
* YouTube: ``meta_json.ytid`` (AudioSet, VGGSound) or ``youtube_id``, or a YouTube URL in ``url``.
  The range in the video is the clip's window: AudioSet and VGGSound store the absolute start
  in the video; other sources add a ``start_s`` / ``start_time`` / ``start_seconds`` field
  of their metadata (the file's offset in the video); without one the range is unknown and
  matches any range of the video.

Two clips are the same recording (``identity_pairs_sql``) when they share a Freesound id
(two windows of one input only when they overlap), or a YouTube id with overlapping ranges.
The score is the overlap as a fraction of the shorter window (1 when a range is unknown).
"""
from __future__ import annotations

YOUTUBE_URL_RE = r"(?:youtube\.com/(?:watch\?(?:[^#]*&)?v=|shorts/|embed/)|youtu\.be/)([A-Za-z0-9_-]{11})"
FREESOUND_URL_RE = r"freesound\.org/(?:people/[^/]+/)?sounds/([0-9]+)"
YOUTUBE_SOURCES = ("audioset", "vggsound")   # sources whose start_s is the absolute time in the video
EVAL_SEGMENT_S = 10.0                        # AudioCaps / VGGSound segments without an end


def _meta(field: str) -> str:
    """A metadata field as text; NULL when absent or empty (local metadata CSVs leave cells empty)."""
    return f"nullif(CASE WHEN json_valid(meta_json) THEN json_extract_string(meta_json, '$.{field}') END, '')"


def clip_keys_sql(clips: str = "clips") -> str:
    """(clip_id, source, source_id, start_s, len_s, kind, key, vstart, vend) per identity key of each clip."""
    yt_sources = ", ".join(f"'{s}'" for s in YOUTUBE_SOURCES)
    offset = (f"CASE WHEN source IN ({yt_sources}) THEN 0.0 ELSE TRY_CAST(coalesce({_meta('start_s')}, "
              f"{_meta('start_time')}, {_meta('start_seconds')}) AS DOUBLE) END")
    return f"""
      WITH c AS (SELECT clip_id, source, source_id, start_s, coalesce(content_s, duration_s) AS len_s, url, meta_json
                 FROM {clips}),
      k AS (
        SELECT clip_id, source, source_id, start_s, len_s, 'freesound_id' AS kind,
               coalesce(CASE WHEN source = 'freesound' THEN source_id END, {_meta('freesound_id')},
                        {_meta('sound_id')}, nullif(regexp_extract(url, '{FREESOUND_URL_RE}', 1), '')) AS key,
               start_s AS vstart, start_s + len_s AS vend FROM c
        UNION ALL
        SELECT clip_id, source, source_id, start_s, len_s, 'youtube_id' AS kind,
               coalesce({_meta('ytid')}, {_meta('youtube_id')},
                        nullif(regexp_extract(url, '{YOUTUBE_URL_RE}', 1), '')) AS key,
               {offset} + start_s AS vstart, {offset} + start_s + len_s AS vend FROM c)
      SELECT * FROM k WHERE key IS NOT NULL AND key <> ''"""


def _overlap(a0: str, a1: str, b0: str, b1: str) -> str:
    """Overlap of [a0, a1) and [b0, b1) as a fraction of the shorter one (0 when disjoint)."""
    return f"greatest(0.0, least({a1}, {b1}) - greatest({a0}, {b0})) / greatest(least({a1} - {a0}, {b1} - {b0}), 1e-9)"


def identity_pairs_sql(clips: str = "clips") -> str:
    """(clip_a, clip_b, score, method): clips of the same recording, clip_a < clip_b."""
    same_input = "a.source = b.source AND a.source_id = b.source_id"
    window = _overlap("a.start_s", "a.start_s + a.len_s", "b.start_s", "b.start_s + b.len_s")
    video = _overlap("a.vstart", "a.vend", "b.vstart", "b.vend")
    score = f"""CASE WHEN {same_input} THEN {window}
                     WHEN a.kind = 'freesound_id' OR a.vstart IS NULL OR b.vstart IS NULL THEN 1.0
                     ELSE {video} END"""
    return f"""
      WITH keys AS ({clip_keys_sql(clips)}),
      p AS (SELECT a.clip_id AS clip_a, b.clip_id AS clip_b, a.kind AS method, {score} AS score
            FROM keys a JOIN keys b ON a.kind = b.kind AND a.key = b.key AND a.clip_id < b.clip_id)
      SELECT clip_a, clip_b, max(score) AS score, arg_max(method, score) AS method FROM p
      WHERE score > 0 GROUP BY clip_a, clip_b"""


def identity_leakage_sql(clips: str = "clips", items: str = "eval_set_items") -> str:
    """(clip_id, eval_set, item_id, score, method): clips of a recording that an eval item comes from."""
    end = f"coalesce(i.end_s, i.start_s + {EVAL_SEGMENT_S})"
    video = _overlap("k.vstart", "k.vend", "i.start_s", end)
    return f"""
      WITH keys AS ({clip_keys_sql(clips)}),
      m AS (
        SELECT k.clip_id, i.name AS eval_set, i.item_id, 'youtube_id' AS method,
               CASE WHEN k.vstart IS NULL OR i.start_s IS NULL THEN 1.0 ELSE {video} END AS score
        FROM keys k JOIN {items} i ON k.kind = 'youtube_id' AND i.youtube_id = k.key
        UNION ALL
        SELECT k.clip_id, i.name, i.item_id, 'freesound_id', 1.0
        FROM keys k JOIN {items} i ON k.kind = 'freesound_id' AND i.freesound_id = k.key)
      SELECT clip_id, eval_set, item_id, max(score) AS score, arg_max(method, score) AS method FROM m
      WHERE score > 0 GROUP BY clip_id, eval_set, item_id"""
