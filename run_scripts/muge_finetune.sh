#!/usr/bin/env bash
# MUGE fine-tuning, the reference's ViT-B-16 recipe. Usage: bash run_scripts/muge_finetune.sh DATAPATH [extra flags]
set -euo pipefail
export DATASET=MUGE NAME="${NAME:-muge_finetune_vit-b-16_roberta-base_bs128_8gpu}"
exec bash "$(dirname "$0")/launch.sh" "$@"
