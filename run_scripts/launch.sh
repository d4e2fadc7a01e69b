#!/usr/bin/env bash
# The one training launcher. Usage: DATASET=MUGE bash run_scripts/launch.sh DATAPATH [extra flags...]
# Defaults are the reference's MUGE ViT-B-16 recipe; every knob is an env var; extra flags go to
# cn_clip.training.main and win over the defaults (argparse keeps the last value).
set -euo pipefail
DATAPATH="${1:?usage: launch.sh DATAPATH [flags...]}"; shift
DATASET="${DATASET:?set DATASET, e.g. MUGE}"

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [[ "$GPUS_PER_NODE" -ge 1 ]] || GPUS_PER_NODE=1
  fi
fi
VISION_MODEL="${VISION_MODEL:-ViT-B-16}"
TEXT_MODEL="${TEXT_MODEL:-RoBERTa-wwm-ext-base-chinese}"

args=(
  --train-data "$DATAPATH/datasets/$DATASET/lmdb/train"
  --val-data "$DATAPATH/datasets/$DATASET/lmdb/valid"
  --logs "${LOGS:-$DATAPATH/experiments/}"
  --name "${NAME:-${DATASET,,}_finetune_${VISION_MODEL,,}_${TEXT_MODEL}}"
  --save-step-frequency "${SAVE_STEP_FREQUENCY:-999999}"
  --save-epoch-frequency "${SAVE_EPOCH_FREQUENCY:-1}"
  --log-interval "${LOG_INTERVAL:-1}"
  --report-training-batch-acc
  --context-length "${CONTEXT_LENGTH:-52}"
  --warmup "${WARMUP:-100}"
  --batch-size "${BATCH_SIZE:-128}"
  --valid-batch-size "${VALID_BATCH_SIZE:-${BATCH_SIZE:-128}}"
  --valid-step-interval "${VALID_STEP_INTERVAL:-150}"
  --valid-epoch-interval "${VALID_EPOCH_INTERVAL:-1}"
  --accum-freq "${ACCUM_FREQ:-1}"
  --lr "${LR:-5e-5}"
  --wd "${WD:-0.001}"
  --max-epochs "${MAX_EPOCHS:-3}"
  --mask-ratio "${MASK_RATIO:-0}"
  --vision-model "$VISION_MODEL"
  --text-model "$TEXT_MODEL"
)
[[ "${USE_AUGMENT:-1}" == 1 ]] && args+=(--use-augment)

# Adaptation (docs/adaptation.md): LORA_R>0 trains low-rank adapters only; LOCK_* freeze all but the last layers.
if [[ "${LORA_R:-0}" != 0 ]]; then
  args+=(--lora-r "$LORA_R" --lora-towers "${LORA_TOWERS:-text,vision}" --lora-targets "${LORA_TARGETS:-attn}"
         --lora-dropout "${LORA_DROPOUT:-0}")
  [[ -n "${LORA_ALPHA:-}" ]] && args+=(--lora-alpha "$LORA_ALPHA")
  [[ "${LORA_TRAIN_PROJ:-0}" == 1 ]] && args+=(--lora-train-proj)
fi
[[ -n "${LOCK_TEXT_UNLOCKED_LAYERS:-}" ]] && args+=(--lock-text-unlocked-layers "$LOCK_TEXT_UNLOCKED_LAYERS")
[[ -n "${LOCK_IMAGE_UNLOCKED_GROUPS:-}" ]] && args+=(--lock-image-unlocked-groups "$LOCK_IMAGE_UNLOCKED_GROUPS")
[[ -n "${LAYER_DECAY:-}" ]] && args+=(--layer-decay "$LAYER_DECAY")

# The recipe (lr 5e-5) is meant for the released weights: a missing default file is an error, not a silent
# from-scratch run. RESUME=path starts elsewhere; only an explicit empty RESUME= trains from scratch.
default_resume="$DATAPATH/pretrained_weights/clip_cn_${VISION_MODEL,,}.pt"
RESUME="${RESUME-$default_resume}"
if [[ -n "$RESUME" ]]; then
  if [[ "$RESUME" == "$default_resume" && ! -f "$RESUME" ]]; then
    dl="python -c \"from cn_clip.models.factory import released_file; released_file('$VISION_MODEL', '${RESUME%/*}')\""
    echo "launch.sh: error: $RESUME not found (this recipe fine-tunes the released $VISION_MODEL weights). Download" \
      "them with: $dl -- or set RESUME=path to other weights, or RESUME= (empty) to train from scratch" >&2
    exit 2
  fi
  args+=(--resume "$RESUME" --reset-data-offset --reset-optimizer)
fi

if [[ "${DEEPSPEED:-0}" == 1 ]]; then
  run=(deepspeed --num_nodes "${WORKER_CNT:-1}" --num_gpus "$GPUS_PER_NODE"
       --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-8514}"
       --module cn_clip.training.main
       --deepspeed --deepspeed_config "${DS_CONFIG:-$(dirname "$0")/ds_config_zero2.json}")
else
  run=(torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "${WORKER_CNT:-1}" --node_rank "${RANK:-0}"
       --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-8514}" -m cn_clip.training.main --)
fi
# torchrun classifies every later "--x" against its own flags (--logs is "ambiguous"): "--" ends its options.
echo "+ ${run[*]} ${args[*]} $*" >&2
exec "${run[@]}" "${args[@]}" "$@"
