#!/usr/bin/env bash
# One command for a newcomer: set up, curate the embedded demo (synth source, local Ray,
# local lake ./lake, offline), then query the catalog.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/soundlake curate demo --lake ./lake
.venv/bin/soundlake sql "SELECT c.source, count(*) AS clips, round(sum(c.duration_s) / 60, 1) AS minutes,
                               any_value(cap.text) AS example_caption
                        FROM clips c LEFT JOIN captions cap USING (clip_id) GROUP BY 1" --lake ./lake
.venv/bin/soundlake status --lake ./lake
