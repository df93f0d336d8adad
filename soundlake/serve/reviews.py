"""Review rows: a reviewer's verdict on a caption or a clip, appended to the lake's ``reviews`` table.

A review is one part file written like every other part (:meth:`Lake.write_part`: a ``.tmp``
name, then an atomic rename), so readers see it whole or not at all. It takes no lake lock:
a curate holds the lock for its whole run, and a review must land meanwhile without blocking
it. Nothing else writes the ``reviews`` table, so nothing races with it. A later review of the
same target supersedes an earlier one (the ``review_latest`` view): undoing a flag is a new
review (``clear`` for a caption, ``keep`` for a clip).
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pyarrow as pa

from soundlake.catalog import schema
from soundlake.catalog.lake import Lake
from soundlake.core.errors import UserError

CAPTION_VERDICTS = ("good", "partly_wrong", "wrong", "clear")
CLIP_VERDICTS = ("exclude", "keep")
RUN_ID = "review"       # part names: part-review-<id>.parquet (a curate's clean-up of its own run skips them)
MAX_TEXT = 2000


def review_row(body: dict, reviewer: str) -> dict:
    """A ``reviews`` row from a request body ({target, clip_id, verdict, reason?, captioner?, caption_text?})."""
    if not isinstance(body, dict):
        raise UserError("a review is a JSON object: {target, clip_id, verdict, ...}")
    target, clip_id, verdict = body.get("target"), body.get("clip_id"), body.get("verdict")
    if target not in ("clip", "caption"):
        raise UserError(f"review target {target!r}: expected clip or caption")
    if not isinstance(clip_id, str) or not clip_id:
        raise UserError("a review needs the clip_id it is about")
    allowed = CLIP_VERDICTS if target == "clip" else CAPTION_VERDICTS
    if verdict not in allowed:
        raise UserError(f"{target} verdict {verdict!r}: expected one of {', '.join(allowed)}")
    reason = body.get("reason") or None
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_TEXT):
        raise UserError(f"a review's reason is text of at most {MAX_TEXT} characters")
    if target == "clip" and verdict == "exclude" and not reason:
        raise UserError("excluding a clip needs a reason")
    row = {"review_id": uuid.uuid4().hex, "target": target, "clip_id": clip_id, "captioner": None,
           "caption_model_id": None, "prompt_version": None, "caption_text": None, "verdict": verdict,
           "reason": reason, "reviewer": reviewer, "created": datetime.now(timezone.utc)}
    if target == "caption":
        captioner, text = body.get("captioner"), body.get("caption_text")
        if not isinstance(captioner, str) or not isinstance(text, str) or not captioner or not text:
            raise UserError("a caption review needs the caption's captioner and caption_text")
        row.update(captioner=captioner, caption_text=text)
    return row


def write_review(lake: Lake, row: dict) -> str:
    """Append one review to the lake; returns its part path (relative to the lake root)."""
    table = pa.Table.from_pylist([row], schema=schema.REVIEWS)
    for _ in range(2):
        try:
            return lake.write_part("reviews", table, RUN_ID)
        except FileNotFoundError:
            pass  # a curate starting now removed every half-written part, ours included: write it again
    return lake.write_part("reviews", table, RUN_ID)
