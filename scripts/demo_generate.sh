#!/usr/bin/env bash
# The demo's last part, on the mel path: train a tiny text-to-audio generator with Ray Train,
# generate a clip for a prompt and say which sound class the demo's CLAP hears in it.
#
# The generator does not learn from ./lake's scenes: there an event of 1.5-3 s sits somewhere in
# 10 s of near-silence under a caption of the whole scene, so most training crops are quiet or do
# not match their caption, and the DiT learns to ignore the text. It learns, as
# benchmarks/generation_quality.py does, from short scenes that one event fills: `curate demo`
# again, into a lake of its own (./runs/gen-lake, so that re-running scripts/demo.sh trains the
# CLAP on the same 200 scenes), 2000 synth scenes of 1.28 s under another seed (so none is one
# of the CLAP's clips), of which the single-event ones (about 1000) are exported. Then
# generation_quality's recipe, sized for 2 cores: the mel VAE (mel-vae-tiny at width 64,
# learning rate 1e-3; 2000 steps of 2 Ray Train workers x 8 crops of 0.64 s: it is
# convolutional, so it encodes the whole clips after training on half-length crops) and, on its
# latents, the DiT (dit-tiny, learning rate 1e-3, 700 steps of batch 16 on one worker: a second
# worker costs as much in gradient exchange as it saves), generating at the training length,
# 1.28 s, with 25 DDIM steps (mel VAE decoder, then Griffin-Lim).
#
# The judge is the CLAP scripts/demo.sh trains on ./lake's 10 s scenes, none of which the
# generator saw. It pads a shorter clip to its 10 s window with zeros, a digital silence it never
# heard in training: that way it names even real 1.28 s siren clips "chirp". So the generated
# clip is put into a 10 s scene the way the synth source renders one (its faint background, the
# clip in the middle: soundlake.sources.synth.event_in_scene), reports/generated-scene.wav, and
# that is what it classifies (real 1.28 s clips presented so: 0.97 of them named right).
#
# About 10 minutes on 2 cores. Re-running resumes: the lake keeps its clips (no duplicates),
# finished shards are kept and finished trainings return at once.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SL=.venv/bin/soundlake
PROMPT="A siren wails."
CLIP=1.28   # seconds: the scenes, the training crops and the generated clip
# the VAE's two workers need two CPUs; on one, a single worker takes both workers' crops
if [ "$(nproc)" -ge 2 ]; then VAE_WORKERS=(--workers 2 --batch-size 8); else VAE_WORKERS=(--workers 1 --batch-size 16); fi

$SL curate demo --lake ./runs/gen-lake --set source.seed=1 --set source.count=2000 \
    --set source.duration=$CLIP --set segment.window=$CLIP
$SL export --lake ./runs/gen-lake --out ./shards/demo-gen --where "len(labels) = 1" --caption reference \
    --shard-count 100 --quiet
$SL train vae --config mel-vae-tiny --set overrides.channels=64 --shards ./shards/demo-gen \
    --out ./runs/demo-mel-vae --steps 2000 --seconds 0.64 "${VAE_WORKERS[@]}"
$SL encode --vae ./runs/demo-mel-vae --shards ./shards/demo-gen --out ./shards/demo-gen-mel --concurrency 2
$SL train dit --config dit-tiny --shards ./shards/demo-gen-mel --vae ./runs/demo-mel-vae --out ./runs/demo-dit \
    --steps 700 --batch-size 16 --workers 1 --seconds $CLIP --lr 1e-3
$SL generate --model ./runs/demo-dit "$PROMPT" --seconds $CLIP --steps 25 --out ./reports/generated.wav
.venv/bin/python - <<'EOF'
import json
from pathlib import Path

import soundfile as sf

from soundlake.sources.synth import event_in_scene

src, dst = Path("reports/generated.wav"), Path("reports/generated-scene.wav")
clip, sr = sf.read(src, dtype="float32")
sf.write(dst, event_in_scene(clip, sr), sr)
prompt = json.loads(Path(f"{src}.json").read_text())["prompt"]
Path(f"{dst}.json").write_text(json.dumps({"prompt": prompt, "scene_of": str(src),
                                           "made_by": "soundlake.sources.synth.event_in_scene"}, indent=2))
print(f"wrote {dst}: {src} in the middle of a 10 s synth scene's faint background")
EOF
if [ -f ./models/clap-demo/soundlake_clap.json ]; then  # the CLAP scripts/demo.sh trains on ./lake
  .venv/bin/python benchmarks/generation_quality.py --classify ./reports/generated-scene.wav --clap ./models/clap-demo
fi
