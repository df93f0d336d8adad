"""`soundlake evaluate captions`: each captioner's captions against the lake's references."""
from __future__ import annotations

from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import close, connect
from soundlake.core.errors import UserError
from soundlake.models.caption_metrics import caption_scores


def evaluate_captions(lake: Lake | str, references: str = "reference", where: str | None = None,
                      encoder=None) -> dict[str, dict]:
    """{captioner: metrics} over clips that have both that captioner's caption and references.

    ``references``: ``reference`` (every reference caption), or a reference model id such
    as ``human`` or ``synth-v1``. One candidate per clip and captioner (the newest).
    """
    ref_filter = "captioner = 'reference'" + ("" if references == "reference" else " AND model_id = ?")
    params = [] if references == "reference" else [references]
    con = connect(lake)
    try:
        refs = con.execute(f"""SELECT c.clip_id, list(text ORDER BY text) FROM captions c JOIN clips USING (clip_id)
                               WHERE {ref_filter} {'AND (' + where + ')' if where else ''} GROUP BY 1""",
                           params).fetchall()
        cands = con.execute("""SELECT captioner, clip_id, arg_max(text, created) FROM captions
                               WHERE captioner <> 'reference' GROUP BY 1, 2 ORDER BY 1, 2""").fetchall()
    except Exception as e:  # duckdb.Error from a bad --where
        raise UserError(f"SQL error: {str(e).splitlines()[0]}") from None
    finally:
        close(con)
    if not refs:
        raise UserError(f"no reference captions ({references!r}) in the lake")
    ref_of = dict(refs)
    by_captioner: dict[str, tuple[list, list]] = {}
    for captioner, clip_id, text in cands:
        if clip_id in ref_of:
            c, r = by_captioner.setdefault(captioner, ([], []))
            c.append(text)
            r.append(ref_of[clip_id])
    if not by_captioner:
        raise UserError("no captioner has captions for clips with references: run the caption stage first")
    return {name: caption_scores(c, r, encoder) for name, (c, r) in sorted(by_captioner.items())}
