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
            if path.suffix in {".py", ".md", ".sh", ".tsv"} or path.name == ".spec_map.tsv":
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


def test_spec_map_targets_exist() -> None:
    rows = [line.split("\t") for line in (REPO / "docs" / ".spec_map.tsv").read_text().splitlines()]
    targets = [target for key, target in rows if not key.startswith("#")]
    assert targets and all(t.startswith("docs/compatibility.md#") for t in targets)
    assert {t.split("#", 1)[1] for t in targets} <= ANCHORS


def test_parameter_table_matches_the_model_tests() -> None:
    table = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and "@" in cells[0]:
            table[cells[0]] = int(cells[4].replace(",", ""))
    assert {arch: table[arch] for arch in PARAMS} == PARAMS
