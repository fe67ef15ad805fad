#!/usr/bin/env bash
# Stage rl at real scale: GSPO + VisionCoach with the release's settings (8 GPUs, ZeRO-3, 1 prompt per
# GPU, G = 4, lr 1e-6 cosine, weight decay 0.01, beta 0.04, clip 0.2, temperature 1.0, top_p 0.95,
# 768 completion tokens, 16,384 prompt tokens, max grad norm 5, k = 2.21, alpha = 0.1, N = 2,
# one epoch, a checkpoint every 500 steps). Run selector.sh first. A frozen vision tower is ours.
#   configs/real/rl.sh [--field=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source configs/real/settings.sh
N=$(python3 -c "import json, sys; print(len(json.load(open(sys.argv[1]))))" "$STGR/json/rl.json")
$LAUNCH train.py --stage=rl --model="$OUT/sft/last" --train_json="$STGR/json/rl.json" --data_root="$STGR/videos" \
    --out_dir="$OUT" $FRAMES $SCALE --batch_size="$GPUS" --rl_steps=$((N / GPUS)) --group_size=4 \
    --rl_lr=1e-6 --weight_decay=0.01 --beta=0.04 --clip_eps=0.2 --ratio=sequence --temperature=1.0 \
    --top_p=0.95 --max_new_tokens=768 --max_prompt_tokens=16384 --grad_clip=5 --coach=selector \
    --hard_k=2.21 --alpha=0.1 --top_n=2 --train_vision=false --save_every=500 "$@"
