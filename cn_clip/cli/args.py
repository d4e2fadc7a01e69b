"""Shared argument groups: each flag is defined once and reused by every entry point."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from cn_clip.runtime import PRECISIONS

if TYPE_CHECKING:
    from cn_clip.eval.features import ExtractOptions

# The reference's `--vision-model` choices (training and extraction); any registered tower is also accepted.
REFERENCE_VISION_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50")
REFERENCE_TEXT_MODELS = ("RoBERTa-wwm-ext-base-chinese", "RoBERTa-wwm-ext-large-chinese", "RBT3-chinese")


def _tower_name(kind: str):
    def check(value: str) -> str:
        from cn_clip.models.registry import list_towers

        towers = list_towers(kind)
        if kind == "text" and value.startswith("hf:") and len(value) > 3:
            return value  # a Hugging Face folder, checked when the tower is built
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
        help="text tower (see list_towers()), or hf:FOLDER for any Hugging Face encoder",
    )


def add_context_length_arg(parser: argparse.ArgumentParser, interpolate: bool = False) -> None:
    """``--context-length``; with ``interpolate`` also ``--interpolate-positions`` (commands that build a model)."""
    parser.add_argument(
        "--context-length",
        type=int,
        default=52,
        help="max tokens incl. [CLS]/[SEP], up to the text tower's position limit (512 for the released towers)",
    )
    if interpolate:
        parser.add_argument(
            "--interpolate-positions",
            action="store_true",
            default=False,
            help="allow --context-length beyond the position limit by resampling the position embeddings",
        )


def add_matryoshka_dim_arg(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--dim",
        type=int,
        default=None,
        help="Matryoshka: keep the first k feature coordinates, re-normalised (default: all; see --matryoshka-dims)",
    )


def add_precision_arg(parser: argparse.ArgumentParser, choices: tuple[str, ...] = PRECISIONS):
    parser.add_argument("--precision", choices=choices, default="amp", help="floating point precision")


def add_resume_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", default=None, type=str, help="checkpoint path (reference format)")


def add_model_arch_arg(parser: argparse.ArgumentParser) -> None:
    """The deploy tools' one-string architecture (the reference's ``--model-arch``)."""
    parser.add_argument(
        "--model-arch",
        required=True,
        help="released name (ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14, RN50) or any registered 'vision@text'",
    )


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """The converters' ``--model-arch`` and which encoders to convert."""
    add_model_arch_arg(parser)
    parser.add_argument("--convert-text", action="store_true", help="convert the text encoder")
    parser.add_argument("--convert-vision", action="store_true", help="convert the image encoder")


# One default per flag (docs/cli.md): the reference's where it has one.
def add_device_arg(parser: argparse._ActionsContainer, choices: tuple[str, ...] | None = None) -> None:
    """``--device``; None = CUDA when available (the reference's ``cuda``, which it required), else the CPU."""
    parser.add_argument(
        "--device",
        choices=choices,
        default=None,
        help=f"{'/'.join(choices or ('cpu', 'cuda', 'cuda:1', 'mps'))} (default: CUDA when available, else cpu)",
    )


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def add_num_workers_arg(parser: argparse._ActionsContainer) -> None:
    """``--num-workers``: DataLoader reader processes, 4 as in the reference's training and zero-shot scripts."""
    parser.add_argument("--num-workers", type=_non_negative, default=4, help="DataLoader reader processes; 0 = inline")


def add_debug_arg(parser: argparse._ActionsContainer) -> None:
    parser.add_argument("--debug", action="store_true", default=False, help="log at DEBUG level")


def add_progress_arg(parser: argparse._ActionsContainer) -> None:
    parser.add_argument("--no-progress", action="store_true", default=False, help="hide the progress bars")


def add_image_reader_args(parser: argparse._ActionsContainer) -> None:
    """How the image-reading commands (extraction, evaluation, indexing) load an LMDB: workers, ids, progress."""
    add_num_workers_arg(parser)
    add_image_id_type_arg(parser)
    add_progress_arg(parser)


def extract_options(args: argparse.Namespace, tokenizer: Any = None) -> ExtractOptions:
    """The typed extraction settings of a parsed command line: the feature-I/O, image-reader and image-source flags
    it has (absent ones keep :class:`~cn_clip.eval.features.ExtractOptions`' defaults), and the architecture's
    ``tokenizer`` (None: the Chinese WordPiece)."""
    from dataclasses import fields

    from cn_clip.data.sources import source_options
    from cn_clip.eval.features import ExtractOptions

    given = {f.name: getattr(args, f.name) for f in fields(ExtractOptions) if hasattr(args, f.name)}
    given["progress"] = not getattr(args, "no_progress", False)
    given["source"] = source_options(args)
    given["tokenizer"] = tokenizer
    return ExtractOptions(**given)


def add_image_id_type_arg(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--image-id-type",
        choices=("auto", "int", "str"),
        default="auto",
        help="LMDB key → id: auto keeps '007'/'a1' as strings and makes canonical decimals ints; int = reference",
    )


def add_build_validation_args(parser: argparse._ActionsContainer) -> None:
    """How the dataset builders (LMDB and WebDataset) validate their input: one report of every problem."""
    parser.add_argument("--skip-bad", action="store_true", help="drop bad rows (listed in the build report)")
    parser.add_argument(
        "--check-images",
        nargs="?",
        const="header",
        default="header",
        choices=("header", "full", "off"),
        help="check that every image opens in Pillow (default: header; 'full' decodes all pixels; 'off': base64 only)",
    )
    parser.add_argument(
        "--no-check-images",
        dest="check_images",
        action="store_const",
        const="off",
        help="only check the base64 text, not the image inside (= --check-images off)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes for image checks (default: cores - 1; this one writes)"
    )
    parser.add_argument("--report", default=None, help="write the list of problems / dropped rows to this JSON file")
