"""Config sections: pydantic models validated from YAML, with ``--set key=value`` overrides.

Every part of soundlake declares its own section (a :class:`Section`) next to the code
that reads it; a pipeline or training spec composes them. Every validation error is one
line naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from soundlake.core.errors import UserError


class Section(BaseModel):
    """A config section: unknown keys are refused, assignments re-validated."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def describe_error(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r}: check the spelling (the README lists every key)"
    if err["type"] == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    got = err.get("input")
    got = "" if isinstance(got, (dict, list)) and err["type"] != "literal_error" else f", got {got!r}"
    return f"{key}: {err['msg'].lower()}{got}"


def set_key(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def load_yaml(text: str, what: str, fix: str) -> Any:
    """Parse YAML text; a syntax error is one UserError line: ``what`` is not valid YAML, what
    the parser expected, then ``fix``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        detail = getattr(e, "problem", None) or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        if mark is not None and "\n" in text.strip():
            detail += f" at line {mark.line + 1}"
        raise UserError(f"{what} is not valid YAML ({detail}); {fix}") from None


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value, e.g. segment.sample_rate=16000")
    key, value = text.split("=", 1)
    key = key.strip()
    if not value.strip():
        return key, None
    return key, load_yaml(value, f"--set {key}: {value!r}",
                          "write it as YAML (e.g. [1, 2] or {a: 1}), or quote it to mean text")


def read_yaml_mapping(path: Path, label: str) -> dict:
    """A YAML file whose top level is a mapping; one-line errors start with ``label``."""
    raw = load_yaml(Path(path).read_text(), label, "check its brackets, quotes and indentation") or {}
    if not isinstance(raw, dict):
        raise UserError(f"{label}: expected a mapping of settings at the top level")
    return raw


def validate_with_sets(cls: type[BaseModel], raw: dict, sets: list[str] | None, label: str):
    """Apply ``--set key=value`` overrides to ``raw``, then validate it as ``cls``; a bad
    value is one line naming the key."""
    for text in sets or []:
        set_key(raw, *parse_override(text))
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{label}: {describe_error(e.errors()[0])}") from None
