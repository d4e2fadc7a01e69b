#!/usr/bin/env bash
# LiT for a new language: a frozen image tower (ours or open_clip's) and a new Hugging Face text tower trained
# against it. Usage:
#   TEXT_FOLDER=path/to/xlm-roberta-base CLIP_WEIGHT_PATH=clip_cn_vit-b-16.pt \
#     bash run_scripts/lit_multilingual.sh DATAPATH [extra flags]
# TEXT_FOLDER holds config.json + tokenizer files (+ weights to start from); CLIP_WEIGHT_PATH is any checkpoint
# whose visual.* (and logit_scale) fit VISION_MODEL: ours, the released files or an open_clip one.
set -euo pipefail
export DATASET="${DATASET:-MUGE}" VISION_MODEL="${VISION_MODEL:-ViT-B-16}"
export TEXT_MODEL="${TEXT_MODEL:-hf:${TEXT_FOLDER:?set TEXT_FOLDER to a Hugging Face encoder folder}}"
export NAME="${NAME:-${DATASET,,}_lit_${VISION_MODEL,,}}" CONTEXT_LENGTH="${CONTEXT_LENGTH:-77}"
export LR="${LR:-1e-4}" WARMUP="${WARMUP:-500}" MAX_EPOCHS="${MAX_EPOCHS:-10}" WD="${WD:-0.01}"
export RESUME="${RESUME-}"  # the image tower comes from CLIP_WEIGHT_PATH, not from a whole-model resume
extra=(--freeze-vision)
[[ -n "${CLIP_WEIGHT_PATH:-}" ]] && extra+=(--clip-weight-path "$CLIP_WEIGHT_PATH")
exec bash "$(dirname "$0")/launch.sh" "$@" "${extra[@]}"
