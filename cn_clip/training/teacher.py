"""The distillation teacher: one place that turns ``--teacher-model-name`` into a frozen CLIP, offline.

A teacher is any of
- a released name (``ViT-L-14``, …), read from ``--teacher-download-root`` (default ``~/.cache/clip``) or downloaded
  there once;
- a local checkpoint of any registered architecture (reference layout or a flat state dict; the architecture is
  inferred from the shapes), so a ViT-L-14 can teach an RN50 student;
- a Hugging Face ``ChineseCLIPModel`` folder (``config.json`` + weights; converted by ``deploy/hf.py``).

A ModelScope id is not fetched: the error says how to download it and what to pass instead. Every Chinese-CLIP
shares one vocabulary, so the teacher reads the student's token ids; images are resized to the teacher's resolution
when it differs from the student's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cn_clip.errors import ConfigError

_logger = logging.getLogger(__name__)
TOWERS = ("image", "text")
# ModelScope ids of the released weights (the reference README's links) → our released names.
MODELSCOPE_RELEASED = {
    "damo/multi-modal_clip-vit-base-patch16_zh": "ViT-B-16",
    "damo/multi-modal_clip-vit-large-patch14_zh": "ViT-L-14",
    "damo/multi-modal_clip-vit-large-patch14_336_zh": "ViT-L-14-336",
    "damo/multi-modal_clip-vit-huge-patch14_zh": "ViT-H-14",
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class Teacher:
    """A frozen fp32 CLIP in eval mode; ``teacher(images, texts)`` → ``{tower: unnormalised features}``."""

    def __init__(self, model: Any, source: str, towers: Sequence[str] = TOWERS) -> None:
        unknown = sorted(set(towers) - set(TOWERS))
        if unknown or not towers:
            raise ConfigError(f"--distillation-towers: choose from {', '.join(TOWERS)} (got {', '.join(towers)})")
        self.model = model.float().eval().requires_grad_(False)
        self.source = source
        self.towers = tuple(t for t in TOWERS if t in towers)
        self.resolution = model.cfg.vision.image_resolution

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if "image" in self.towers:
            if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
                images = F.interpolate(images.float(), size=(self.resolution, self.resolution), mode="bicubic")
            out["image"] = self.model.encode_image(images).float()
        if "text" in self.towers:
            out["text"] = self.model.encode_text(texts).float()
        return out


def teacher_model(name: str, download_root: str | None = None) -> Any:
    """Build the teacher CLIP (fp32, CPU) from a released name, a checkpoint file or a Hugging Face folder."""
    from cn_clip.models.factory import create_model, infer_architecture, released_file
    from cn_clip.models.pretrained import PRETRAINED
    from cn_clip.weights import read_checkpoint, state_dict_of

    path = Path(name).expanduser()
    if not path.exists() and name in PRETRAINED:
        info = PRETRAINED[name]
        return create_model(info.architecture, released_file(name, download_root), input_resolution=info.resolution)
    if path.is_dir():
        if (path / "config.json").is_file():
            from cn_clip.deploy.hf import load_hf_folder

            state, cfg = load_hf_folder(path)
            return create_model(cfg, state)
        if (path / "pytorch_model.bin").is_file():  # a ModelScope download of released weights
            path = path / "pytorch_model.bin"
        else:
            raise ConfigError(f"teacher {path}: a folder without config.json (Hugging Face) or pytorch_model.bin")
    if path.is_file():
        raw = read_checkpoint(path)
        return create_model(infer_architecture(state_dict_of(raw, str(path))), raw)
    raise ConfigError(_not_found(name))


def _not_found(name: str) -> str:
    from cn_clip.models.pretrained import available_models

    if Path(name).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        return f"teacher checkpoint {name} does not exist"
    if _HUB_ID.fullmatch(name):
        released = MODELSCOPE_RELEASED.get(name)
        same = (
            f" (these are the released weights {released!r}: pass --teacher-model-name {released})" if released else ""
        )
        return (
            f"teacher {name!r} is a ModelScope id and teachers are loaded offline{same}: download it with "
            f"`pip install modelscope && modelscope download --model {name} --local_dir DIR`, then pass "
            "--teacher-model-name DIR (a Chinese-CLIP checkpoint or a Hugging Face ChineseCLIPModel folder)"
        )
    return (
        f"teacher {name!r} is not a released name ({', '.join(available_models())}), a checkpoint file or a "
        "Hugging Face ChineseCLIPModel folder"
    )


def load_teacher(
    name: str, device: str | torch.device = "cpu", download_root: str | None = None, towers: Sequence[str] = TOWERS
) -> Teacher:
    """The frozen teacher on ``device`` distilling ``towers``."""
    model = teacher_model(name, download_root)
    teacher = Teacher(model.to(device), name, towers)
    _logger.info("Teacher model loaded from %s (%s, distilling %s)", name, model.cfg.name, " + ".join(teacher.towers))
    return teacher
