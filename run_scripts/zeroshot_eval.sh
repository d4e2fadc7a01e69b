#!/usr/bin/env bash
# Zero-shot classification of one ELEVATER-style dataset; the reference's argument order.
# Usage: bash run_scripts/zeroshot_eval.sh GPU_ID DATAPATH DATASET VISION_MODEL TEXT_MODEL CHECKPOINT [INDEX_JSON] [extra flags]
#   reads  DATAPATH/datasets/DATASET/{label_cn.txt,test/<class-id>/...}
#   writes DATAPATH/save_predictions/DATASET.json
# GPU_ID "" or "cpu" runs on the CPU.
set -euo pipefail
usage="usage: zeroshot_eval.sh GPU_ID DATAPATH DATASET VISION_MODEL TEXT_MODEL CHECKPOINT [INDEX_JSON] [flags...]"
gpu="${1?$usage}"; path="${2:?$usage}"; dataset="${3:?$usage}"
vision_model="${4:?$usage}"; text_model="${5:?$usage}"; resume="${6:?$usage}"; index="${7:-}"
shift $(( $# < 7 ? $# : 7 ))
if [[ -n "$gpu" && "$gpu" != cpu ]]; then export CUDA_VISIBLE_DEVICES="$gpu"; else export CUDA_VISIBLE_DEVICES=""; fi
savedir="$path/save_predictions"
mkdir -p "$savedir"
cmd=("${PYTHON:-python}" -u -m cn_clip.eval.zeroshot_evaluation
     --datapath="$path/datasets/$dataset/test" --label-file="$path/datasets/$dataset/label_cn.txt"
     --save-dir="$savedir" --dataset="$dataset" --index="$index" --img-batch-size="${IMG_BATCH_SIZE:-64}"
     --resume="$resume" --vision-model="$vision_model" --text-model="$text_model")
echo "+ ${cmd[*]} $*" >&2
exec "${cmd[@]}" "$@"
