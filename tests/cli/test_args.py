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
# Flags added since, with the defaults that keep the recorded behaviour (a documented command line never sets them).
ADDED = {
    "interpolate_positions": False,  # --interpolate-positions: long captions beyond the position limit
    "matryoshka_dims": "()",  # --matryoshka-dims: nested-dimension losses, off
    "dim": None,  # --dim: Matryoshka truncation of extracted/indexed features, off
}


@pytest.mark.parametrize(("case", "module", "builder", "argv"), GEN.CASES, ids=[c[0] for c in GEN.CASES])
def test_documented_command_lines_keep_their_values(case: str, module: str, builder: str, argv: list[str]) -> None:
    expected = {**BEFORE[case], **CHANGED.get(case, {})}
    parsed = GEN.parse(module, builder, argv)
    added = {key: value for key, value in parsed.items() if key not in expected}
    assert {key: value for key, value in parsed.items() if key in expected} == expected
    assert added == {key: ADDED[key] for key in added if key in ADDED}, f"new flags without a recorded default: {added}"


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
