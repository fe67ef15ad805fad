#!/usr/bin/env bash
# Idempotent set-up for a fresh machine (Debian/Ubuntu): ffmpeg for torchcodec, then Python packages.
#   ./setup.sh               # what every run needs
#   ./setup.sh --deepspeed   # plus the optional DeepSpeed extra (configs/zero3.yaml)
# Keeps an existing torch (a CUDA build on a GPU box stays as it is); installs the CPU wheel otherwise.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v ffmpeg >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi
PY=${PYTHON:-python3}
if ! $PY -c "import torch" >/dev/null 2>&1; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -r requirements.txt
# Optional: DeepSpeed for configs/zero3.yaml (ZeRO-3; also runs on its CPU accelerator, as the tests do).
if [ "${1:-}" = "--deepspeed" ]; then
  $PY -m pip install -q "deepspeed>=0.15"
fi
