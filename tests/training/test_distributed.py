"""Multi-process runs (slow): torchrun with 2 gloo processes against one process with the doubled batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.training.helpers import latest_state, tiny_args

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("ddp_probe.py")
_PORT = iter(range(29650, 29700))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(next(_PORT)), *args]  # fmt: skip


def _probe(tmp_path: Path, nproc: int, flags: list[str]) -> dict:
    out = tmp_path / f"probe{nproc}.pt"
    cmd = (
        _torchrun(nproc, str(PROBE), str(out), *flags) if nproc > 1 else [sys.executable, str(PROBE), str(out), *flags]
    )
    subprocess.run(cmd, check=True, env=_env(), cwd=REPO, timeout=300)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize(
    "flags,grad_scale",
    [
        ([], 0.5),
        (["--gather-with-grad"], 1.0),
        (["--gather-with-grad", "--local-loss"], 1.0),
        (["--siglip"], 0.5),
        (["--siglip", "--gather-with-grad", "--local-loss"], 1.0),
    ],
    ids=["reference", "gather-with-grad", "local-loss", "siglip", "siglip-local-loss"],
)
def test_two_processes_equal_one_with_double_batch(tmp_path: Path, flags: list[str], grad_scale: float) -> None:
    single, double = _probe(tmp_path, 1, flags), _probe(tmp_path, 2, flags)
    assert double["world"] == 2
    assert float(double["loss"]) == pytest.approx(float(single["loss"]), abs=1e-5)
    # the reference's plain gather only reaches local features: DDP's average is the full gradient / world
    # (logit_scale enters every rank's full logits directly, so its gradient is complete)
    for name, grad in single["grads"].items():
        scale = 1.0 if name in ("logit_scale", "logit_bias") else grad_scale
        torch.testing.assert_close(double["grads"][name], grad * scale, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "extra,global_batch",
    [([], 8), (["--loss", "siglip", "--local-loss", "--gather-with-grad", "--accum-freq", "2"], 16)],
    ids=["clip", "siglip-accum"],
)
def test_torchrun_main_two_processes(tmp_path: Path, extra: list[str], global_batch: int) -> None:
    argv = tiny_args(tmp_path, "--save-step-frequency", "2", *extra, steps=3)
    cmd = _torchrun(2, "-m", "cn_clip.training.main", "--", *argv)
    subprocess.run(cmd, check=True, env=_env(), cwd=REPO, timeout=300)
    log = next((tmp_path / "run").glob("out_*.log")).read_text()
    assert f"Global Batch Size: {global_batch}" in log
    assert latest_state(tmp_path)["module.logit_scale"].shape == ()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "epoch_latest.pt", map_location="cpu", weights_only=True)
    assert ("logit_bias" in ckpt) == ("siglip" in extra)


LOCAL_PRIMARY_PROBE = """
import sys, time
from cn_clip.runtime import cleanup, init_distributed, local_primary_first
env = init_distributed(device="cpu")
with local_primary_first(env):
    with open(sys.argv[1], "a") as log:
        log.write(f"{env.rank} in\\n")
    time.sleep(1.0 if env.is_local_primary else 0.0)  # a download
    with open(sys.argv[1], "a") as log:
        log.write(f"{env.rank} out\\n")
cleanup(env)
"""


def test_local_primary_runs_first_while_the_others_wait(tmp_path: Path) -> None:
    script, log = tmp_path / "probe.py", tmp_path / "order.txt"
    script.write_text(LOCAL_PRIMARY_PROBE, encoding="utf-8")
    subprocess.run(_torchrun(2, str(script), str(log)), check=True, env=_env(), cwd=REPO, timeout=300)
    assert log.read_text().split("\n")[:4] == ["0 in", "0 out", "1 in", "1 out"]
