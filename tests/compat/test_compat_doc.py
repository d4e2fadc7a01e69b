"""docs/compatibility.md is the in-repository record of the reference's facts: every citation of it resolves, and
its parameter table is the one the model tests check."""

from __future__ import annotations

import re
from pathlib import Path

from tests.models.test_models import PARAMS

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "compatibility.md"
ANCHORS = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', DOC.read_text(encoding="utf-8")))
CITATION = re.compile(r"compatibility\.md#([A-Za-z0-9_-]+)")


def _cited() -> dict[str, set[str]]:
    cited: dict[str, set[str]] = {}
    for root in ("cn_clip", "tests", "benchmarks", "docs", "run_scripts"):
        for path in (REPO / root).rglob("*"):
            if path.suffix in {".py", ".md", ".sh"}:
                for anchor in CITATION.findall(path.read_text(encoding="utf-8", errors="replace")):
                    cited.setdefault(anchor, set()).add(str(path.relative_to(REPO)))
    for anchor in CITATION.findall((REPO / "README.md").read_text(encoding="utf-8")):
        cited.setdefault(anchor, set()).add("README.md")
    return cited


def test_every_citation_names_an_anchor() -> None:
    cited = _cited()
    assert cited, "nothing cites docs/compatibility.md"
    dangling = {anchor: sorted(files) for anchor, files in cited.items() if anchor not in ANCHORS}
    assert not dangling, f"citations of missing anchors: {dangling}"


def test_no_citation_points_outside_the_repository() -> None:
    """Facts the code relies on are cited from docs/compatibility.md, never from a document outside the repo."""
    outside = re.compile(r"SPEC\s*§|SPEC \d+\.\d+|shared/SPEC")
    hits = []
    for root in ("cn_clip", "tests", "benchmarks", "docs", "run_scripts", "data_docs"):
        for path in (REPO / root).rglob("*"):
            if path.suffix in {".py", ".md", ".sh", ".json"} and path.name != Path(__file__).name:
                text = path.read_text(encoding="utf-8", errors="replace")
                hits += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in outside.finditer(text)]
    hits += [f"README.md: {m.group(0)}" for m in outside.finditer((REPO / "README.md").read_text(encoding="utf-8"))]
    assert not hits, hits


def test_parameter_table_matches_the_model_tests() -> None:
    table = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and "@" in cells[0]:
            table[cells[0]] = int(cells[4].replace(",", ""))
    assert {arch: table[arch] for arch in PARAMS} == PARAMS
