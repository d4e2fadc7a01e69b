#!/usr/bin/env bash
# Reference script name: MUGE + FLIP (mask ratio 0.5).
export MASK_RATIO="${MASK_RATIO:-0.5}"
exec bash "$(dirname "$0")/muge_finetune.sh" "$@"
