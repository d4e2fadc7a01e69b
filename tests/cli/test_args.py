"""Shared flags: every command line the reference documents parses to the values it did before the refactor."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest

from cn_clip.cli import args as A

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_spec = importlib.util.spec_from_file_location("gen_cli_namespaces", FIXTURES / "gen_cli_namespaces.py")
GEN = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(GEN)
BEFORE = json.loads((FIXTURES / "cli_namespaces.json").read_text(encoding="utf-8"))

# The deliberate changes: one default per shared flag (docs/cli.md). --num-workers was None (min(4, cores - 1)) or
# 0 in the extraction CLIs and is the reference's 4 everywhere; --device was "cuda" (ONNX extraction, speed
# benchmark) or "cpu" (make_topk_predictions) and is None everywhere: CUDA when available, else the CPU.
CHANGED = {
    "extract/minimal": {"num_workers": 4},
    "extract/readme": {"num_workers": 4},
    "extract_onnx/minimal": {"device": None, "num_workers": 4},
    "extract_onnx/readme": {"device": None, "num_workers": 4},
    "zeroshot/readme": {"num_workers": 4},
    "run/minimal": {"num_workers": 4},
    "search/index": {"num_workers": 4},
    "speed/readme": {"device": None},
    "topk/readme": {"device": None},
}
# Flags added to several commands, with the defaults that keep the recorded behaviour (long captions, Matryoshka).
ANYWHERE = {
    "interpolate_positions": False,  # --interpolate-positions: long captions beyond the position limit
    "matryoshka_dims": "()",  # --matryoshka-dims: nested-dimension losses, off
    "dim": None,  # --dim: Matryoshka truncation of extracted/indexed features, off
}


# New flags (their defaults keep the old behaviour): the readers beside LMDB (docs/data.md), SigLIP and calibration.
_SOURCES = {"dataset_type": "auto", "csv_img_key": "filepath", "csv_caption_key": "title", "csv_separator": None}
ADDED = {
    "train": {
        **_SOURCES, "train_num_samples": None, "val_num_samples": None, "dataset_resampled": False,
        "train_data_upsampling_factors": None, "shuffle": True, "shuffle_window": 1000,
        "loss": "clip",  # --loss siglip (docs/scores.md)
        # adaptation (docs/training.md)
        "distillation_towers": "image,text", "teacher_download_root": None, "retention_data": None,
        "retention_warn": 5.0, "valid_at_start": False,
        # LoRA and partial unlocking (docs/adaptation.md)
        "lora_r": 0, "lora_alpha": None, "lora_dropout": 0.0, "lora_towers": "text,vision", "lora_targets": "attn",
        "lora_train_proj": False, "lock_text_unlocked_layers": None, "lock_image_unlocked_groups": None,
        "layer_decay": None,
    },
    "topk": {"calibration": None},  # probabilities from a calib.json (docs/scores.md)
    "run": {**_SOURCES, "calibrate": None},
    "search/index": {**_SOURCES, "index_type": "flat"},  # approximate indexes (docs/search_service.md)
    "search/index_flags": {**_SOURCES, "index_type": "flat"},
    "search/query": {"calibration": None, "min_probability": None},
    "search/query_flags": {"calibration": None, "min_probability": None},
    "extract": _SOURCES,
    "extract_onnx": _SOURCES,
}  # fmt: skip


@pytest.mark.parametrize(("case", "module", "builder", "argv"), GEN.CASES, ids=[c[0] for c in GEN.CASES])
def test_documented_command_lines_keep_their_values(case: str, module: str, builder: str, argv: list[str]) -> None:
    added = {**ADDED.get(case.split("/")[0], {}), **ADDED.get(case, {})}
    expected = {**BEFORE[case], **CHANGED.get(case, {}), **added}
    parsed = GEN.parse(module, builder, argv)
    extra = {key: value for key, value in parsed.items() if key not in expected}
    assert {key: value for key, value in parsed.items() if key in expected} == expected
    assert extra == {key: ANYWHERE[key] for key in extra if key in ANYWHERE}, f"new flags without a default: {extra}"


def test_every_case_is_recorded() -> None:
    assert sorted(BEFORE) == sorted(c[0] for c in GEN.CASES) and set(CHANGED) <= set(BEFORE)


def test_shared_flags_have_one_default() -> None:
    parser = argparse.ArgumentParser()
    for add in (A.add_device_arg, A.add_num_workers_arg, A.add_debug_arg, A.add_progress_arg, A.add_image_id_type_arg):
        add(parser)
    assert vars(parser.parse_args([])) == {
        "device": None, "num_workers": 4, "debug": False, "no_progress": False, "image_id_type": "auto"
    }  # fmt: skip


def test_negative_workers_are_a_usage_error(capsys) -> None:
    parser = argparse.ArgumentParser()
    A.add_num_workers_arg(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--num-workers", "-1"])
    assert exit_info.value.code == 2 and "--num-workers: must be >= 0, got -1" in capsys.readouterr().err


def test_each_shared_flag_is_declared_only_in_cli_args() -> None:
    package = Path(A.__file__).resolve().parents[1]
    shared = ("--device", "--num-workers", "--debug", "--no-progress", "--image-id-type", "--context-length")
    for flag in (*shared, "--model-arch", "--convert-text", "--convert-vision"):
        declares = re.compile(r'add_argument\(\s*"' + re.escape(flag) + '"')
        owners = [str(p.relative_to(package)) for p in package.rglob("*.py") if declares.search(p.read_text("utf-8"))]
        assert owners == ["cli/args.py"], (flag, owners)
