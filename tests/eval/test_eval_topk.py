"""Exact top-k: tie order equals a stable descending sort for every back end, chunking and k; feature files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cn_clip.errors import DataError
from cn_clip.eval.featio import (
    Features,
    read_feature_files,
    read_features,
    write_features_jsonl,
    write_features_npy,
)
from cn_clip.eval.make_topk_predictions import main as topk_main
from cn_clip.eval.make_topk_predictions import make_topk_predictions
from cn_clip.eval.metrics import compute_score
from cn_clip.eval.topk import evaluate_retrieval, resolve_backend, topk_search
from cn_clip.eval.transform_ir_annotation_to_tr import invert_annotations

BACKENDS = ["numpy", "torch", "faiss"]


def _tied(rows: int, dim: int, seed: int) -> np.ndarray:
    """Small dyadic values: dot products are exact in fp32 and ties are frequent."""
    return (np.random.default_rng(seed).integers(-2, 3, size=(rows, dim)) * 0.25).astype(np.float32)


def _stable_reference(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    scores = (queries.astype(np.float64) @ gallery.T.astype(np.float64)).tolist()
    return np.array([sorted(range(len(gallery)), key=lambda j, s=row: s[j], reverse=True)[:k] for row in scores])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("k", "gallery_chunk", "query_chunk"), [(1, 1000, None), (5, 7, 3), (10, 64, 16), (300, 50, 9)]
)
def test_ties_follow_gallery_order(backend, k, gallery_chunk, query_chunk):
    queries, gallery = _tied(40, 6, 0), _tied(200, 6, 1)
    gallery[150:160] = gallery[3]  # exact duplicates far apart
    queries[0] = 0  # every score ties
    result = topk_search(queries, gallery, k, backend=backend, gallery_chunk=gallery_chunk, query_chunk=query_chunk)
    expected = _stable_reference(queries, gallery, k)
    np.testing.assert_array_equal(result.indices, expected)
    assert result.indices.shape == (40, min(k, 200))
    np.testing.assert_array_equal(result.scores, np.take_along_axis(queries @ gallery.T, expected, 1))


def test_faiss_rescores_rows_tied_at_the_boundary():
    gallery = np.zeros((50, 4), dtype=np.float32)
    gallery[:, 0] = 1.0  # 50 equal scores: FAISS' own choice among them is arbitrary
    queries = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=np.float32)
    result = topk_search(queries, gallery, 5, backend="faiss")
    np.testing.assert_array_equal(result.indices, [[0, 1, 2, 3, 4]] * 2)


def test_float16_memory_map_and_npy_round_trip(tmp_path):
    ids = [10, "b", 30]
    matrix = np.eye(3, 4, dtype=np.float32)
    write_features_npy(tmp_path / "img.npy", ids, matrix, "image_id", dtype="float16")
    assert json.loads((tmp_path / "img.ids.json").read_text()) == {"id_key": "image_id", "ids": ids}
    feats = read_features(tmp_path / "img.npy", "image_id")
    assert feats.ids == ids and feats.matrix.dtype == np.float16
    result = topk_search(matrix[:2], feats.matrix, 2, gallery_chunk=2)
    np.testing.assert_array_equal(result.indices, [[0, 1], [1, 0]])


def test_jsonl_and_npy_give_identical_predictions(tmp_path):
    images, texts = _tied(30, 8, 2), _tied(12, 8, 3)
    image_ids, text_ids = [f"图{i}" for i in range(30)], list(range(100, 112))
    write_features_jsonl(tmp_path / "img.jsonl", image_ids, images, "image_id")
    write_features_jsonl(tmp_path / "txt.jsonl", text_ids, texts, "text_id")
    write_features_npy(tmp_path / "img.npy", image_ids, images, "image_id")
    write_features_npy(tmp_path / "txt.npy", text_ids, texts, "text_id")
    for direction in ("text_to_image", "image_to_text"):
        make_topk_predictions(tmp_path / "img.jsonl", tmp_path / "txt.jsonl", tmp_path / "a.jsonl", direction=direction)
        make_topk_predictions(tmp_path / "img.npy", tmp_path / "txt.npy", tmp_path / "b.jsonl", direction=direction)
        assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    first = json.loads((tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert list(first) == ["image_id", "text_ids"] and first["image_id"] == "图0" and len(first["text_ids"]) == 10


def test_evaluate_retrieval_equals_file_pipeline(tmp_path, capsys):
    images, texts = _tied(25, 8, 4), _tied(40, 8, 5)
    image_ids, text_ids = list(range(1000, 1025)), list(range(40))
    truth = {t: [1000 + (t * 7) % 25] for t in text_ids[:30]} | {35: [1000, 1001], 36: []}
    result = evaluate_retrieval(Features(image_ids, images, "image_id"), Features(text_ids, texts, "text_id"), truth)
    write_features_jsonl(tmp_path / "img.jsonl", image_ids, images, "image_id")
    write_features_jsonl(tmp_path / "txt.jsonl", text_ids, texts, "text_id")
    (tmp_path / "gt.jsonl").write_text(
        "".join(json.dumps({"text_id": t, "image_ids": i}) + "\n" for t, i in truth.items())
    )
    (tmp_path / "gt.tr.jsonl").write_text(
        "".join(json.dumps({"image_id": i, "text_ids": t}) + "\n" for i, t in invert_annotations(truth.items()).items())
    )
    for name, gt in (("text_to_image", "gt.jsonl"), ("image_to_text", "gt.tr.jsonl")):
        make_topk_predictions(tmp_path / "img.jsonl", tmp_path / "txt.jsonl", tmp_path / "p.jsonl", direction=name)
        mean, r1, r5, r10 = compute_score(tmp_path / gt, tmp_path / "p.jsonl", name)
        got = result[name]
        assert [got["r1"], got["r5"], got["r10"]] == [r1, r5, r10]
        assert got["mean_recall"] == pytest.approx(mean, abs=1e-12)
    assert result["mean_recall"] == pytest.approx(
        (result["text_to_image"]["mean_recall"] + result["image_to_text"]["mean_recall"]) / 2
    )


def test_evaluate_retrieval_names_missing_queries():
    feats = Features([1, 2], np.eye(2, dtype=np.float32), "image_id", "img.npy")
    texts = Features([5], np.eye(1, 2, dtype=np.float32), "text_id", "txt.jsonl")
    with pytest.raises(DataError, match=r"1 ground-truth text_ids have no feature in txt.jsonl: 6"):
        evaluate_retrieval(feats, texts, {5: [1], 6: [2]})


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"image_id": 1, "feature": [0.1, 0.2]}\n{"image_id": 2, "feature": [0.1]}\n', "img.jsonl:2: 'feature'"),
        ('{"image_id": 1, "feature": [0.1, 0.2]}\nnot json\n', "img.jsonl:2: not a JSON object"),
        (
            '{"image_id": 1, "feature": [0.1, 0.2]}\n\n{"text_id": 2, "feature": [1, 2]}\n',
            "img.jsonl:3: expected an object with keys 'image_id' and 'feature'",
        ),
        ('{"image_id": [1], "feature": [0.1, 0.2]}\n', "img.jsonl:1: image_id must be an integer or a string"),
        ('{"image_id": 1, "feature": [NaN, 0.2]}\n', "img.jsonl:1: not a JSON object"),
        ('{"image_id": 1, "feature": ["a", 0.2]}\n', "img.jsonl:1: 'feature' values must be numbers"),
        ('{"image_id": 1, "feature": [1e39, 0.2]}\n', "the feature of image_id 1 contains NaN or infinity"),
        ("", "no features (empty file)"),
    ],
)
def test_bad_feature_files_name_file_and_line(tmp_path, content, fragment):
    (tmp_path / "img.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=None) as info:
        read_features(tmp_path / "img.jsonl", "image_id")
    assert fragment in str(info.value)


def test_cli_errors_are_one_line(tmp_path, capsys):
    argv = ["--image-feats", str(tmp_path / "missing.jsonl"), "--text-feats", "x", "--output", str(tmp_path / "o")]
    assert topk_main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: feature file not found:")
    with pytest.raises(SystemExit):
        topk_main([*argv, "--backend", "faiss", "--device", "cuda"])
    assert not (tmp_path / "o").exists()


def test_backend_resolution():
    assert resolve_backend("auto", None) == "numpy" and resolve_backend("auto", "cuda:1") == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("numpy", "cuda")


@pytest.mark.gpu
def test_cuda_backend_matches_cpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    queries, gallery = _tied(64, 16, 6), _tied(3000, 16, 7)
    cpu = topk_search(queries, gallery, 10)
    gpu = topk_search(queries, gallery, 10, backend="torch", device="cuda", gallery_chunk=1000)
    np.testing.assert_array_equal(cpu.indices, gpu.indices)


def test_parallel_reading_equals_sequential_and_reports_errors(tmp_path):
    write_features_jsonl(tmp_path / "img.jsonl", [1, 2], _tied(2, 4, 8), "image_id")
    write_features_jsonl(tmp_path / "txt.jsonl", ["a"], _tied(1, 4, 9), "text_id")
    requests = [(tmp_path / "img.jsonl", "image_id"), (tmp_path / "txt.jsonl", "text_id")]
    sequential = read_feature_files(requests, parallel=False)
    parallel = read_feature_files(requests, parallel=True)
    for a, b in zip(sequential, parallel, strict=True):
        assert a.ids == b.ids and a.id_key == b.id_key
        np.testing.assert_array_equal(a.matrix, b.matrix)
    (tmp_path / "txt.jsonl").write_text('{"text_id": "a"}\n')
    with pytest.raises(DataError, match=r"txt.jsonl:1: expected an object"):
        read_feature_files(requests, parallel=True)
