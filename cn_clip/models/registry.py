"""The model registry: tower configs are JSON data; architectures are named ``"{vision}@{text}"``.

Users add their own towers with :func:`add_model_config` (a file or a directory of JSON files) without touching the
package. Released names resolve to the reference's ``model_configs/*.json`` shipped under ``configs/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cn_clip.errors import ConfigError
from cn_clip.models.config import CLIPCfg, read_json_config, text_cfg_from_dict, vision_cfg_from_dict

_logger = logging.getLogger(__name__)
_CONFIG_DIR = Path(__file__).parent / "configs"
_TOWERS: dict[str, dict[str, Any]] = {}
_SOURCES: dict[str, str] = {}
_SCANNED = False


HF_PREFIX = "hf:"
# The pooler a bare ``hf:PATH`` tower gets, by the folder's model_type (open_clip's choices; "mean" otherwise).
_HF_DEFAULT_POOLER = {"bert": "cls", "clip_text_model": "eos", "clip": "eos"}


def _normalise_name(name: str) -> str:
    # The reference maps "/" to "-" in tower names (e.g. "ViT-B/16"). An hf: folder becomes absolute, so that
    # names stored with results (a search index's meta.json) work from any directory; a hub id is kept.
    if name.startswith(HF_PREFIX):
        folder = Path(name[len(HF_PREFIX) :]).expanduser()
        return f"{HF_PREFIX}{folder.resolve()}" if len(name) > len(HF_PREFIX) and folder.is_dir() else name
    return name.replace("/", "-")


def hf_tower_config(name: str) -> dict[str, Any]:
    """The tower config of ``hf:PATH``: the folder's encoder with the pooler its model type suggests, a linear
    projection and 77 tokens (write a tower JSON with ``hf_model`` to choose otherwise)."""
    from cn_clip.models.text import load_hf_text_config

    path = name[len(HF_PREFIX) :]
    if not path:
        raise ConfigError(f"{name!r}: give a folder after 'hf:', e.g. hf:./xlm-roberta-base")
    model_type = load_hf_text_config(path).model_type
    return {"hf_model": path, "pooler": _HF_DEFAULT_POOLER.get(model_type, "mean"), "proj": "linear"}


def _scan_builtin() -> None:
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    for path in sorted(_CONFIG_DIR.glob("*.json")):
        _register(path.stem, read_json_config(path), str(path))


def _register(name: str, data: dict[str, Any], source: str) -> None:
    _TOWERS[name] = data
    _SOURCES[name] = source


def add_model_config(path_or_dict: str | Path | dict[str, Any], name: str | None = None) -> list[str]:
    """Register tower configs from a JSON file, a directory of JSON files or a dict (then ``name`` is needed)."""
    _scan_builtin()
    if isinstance(path_or_dict, dict):
        if not name:
            raise ConfigError("add_model_config(dict) needs a name")
        _register(name, dict(path_or_dict), f"<{name}>")
        return [name]
    path = Path(path_or_dict)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"no *.json model configs in {path}")
    added = []
    for file in files:
        _register(
            name if name and len(files) == 1 else file.stem, _relative_to(read_json_config(file), file), str(file)
        )
        added.append(file.stem)
    return added


def _relative_to(data: dict[str, Any], file: Path) -> dict[str, Any]:
    """An ``hf_model`` written as ``./folder`` or ``../folder`` is relative to the JSON file that names it."""
    hf_model = data.get("hf_model")
    if isinstance(hf_model, str) and hf_model.startswith(("./", "../")):
        return {**data, "hf_model": str((file.parent / hf_model).resolve())}
    return data


def _is_vision(data: dict[str, Any]) -> bool:
    return "vision_layers" in data


def list_towers(kind: str | None = None) -> list[str]:
    """Tower names: ``kind`` ``"vision"``, ``"text"`` or None for both."""
    _scan_builtin()
    names = sorted(_TOWERS)
    if kind is None:
        return names
    want_vision = kind == "vision"
    return [n for n in names if _is_vision(_TOWERS[n]) == want_vision]


def list_models() -> list[str]:
    """Every registered ``vision@text`` architecture name."""
    return [f"{v}@{t}" for v in list_towers("vision") for t in list_towers("text")]


def _tower(name: str, kind: str) -> tuple[dict[str, Any], str]:
    _scan_builtin()
    key = _normalise_name(name)
    if kind == "text" and key.startswith(HF_PREFIX):
        return hf_tower_config(key), key
    if key not in _TOWERS:
        raise ConfigError(f"unknown {kind} model {name!r}; registered {kind} models: {', '.join(list_towers(kind))}")
    data = _TOWERS[key]
    if _is_vision(data) != (kind == "vision"):
        raise ConfigError(f"{name!r} ({_SOURCES[key]}) is not a {kind} tower config")
    return data, _SOURCES[key]


def get_tower_data(name: str) -> dict[str, Any]:
    """The raw JSON data of a registered tower."""
    _scan_builtin()
    return _TOWERS[_normalise_name(name)]


def get_model_config(name: str) -> CLIPCfg:
    """Resolve ``"{vision}@{text}"`` to a typed :class:`CLIPCfg`."""
    vision_name, _, text_name = name.partition("@")
    if not vision_name or not text_name or ("@" in text_name and not text_name.startswith(HF_PREFIX)):
        raise ConfigError(
            f"model name {name!r} must be '<vision>@<text>', e.g. 'ViT-B-16@RoBERTa-wwm-ext-base-chinese'"
        )
    vision_data, vision_src = _tower(vision_name, "vision")
    text_data, text_src = _tower(text_name, "text")
    return CLIPCfg(
        vision=vision_cfg_from_dict(vision_data, vision_src),
        text=text_cfg_from_dict(text_data, text_src),
        name=f"{_normalise_name(vision_name)}@{_normalise_name(text_name)}",
    )


def config_from_flat_dict(data: dict[str, Any], name: str = "<custom>") -> CLIPCfg:
    """Split a merged reference-style ``model_info`` dict into a :class:`CLIPCfg`."""
    vision = {k: v for k, v in data.items() if k.startswith("vision_") or k in ("embed_dim", "image_resolution")}
    text = {k: v for k, v in data.items() if k not in vision}
    return CLIPCfg(vision=vision_cfg_from_dict(vision, name), text=text_cfg_from_dict(text, name), name=name)
