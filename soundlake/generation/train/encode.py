"""Pre-encode audio shards into latent shards with a trained VAE, on Ray Data.

    soundlake encode --vae runs/vae --shards ./shards/v1 --out ./shards/v1-latents

Each source shard becomes one latent shard of the same name, holding per sample
``<key>.latents.npy`` (the posterior mean, float32 [C, F] at the VAE's latent rate; a 2D mel
latent [C, F', T'] folded to [C * F', T'], its ``grid_freq`` F' in the manifest) and
``<key>.json`` (the source metadata plus a ``latents`` entry); ``--keep-audio`` keeps the
``.flac`` too. Shards are encoded by a Ray Data actor pool (the VAE loaded once per
actor) and written atomically under their final name. The output ``manifest.json`` has
the same form as an export's (``shard_urls`` reads both) plus the VAE's identity and the
latent mean/std that the DiT normalises with; it is rewritten after every shard, so a
killed run resumes: shards listed there with a matching sha256 are kept.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from soundlake.core.audio import decode_mono
from soundlake.core.errors import UserError
from soundlake.core.storage import is_local, open_input, open_uri, put_bytes
from soundlake.export import shards

FORMAT = "soundlake-latents-1"


@dataclass
class EncodeResult:
    out: str
    shards: int
    written: int
    kept: int
    samples: int
    mean: float
    std: float
    elapsed_s: float
    failed: list[str] = field(default_factory=list)


class EncodeShard:
    """Ray Data actor: one source shard per row -> one latent shard written to ``out``."""

    def __init__(self, vae_dir: str, out: str, keep_audio: bool, batch_size: int, threads: int | None):
        import torch

        from soundlake.generation.mel_vae import latent_geometry
        from soundlake.generation.model_folder import load_vae

        if threads:
            torch.set_num_threads(threads)
        self.vae, meta = load_vae(vae_dir)
        self.out, self.keep_audio, self.batch_size = out, keep_audio, batch_size
        self.vae_id = {"path": str(vae_dir), "step": meta.get("train", {}).get("step"),
                       "sample_rate": self.vae.cfg.sample_rate, "latent_rate": self.vae.latent_rate,
                       "channels": self.vae.latent_dim, "grid_freq": latent_geometry(meta["config"])["grid_freq"]}

    def _encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        hop = self.vae.hop
        # Equal lengths batch together (exports are usually fixed-length clips).
        by_len: dict[int, list[int]] = {}
        for i, c in enumerate(clips):
            by_len.setdefault(len(c), []).append(i)
        res: dict[int, np.ndarray] = {}
        for n, idx in by_len.items():
            padded = -(-n // hop) * hop
            for s in range(0, len(idx), self.batch_size):
                part = idx[s:s + self.batch_size]
                wav = np.zeros((len(part), 1, padded), np.float32)
                for j, i in enumerate(part):
                    wav[j, 0, :n] = clips[i]
                with torch.no_grad():  # a 2D (mel) latent [B, C, F', T'] is stored folded: [B, C * F', T']
                    z = self.vae.encode(torch.from_numpy(wav)).mean.flatten(1, -2).numpy()
                for j, i in enumerate(part):
                    res[i] = z[j]
        return [res[i] for i in range(len(clips))]

    def _samples(self, src: str) -> tuple[list[tuple[str, dict[str, bytes]]], list[np.ndarray]]:
        """The latent shard's samples, and the latent arrays themselves (for the statistics)."""
        with open_input(src) as stream:
            raw = list(shards.iter_samples(stream, src))
        clips = [decode_mono(s["flac"], self.vae.cfg.sample_rate) for s in raw]
        out = []
        latents = self._encode(clips)
        for s, z in zip(raw, latents):
            meta = json.loads(s["json"])
            meta["latents"] = {**self.vae_id, "frames": int(z.shape[1])}
            buf = io.BytesIO()
            np.save(buf, z.astype(np.float32), allow_pickle=False)
            members = {"json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode(),
                       "latents.npy": buf.getvalue()}
            if self.keep_audio:
                members["flac"] = s["flac"]
            out.append((s["__key__"], members))
        return out, latents

    def __call__(self, batch: dict) -> dict:
        rows = {"name": [], "split": [], "count": [], "bytes": [], "sha256": [], "sum": [], "sumsq": [],
                "values": [], "error": []}
        for name, split, src in zip(batch["name"], batch["split"], batch["src"]):
            stats = (0.0, 0.0, 0)
            info, error = None, ""
            try:
                samples, zs = self._samples(src)
                stats = (float(sum(z.sum(dtype=np.float64) for z in zs)),
                         float(sum(np.square(z, dtype=np.float64).sum() for z in zs)), int(sum(z.size for z in zs)))
                fs, root = open_uri(self.out)
                info = shards.write_shard(fs, f"{root.rstrip('/')}/{name}", samples)
            except (shards.UnsafeTarError, OSError, RuntimeError, ValueError) as e:
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows["name"].append(name)
            rows["split"].append(split)
            rows["count"].append(info.count if info else 0)
            rows["bytes"].append(info.bytes if info else 0)
            rows["sha256"].append(info.sha256 if info else "")
            rows["sum"].append(stats[0])
            rows["sumsq"].append(stats[1])
            rows["values"].append(stats[2])
            rows["error"].append(error)
        return rows


def encode_shards(vae_dir: str, source: str, out: str, *, split: str | None = None, batch_size: int = 16,
                  concurrency: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0, keep_audio: bool = False,
                  threads: int | None = None, on_shard: Callable[[dict, int, int], None] | None = None) -> EncodeResult:
    """Encode every shard of the export ``source`` (or those of ``split``) into ``out``."""
    import ray.data

    from soundlake.core.fingerprints import weights_sha256
    from soundlake.generation.mel_vae import latent_geometry
    from soundlake.generation.model_folder import read_meta

    t0 = time.perf_counter()
    vae_meta = read_meta(vae_dir, "vae")
    src_manifest = shards.read_manifest(source)
    if src_manifest is None:
        raise UserError(f"{source}: no manifest.json; give the folder a `soundlake export` wrote")
    if src_manifest.get("format") == FORMAT:
        raise UserError(f"{source}: these are latent shards already; give the audio export")
    todo_all = [s for s in src_manifest["shards"] if split is None or s["split"] == split]
    if not todo_all:
        raise UserError(f"{source}: no shards" + (f" of split {split!r}" if split else ""))
    geometry = latent_geometry(vae_meta["config"])
    fs, root = open_uri(out)
    if is_local(fs):
        Path(root).mkdir(parents=True, exist_ok=True)
    vae_ident = {"path": str(Path(vae_dir).resolve()), "config": vae_meta["config"],
                 "step": vae_meta.get("train", {}).get("step"),
                 "weights_sha256": weights_sha256(Path(vae_dir) / "model.safetensors")}
    manifest = shards.read_manifest(out)
    done: dict[str, dict] = {}
    if manifest is not None:
        if manifest.get("vae", {}).get("weights_sha256") != vae_ident["weights_sha256"] \
                or manifest.get("source") != source:
            raise UserError(f"{out} holds latents of another VAE or source: give a new --out")
        for s in manifest["shards"]:
            path = f"{root.rstrip('/')}/{s['name']}"
            if fs.get_file_info(path).type.name != "NotFound" and shards.sha256_file(fs, path) == s["sha256"]:
                done[s["name"]] = s
    base = source.rstrip("/")
    todo = [{"name": s["name"], "split": s["split"], "src": f"{base}/{s['name']}"}
            for s in todo_all if s["name"] not in done]
    entries = dict(done)
    failed = []

    def write_manifest():
        n = sum(e["values"] for e in entries.values())
        mean = sum(e["sum"] for e in entries.values()) / max(n, 1)
        var = sum(e["sumsq"] for e in entries.values()) / max(n, 1) - mean ** 2
        doc = {"format": FORMAT, "source": source, "vae": vae_ident,
               "latents": {"mean": mean, "std": float(np.sqrt(max(var, 1e-12))), "values": n,
                           "channels": geometry["channels"], "rate": geometry["rate"],
                           "grid_freq": geometry["grid_freq"]},
               "shards": [entries[s["name"]] for s in todo_all if s["name"] in entries]}
        put_bytes(fs, f"{root.rstrip('/')}/manifest.json", json.dumps(doc, indent=2).encode())
        return doc

    if todo:
        from soundlake.core.ray_env import data_context

        data_context()
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            EncodeShard, fn_constructor_args=(vae_dir, out, keep_audio, batch_size, threads),
            batch_size=1, batch_format="numpy", concurrency=concurrency, num_cpus=num_cpus, num_gpus=num_gpus)
        for i, row in enumerate(ds.iter_rows(), 1):
            row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            if row["error"]:
                failed.append(f"{row['name']}: {row['error']}")
            else:
                entries[row["name"]] = {k: row[k] for k in ("name", "split", "count", "bytes", "sha256",
                                                              "sum", "sumsq", "values")}
                write_manifest()
            if on_shard:
                on_shard(row, i, len(todo))
    doc = write_manifest()
    return EncodeResult(out, len(todo_all), len(todo) - len(failed), len(done), sum(e["count"] for e in entries.values()),
                        doc["latents"]["mean"], doc["latents"]["std"], time.perf_counter() - t0, failed)

