"""The package map of the README is true of the code: imports go one way, from entry points down to the core."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cn_clip"

# Modules that are both a library and a command (``main`` beside what other modules call): ``calibrate`` (fit and
# apply), ``transform_ir_annotation_to_tr`` (the reference's CLI path, whose inversion topk's scorer uses),
# ``training.lora`` (adapters the trainer attaches; ``merge|apply`` on the command line).
LIBRARY_COMMANDS = {"cn_clip.eval.calibrate", "cn_clip.eval.transform_ir_annotation_to_tr", "cn_clip.training.lora"}

# Layers, lowest first; a module may import its own layer and the ones below, never one above.
LAYERS = [
    {"errors", "version", "fileio", "extras", "runtime", "hub"},  # core: no model, no data
    {"models", "weights", "tokenizer", "transforms", "clip"},  # towers, checkpoints, text and image inputs
    {"data"},  # formats, readers, builders
    {"eval", "deploy"},  # extraction, ranking, metrics, calibration; export and conversion
    {"training", "search"},  # the trainer (validation ranks through eval); indexes and the service
    {"cli", "preprocess", "convert", "demo", "__init__"},  # entry points and the lazy public API
]
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cn_clip."):
            found.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "cn_clip":
            found += [f"cn_clip.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("cn_clip.")]
    return found


def _is_entry_point(path: Path) -> bool:
    """A command: ``__main__.py``, a module run with ``-m``, or a parser module (``training/params.py``)."""
    text = path.read_text(encoding="utf-8")
    return path.name in ("__main__.py", "params.py") or 'if __name__ == "__main__":' in text


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_package_part_has_a_layer() -> None:
    parts = {_part("cn_clip." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in MODULES}
    assert parts <= set(LAYER_OF), sorted(parts - set(LAYER_OF))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down(path: Path) -> None:
    source = _part("cn_clip." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    if _is_entry_point(path):  # a command assembles libraries from any layer
        return
    upward = [m for m in _imports(path) if LAYER_OF[_part(m)] > LAYER_OF[source]]
    assert not upward, f"{path.relative_to(PACKAGE)} imports upward: {upward}"


@pytest.mark.parametrize(
    "path", [p for p in MODULES if not _is_entry_point(p) and p.parts[-2] != "cli"], ids=lambda p: p.name
)
def test_library_modules_do_not_import_commands(path: Path) -> None:
    commands = {"cn_clip.cli.runner"} | {
        "cn_clip." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in MODULES if _is_entry_point(p)
    }
    commands -= LIBRARY_COMMANDS
    assert not set(_imports(path)) & commands, f"{path.relative_to(PACKAGE)} imports a command module"
