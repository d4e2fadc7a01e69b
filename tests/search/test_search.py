"""Search: index from an LMDB or a folder, text→image and image→image queries against brute force."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cn_clip.eval.featio import read_features
from cn_clip.search.__main__ import main
from tests.helpers import TINY_ARCH, TINY_FLAGS, make_retrieval_dataset, png_bytes


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, vit_ckpt: Path) -> dict[str, Path]:
    root = make_retrieval_dataset(tmp_path_factory.mktemp("search"))
    ckpt = vit_ckpt
    folder = root / "photos"
    for i in range(5):
        (folder / ("sub" if i % 2 else "")).mkdir(parents=True, exist_ok=True)
        (folder / ("sub" if i % 2 else "") / f"p{i}.png").write_bytes(png_bytes(50 + i, (30 + i, 26)))
    (folder / "notes.txt").write_text("not an image")
    common = ["--resume", str(ckpt), "--num-workers", "0", "--no-progress", "--device", "cpu"]
    imgs = root / "lmdb" / "valid" / "imgs"
    assert main(["index", "--image-data", str(imgs), "--out", str(root / "idx_lmdb"), *common, *TINY_FLAGS]) == 0
    assert main(["index", "--image-data", str(folder), "--out", str(root / "idx_folder"), *common]) == 0  # inferred
    return {"root": root, "ckpt": ckpt, "imgs": imgs, "folder": folder}


def _query(capsys: pytest.CaptureFixture, *argv: str) -> list[dict]:
    assert main(["query", *argv, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_text_query_equals_brute_force(built: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from cn_clip.eval.extract_features import main as extract_main

    root = built["root"]
    (root / "q_texts.jsonl").write_text(json.dumps({"text_id": 1, "text": "一只猫"}, ensure_ascii=False) + "\n")
    argv = ["--extract-image-feats", "--extract-text-feats", "--image-data", str(built["imgs"]), "--num-workers", "0"]
    argv += ["--text-data", str(root / "q_texts.jsonl"), "--resume", str(built["ckpt"]), "--no-progress"]
    assert extract_main([*argv, "--precision", "fp32", *TINY_FLAGS]) == 0
    capsys.readouterr()
    images = read_features(root / "q_imgs.img_feat.jsonl", "image_id")
    query = read_features(root / "q_texts.txt_feat.jsonl", "text_id").matrix[0]
    scores = images.matrix.astype(np.float64) @ query
    order = np.argsort(-scores, kind="stable")[:5]
    hits = _query(capsys, "--index", str(root / "idx_lmdb"), "一只猫", "--top-k", "5")
    assert [h["id"] for h in hits] == [images.ids[j] for j in order]
    np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=1e-5)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5] and all(h["path"] is None for h in hits)
    soft = _query(capsys, "--index", str(root / "idx_lmdb"), "一只猫", "--top-k", "5", "--score", "softmax")
    assert [h["id"] for h in soft] == [h["id"] for h in hits]
    assert sum(h["score"] for h in soft) == pytest.approx(1.0)
    meta = json.loads((root / "idx_lmdb" / "meta.json").read_text())
    logits = meta["logit_scale"] * scores[order]
    np.testing.assert_allclose([h["score"] for h in soft], np.exp(logits) / np.exp(logits).sum(), atol=1e-4)


def test_folder_index_and_image_query(built: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    idx = built["root"] / "idx_folder"
    ids = json.loads((idx / "ids.json").read_text())
    assert ids == ["p0.png", "p2.png", "p4.png", "sub/p1.png", "sub/p3.png"]
    meta = json.loads((idx / "meta.json").read_text())
    assert meta["architecture"] == TINY_ARCH and meta["count"] == 5 and meta["dim"] == 64
    hits = _query(capsys, "--index", str(idx), "--image", str(built["folder"] / "sub" / "p3.png"), "--top-k", "10")
    assert len(hits) == 5 and hits[0]["id"] == "sub/p3.png" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["path"] == str((built["folder"] / "sub" / "p3.png").resolve())
    assert main(["query", "--index", str(idx), "汽车", "--top-k", "2", "--device", "cpu"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "rank\tcosine\tid\tpath" and len(table) == 3 and table[1].startswith("1\t")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["query", "--index", "{root}/idx_lmdb", "猫", "--image", "x.jpg"], "either a query text or --image"),
        (["query", "--index", "{root}/idx_lmdb"], "either a query text or --image"),
        (["query", "--index", "{root}/photos", "猫"], "not a search index (meta.json missing"),
        (["index", "--image-data", "{root}/photos", "--out", "{root}/idx_folder", "--resume", "{ckpt}"], "--overwrite"),
        (["index", "--image-data", "{root}/nothing", "--out", "{root}/x", "--resume", "{ckpt}"], "does not exist"),
    ],
)
def test_errors_are_one_line(argv: list[str], message: str, built: dict[str, Path], capsys) -> None:
    argv = [a.format(root=built["root"], ckpt=built["ckpt"]) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_image_in_folder_is_named(built: dict[str, Path], tmp_path: Path, capsys) -> None:
    shutil.copytree(built["folder"], tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    argv = ["index", "--image-data", str(tmp_path / "photos"), "--out", str(tmp_path / "idx"), "--num-workers", "0"]
    assert main([*argv, "--resume", str(built["ckpt"]), "--no-progress"]) == 2
    assert "broken.jpg: cannot read this image" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()
