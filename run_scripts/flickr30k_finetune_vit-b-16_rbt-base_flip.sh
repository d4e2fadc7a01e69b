#!/usr/bin/env bash
# Reference script name: Flickr30k-CN + FLIP (mask ratio 0.5).
export MASK_RATIO="${MASK_RATIO:-0.5}"
exec bash "$(dirname "$0")/flickr30k_finetune.sh" "$@"
