"""Pipeline specs: YAML files validated into dataclass-like pydantic models.

A spec is data. Built-ins live in ``soundlake/pipelines/specs/<name>.yaml`` and are
found by name; any path works too. ``--set a.b=value`` overrides any setting (the
value is parsed as YAML). Every validation error is one line naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from soundlake.errors import UserError

SPEC_DIR = Path(__file__).parent / "specs"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSpec(Section):
    kind: Literal["synth", "local", "audioset", "vggsound", "freesound"] = "synth"
    input: str | None = Field(None, description="local: folder scanned recursively")
    count: int = Field(200, ge=1, description="synth: number of scenes")
    seed: int = Field(0, description="synth: corpus seed")
    duration: float = Field(10.0, gt=0, description="synth: scene length in seconds")
    speech: bool = Field(False, description="synth: allow espeak-ng speech events")
    limit: int | None = Field(None, ge=1, description="process at most this many inputs")
    follow_symlinks: bool = True
    manifest: str | None = Field(None, description="audioset/vggsound: segment CSV (local path)")
    ontology: str | None = Field(None, description="audioset: ontology.json (default: the bundled one)")


class SegmentSpec(Section):
    sample_rate: int = Field(32000, ge=8000, le=192000)
    channels: Literal[1, 2] = 1
    window: float = Field(10.0, gt=0, description="clip length in seconds")
    policy: Literal["annotated", "first", "sliding", "random"] = "first"
    hop: float | None = Field(None, gt=0, description="sliding: hop in seconds (default: window)")
    max_windows: int | None = Field(None, ge=1, description="at most this many clips per input")
    remainder: Literal["pad", "drop"] = "pad"
    min_duration: float = Field(1.0, ge=0, description="shorter content is a too_short failure")
    max_duration: float = Field(3600.0, gt=0, description="longer inputs are a too_long failure")
    silence_dbfs: float = Field(-60.0, le=0, description="windows with RMS below this are dropped")
    loudness: bool = Field(True, description="measure integrated loudness (LUFS)")
    seed: int = 0
    ffmpeg_timeout: float = Field(60.0, gt=0)


class DownloadSpec(Section):
    url_template: str = Field("https://www.youtube.com/watch?v={ytid}", description="media URL for a YouTube id")
    format: str = "bestaudio/best"
    sections: bool = Field(True, description="fetch only the annotated section (yt-dlp download_ranges)")
    timeout_s: float = Field(60.0, gt=0, description="socket timeout; the watchdog allows 4x per download")
    retries: int = Field(3, ge=0, description="extra attempts for transient failures")
    backoff_s: float = Field(2.0, ge=0, description="first backoff; doubles per attempt, with jitter")
    max_backoff_s: float = Field(120.0, ge=0)
    cookies_file: str | None = Field(None, description="Netscape cookies file for yt-dlp")
    rate_per_minute: dict[str, float] = Field(default_factory=lambda: {"*": 30.0},
                                              description="requests per minute per host ('*' = any other)")
    bot_wall_pause_s: float = Field(900.0, ge=0, description="pause all downloads after a bot wall")
    concurrency: int = Field(4, ge=1, description="downloads in flight per worker")


class FreesoundSpec(Section):
    api_url: str = "https://freesound.org/apiv2"
    query: str = ""
    filter: str | None = Field(None, description="Solr filter, e.g. 'duration:[1 TO 30]'")
    sort: str = "score"
    page_size: int = Field(150, ge=1, le=150)
    fields: str = "id,name,tags,description,license,username,duration,previews,created,url"
    license: list[str] | None = Field(None, description="keep only these licenses, e.g. [CC0, CC-BY]")
    preview: Literal["hq-ogg", "hq-mp3", "lq-ogg", "lq-mp3"] = "hq-ogg"
    original: bool = Field(False, description="download originals (needs FREESOUND_OAUTH_TOKEN)")
    max_results: int | None = Field(None, ge=1)


class ClapSpec(Section):
    model: str | None = Field(None, description="CLAP model: in-house folder, transformers ClapModel folder or "
                                                "hub id (cached), or a laion-clap .pt")
    backend: Literal["hf", "laion", "soundlake"] | None = Field(None, description="default: detected from model")
    batch_size: int = Field(16, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    concurrency: int = Field(1, ge=1, description="actors in the pool")
    tag_labels: str | list[str] = Field("audioset", description="'audioset' (527 classes), a text file, or a list")
    tag_template: str = "the sound of {label}"
    top_k: int = Field(5, ge=1)


class CaptionSpec(Section):
    captioners: list[Literal["template", "autocap"]] = Field(["template"], description="captioners run by the "
                                                             "caption stage")
    use_metadata: bool = Field(True, description="template: titles and tags too, not only labels; autocap: "
                                                 "metadata fields in its tags (false: every field left empty)")
    autocap_model: str | None = Field(None, description="autocap: a folder saved by `soundlake train captioner`")
    autocap_batch_size: int = Field(16, ge=1, description="autocap: clips per beam-search call")
    autocap_num_beams: int | None = Field(None, ge=1, description="autocap: beams (default: the model's)")
    autocap_num_gpus: float = Field(0.0, ge=0, description="autocap: GPUs per actor")
    autocap_concurrency: int = Field(1, ge=1, description="autocap: actors in the pool")

    @model_validator(mode="after")
    def _check_autocap(self):
        if "autocap" in self.captioners and not self.autocap_model:
            raise ValueError("caption.autocap_model: the autocap captioner needs a model folder "
                             "(train one with `soundlake train captioner`)")
        return self


class RaySpec(Section):
    address: str | None = Field(None, description="join this Ray cluster instead of starting a local one")
    num_cpus: int | None = Field(None, ge=1, description="local Ray: CPUs to use (default: all)")
    object_store_mb: int = Field(512, ge=80, description="local Ray: object store size")
    inputs_per_task: int = Field(8, ge=1, description="inputs handled by one segment task")


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


def describe_error(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r}: check the spelling (the README lists every key)"
    if err["type"] == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    got = err.get("input")
    got = "" if isinstance(got, (dict, list)) and err["type"] != "literal_error" else f", got {got!r}"
    return f"{key}: {err['msg'].lower()}{got}"


def _set(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value, e.g. segment.sample_rate=16000")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def read_yaml_mapping(path: Path, label: str) -> dict:
    """A YAML file whose top level is a mapping; one-line errors start with ``label``."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{label}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{label}: expected a mapping of settings at the top level")
    return raw


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
            _set(raw, key, value)
    return validate_with_sets(PipelineSpec, raw, sets, f"spec {path.name}")


def validate_with_sets(cls: type[BaseModel], raw: dict, sets: list[str] | None, label: str):
    """Apply ``--set key=value`` overrides to ``raw``, then validate it as ``cls``; a bad
    value is one line naming the key."""
    for text in sets or []:
        _set(raw, *parse_override(text))
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{label}: {describe_error(e.errors()[0])}") from None
