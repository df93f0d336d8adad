"""Failure classes and skip reasons shared by every stage.

A stage never raises for one bad row: it returns the row with ``status='failed'``,
an ``error`` class from :data:`ERROR_CLASSES` and a one-line ``message``. Bugs
(anything that is not a :class:`RowError`) still fail loudly. A policy decision (too
short, too long, silent, excluded) is not a failure: its row comes back with
``status='skipped'`` and the reason (:data:`SKIP_REASONS`), and lands in ``skipped``.
"""
from __future__ import annotations

# class -> permanent? Permanent failures are never retried automatically;
# transient ones are retried by the stage (with backoff) and by `retry-failed`.
ERROR_CLASSES: dict[str, bool] = {
    "corrupt": True,        # decoder error, truncated data
    "empty": True,          # zero-byte file
    "not_audio": True,      # text or other non-media content
    "unsupported": True,    # codec/container/channel layout we cannot handle
    "unreadable": True,     # permission, symlink loop, I/O error
    "not_found": True,      # missing file / removed media / HTTP 404
    "private": True,        # private or members-only media
    "forbidden": True,      # HTTP 403, geo-blocked
    "malformed": True,      # a manifest line that cannot be parsed
    "rate_limited": False,  # HTTP 429
    "server_error": False,  # HTTP 5xx
    "timeout": False,       # no answer within the configured timeout
    "network": False,       # connection reset/refused, truncated body
    "bot_wall": False,      # "Sign in to confirm you're not a bot"
    "model_error": False,   # a model stage failed on this row (OOM, bad output)
    "lint": True,           # a generated caption failed the lint rules
}
PERMANENT = frozenset(k for k, v in ERROR_CLASSES.items() if v)

# Policy decisions: reason -> the setting that decided it (a curator changes the setting,
# not the data, to change the outcome). Raised as RowError like failures, recorded apart.
SKIP_REASONS: dict[str, str] = {
    "too_short": "segment.min_duration",
    "too_long": "segment.max_duration",
    "silent": "segment.silence_dbfs",
    "excluded": "source filters",
}


class RowError(Exception):
    """An expected, classified failure of one input row."""

    def __init__(self, error: str, message: str):
        if error not in ERROR_CLASSES and error not in SKIP_REASONS:
            raise ValueError(f"unknown error class {error!r}")
        super().__init__(message)
        self.error = error
        self.message = message


def one_line(e: Exception) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class UserError(Exception):
    """A mistake the user can fix (bad config, bad query, busy lake): printed as one line."""
