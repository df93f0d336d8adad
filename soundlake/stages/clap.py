"""CLAP stages: audio embeddings, zero-shot tags, caption scores.

* ``embed`` (actor pool): decode each clip's FLAC, resample to the model's rate, embed
  with deterministic windowing; writes ``embeddings`` (fixed-size FLOAT[dim] arrays that
  DuckDB's ``array_cosine_similarity`` uses) and, with ``tag`` in the spec's stages,
  top-k zero-shot ``tags`` over a label set (AudioSet's 527 classes by default).
* ``score``: cosine of every caption of the clip with its audio embedding, into ``scores``.

Every row records the model identity (backend, path/id, checkpoint sha256, rate,
windowing), so numbers from two CLAP models are never mixed under one threshold.
Scores are raw: thresholds are applied in queries and at export.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from soundlake.catalog.schema import SCORES, TAGS, embeddings_schema
from soundlake.core.audio import decode_mono
from soundlake.core.config import Section
from soundlake.stages.base import Resources, Stage


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


ONTOLOGY = Path(__file__).resolve().parents[1] / "data" / "audioset_ontology.json"


def audioset_labels(path: Path = ONTOLOGY) -> list[str]:
    """The 527 AudioSet class names that carry labels (abstract/blacklisted ones excluded)."""
    nodes = json.loads(Path(path).read_text())
    return [n["name"] for n in nodes if "abstract" not in n.get("restrictions", [])
            and "blacklist" not in n.get("restrictions", [])]


def resolve_labels(spec_labels: str | list[str]) -> tuple[str, list[str]]:
    """(label set name, labels): 'audioset', a text file (one per line), or a list."""
    if isinstance(spec_labels, list):
        return "custom", list(spec_labels)
    if spec_labels == "audioset":
        return "audioset", audioset_labels()
    lines = Path(spec_labels).read_text(encoding="utf-8").splitlines()
    return Path(spec_labels).name, [l.strip() for l in lines if l.strip() and not l.startswith("#")]


TAG_TYPE = pa.list_(pa.struct([("label", pa.string()), ("prob", pa.float32())]))
SCORE_TYPE = pa.list_(pa.struct([("captioner", pa.string()), ("caption_model_id", pa.string()),
                                 ("text", pa.string()), ("score", pa.float32())]))


class ClapStage(Stage):
    """A stage backed by one CLAP model (an actor pool); ``output`` is the flow column it adds,
    and ``rows(batch, now)`` the catalog rows that column becomes."""
    uses_actors = True
    output: ClassVar[str] = ""

    def __init__(self, clap_spec, run_id: str):
        self.spec, self.run_id = clap_spec, run_id
        self.model = None

    def resources(self) -> Resources:
        s = self.spec
        return Resources(num_cpus=s.num_cpus, num_gpus=s.num_gpus, concurrency=s.concurrency,
                         batch_size=s.batch_size)

    def setup(self) -> None:
        import torch

        from soundlake.models.clap.load import load_clap

        torch.set_num_threads(max(1, int(self.spec.num_cpus)))
        device = "cuda" if self.spec.num_gpus and torch.cuda.is_available() else "cpu"
        self.model = load_clap(self.spec.model, backend=self.spec.backend, device=device)
        self.model_id, self.model_hash = self.spec.model, str(self.model.identity.get("checkpoint_sha256", ""))
        self.identity = json.dumps(self.model.identity, sort_keys=True, default=str)

    def constant(self, batch: pa.Table, name: str, value: str) -> pa.Table:
        return batch.append_column(name, pa.array([value] * batch.num_rows, pa.string()))

    def tables(self, batch: pa.Table) -> dict[str, pa.Table]:
        if self.output not in batch.column_names:
            return {}
        return self.rows(batch, datetime.now(timezone.utc))

    def rows(self, batch: pa.Table, now: datetime) -> dict[str, pa.Table]:
        raise NotImplementedError


class EmbedStage(ClapStage):
    """Audio embeddings, and top-k zero-shot tags when ``tag`` is on."""

    name = "embed"
    output = "clap_embedding"

    def __init__(self, clap_spec, run_id: str, tag: bool):
        super().__init__(clap_spec, run_id)
        self.tag = tag

    def setup(self) -> None:
        super().setup()
        if self.tag:
            from soundlake.models.clap.windowing import label_prompts

            self.label_set, self.labels = resolve_labels(self.spec.tag_labels)
            self.label_emb = self.model.embed_text(label_prompts(self.labels, self.spec.tag_template))

    def embed(self, flacs: list[bytes]) -> np.ndarray:
        return self.model.embed_audio([decode_mono(data, self.model.sample_rate) for data in flacs])

    def process(self, batch: pa.Table) -> pa.Table:
        from soundlake.models.clap.windowing import zero_shot

        status = batch["status"].to_pylist()
        idx = [i for i, s in enumerate(status) if s == "ok"]
        vectors: list = [None] * batch.num_rows
        tags: list = [None] * batch.num_rows
        if idx:
            flacs = batch["flac"]
            emb = self.embed([flacs[i].as_py() for i in idx])
            probs = zero_shot(emb, self.label_emb, self.model.logit_scale) if self.tag else None
            for j, i in enumerate(idx):
                vectors[i] = emb[j].astype(np.float32).tolist()
                if probs is not None:
                    top = np.argsort(-probs[j])[: self.spec.top_k]
                    tags[i] = [{"label": self.labels[k], "prob": float(probs[j, k])} for k in top]
        batch = batch.append_column("clap_embedding", pa.array(vectors, pa.list_(pa.float32())))
        batch = batch.append_column("clap_tags", pa.array(tags, TAG_TYPE))
        batch = self.constant(batch, "clap_label_set", self.label_set if self.tag else "")
        batch = self.constant(batch, "clap_model_id", self.model_id)
        batch = self.constant(batch, "clap_model_hash", self.model_hash)
        return self.constant(batch, "clap_identity", self.identity)

    def rows(self, batch: pa.Table, now: datetime) -> dict[str, pa.Table]:
        """embeddings and tags rows."""
        ok = batch.filter(pc.invert(pc.is_null(batch["clap_embedding"])))
        if not ok.num_rows:
            return {}
        return embedding_rows(ok, self.run_id, now)


def embedding_rows(ok: pa.Table, run_id: str, now: datetime) -> dict[str, pa.Table]:
    emb = np.array(ok["clap_embedding"].to_pylist(), dtype=np.float32)
    n, dim = emb.shape
    ident = ok["clap_identity"][0].as_py()
    out = {"embeddings": pa.table({
        "clip_id": ok["clip_id"], "model_id": ok["clap_model_id"], "model_hash": ok["clap_model_hash"],
        "backend": [json.loads(ident).get("backend")] * n, "identity_json": ok["clap_identity"], "dim": [dim] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
        "run_id": [run_id] * n, "created": [now] * n}, schema=embeddings_schema(dim))}
    rows = [{"clip_id": r["clip_id"], "model_id": r["clap_model_id"], "model_hash": r["clap_model_hash"],
             "label_set": r["clap_label_set"], "rank": rank + 1, "label": t["label"], "prob": t["prob"],
             "run_id": run_id, "created": now}
            for r in ok.select(["clip_id", "clap_model_id", "clap_model_hash", "clap_label_set", "clap_tags"]).to_pylist()
            for rank, t in enumerate(r["clap_tags"] or [])]
    if rows:
        out["tags"] = pa.Table.from_pylist(rows, schema=TAGS)
    return out


class ScoreStage(ClapStage):
    """Cosine of each caption in the flow (reference + new captions) with the clip's embedding."""

    name = "score"
    output = "clap_scores"

    def process(self, batch: pa.Table) -> pa.Table:
        cols = batch.column_names
        per_row: list = [None] * batch.num_rows
        pairs = []  # (row index, captioner, caption model, text)
        for i, row in enumerate(batch.select([c for c in ("clap_embedding", "ref_caption", "ref_caption_model",
                                                          "new_captions") if c in cols]).to_pylist()):
            if row.get("clap_embedding") is None:
                continue
            if row.get("ref_caption"):
                pairs.append((i, "reference", row.get("ref_caption_model"), row["ref_caption"]))
            for cap in row.get("new_captions") or []:
                pairs.append((i, cap["captioner"], cap["model_id"], cap["text"]))
        if pairs:
            texts = [p[3] for p in pairs]
            unique = sorted(set(texts))
            temb = dict(zip(unique, self.model.embed_text(unique)))
            emb = batch["clap_embedding"]
            for (i, captioner, model_id, text) in pairs:
                a = np.asarray(emb[i].as_py(), dtype=np.float32)
                score = float(a @ temb[text] / (np.linalg.norm(a) * np.linalg.norm(temb[text]) + 1e-12))
                per_row[i] = (per_row[i] or []) + [{"captioner": captioner, "caption_model_id": model_id,
                                                    "text": text, "score": score}]
        batch = batch.append_column("clap_scores", pa.array(per_row, SCORE_TYPE))
        batch = self.constant(batch, "score_model_id", self.model_id)
        return self.constant(batch, "score_model_hash", self.model_hash)

    def rows(self, batch: pa.Table, now: datetime) -> dict[str, pa.Table]:
        """scores rows: one per (clip, caption, CLAP model)."""
        rows = [{"clip_id": r["clip_id"], "captioner": s["captioner"], "caption_model_id": s["caption_model_id"],
                 "caption_text": s["text"], "clap_model_id": r["score_model_id"],
                 "clap_model_hash": r["score_model_hash"], "score": s["score"], "run_id": self.run_id, "created": now}
                for r in batch.select(["clip_id", "clap_scores", "score_model_id", "score_model_hash"]).to_pylist()
                for s in r["clap_scores"] or []]
        return {"scores": pa.Table.from_pylist(rows, schema=SCORES)} if rows else {}
