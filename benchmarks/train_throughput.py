"""Training throughput fed from shards vs from batches already in memory, side by side.

Builds a synth export (N clips), trains the tiny VAE on it and, on the latents of the
first VAE trained (its ``shards`` run), the tiny DiT, each through the same Ray Train path
twice per round: ``data=shards`` (the export
loader: tar reading, FLAC decode, resampling or latent loading, crop, collate) and
``data=memory`` (the same batches read once beforehand, then served from RAM). Samples/s
is taken from the training log after the first logged interval (start-up excluded); the
loader's cost is ``1 - shards / memory``. Target: < 10 %. The log also times how long
each step waited for its batch, so the share of loop time spent in the loader is printed
too (a measure within one run, less exposed to other load on the machine).

    python benchmarks/train_throughput.py [--clips 64] [--steps 60] [--rounds 2]

(``--quick``: 8 clips, batch 2, 4 steps logged every 2, 1 round.)
"""
from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from common import figure, init_ray, parse_args

from soundlake.generation.train.encode import encode_shards
from soundlake.generation.train.specs import load_train_spec
from soundlake.generation.train.trainer import train
from soundlake.testing import make_synth_export

FIGURES = ("vae-tiny_loader_cost", "dit-tiny_loader_cost")


def rate(out: Path) -> tuple[float, float]:
    """(samples/s, share of the loop's time spent waiting for batches), start-up excluded."""
    with open(out / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))[1:]  # the first interval holds start-up
    seconds = sum(float(r["seconds"]) for r in rows)
    samples = sum(float(r["seconds"]) * float(r["samples_per_s"]) for r in rows)
    return samples / seconds, sum(float(r["data_s"]) for r in rows) / seconds


def run(kind: str, root: Path, tag: str, data: str, steps: int, log_every: int = 10, **kw) -> tuple[float, float]:
    out = root / f"{kind}-{tag}-{data}"
    spec = load_train_spec(kind, out=str(out), steps=steps, sets=[f"data={data}", f"log_every={log_every}",
                                                                   f"checkpoint_every={steps}"], **kw)
    train(spec)
    return rate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60,
                    help="at least 2 x --log-every: the first logged interval (start-up) is not counted")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    a = parse_args(ap, dict(clips=8, batch_size=2, steps=4, log_every=2, rounds=1))
    import ray

    init_ray(num_cpus=2, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_synth_export(root / "data", a.clips, seconds=4.0, sr=32000, shard_count=8)
        vae_kw = dict(shards=str(shards), batch_size=a.batch_size, seconds=1.0)
        results: dict[str, dict[str, list[tuple[float, float]]]] = {"vae-tiny": {}, "dit-tiny": {}}
        for r in range(a.rounds):
            for data in ("shards", "memory"):
                results["vae-tiny"].setdefault(data, []).append(run("vae", root, f"r{r}", data, a.steps, a.log_every,
                                                                    **vae_kw))
        # The DiT trains on the latents of the first VAE trained above (a model like any other:
        # the loader's cost does not depend on how well it reconstructs).
        vae_dir, latents = root / "vae-r0-shards", root / "latents"
        encode_shards(str(vae_dir), str(shards), str(latents))
        dit_kw = dict(shards=str(latents), vae=str(vae_dir), batch_size=a.batch_size, seconds=2.0)
        for r in range(a.rounds):
            for data in ("shards", "memory"):
                results["dit-tiny"].setdefault(data, []).append(run("dit", root, f"r{r}", data, a.steps, a.log_every,
                                                                    **dit_kw))
        print(f"{a.clips} synth clips (4 s, 32 kHz; VAE at 16 kHz, 1 s crops; DiT on 2 s of latents), "
              f"batch {a.batch_size}, {a.steps} steps, 1 Ray Train worker, median of {a.rounds} rounds")
        for name, res in results.items():
            shards_r = statistics.median(r for r, _ in res["shards"])
            mem_r = statistics.median(r for r, _ in res["memory"])
            wait = statistics.median(w for _, w in res["shards"])
            figure(f"{name}_loader_cost", f"{name}: shards {shards_r:6.1f} samples/s · memory {mem_r:6.1f} "
                   f"samples/s · ratio {shards_r / mem_r:.2f}x · loader cost {100 * (1 - shards_r / mem_r):+.1f}% "
                   f"(target < 10%) · time waiting for batches in the shards runs {100 * wait:.1f}%")
    ray.shutdown()


if __name__ == "__main__":
    main()
