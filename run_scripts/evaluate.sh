#!/usr/bin/env bash
# One-command retrieval evaluation: features → top-k (both directions) → recall scoring, one table.
# Usage: bash run_scripts/evaluate.sh DATA_DIR CHECKPOINT [extra flags for cn_clip.eval.run]
#   DATA_DIR holds {split}_texts.jsonl and lmdb/{split}/imgs, e.g. ${DATAPATH}/datasets/MUGE
# Env: SPLIT (valid), VISION_MODEL (ViT-B-16), TEXT_MODEL (RoBERTa-wwm-ext-base-chinese), OUTPUT_DIR
#      (DATA_DIR/eval/SPLIT), GPUS_PER_NODE (1; > 1 shards the extraction with torchrun), MASTER_PORT (8515).
set -euo pipefail
usage="usage: evaluate.sh DATA_DIR CHECKPOINT [flags...]"
data="${1:?$usage}"; resume="${2:?$usage}"; shift 2
args=(--data "$data" --split "${SPLIT:-valid}" --resume "$resume"
      --vision-model "${VISION_MODEL:-ViT-B-16}" --text-model "${TEXT_MODEL:-RoBERTa-wwm-ext-base-chinese}")
if [[ -n "${OUTPUT_DIR:-}" ]]; then args+=(--output-dir "$OUTPUT_DIR"); fi
gpus="${GPUS_PER_NODE:-1}"
if (( gpus > 1 )); then
  run=(torchrun --nproc_per_node "$gpus" --master_port "${MASTER_PORT:-8515}" -m cn_clip.eval.run)
else
  run=("${PYTHON:-python}" -m cn_clip.eval.run)
fi
echo "+ ${run[*]} ${args[*]} $*" >&2
exec "${run[@]}" "${args[@]}" "$@"
