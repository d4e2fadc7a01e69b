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
