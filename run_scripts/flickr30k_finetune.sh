#!/usr/bin/env bash
# Flickr30k-CN fine-tuning. Usage: bash run_scripts/flickr30k_finetune.sh DATAPATH [extra flags]
set -euo pipefail
export DATASET=Flickr30k-CN NAME="${NAME:-flickr30k_finetune_vit-b-16_roberta-base_bs128_8gpu}"
exec bash "$(dirname "$0")/launch.sh" "$@"
