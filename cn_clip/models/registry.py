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


def _normalise_name(name: str) -> str:
    # The reference maps "/" to "-" in tower names (e.g. "ViT-B/16").
    return name.replace("/", "-")


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
        _register(name if name and len(files) == 1 else file.stem, read_json_config(file), str(file))
        added.append(file.stem)
    return added


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
    if key not in _TOWERS:
        raise ConfigError(f"unknown {kind} model {name!r}; registered {kind} models: {', '.join(list_towers(kind))}")
    data = _TOWERS[key]
    if _is_vision(data) != (kind == "vision"):
        raise ConfigError(f"{name!r} ({_SOURCES[key]}) is not a {kind} tower config")
    return data, _SOURCES[key]


def get_model_config(name: str) -> CLIPCfg:
    """Resolve ``"{vision}@{text}"`` to a typed :class:`CLIPCfg`."""
    if name.count("@") != 1:
        raise ConfigError(
            f"model name {name!r} must be '<vision>@<text>', e.g. 'ViT-B-16@RoBERTa-wwm-ext-base-chinese'"
        )
    vision_name, text_name = name.split("@")
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
