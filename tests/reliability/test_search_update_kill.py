"""A search index update killed at any moment (SIGKILL, real subprocess) leaves a loadable index: the old
generation, or the new one if the switch had happened; never a mix. The next update cleans the leftovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cn_clip.search import store

pytestmark = pytest.mark.reliability

REPO = Path(__file__).parents[2]
CHILD = """
import sys, numpy as np
from cn_clip.search import store
rows = np.random.default_rng(1).standard_normal((150_000, 64)).astype(np.float32)
rows /= np.linalg.norm(rows, axis=1, keepdims=True)
ids = [f"new{i}" for i in range(len(rows))]
print("ready", flush=True)
store.add(sys.argv[1], rows, ids, ids, {"kind": "folder", "path": "/new"})
print("done", flush=True)
"""


def _gallery(idx: Path, n: int = 20_000) -> None:
    rows = np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    ids = [f"old{i}" for i in range(n)]
    store.create(idx, rows, ids, [[0, i] for i in ids], {"sources": [{"kind": "folder", "path": "/old"}]}, "flat")


def _kill_when(child: subprocess.Popen, idx: Path, trigger: str) -> None:
    """SIGKILL the child as soon as a file whose name starts with ``trigger`` shows up in ``idx``."""
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if not trigger or any(p.name.startswith(trigger) for p in idx.iterdir()):
            os.kill(child.pid, signal.SIGKILL)
            return
        time.sleep(0.002)


# Stages of an add: nothing written yet, first temp file, index written, features written (switch imminent).
@pytest.mark.parametrize("trigger", ["", ".index.1.faiss.", "index.1.faiss", "vectors.1.npy"])
def test_killed_add_leaves_a_whole_generation(tmp_path: Path, trigger: str) -> None:
    idx = tmp_path / "idx"
    _gallery(idx)
    before = (idx / "meta.json").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(idx)], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    _kill_when(child, idx, trigger)
    child.wait()
    gallery = store.load(idx)
    # loading checks that ids, locations, vectors and index agree: no generation is ever half there
    if gallery.generation == 0:
        assert (idx / "meta.json").read_bytes() == before and len(gallery.ids) == 20_000
    else:
        assert len(gallery.ids) == 170_000 and gallery.ids[-1] == "new149999"
    meta = store.remove(idx, ["old0"])  # the next update works and sweeps what the killed one left
    assert meta["count"] == len(gallery.ids) - 1
    assert not [p.name for p in idx.iterdir() if p.name.endswith(".tmp")]
    live = set(meta["files"].values()) | set(json.loads(before)["files"].values())
    live |= {store.file_names(meta["generation"] - 1)[kind] for kind in store.KINDS}
    assert {p.name for p in idx.iterdir() if store._generation_of(p.name) is not None} <= live
