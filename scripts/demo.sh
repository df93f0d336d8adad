#!/usr/bin/env bash
# One command for a newcomer: set up, then run the embedded demo end to end, offline:
# curate synthetic soundscapes into ./lake (local Ray), query the catalog, train the
# in-house CLAP and score every caption with it, report thresholds, export shards,
# train a tiny VAE + DiT on them and generate a clip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SL=.venv/bin/soundlake

$SL curate demo --lake ./lake
$SL sql "SELECT c.source, count(DISTINCT c.clip_id) AS clips, round(sum(c.duration_s) / 60, 1) AS minutes,
                any_value(d.caption) AS example_caption
         FROM clips c JOIN dataset d USING (clip_id) GROUP BY 1" --lake ./lake

$SL train clap --lake ./lake --out ./models/clap-demo --epochs 30 --batch-size 32
$SL curate demo --lake ./lake --set clap.model=./models/clap-demo
$SL report thresholds --lake ./lake --out ./reports/thresholds.html
$SL sql "SELECT clip_id, round(text_similarity(clip_id, 'a siren wails'), 3) AS similarity, caption
         FROM dataset ORDER BY similarity DESC LIMIT 5" --lake ./lake
$SL evaluate captions --lake ./lake
$SL status --lake ./lake

if [ -f scripts/demo_generate.sh ]; then
  bash scripts/demo_generate.sh
fi
