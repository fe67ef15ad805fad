# Shared by the stage scripts beside it (sourced, not run): where things are, and the release's
# settings that every stage uses (REFERENCE.md sections 1, 4 and 9). Override any of the first
# four from the environment:  MODEL=/ckpt/Qwen2.5-VL-3B-Instruct OUT=runs/3b configs/real/sft.sh
MODEL=${MODEL:-/ckpt/Qwen2.5-VL-7B-Instruct}   # a Qwen2.5-VL checkpoint directory
STGR=${STGR:-/stgr}                             # json/sft.json, json/rl.json, videos/
OUT=${OUT:-runs/7b}                             # every stage writes under here
GPUS=${GPUS:-8}
# 2 fps, 4 to 16 frames, 128*28*28 pixels a frame: what the release shows the model
FRAMES="--fps=2 --min_frames=4 --max_frames=16 --max_pixels=100352"
# bf16 compute over fp32 masters, activation checkpointing, flash-attention 2 where it is installed
ATTN=$(python3 -c "import flash_attn" 2>/dev/null && echo flash_attention_2 || echo sdpa)
SCALE="--dtype=bfloat16 --gradient_checkpointing=true --attn_implementation=$ATTN"
# ZeRO-3 through accelerate (needs ./setup.sh --deepspeed); GPUS processes, 1 sample or prompt each
LAUNCH="accelerate launch --config_file configs/zero3.yaml --num_processes=$GPUS"
