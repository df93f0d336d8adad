"""The `template` captioner: captions from metadata and labels, no model.

As in GenAu's first training stage: label names (AudioSet ontology names, VGGSound
classes, synth classes), Freesound tags and titles are put into one of several
sentence templates. The template is chosen by a stable hash of the clip id, so the
same clip always gets the same caption. Without metadata or labels it writes nothing.

:func:`filename_caption` is the last resort for files that come with no metadata at all
(sound-effect folders): the file name's words (``dog_bark_02.wav`` -> "dog bark").
"""
from __future__ import annotations

import hashlib
import re

PROMPT_VERSION = "template-v1"
_LABEL_TEMPLATES = ["The sound of {labels}.", "{Labels} can be heard.", "A recording of {labels}.",
                    "An audio clip with {labels}."]
_TITLE_TEMPLATES = ["{title}: {labels}.", "A recording titled \"{title}\" with {labels}."]
_TAG_TEMPLATES = ["A sound tagged {tags}.", "{Tags}."]


def _humanise(label: str) -> str:
    return re.sub(r"[_\s]+", " ", label).strip().lower()


def _join(items: list[str]) -> str:
    items = [i for i in dict.fromkeys(items) if i]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _pick(options: list[str], key: str) -> str:
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little")
    return options[h % len(options)]


def filename_caption(source_id: str) -> str | None:
    """The words of a file name, without its folder, extension, numbers and separators."""
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", source_id.replace("\\", "/").rsplit("/", 1)[-1])
    words = [w for w in re.split(r"[\s_.\-]+", stem.lower()) if w and not w.isdigit()]
    return " ".join(words) or None


def template_caption(clip_id: str, labels: list[str] | None = None, title: str | None = None,
                     tags: list[str] | None = None, use_metadata: bool = True) -> str | None:
    """One caption from labels (preferred), else title/tags; None when there is nothing to say."""
    labels = [_humanise(l) for l in (labels or []) if l]
    tags = [_humanise(t) for t in (tags or []) if t][:5] if use_metadata else []
    title = (title or "").strip() if use_metadata else ""
    if labels:
        text = _join(labels)
        if title and len(title) < 80:
            return _pick(_TITLE_TEMPLATES, clip_id).format(title=title, labels=text)
        t = _pick(_LABEL_TEMPLATES, clip_id)
        return t.format(labels=text, Labels=text[:1].upper() + text[1:])
    if tags:
        text = _join(tags)
        return _pick(_TAG_TEMPLATES, clip_id).format(tags=text, Tags=text[:1].upper() + text[1:])
    if title:
        return f"{title}."
    return None
