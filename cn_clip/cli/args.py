"""Shared argument groups: each flag is defined once and reused by every entry point."""

from __future__ import annotations

import argparse

from cn_clip.runtime import PRECISIONS

# The reference's `--vision-model` choices (training and extraction); any registered tower is also accepted.
REFERENCE_VISION_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50")
REFERENCE_TEXT_MODELS = ("RoBERTa-wwm-ext-base-chinese", "RoBERTa-wwm-ext-large-chinese", "RBT3-chinese")


def _tower_name(kind: str):
    def check(value: str) -> str:
        from cn_clip.models.registry import list_towers

        towers = list_towers(kind)
        if value.replace("/", "-") not in towers:
            raise argparse.ArgumentTypeError(f"unknown {kind} model {value!r}; choose from {', '.join(towers)}")
        return value

    return check


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--vision-model", type=_tower_name("vision"), default="ViT-B-16", help="vision tower (see list_towers())"
    )
    group.add_argument(
        "--text-model",
        type=_tower_name("text"),
        default="RoBERTa-wwm-ext-base-chinese",
        help="text tower (see list_towers())",
    )


def add_context_length_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context-length", type=int, default=52, help="max tokens incl. [CLS]/[SEP] (≤ 512)")


def add_precision_arg(parser: argparse.ArgumentParser, choices: tuple[str, ...] = PRECISIONS):
    parser.add_argument("--precision", choices=choices, default="amp", help="floating point precision")


def add_resume_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", default=None, type=str, help="checkpoint path (reference format)")
