"""DeepSpeed on CPU (slow): the ``deepspeed`` launcher, 2 processes, gloo; ZeRO-2 fp32 and ZeRO-3 bf16."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.training.helpers import tiny_args

pytestmark = pytest.mark.slow
DEEPSPEED = REPO / ".venv" / "bin" / "deepspeed"


def _launch(tmp_path: Path, stage: int, precision: str, port: int, steps: int) -> str:
    if not DEEPSPEED.exists() and shutil.which("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    argv = tiny_args(
        tmp_path, "--deepspeed", "--deepspeed_config", f"run_scripts/ds_config_zero{stage}.json", steps=steps
    )
    argv[argv.index("--precision") + 1] = precision
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{DEEPSPEED.parent}:{os.environ['PATH']}",
    }
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port), "--module", "cn_clip.training.main", *argv]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=500, capture_output=True)
    return "".join(p.read_text() for p in sorted((tmp_path / "run").glob("out_*.log")))


@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (3, "bf16")])
def test_deepspeed_step_checkpoint_and_resume(tmp_path: Path, stage: int, precision: str) -> None:
    from cn_clip.models.factory import load_from_name

    log = _launch(tmp_path, stage, precision, 29720 + stage, steps=2)
    assert "Global Steps: 2/2" in log and "Global Batch Size: 8" in log
    model, _ = load_from_name(str(tmp_path / "run" / "checkpoints" / "epoch_latest.pt"), device="cpu")
    assert model.logit_scale.shape == ()
    assert (tmp_path / "run" / "checkpoints" / "deepspeed" / "last").is_dir()
    log = _launch(tmp_path, stage, precision, 29730 + stage, steps=4)  # auto-resume: weights + DeepSpeed state
    assert "optimizer state is restored from the DeepSpeed checkpoint" in log
    assert "Global Steps: 4/4" in log
