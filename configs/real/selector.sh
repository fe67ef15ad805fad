#!/usr/bin/env bash
# Stage selector at real scale: the SFT checkpoint as the frozen proxy labels RL samples (every
# visual prompt x selector_group answers), trains the head, and writes a prediction for every RL
# training id to $OUT/selector/predictions.json, which rl.sh reads (--coach=selector).
# One process on one GPU: the proxy is frozen, nothing is sharded.
#   configs/real/selector.sh [--field=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source configs/real/settings.sh
python3 train.py --stage=selector --model="$OUT/sft/last" --train_json="$STGR/json/rl.json" \
    --data_root="$STGR/videos" --out_dir="$OUT" $FRAMES --dtype=bfloat16 --attn_implementation="$ATTN" \
    --max_new_tokens=768 --max_prompt_tokens=16384 --selector_samples=256 --selector_group=2 \
    --selector_predict=all "$@"
