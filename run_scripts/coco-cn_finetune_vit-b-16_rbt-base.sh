#!/usr/bin/env bash
# Reference script name: COCO-CN recipe.
exec bash "$(dirname "$0")/coco_cn_finetune.sh" "$@"
