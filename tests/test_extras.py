"""Optional dependencies: each is in one extra of setup.py, and a missing one is one line naming its install.

The CLI tests hide the package (``sys.modules[name] = None`` makes every import of it fail as if not installed) and
then run the real entry point as ``__main__``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cn_clip.extras import OPTIONAL, MissingExtraError, require

REPO = Path(__file__).resolve().parents[1]
HIDE_AND_RUN = (
    "import runpy, sys; sys.modules[sys.argv[1]] = None; module = sys.argv[2]; sys.argv = [module, *sys.argv[3:]]; "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)
TINY = ["--vision-model", "ViT-Tiny", "--text-model", "BERT-Tiny-chinese"]


def _setup_extras() -> dict[str, list[str]]:
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["EXTRAS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no EXTRAS literal")


def test_every_optional_module_is_in_its_extra() -> None:
    extras = _setup_extras()
    for module, (distribution, extra) in OPTIONAL.items():
        names = [req.split(">")[0].split("=")[0].split("<")[0] for req in extras[extra]]
        assert distribution in names, f"{module}: {distribution} is not in setup.py's [{extra}]"
    listed = {req for reqs in extras.values() for req in reqs}
    assert len(listed) == sum(len(v) for v in extras.values()), "a requirement is listed in two extras"


def test_require_hidden_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingExtraError) as info:
        require("faiss", "--backend faiss")
    assert str(info.value) == '--backend faiss needs faiss-cpu, which is not installed: pip install "cn_clip[search]"'


def test_require_keeps_a_broken_dependency_visible(tmp_path: Path, monkeypatch) -> None:
    """An installed package whose own import fails is not reported as 'not installed'."""
    package = tmp_path / "webdataset"
    package.mkdir()
    (package / "__init__.py").write_text("import cn_clip_no_such_module_xyz\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "webdataset", raising=False)
    with pytest.raises(ModuleNotFoundError, match="cn_clip_no_such_module_xyz"):
        require("webdataset", "--train-data *.tar")


def test_require_refuses_an_unlisted_module() -> None:
    with pytest.raises(KeyError, match="not an optional dependency"):
        require("json", "anything")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from cn_clip.models.factory import create_model

    root = tmp_path_factory.mktemp("extras")
    ckpt = root / "tiny.pt"
    model = create_model("ViT-Tiny@BERT-Tiny-chinese")
    torch.save({"epoch": 1, "step": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    (root / "img.jsonl").write_text('{"image_id": 1, "feature": [1.0, 0.0]}\n', encoding="utf-8")
    (root / "txt.jsonl").write_text('{"text_id": 1, "feature": [1.0, 0.0]}\n', encoding="utf-8")
    return {"root": root, "ckpt": ckpt}


def _cases(f: dict[str, Path]) -> dict[str, tuple[str, str, list[str]]]:
    root = f["root"]
    return {
        "onnx export": (
            "onnx",
            "deploy",
            [
                *("cn_clip.deploy.pytorch_to_onnx", "--model-arch", "ViT-Tiny@BERT-Tiny-chinese"),
                *(
                    "--pytorch-ckpt-path",
                    str(f["ckpt"]),
                    "--save-onnx-path",
                    str(root / "onnx" / "m"),
                    "--convert-text",
                ),
            ],
        ),
        "faiss top-k": (
            "faiss",
            "search",
            [
                *("cn_clip.eval.make_topk_predictions", "--image-feats", str(root / "img.jsonl")),
                *("--text-feats", str(root / "txt.jsonl"), "--output", str(root / "p.jsonl"), "--backend", "faiss"),
            ],
        ),
        "search query": ("faiss", "search", ["cn_clip.search", "query", "--index", str(root / "no_index"), "猫"]),
        "deepspeed": (
            "deepspeed",
            "deepspeed",
            [
                *("cn_clip.training.main", "--train-data", "synthetic:8:4", *TINY, "--batch-size", "4"),
                *("--num-workers", "0", "--max-steps", "1", "--logs", str(root / "logs"), "--deepspeed"),
            ],
        ),
        "demo dataset": ("skimage", "demo", ["cn_clip.preprocess.make_demo_dataset", "--out", str(root / "demo")]),
    }


@pytest.mark.parametrize("case", ["onnx export", "faiss top-k", "search query", "deepspeed", "demo dataset"])
def test_cli_names_the_missing_extra(case: str, files) -> None:
    hidden, extra, argv = _cases(files)[case]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", HIDE_AND_RUN, hidden, *argv]
    done = subprocess.run(cmd, env=env, cwd=files["root"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith(f'which is not installed: pip install "cn_clip[{extra}]"')
    assert OPTIONAL[hidden][0] in last
