#!/usr/bin/env bash
# Reference script name: MUGE + feature distillation (both towers) from a local teacher, offline.
# TEACHER: a released name (default ViT-L-14: $DATAPATH/pretrained_weights/clip_cn_vit-l-14.pt, downloaded there if
# missing), any cn_clip checkpoint file, or a Hugging Face ChineseCLIPModel folder. DISTILLATION_WEIGHT: 0.5.
set -euo pipefail
DATAPATH="${1:?usage: TEACHER=ViT-L-14 bash muge_finetune_vit-b-16_rbt-base_distillation.sh DATAPATH [flags...]}"
exec bash "$(dirname "$0")/muge_finetune.sh" "$@" --distillation --teacher-model-name "${TEACHER:-ViT-L-14}" \
  --teacher-download-root "${TEACHER_DOWNLOAD_ROOT:-$DATAPATH/pretrained_weights}" \
  --distillation-weight "${DISTILLATION_WEIGHT:-0.5}"
