"""Pipeline specs: YAML files validated into one model composed of each part's own section.

A spec is data. Built-ins live in ``soundlake/pipelines/specs/<name>.yaml`` and are
found by name; any path works too. ``--set a.b=value`` overrides any setting (the
value is parsed as YAML). Every validation error is one line naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from soundlake.core.config import (
    Section,
    read_yaml_mapping,
    set_key,
    validate_with_sets,
)
from soundlake.core.errors import UserError
from soundlake.core.ray_env import RaySpec
from soundlake.sources.base import SourceSpec
from soundlake.sources.fetch import DownloadSpec
from soundlake.sources.freesound import FreesoundSpec
from soundlake.stages.caption import CaptionSpec
from soundlake.stages.clap import ClapSpec
from soundlake.stages.segment import SegmentSpec

SPEC_DIR = Path(__file__).parent / "specs"


class PipelineSpec(Section):
    name: str
    description: str = ""
    source: SourceSpec = SourceSpec()
    segment: SegmentSpec = SegmentSpec()
    stages: list[Literal["download", "segment", "caption", "embed", "tag", "score"]] = ["segment"]
    caption: CaptionSpec = CaptionSpec()
    download: DownloadSpec = DownloadSpec()
    freesound: FreesoundSpec = FreesoundSpec()
    clap: ClapSpec = ClapSpec()
    ray: RaySpec = RaySpec()

    @model_validator(mode="after")
    def _check(self):
        if self.source.kind == "local" and not self.source.input:
            raise ValueError("source.input: the local source needs a folder (--input DIR)")
        return self

    def active_stages(self) -> list[str]:
        """The stages that will run: model stages need clap.model."""
        return [s for s in self.stages if s in ("segment", "download", "caption") or self.clap.model]


def builtin_names() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def load_spec(name_or_path: str, overrides: dict[str, Any] | None = None,
              sets: list[str] | None = None) -> PipelineSpec:
    path = Path(name_or_path)
    if not path.is_file():
        path = SPEC_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"no pipeline {name_or_path!r}: give a YAML path or one of "
                            f"{', '.join(builtin_names())}")
    raw = read_yaml_mapping(path, f"spec {path}")
    for key, value in (overrides or {}).items():
        if value is not None:
            set_key(raw, key, value)
    return validate_with_sets(PipelineSpec, raw, sets, f"spec {path.name}")
