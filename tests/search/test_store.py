"""Index types, recall metadata, and atomic add/remove of the index directory (synthetic features, no model)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cn_clip.errors import ConfigError, DataError
from cn_clip.search import ann, store


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """L2-normalised rows around 20 centres: a gallery with neighbourhoods, as real image features have."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    rows = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def make(path: Path, n: int = 60, index_type: str = "flat", seed: int = 0) -> dict:
    matrix = clustered(n, seed=seed)
    meta = {"architecture": "test", "sources": [{"kind": "folder", "path": str(path.parent)}], "resolution": 64}
    return store.create(
        path, matrix, [f"a{i}" for i in range(n)], [[0, f"a{i}.png"] for i in range(n)], meta, index_type
    )


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "ivfpq"])
def test_index_types_store_recall_and_search_like_exact(tmp_path: Path, index_type: str) -> None:
    n = 2000
    meta = make(tmp_path / "idx", n=n, index_type=index_type)
    assert meta["index_type"] == index_type and meta["count"] == n and meta["build_seconds"] >= 0
    on_disk = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert on_disk["factory"] == meta["factory"] and on_disk["params"] == meta["params"]
    gallery = store.load(tmp_path / "idx")
    matrix = clustered(n)
    if index_type == "flat":
        assert "recall_at_10" not in meta
    else:  # the stored figure is what recall_at_k measures again on the loaded (memory-mapped) index
        assert 0.5 <= meta["recall_at_10"] <= 1.0
        assert ann.recall_at_k(gallery.index, matrix) == pytest.approx(meta["recall_at_10"], abs=1e-4)
    np.testing.assert_array_equal(np.asarray(gallery.vectors), matrix)
    found = gallery.index.search(matrix[:10], 10)[1]
    assert np.mean([row in hits for row, hits in enumerate(found)]) >= 0.8  # rows find themselves (PQ may miss)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_readers_memory_map_the_index_and_features(tmp_path: Path, index_type: str) -> None:
    make(tmp_path / "idx", n=300, index_type=index_type)

    def mapped() -> str:
        return Path("/proc/self/maps").read_text()

    gallery = store.load(tmp_path / "idx")
    assert str(tmp_path / "idx" / "index.faiss") in mapped() and str(tmp_path / "idx" / "vectors.npy") in mapped()
    del gallery
    writer = store.load(tmp_path / "idx", mmap=False)  # updates read into memory (they build a new generation)
    assert isinstance(writer.vectors, np.ndarray) and not isinstance(writer.vectors, np.memmap)


def test_auto_picks_by_size_and_unknown_type_is_refused() -> None:
    assert ann.resolve_kind("auto", 1000) == "flat"
    assert ann.resolve_kind("auto", 5_000_000) == "ivfpq"
    assert ann.make_spec("ivfpq", 1_000_000, 512).factory == "IVF4000,PQ64np,Refine(SQ8)"
    with pytest.raises(ConfigError, match="unknown --index-type 'annoy'"):
        ann.resolve_kind("annoy", 10)
    with pytest.raises(ConfigError, match="needs at least 40 images to train, got 30"):
        ann.build(ann.make_spec("ivf", 100, 32), clustered(30))


def test_add_and_remove_make_new_generations(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    make(idx, n=40)
    extra = clustered(5, seed=9)
    meta = store.add(idx, extra, ["b0", "b1", "b2", "b3", "b4"], [f"b{i}.png" for i in range(5)],
                     {"kind": "lmdb", "path": "/data/new"})  # fmt: skip
    assert meta["generation"] == 1 and meta["count"] == 45 and meta["files"]["index"] == "index.1.faiss"
    gallery = store.load(idx)
    assert gallery.ids[-5:] == ["b0", "b1", "b2", "b3", "b4"] and gallery.source_of(44) == (
        meta["sources"][1],
        "b4.png",
    )
    assert gallery.path_of(0) == str(tmp_path / "a0.png") and gallery.path_of(44) is None
    assert gallery.index.search(extra[2:3], 1)[1][0, 0] == 42

    meta = store.remove(idx, ["a3", "b1"])
    gallery = store.load(idx)
    assert meta["generation"] == 2 and meta["count"] == 43 and "a3" not in gallery.row_of and "b1" not in gallery.row_of
    row = gallery.row_of["b2"]
    assert gallery.index.search(extra[2:3], 1)[1][0, 0] == row
    np.testing.assert_array_equal(np.asarray(gallery.vectors[row]), extra[2])
    names = sorted(p.name for p in idx.iterdir() if not p.name.startswith("."))
    assert "index.faiss" not in names and {"index.1.faiss", "index.2.faiss"} <= set(names)  # previous kept


def test_remove_from_hnsw_and_ivf_keeps_type(tmp_path: Path) -> None:
    for index_type in ("hnsw", "ivf"):
        idx = tmp_path / index_type
        make(idx, n=400, index_type=index_type)
        meta = store.remove(idx, ["a0", "a1"])
        assert meta["index_type"] == index_type and meta["count"] == 398 and 0.5 <= meta["recall_at_10"] <= 1
        assert store.load(idx).index.ntotal == 398


@pytest.mark.parametrize(
    ("action", "message"),
    [
        ("add_existing", "duplicate image ids refused (already in the index: 'a1', 'a7')"),
        ("add_twice", "duplicate image ids refused (given twice: 'c')"),
        ("remove_unknown", "ids not in"),
        ("add_wrong_dim", "new features are 16-d but"),
    ],
)
def test_refused_updates_name_the_ids_and_change_nothing(tmp_path: Path, action: str, message: str) -> None:
    idx = tmp_path / "idx"
    make(idx, n=20)
    before = (idx / "meta.json").read_bytes()
    source = {"kind": "folder", "path": str(tmp_path)}
    with pytest.raises((DataError, ConfigError), match=message.replace("(", r"\(").replace(")", r"\)")):
        if action == "add_existing":
            store.add(idx, clustered(3, seed=1), ["a1", "new", "a7"], ["x", "y", "z"], source)
        elif action == "add_twice":
            store.add(idx, clustered(2, seed=1), ["c", "c"], ["x", "y"], source)
        elif action == "remove_unknown":
            store.remove(idx, ["a1", "zz"])
        else:
            store.add(idx, clustered(2, dim=16), ["x", "y"], ["x", "y"], source)
    assert (idx / "meta.json").read_bytes() == before


def test_failed_update_leaves_the_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    idx = tmp_path / "idx"
    make(idx, n=20)
    before = (idx / "meta.json").read_bytes()

    def killed(*_: object) -> None:
        raise KeyboardInterrupt  # as if the process died after writing the new files, before the switch

    monkeypatch.setattr(store, "_switch", killed)
    with pytest.raises(KeyboardInterrupt):
        store.add(idx, clustered(2, seed=3), ["x", "y"], ["x", "y"], {"kind": "folder", "path": str(tmp_path)})
    monkeypatch.undo()
    assert (idx / "meta.json").read_bytes() == before and store.load(idx).index.ntotal == 20
    assert (idx / "index.1.faiss").exists()  # the orphan of the failed update …
    store.remove(idx, ["a0"])  # … is overwritten by the next generation 1, and nothing else lingers
    assert store.load(idx).ids == [f"a{i}" for i in range(1, 20)]
    assert not [p for p in idx.iterdir() if p.name.endswith(".tmp")]


def test_readers_see_the_old_or_the_new_generation(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    make(idx, n=30)
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                gallery = store.load(idx)  # Gallery checks that ids, locations, vectors and index agree
                seen.append((gallery.generation, len(gallery.ids)))
            except BaseException as exc:  # collected and re-raised by the test below
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    source = {"kind": "folder", "path": str(tmp_path)}
    for step in range(6):
        reads = len(seen)
        while len(seen) == reads and thread.is_alive():  # let the reader in between updates, as well as during them
            time.sleep(0.001)
        store.add(idx, clustered(2, seed=10 + step), [f"n{step}a", f"n{step}b"], ["x", "y"], source)
    done.set()
    thread.join()
    assert not errors, errors
    assert all(count == 30 + 2 * generation for generation, count in seen)
    assert {generation for generation, _ in seen} >= {0, 1, 2, 3, 4, 5}


def test_format1_index_loads_and_converts_on_update(tmp_path: Path) -> None:
    import faiss

    idx = tmp_path / "old"
    idx.mkdir()
    matrix = clustered(10)
    flat = faiss.IndexFlatIP(32)
    flat.add(matrix)
    faiss.write_index(flat, str(idx / "index.faiss"))
    (idx / "ids.json").write_text(json.dumps(list(range(100, 110))))
    meta = {"format": 1, "architecture": "t", "source": "/x/imgs", "source_kind": "lmdb", "resolution": 64}
    (idx / "meta.json").write_text(json.dumps(meta))
    gallery = store.load(idx)
    assert gallery.ids[0] == 100 and gallery.source_of(3) == ({"kind": "lmdb", "path": "/x/imgs"}, "103")
    np.testing.assert_allclose(gallery.vectors, matrix)
    meta = store.remove(idx, ["105"])
    assert meta["format"] == 2 and store.load(idx).ids == [100, 101, 102, 103, 104, 106, 107, 108, 109]
