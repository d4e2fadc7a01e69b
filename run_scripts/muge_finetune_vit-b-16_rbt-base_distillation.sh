#!/usr/bin/env bash
# Reference script name: MUGE + image-feature distillation.
exec bash "$(dirname "$0")/muge_finetune.sh" "$@" --distillation --teacher-model-name=damo/multi-modal_team-vit-large-patch14_multi-modal-similarity
