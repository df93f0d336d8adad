"""Training throughput fed from shards vs from batches already in memory, side by side.

Builds a synth export (N clips), trains the tiny VAE on it and, on the latents of the
first VAE trained, the tiny DiT. Each round is one Ray Train run per model with two
phases on the same shards: ``data: shards`` (the export loader: tar reading, FLAC decode,
resampling or latent loading, crop, collate) and ``data: memory`` (the same batches read
once at the phase's start, then served from RAM); odd rounds run them in the other order,
cancelling order effects (warm caches, a model further trained). Samples/s per phase is
taken from the training log's rows of that phase, its first logged interval excluded
(start-up, the memory cache's fill); the loader's cost is ``1 - shards / memory``. Target:
< 10 %. The log also times how long each step waited for its batch, so the share of loop
time spent in the loader is printed too (a measure within one phase, less exposed to
other load on the machine).

    python benchmarks/train_throughput.py [--clips 64] [--steps 60] [--rounds 2] [--workers 1]

(``--quick``: 8 clips, batch 2, 2 steps per phase logged every step, 1 round, in Ray Train's
local mode (``--workers 0``: the same loop and loader, without Ray Train's ~15 s start-up per
run): the smallest that still measures one interval per phase.)
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
MODES = ("shards", "memory")


def phase_rates(out: Path) -> dict[str, tuple[float, float]]:
    """Per phase (named by its data mode): (samples/s, share of the loop's time spent waiting
    for batches), the phase's first logged interval excluded."""
    with open(out / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rates = {}
    for mode in MODES:
        kept = [r for r in rows if r["phase"] == mode][1:]
        seconds = sum(float(r["seconds"]) for r in kept)
        samples = sum(float(r["seconds"]) * float(r["samples_per_s"]) for r in kept)
        rates[mode] = (samples / seconds, sum(float(r["data_s"]) for r in kept) / seconds)
    return rates


def run(kind: str, out: Path, rnd: int, shards: str, steps: int, log_every: int, workers: int, **kw) -> dict:
    """One Ray Train run: a shards phase and a memory phase (reversed on odd rounds)."""
    order = MODES if rnd % 2 == 0 else MODES[::-1]
    phases = [{"name": mode, "shards": shards, "steps": steps, "data": mode} for mode in order]
    spec = load_train_spec(kind, out=str(out), phases=phases, sets=[
        f"log_every={log_every}", f"checkpoint_every={2 * steps}", f"workers={workers}"], **kw)
    train(spec)
    return phase_rates(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60,
                    help="per phase, at least 2 x --log-every: a phase's first logged interval is not counted")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1,
                    help="Ray Train workers; 0: Ray Train's local mode (the same loop in this process)")
    a = parse_args(ap, dict(clips=8, batch_size=2, steps=2, log_every=1, rounds=1, workers=0))
    if a.steps < 2 * a.log_every:
        ap.error("--steps must be at least 2 x --log-every")
    import ray

    init_ray(num_cpus=2, log_to_driver=False)  # the encode step is a Ray Data job
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_synth_export(root / "data", a.clips, seconds=4.0, sr=32000, shard_count=8)
        sizes = dict(steps=a.steps, log_every=a.log_every, batch_size=a.batch_size, workers=a.workers)
        results: dict[str, list[dict]] = {"vae-tiny": [], "dit-tiny": []}
        for r in range(a.rounds):
            results["vae-tiny"].append(run("vae", root / f"vae-r{r}", r, str(shards), seconds=1.0, **sizes))
        # The DiT trains on the latents of the first VAE trained above (a model like any other:
        # the loader's cost does not depend on how well it reconstructs).
        vae_dir, latents = root / "vae-r0", root / "latents"
        encode_shards(str(vae_dir), str(shards), str(latents))
        for r in range(a.rounds):
            results["dit-tiny"].append(run("dit", root / f"dit-r{r}", r, str(latents), vae=str(vae_dir),
                                           seconds=2.0, **sizes))
        print(f"{a.clips} synth clips (4 s, 32 kHz; VAE at 16 kHz, 1 s crops; DiT on 2 s of latents), "
              f"batch {a.batch_size}, {a.steps} steps per phase, a shards and a memory phase in one Ray Train "
              f"run (order alternating per round), {a.workers or 'local mode, no'} Ray Train worker, median of {a.rounds} rounds")
        for name, res in results.items():
            shards_r = statistics.median(r["shards"][0] for r in res)
            mem_r = statistics.median(r["memory"][0] for r in res)
            wait = statistics.median(r["shards"][1] for r in res)
            figure(f"{name}_loader_cost", f"{name}: shards {shards_r:6.1f} samples/s · memory {mem_r:6.1f} "
                   f"samples/s · ratio {shards_r / mem_r:.2f}x · loader cost {100 * (1 - shards_r / mem_r):+.1f}% "
                   f"(target < 10%) · time waiting for batches in the shards phases {100 * wait:.1f}%")
    ray.shutdown()


if __name__ == "__main__":
    main()
