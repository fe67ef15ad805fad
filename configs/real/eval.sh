#!/usr/bin/env bash
# Evaluation at real scale, with the frames the model was trained on (V-STAR: the release's 1 fps,
# at most 16 frames). One process per GPU, each on a shard of the file.
#   configs/real/eval.sh CHECKPOINT DATA_JSON [--field=value ...]
#   configs/real/eval.sh runs/7b/rl/last /stgr/json/test.json --limit=500
set -euo pipefail
cd "$(dirname "$0")/../.."
source configs/real/settings.sh
CKPT=$1 DATA=$2
shift 2
torchrun --standalone --nproc_per_node="$GPUS" eval.py --model="$CKPT" --data="$DATA" $FRAMES \
    --dtype=bfloat16 --attn_implementation="$ATTN" --max_new_tokens=768 --max_prompt_tokens=16384 "$@"
