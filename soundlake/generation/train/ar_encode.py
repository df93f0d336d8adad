"""Precompute the AR model's acoustic encodings for every caption of a latent shard folder.

    soundlake ar-encode --ar runs/ar --shards shards/demo-mel --out shards/demo-ar

DC-LDM trains its diffusion model on the AR model's *predictions* from each clip's caption,
never on the clip's own audio. A prediction depends on the caption alone (sampling is seeded
by it), so it is computed once per distinct caption: each latent shard becomes one Parquet
part ``<shard>.parquet`` (caption, codes, encoding) holding its captions not yet predicted by
an earlier part. Parts are written atomically and listed in ``manifest.json`` after each one
(with their sha256), so a killed run resumes where it stopped. ``train dit --set cond2=ar
--set ar_encodings=OUT`` reads the folder (:class:`EncodingTable`).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from soundlake.core.errors import UserError
from soundlake.core.storage import is_local, open_input, open_uri, put_bytes

FORMAT = "soundlake-ar-encodings-1"


@dataclass
class ArEncodeResult:
    out: str
    shards: int
    written: int
    kept: int
    captions: int
    elapsed_s: float


def read_encodings_manifest(folder: str) -> dict:
    try:
        with open_input(f"{folder.rstrip('/')}/manifest.json") as f:
            m = json.loads(f.read())
    except (FileNotFoundError, OSError):
        m = None
    if not m or m.get("format") != FORMAT:
        raise UserError(f"{folder}: no AR encodings; run `soundlake ar-encode --ar <ar model> --shards <latents> "
                        f"--out {folder}` first")
    return m


class EncodingTable:
    """caption -> predicted encoding [frames, C] (normalised latent tokens), from an ar-encode folder."""

    def __init__(self, table: dict[str, np.ndarray], meta: dict):
        self.table, self.meta = table, meta

    @classmethod
    def read(cls, folder: str, parts: list[dict] | None = None) -> "EncodingTable":
        """The folder's encodings (of ``parts`` only, when given)."""
        import pyarrow.parquet as pq

        m = read_encodings_manifest(folder)
        frames, channels = m["frames"], m["channels"]
        table: dict[str, np.ndarray] = {}
        for part in m["parts"] if parts is None else parts:
            with open_input(f"{folder.rstrip('/')}/{part['file']}") as f:
                t = pq.read_table(io.BytesIO(f.read()))
            enc = np.asarray(t.column("encoding").combine_chunks().flatten(), np.float32).reshape(-1, frames, channels)
            table.update(zip(t.column("caption").to_pylist(), enc))
        return cls(table, m)

    def lookup(self, captions: list[str]):
        import torch

        missing = [c for c in captions if c not in self.table]
        if missing:
            raise UserError(f"{len(missing)} caption(s) have no AR encoding (e.g. {missing[0]!r}): run `soundlake "
                            f"ar-encode` on the shards this DiT trains on")
        return torch.from_numpy(np.stack([self.table[c] for c in captions]))


def _captions(url: str) -> list[str]:
    from soundlake.generation.train.tokens import shard_samples

    out: set[str] = set()
    for _, parts in shard_samples(url):
        if "json" in parts:
            meta = json.loads(parts["json"])
            out.update(meta.get("captions") or [meta.get("caption", "")])
    return sorted(c for c in out if c)


def _parquet(captions: list[str], codes: np.ndarray, enc: np.ndarray) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({"caption": pa.array(captions, pa.string()),
                  "codes": pa.array(list(codes.reshape(len(captions), -1).astype(np.int16))),
                  "encoding": pa.array(list(enc.reshape(len(captions), -1)), pa.list_(pa.float32()))})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


def ar_encode(ar_dir: str, shards: str, out: str, *, via: str = "tokens", split: str | None = None,
              batch_size: int = 32, on_part: Callable[[dict, int, int], None] | None = None) -> ArEncodeResult:
    """Predict every caption of ``shards`` (all splits, or ``split``) with the AR model in ``ar_dir``."""
    from soundlake.generation.model_folder import AcousticEncoder
    from soundlake.generation.train.data import shard_urls
    from soundlake.generation.train.tokens import latent_manifest

    t0 = time.perf_counter()
    lat = latent_manifest(shards)
    encoder = AcousticEncoder(ar_dir)
    tok = encoder.tokens_meta["latents"]
    if lat["vae"].get("weights_sha256") != tok["vae_sha256"]:
        raise UserError(f"{shards} holds latents of another VAE than the one {ar_dir}'s tokenizer was fitted on")
    ident = {**encoder.identity, "vae_sha256": tok["vae_sha256"],
             "phases": encoder.meta.get("train", {}).get("phases", [])}
    fs, root = open_uri(out)
    if is_local(fs):
        Path(root).mkdir(parents=True, exist_ok=True)
    try:
        old = read_encodings_manifest(out)
    except UserError:
        old = None
    if old is not None and (old["ar"]["weights_sha256"] != ident["weights_sha256"] or old["via"] != via):
        raise UserError(f"{out} holds encodings of another AR model or --via: give a new --out")
    urls = shard_urls(shards, split=split)
    if not urls:
        raise UserError(f"{shards}: no shards" + (f" of split {split!r}" if split else ""))
    parts: list[dict] = []
    if old is not None:
        for p in old["parts"]:
            path = f"{root.rstrip('/')}/{p['file']}"
            if fs.get_file_info(path).type.name != "NotFound":
                with fs.open_input_stream(path) as f:
                    if hashlib.sha256(f.read()).hexdigest() == p["sha256"]:
                        parts.append(p)
    done_names = {p["shard"] for p in parts}
    seen: set[str] = set()
    todo = [(url.rsplit("/", 1)[-1], url) for url in urls if url.rsplit("/", 1)[-1] not in done_names]
    if parts:   # captions already predicted by kept parts are not predicted again
        seen.update(EncodingTable.read(out, parts).table)

    def write_manifest():
        doc = {"format": FORMAT, "source": shards, "via": via, "ar": ident, "frames": encoder.cfg.frames,
               "channels": encoder.rvq.channels, "parts": parts}
        put_bytes(fs, f"{root.rstrip('/')}/manifest.json", json.dumps(doc, indent=2).encode())

    for i, (name, url) in enumerate(todo, 1):
        captions = [c for c in _captions(url) if c not in seen]
        codes, enc = encoder.encode(captions, via=via, batch=batch_size) if captions else \
            (np.zeros((0, encoder.cfg.frames, encoder.cfg.levels), np.int64),
             np.zeros((0, encoder.cfg.frames, encoder.rvq.channels), np.float32))
        data = _parquet(captions, codes, enc)
        file = f"{name.rsplit('.', 1)[0]}.parquet"
        put_bytes(fs, f"{root.rstrip('/')}/{file}", data)
        parts.append({"shard": name, "file": file, "captions": len(captions),
                      "sha256": hashlib.sha256(data).hexdigest()})
        seen.update(captions)
        write_manifest()
        if on_part:
            on_part(parts[-1], i, len(todo))
    write_manifest()
    return ArEncodeResult(out, len(urls), len(todo), len(urls) - len(todo), len(seen), time.perf_counter() - t0)
