#!/usr/bin/env bash
# Reference script name: MUGE + flash attention.
exec bash "$(dirname "$0")/muge_finetune.sh" "$@" --use-flash-attention
