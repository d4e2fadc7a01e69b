"""A clean install: ``pip install .`` without extras, on the Python floor that setup.py states, is enough to load a
checkpoint with ``load_from_name`` and train the tiny model; a missing extra is one line naming its install.

torch and torchvision (a CUDA build here, gigabytes with its NVIDIA libraries) are not downloaded again: the fresh
venv sees only them and their own dependencies, through ``tests/fixtures/torch_overlay.py``. Every other package
comes from ``pip install .``, so a core dependency missing from requirements.txt fails this test.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.torch_overlay import install_overlay

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Optional packages that must NOT come with the core install.
EXTRA_MODULES = ("onnx", "onnxruntime", "onnxscript", "faiss", "deepspeed", "fastapi", "peft", "matplotlib", "skimage")

SMOKE = """
import importlib.util, sys
from pathlib import Path
import torch
import cn_clip
from cn_clip.models.factory import create_model
assert "site-packages" in cn_clip.__file__, cn_clip.__file__
present = [m for m in sys.argv[2].split(",") if importlib.util.find_spec(m) is not None]
assert present == [], f"the core install pulled in optional packages: {present}"
model = create_model("ViT-Tiny@BERT-Tiny-chinese")
ckpt = Path(sys.argv[1])
torch.save({"epoch": 1, "step": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)
loaded, preprocess = cn_clip.load_from_name(str(ckpt), device="cpu")
with torch.no_grad():
    text = loaded.encode_text(cn_clip.tokenize(["一只猫"]))
assert text.shape == (1, model.cfg.embed_dim) and torch.isfinite(text).all()
print("LOADED", sys.version_info[:2])
"""


def _floor() -> str:
    """The ``python_requires`` floor, read from setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "python_requires":
            match = re.fullmatch(r">=(\d+\.\d+)", ast.literal_eval(node.value))
            assert match, "python_requires should be a plain floor (>=X.Y)"
            return match.group(1)
    raise AssertionError("setup.py has no python_requires")


def _source_copy(root: Path) -> Path:
    """What setup.py packages, copied out of the work tree so the build leaves nothing in it."""
    src = root / "src"
    src.mkdir()
    for name in ("setup.py", "requirements.txt", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "cn_clip", src / "cn_clip", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_clean_install_on_the_floor_python(tmp_path: Path) -> None:
    floor = _floor()
    interpreter = shutil.which(f"python{floor}")
    assert interpreter, f"python{floor} (setup.py's python_requires floor) is not on PATH"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    work = tmp_path / "outside"  # no cn_clip/ folder here: imports must come from the install
    work.mkdir()
    venv = tmp_path / "venv"
    _run([interpreter, "-m", "venv", str(venv)], env, work)
    py = str(venv / "bin" / "python")
    install_overlay(venv)
    _run([py, "-m", "pip", "install", "-q", str(_source_copy(tmp_path))], env, work)

    out = _run([py, "-c", SMOKE, str(tmp_path / "tiny.pt"), ",".join(EXTRA_MODULES)], env, work).stdout
    assert f"LOADED ({floor.replace('.', ', ')})" in out

    logs = tmp_path / "logs"
    train = [
        *("--train-data", "synthetic:8:4", "--vision-model", "ViT-Tiny", "--text-model", "BERT-Tiny-chinese"),
        *("--batch-size", "4", "--num-workers", "0", "--max-steps", "1", "--precision", "fp32"),
        *("--logs", str(logs), "--name", "clean", "--device", "cpu"),
    ]
    _run([py, "-m", "cn_clip.training.main", *train], env, work)
    assert (logs / "clean" / "checkpoints" / "epoch_latest.pt").is_file()

    # A missing extra, really missing: one line naming the install that fixes it, exit 2.
    feats = tmp_path / "feats.jsonl"
    feats.write_text('{"image_id": 1, "feature": [1.0, 0.0]}\n', encoding="utf-8")
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text_id": 1, "feature": [1.0, 0.0]}\n', encoding="utf-8")
    topk = [py, "-m", "cn_clip.eval.make_topk_predictions", "--image-feats", str(feats), "--text-feats", str(texts)]
    done = subprocess.run(
        [*topk, "--output", str(tmp_path / "p.jsonl"), "--backend", "faiss"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith('not installed: pip install "cn_clip[search]"')
    assert "Traceback" not in done.stderr
