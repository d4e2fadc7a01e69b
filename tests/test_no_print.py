"""Library code logs and returns; only command-line entry points print.

An entry-point module is one a user runs: it ends in ``if __name__ == "__main__":`` (or is a ``__main__.py``).
``print`` is allowed anywhere in those, and in the allow-list below; any other ``print(...)`` under ``cn_clip/``
fails this test with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cn_clip"
ALLOWED = {
    "cli/runner.py": "run_cli prints the one-line user error and the exit message of every entry point",
}


def _is_entry_point(path: Path, tree: ast.Module) -> bool:
    if path.name == "__main__.py":
        return True
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = {ast.unparse(part) for part in (node.test.left, *node.test.comparators)}
            if names == {"__name__", "'__main__'"}:
                return True
    return False


def _prints(tree: ast.Module) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]


def test_library_code_does_not_print() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        if relative in ALLOWED or _is_entry_point(path, tree):
            continue
        offenders += [f"cn_clip/{relative}:{line}" for line in _prints(tree)]
    assert offenders == [], "library code prints (log it, or return it to the CLI): " + ", ".join(offenders)


def test_the_checker_sees_entry_points_and_prints() -> None:
    """Guard against a checker that passes vacuously."""
    cli = PACKAGE / "preprocess" / "build_lmdb_dataset.py"
    tree = ast.parse(cli.read_text(encoding="utf-8"))
    assert _is_entry_point(cli, tree) and _prints(tree)
    library = PACKAGE / "data" / "lmdb_build.py"
    assert not _is_entry_point(library, ast.parse(library.read_text(encoding="utf-8")))
    assert _prints(ast.parse("def f():\n    print('x')\n")) == [2]
    for relative in ALLOWED:
        assert (PACKAGE / relative).is_file(), f"stale allow-list entry {relative}"
