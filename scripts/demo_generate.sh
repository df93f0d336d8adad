#!/usr/bin/env bash
# The demo's last part, on the mel path: export the curated demo lake as shards, train the tiny
# mel VAE and, on its latents, the tiny DiT with Ray Train, generate a clip (mel VAE decoder,
# then Griffin-Lim) and say which sound class the demo's CLAP hears in it. The recipe is
# benchmarks/generation_quality.py's (mel VAE width 64, learning rate 1e-3), with step counts
# that fit about 10 minutes on 2 cores. Re-running resumes: finished shards are kept and
# finished trainings return at once.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SL=.venv/bin/soundlake
PROMPT="A siren wails."

$SL export --lake ./lake --out ./shards/demo --caption all --shard-count 25 --quiet
$SL train vae --config mel-vae-tiny --set overrides.channels=64 --shards ./shards/demo --out ./runs/mel-vae \
    --steps 1500
$SL encode --vae ./runs/mel-vae --shards ./shards/demo --out ./shards/demo-mel --concurrency 2
$SL train dit --config dit-tiny --shards ./shards/demo-mel --vae ./runs/mel-vae --out ./runs/dit-mel \
    --steps 600 --batch-size 8 --seconds 2.56 --lr 1e-3
$SL generate --model ./runs/dit-mel "$PROMPT" --seconds 2.56 --steps 50 --out ./reports/generated.wav
if [ -f ./models/clap-demo/soundlake_clap.json ]; then  # the CLAP scripts/demo.sh trains on the lake
  .venv/bin/python benchmarks/generation_quality.py --classify ./reports/generated.wav --clap ./models/clap-demo
fi
