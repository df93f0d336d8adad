"""Normalise license URLs and names to short ids: CC0, CC-BY, CC-BY-SA, CC-BY-NC, ...

Freesound reports a license as a Creative Commons deed URL
(``http://creativecommons.org/licenses/by-nc/3.0/``) or, in older records and the
search filter, as a name (``Attribution Noncommercial``, ``Creative Commons 0``).
YouTube reports ``Creative Commons Attribution license (reuse allowed)`` or
``YouTube Standard License`` (stored as ``YouTube``). Unknown text returns ``None``
from :func:`normalize` so a curator never mistakes it for a known license.

    normalize("https://creativecommons.org/licenses/by/4.0/")  -> "CC-BY"
    normalize("Attribution Noncommercial")                     -> "CC-BY-NC"
    normalize("http://creativecommons.org/licenses/sampling+/1.0/") -> "Sampling+"
"""
from __future__ import annotations

import re

LICENSES = ("CC0", "CC-BY", "CC-BY-SA", "CC-BY-NC", "CC-BY-NC-SA", "CC-BY-ND", "CC-BY-NC-ND",
            "Sampling+", "Sampling", "NC-Sampling+", "PDM", "YouTube")

_NAMES = {
    "creative commons 0": "CC0", "cc0": "CC0", "cc-0": "CC0", "public domain dedication": "CC0",
    "attribution": "CC-BY", "cc by": "CC-BY", "cc-by": "CC-BY",
    "attribution noncommercial": "CC-BY-NC", "attribution non-commercial": "CC-BY-NC",
    "attribution sharealike": "CC-BY-SA", "attribution share-alike": "CC-BY-SA",
    "sampling+": "Sampling+", "sampling plus": "Sampling+", "sampling": "Sampling",
    "noncommercial sampling+": "NC-Sampling+", "public domain mark": "PDM",
    "youtube standard": "YouTube", "standard youtube": "YouTube",
}


def normalize(value: str | None) -> str | None:
    """A short license id from a URL or a name; None for empty or unknown."""
    if not value:
        return None
    text = value.strip()
    low = text.lower()
    if low.upper() in (x.upper() for x in LICENSES):
        return next(x for x in LICENSES if x.upper() == low.upper())
    m = re.search(r"creativecommons\.org/(licenses|publicdomain)/([a-z+\-]+)", low)
    if m:
        kind, code = m.groups()
        if kind == "publicdomain":
            return {"zero": "CC0", "mark": "PDM"}.get(code)
        code = code.strip("-")
        if code == "sampling+":
            return "Sampling+"
        if code == "nc-sampling+":
            return "NC-Sampling+"
        if code == "sampling":
            return "Sampling"
        parts = code.split("-")
        if parts and parts[0] == "by" and set(parts[1:]) <= {"nc", "sa", "nd"}:
            return "CC-" + "-".join(p.upper() for p in parts)
        return None
    low = re.sub(r"\s+", " ", low.replace("license", "").replace("licence", "")).strip(" .()")
    if low in _NAMES:
        return _NAMES[low]
    # YouTube's "Creative Commons Attribution license (reuse allowed)"
    if "creative commons" in low and "attribution" in low:
        return "CC-BY"
    return None


def matches(license_id: str | None, wanted: list[str] | None) -> bool:
    """True when no filter is set or the (normalised) license is one of ``wanted``."""
    if not wanted:
        return True
    keep = {normalize(w) or w for w in wanted}
    return license_id in keep
