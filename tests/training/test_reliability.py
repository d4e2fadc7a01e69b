"""SIGKILL a real training process at a random step, resume, and get bit-identical final weights (slow)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.training.helpers import latest_state, tiny_args

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
STEPS = 8


def _cmd(logs: Path) -> list[str]:
    extra = ["--save-step-frequency", "1", "--accum-freq", "2", "--mask-ratio", "0.25"]
    return [sys.executable, "-m", "cn_clip.training.main", *tiny_args(logs, *extra, steps=STEPS, data="synthetic:24:4")]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _steps_logged(logs: Path) -> int:
    text = "".join(p.read_text(errors="replace") for p in (logs / "run").glob("out_*.log"))
    found = re.findall(r"Global Steps: (\d+)/", text)
    return max(map(int, found), default=0)


def kill_and_resume(cmd: Callable[[Path], list[str]], tmp_path: Path, steps: int) -> str:
    """Run ``cmd(tmp_path/"a")`` to the end; run ``cmd(tmp_path/"b")``, SIGKILL it at a random step, check its
    latest checkpoint loads, run it again to resume. Returns the seed/kill note for assertion messages."""
    seed = int(os.environ.get("CN_CLIP_RELIABILITY_SEED", time.time_ns() % 10_000))
    kill_after = random.Random(seed).randint(1, steps - 2)
    subprocess.run(cmd(tmp_path / "a"), check=True, env=_env(), cwd=REPO, timeout=300, capture_output=True)

    proc = subprocess.Popen(
        cmd(tmp_path / "b"), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240
        while _steps_logged(tmp_path / "b") < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(random.Random(seed + 1).random() * 0.3)  # anywhere inside the next step or save
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    latest = tmp_path / "b" / "run" / "checkpoints" / "epoch_latest.pt"
    if latest.exists():  # never truncated: it loads, whatever moment the kill hit
        torch.load(latest, map_location="cpu", weights_only=True)
    subprocess.run(cmd(tmp_path / "b"), check=True, env=_env(), cwd=REPO, timeout=300, capture_output=True)
    return f"seed {seed}, killed after step {kill_after}"


def test_sigkill_at_random_step_then_resume(tmp_path: Path) -> None:
    note = kill_and_resume(_cmd, tmp_path, STEPS)
    a, b = latest_state(tmp_path / "a"), latest_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a), note
