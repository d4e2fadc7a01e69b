#!/usr/bin/env bash
# Reference script name: Flickr30k-CN ViT-B-16 recipe.
exec bash "$(dirname "$0")/flickr30k_finetune.sh" "$@"
