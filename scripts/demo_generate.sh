#!/usr/bin/env bash
# The demo's last part: export the curated demo lake as shards, train a tiny waveform VAE and
# a tiny DiT on them with Ray Train (a few minutes on CPU), and generate a clip.
# Re-running resumes: finished shards are kept and finished trainings return at once.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SL=.venv/bin/soundlake

$SL export --lake ./lake --out ./shards/demo --caption all --shard-count 25 --quiet
$SL train vae --shards ./shards/demo --out ./runs/vae --steps 150 --batch-size 8 --seconds 1
$SL encode --vae ./runs/vae --shards ./shards/demo --out ./shards/demo-latents --concurrency 2
$SL train dit --shards ./shards/demo-latents --vae ./runs/vae --out ./runs/dit --steps 200 --batch-size 8 --seconds 5
$SL generate --model ./runs/dit "A high beep repeats." --seconds 10 --steps 50 --out ./reports/generated.wav
