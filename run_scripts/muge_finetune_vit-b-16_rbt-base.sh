#!/usr/bin/env bash
# Reference script name: MUGE ViT-B-16 recipe.
exec bash "$(dirname "$0")/muge_finetune.sh" "$@"
