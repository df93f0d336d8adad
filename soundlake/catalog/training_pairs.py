"""(audio, caption) pairs from the lake, for training models in-process."""
from __future__ import annotations

from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import connect, where_expression
from soundlake.core.audio import decode_mono
from soundlake.core.errors import UserError
from soundlake.core.splits import in_holdout


def load_pairs(lake: Lake | str, sample_rate: int, captioner: str = "reference", where: str | None = None,
               holdout: float = 0.0, limit: int | None = None):
    """Returns (train, held_out), each a list of (clip_id, mono float32 audio at sample_rate, caption).

    One caption per clip: the named captioner's (the newest when there are several).
    """
    con = connect(lake)
    sql = f"""SELECT c.clip_id, a.flac, cap.text FROM clips c JOIN audio a USING (clip_id)
              JOIN (SELECT clip_id, arg_max(text, created) AS text FROM captions WHERE captioner = ?
                    GROUP BY clip_id) cap USING (clip_id)
              {'WHERE (' + where_expression(where) + ')' if where else ''} ORDER BY c.clip_id {f'LIMIT {int(limit)}' if limit else ''}"""
    try:
        rows = con.execute(sql, [captioner]).fetchall()
    except Exception as e:  # duckdb.Error: a bad --where
        raise UserError(f"SQL error in --where: {str(e).splitlines()[0]}") from None
    if not rows:
        raise UserError(f"no clips with a {captioner!r} caption in the lake"
                        + (f" matching {where!r}" if where else "") + ": curate first (soundlake curate demo)")
    train, held = [], []
    for clip_id, flac, text in rows:
        (held if in_holdout(clip_id, holdout) else train).append((clip_id, decode_mono(flac, sample_rate), text))
    return train, held


def clip_metadata(lake: Lake | str, clip_ids: list[str]) -> dict[str, dict]:
    """{clip_id: {title, description, labels, tags, meta_json}} for training captioners on metadata."""
    con = connect(lake)
    con.execute("CREATE TEMP TABLE wanted(clip_id VARCHAR)")
    con.executemany("INSERT INTO wanted VALUES (?)", [[c] for c in clip_ids])
    rows = con.execute("""SELECT clip_id, title, description, labels, tags, meta_json FROM clips
                          JOIN wanted USING (clip_id)""").fetchall()
    names = ["title", "description", "labels", "tags", "meta_json"]
    return {r[0]: dict(zip(names, r[1:])) for r in rows}
