"""Package-level contracts: fast lazy import, the released model list, compat import paths."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light() -> None:
    code = "import sys, cn_clip, cn_clip.clip; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_available_models_order() -> None:
    import cn_clip

    assert cn_clip.available_models() == ["ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50"]


def test_reference_paths_resolve() -> None:
    import cn_clip.clip as clip
    from cn_clip.clip.model import CLIP, ModifiedResNet, VisualTransformer, convert_weights  # noqa: F401
    from cn_clip.clip.utils import _MODEL_INFO, _MODELS, create_model  # noqa: F401

    assert _MODELS["ViT-B-16"] == ("chinese-clip-vit-base-patch16", "clip_cn_vit-b-16.pt")
    assert _MODEL_INFO["ViT-L-14-336"] == {
        "struct": "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese",
        "input_resolution": 336,
    }
    assert callable(clip.load_from_name) and callable(clip.convert_state_dict)


def test_no_module_file_shadows_a_library() -> None:
    """Reference users run scripts as files (``python cn_clip/deploy/pytorch_to_onnx.py``), which puts the script's
    folder first on sys.path: a sibling named like a library (``onnx.py``) would then hide the real one."""
    from pathlib import Path

    libraries = {"onnx", "onnxruntime", "torch", "torchvision", "transformers", "tokenizers", "lmdb", "faiss"}
    libraries |= {"jieba", "numpy", "PIL", "tqdm", "safetensors", "timm", "deepspeed", "orjson", "onnxscript"}
    libraries |= set(sys.stdlib_module_names)
    package = Path(__file__).parents[1] / "cn_clip"
    clashes = [str(p.relative_to(package)) for p in package.rglob("*.py") if p.stem in libraries]
    assert clashes == []
