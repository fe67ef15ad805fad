#!/usr/bin/env bash
# Stage sft at real scale: the release's SFT (lr 1e-6, bf16, ZeRO-3, batch 1 per GPU, max grad norm 5).
#   configs/real/sft.sh [--field=value ...]      (extra flags go to train.py)
# Warmup and the number of epochs are not in the release's notes: ours (20 steps, 1 epoch).
set -euo pipefail
cd "$(dirname "$0")/../.."
source configs/real/settings.sh
$LAUNCH train.py --stage=sft --model="$MODEL" --train_json="$STGR/json/sft.json" --data_root="$STGR/videos" \
    --out_dir="$OUT" $FRAMES $SCALE --batch_size="$GPUS" --lr=1e-6 --sft_warmup=20 --sft_epochs=1 \
    --weight_decay=0.01 --grad_clip=5 --max_prompt_tokens=16384 --save_every=500 "$@"
