"""Duplicate groups: connected components of matching pairs, and the clip each group keeps.

The kept representative is the best by, in order: license (``LICENSE_RANK``: the freer the
better, unknown last), caption score (higher; none last), duration (longer), clip_id
(smaller, so that the choice is deterministic).
"""
from __future__ import annotations

from typing import Iterable

# The short ids of soundlake.sources.licenses, freest first. Attribution-only and
# share-alike come before non-commercial and no-derivatives; "YouTube" (the standard
# license: no reuse granted) and anything unknown come last.
LICENSE_RANK: dict[str, int] = {name: rank for rank, name in enumerate((
    "CC0", "PDM", "CC-BY", "CC-BY-SA", "Sampling+", "CC-BY-NC", "CC-BY-NC-SA", "NC-Sampling+", "Sampling",
    "CC-BY-ND", "CC-BY-NC-ND", "YouTube"))}
UNKNOWN_RANK = len(LICENSE_RANK)
_BY_UPPER = {name.upper(): rank for name, rank in LICENSE_RANK.items()}


def connected_groups(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """clip_id -> group_id (the smallest clip_id of its component), for every clip in a pair."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        r = x
        while parent[r] != r:
            r = parent[r]
        while parent[x] != r:                  # path compression
            parent[x], x = r, parent[x]
        return r

    for pair in pairs:
        a, b = root(pair[0]), root(pair[1])
        if a != b:
            parent[max(a, b)] = min(a, b)      # the smaller id stays the root
    return {clip: root(clip) for clip in parent}


def keep_order(member: dict) -> tuple:
    """Sort key of a group member: the smallest is kept."""
    score = member.get("score")
    return (_BY_UPPER.get((member.get("license") or "").upper(), UNKNOWN_RANK),
            0 if score is not None else 1, -(score or 0.0),
            -(member.get("duration_s") or 0.0), member["clip_id"])


def pick_kept(members: list[dict]) -> str:
    """The clip_id a duplicate group keeps (``members``: dicts with clip_id, license, score,
    duration_s)."""
    if not members:
        raise ValueError("pick_kept: a group has at least one member")
    return min(members, key=keep_order)["clip_id"]
