#!/usr/bin/env bash
# COCO-CN recipe. Usage: bash run_scripts/coco_cn_finetune.sh DATAPATH [extra flags]
set -euo pipefail
export DATASET=COCO-CN NAME="${NAME:-coco-cn_finetune_vit-b-16_roberta-base_bs1024_8gpu}"
export BATCH_SIZE="${BATCH_SIZE:-1024}" LR="${LR:-3e-5}" WARMUP="${WARMUP:-6}" MAX_EPOCHS="${MAX_EPOCHS:-20}"
export VALID_STEP_INTERVAL="${VALID_STEP_INTERVAL:-999999}"
exec bash "$(dirname "$0")/launch.sh" "$@" --grad-checkpointing
