"""Where the benchmarks find the reference (cn-clip 1.6.0 in its own venv): ``$CN_CLIP_REF_PYTHON``, else the
``.refvenv`` that ``make refvenv`` builds in this checkout (tests/fixtures/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REF_PYTHON = os.environ.get("CN_CLIP_REF_PYTHON") or str(REPO / ".refvenv" / "bin" / "python")
