"""Calibration: the fitted maps, the held-out metrics, calib.json, and its use in top-k predictions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cn_clip.eval import calibrate as C
from cn_clip.eval import make_topk_predictions
from cn_clip.eval.featio import write_features_jsonl
from tests.helpers import TINY_ARCH, TINY_FLAGS, make_retrieval_dataset, save_reference_checkpoint

TOPK = Path(__file__).resolve().parents[1] / "fixtures" / "eval" / "topk"


def _logistic_sample(n: int, a: float, b: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.2, 0.8, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(a * x + b)))).astype(np.int8)
    return x, y


def _features(n: int, dim: int = 16, noise: float = 0.9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images and one noisy caption each (text i matches image i), L2-normalised."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, dim))
    texts = images + noise * rng.normal(size=(n, dim))
    norm = lambda m: (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(images), norm(texts)


def _pairs(n: int = 300, seed: int = 0) -> C.PairSet:
    images, texts = _features(n, seed=seed)
    return C.build_pairs(texts, images, [[i] for i in range(n)], hard=5, random=5, seed=seed)


def test_platt_recovers_known_parameters() -> None:
    x, y = _logistic_sample(200_000, a=12.0, b=-5.0, seed=1)
    params = C.fit_platt(x, y)
    assert params["a"] == pytest.approx(12.0, rel=0.03)
    assert params["b"] == pytest.approx(-5.0, rel=0.03)


def test_isotonic_is_calibrated_on_its_training_data() -> None:
    x, y = _logistic_sample(20_000, a=9.0, b=-4.0, seed=2)
    calibrator = C.Calibrator("isotonic", C.fit_isotonic(x, y))
    assert C.expected_calibration_error(calibrator(x), y) <= 0.02


@pytest.mark.parametrize("method", ["platt", "isotonic", "temperature"])
def test_fit_is_monotone(method: str) -> None:
    pairs = _pairs()
    result = C.fit(pairs, C.FitOptions(method=method, logit_scale=10.0))
    grid = np.linspace(-1, 1, 2001)
    probs = result.calibrator(grid)  # temperature: one row of 2001 candidates
    assert np.all(np.diff(probs) >= 0)
    assert np.all((probs >= 0) & (probs <= 1))


def test_siglip_map_is_the_models_sigmoid() -> None:
    calibrator = C.Calibrator("siglip", {"scale": 10.0, "bias": -3.0})
    assert float(calibrator(0.3)) == pytest.approx(0.5)
    assert np.all(np.diff(calibrator(np.linspace(-1, 1, 101))) > 0)


def test_metrics_against_brute_force() -> None:
    rng = np.random.default_rng(3)
    scores, labels = rng.normal(size=300).round(1), rng.integers(0, 2, 300)  # rounded: many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert C.roc_auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))
    probs = np.array([0.05, 0.05, 0.95, 0.95])
    assert C.expected_calibration_error(probs, np.array([0, 1, 1, 1])) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
    assert C.brier_score(probs, np.array([0, 0, 1, 1])) == pytest.approx(0.0025)


def test_calibration_improves_held_out_ece() -> None:
    result = C.fit(_pairs(400), C.FitOptions(method="platt", logit_scale=100.0))
    metrics = result.calibrator.report["metrics"]
    assert metrics["after"]["ece"] < metrics["before"]["cosine"]["ece"]
    assert metrics["after"]["ece"] <= 0.06
    assert metrics["after"]["roc_auc"] == pytest.approx(metrics["before"]["cosine"]["roc_auc"])  # monotone map


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_threshold_reaches_target_precision_on_held_out_pairs(target: float) -> None:
    result = C.fit(_pairs(400, seed=4), C.FitOptions(method="platt", target_precision=target))
    threshold = result.calibrator.report["threshold"]
    held = result.holdout
    chosen = held.cosine >= threshold["cosine"]
    precision = held.label[chosen].mean()
    recall = held.label[chosen].sum() / held.label.sum()
    assert precision >= target
    assert threshold["precision"] == pytest.approx(precision)
    assert threshold["recall"] == pytest.approx(recall)
    lower = held.cosine[held.cosine < threshold["cosine"]]
    if len(lower):  # the next lower threshold would miss the target: this one has the most recall
        next_down = held.cosine >= lower.max()
        assert held.label[next_down].mean() < target


def test_calib_json_round_trip_and_hash_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fitted = tmp_path / "model.pt"
    fitted.write_bytes(b"weights A")
    other = tmp_path / "other.pt"
    other.write_bytes(b"weights B")
    result = C.fit(_pairs(), C.FitOptions(method="isotonic"))
    calibrator = result.calibrator
    calibrator.checkpoint = {"path": str(fitted), "sha256": C.checkpoint_sha256(fitted)}
    calibrator.save(tmp_path / "calib.json")
    loaded = C.Calibrator.load(tmp_path / "calib.json", checkpoint=fitted)
    grid = np.linspace(-1, 1, 50)
    np.testing.assert_array_equal(loaded(grid), calibrator(grid))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with caplog.at_level(logging.WARNING):
        C.Calibrator.load(tmp_path / "calib.json", checkpoint=other)
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(fitted) in message and str(other) in message


def test_lazy_public_api() -> None:
    import cn_clip

    assert cn_clip.Calibrator is C.Calibrator


# ---------------------------------------------------------------------------------------------- the CLI
def _write_split(tmp_path: Path, n: int = 60, gt: list[list[int]] | None = None) -> dict[str, Path]:
    images, texts = _features(n, seed=5)
    paths = {"img": tmp_path / "imgs.img_feat.jsonl", "txt": tmp_path / "texts.txt_feat.jsonl"}
    write_features_jsonl(paths["img"], list(range(100, 100 + n)), images, "image_id")
    write_features_jsonl(paths["txt"], list(range(n)), texts, "text_id")
    gt = [[100 + i] for i in range(n)] if gt is None else gt
    paths["gt"] = tmp_path / "valid_texts.jsonl"
    paths["gt"].write_text(
        "".join(json.dumps({"text_id": i, "text": "x", "image_ids": g}) + "\n" for i, g in enumerate(gt))
    )
    return paths


def _cli(paths: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--image-feats",
        str(paths["img"]),
        "--text-feats",
        str(paths["txt"]),
        "--gt-file",
        str(paths["gt"]),
        *extra,
    ]


def test_cli_writes_calib_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = _write_split(tmp_path)
    out = tmp_path / "out"
    argv = _cli(
        paths, "--method", "isotonic", "--target-precision", "0.9", "--logit-scale", "100", "--output-dir", str(out)
    )
    assert C.main(argv) == 0
    printed = capsys.readouterr().out
    assert "softmax over candidates" in printed and "calibrated (isotonic)" in printed
    saved = json.loads((out / "calib.json").read_text())
    assert saved["format"] == C.FORMAT and saved["method"] == "isotonic"
    assert set(saved["metrics"]["before"]) == {"cosine", "softmax"}
    assert saved["threshold"]["target_precision"] == 0.9
    for name in ("reliability.png", "precision_recall.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize(
    "case,message",
    [
        ("empty", "no features (empty file)"),
        ("no_positives", "no positives"),
        ("other_format", "not a cn_clip calibration file"),
    ],
)
def test_bad_inputs_are_one_line(case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = _write_split(tmp_path)
    if case == "empty":
        paths["txt"].write_text("")
        argv = _cli(paths)
    elif case == "no_positives":
        paths = _write_split(tmp_path, gt=[[] for _ in range(60)])
        argv = _cli(paths)
    else:
        bogus = tmp_path / "calib.json"
        bogus.write_text(json.dumps({"format": "sklearn", "a": 1}))
        argv = ["--image-feats", str(TOPK / "img.jsonl"), "--text-feats", str(TOPK / "txt.jsonl")]
        argv += ["--output", str(tmp_path / "p.jsonl"), "--calibration", str(bogus)]
        assert make_topk_predictions.main(argv) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if not line[:4].isdigit()]
        assert line.startswith("error: ") and message in line
        return
    assert C.main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if not line[:4].isdigit()]  # no log lines
    assert line.startswith("error: ") and message in line


def test_empty_split_is_refused() -> None:
    with pytest.raises(C.CalibrationError, match="empty split: 0 texts and 5 images"):
        C.build_pairs(np.zeros((0, 4), np.float32), np.eye(5, 4, dtype=np.float32), [])


def test_gt_naming_no_feature_images_has_no_positives(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = _write_split(tmp_path, gt=[[9999] for _ in range(60)])
    assert C.main(_cli(paths)) == 2
    assert "no positives" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- top-k probabilities
@pytest.mark.parametrize("method", ["platt", "temperature"])
@pytest.mark.parametrize(
    "module,expected,id_key",
    [(make_topk_predictions.main, "ref_t2i_k3.jsonl", "image_ids"), (None, "ref_i2t_k3.jsonl", "text_ids")],
    ids=["t2i", "i2t"],
)
def test_topk_probabilities_only_with_the_flag(tmp_path: Path, method: str, module, expected: str, id_key: str) -> None:
    from cn_clip.eval import make_topk_predictions_tr
    from cn_clip.eval.featio import read_features

    main = module or make_topk_predictions_tr.main
    params = {"a": 5.0, "b": -1.0} if method == "platt" else {"scale": 3.0}
    C.Calibrator(method, params).save(tmp_path / "calib.json")
    base = ["--image-feats", str(TOPK / "img.jsonl"), "--text-feats", str(TOPK / "txt.jsonl"), "--top-k", "3"]
    assert main([*base, "--output", str(tmp_path / "plain.jsonl")]) == 0
    assert (tmp_path / "plain.jsonl").read_bytes() == (TOPK / expected).read_bytes()  # byte-identical without it
    assert main([*base, "--output", str(tmp_path / "cal.jsonl"), "--calibration", str(tmp_path / "calib.json")]) == 0
    images, texts = read_features(TOPK / "img.jsonl", "image_id"), read_features(TOPK / "txt.jsonl", "text_id")
    queries, gallery = (texts, images) if id_key == "image_ids" else (images, texts)
    column = {item: j for j, item in enumerate(gallery.ids)}
    calibrated = [json.loads(line) for line in (tmp_path / "cal.jsonl").read_text().splitlines()]
    golden = [json.loads(line) for line in (TOPK / expected).read_text().splitlines()]
    for row, line, want in zip(queries.matrix, calibrated, golden, strict=True):
        assert {k: v for k, v in line.items() if k != "probabilities"} == want
        cosines = row @ gallery.matrix.T
        if method == "platt":
            expect = [1 / (1 + np.exp(-(5.0 * cosines[column[i]] - 1.0))) for i in line[id_key]]
        else:
            full = np.exp(3.0 * cosines) / np.exp(3.0 * cosines).sum()
            expect = [full[column[i]] for i in line[id_key]]
        np.testing.assert_allclose(line["probabilities"], expect, atol=1e-6)


# ------------------------------------------------------------------------ eval.run, --data and search
def test_run_calibrate_data_mode_and_search(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    from cn_clip.eval.run import main as run_main
    from cn_clip.search.__main__ import main as search_main

    root = make_retrieval_dataset(tmp_path / "ds", n_images=12, n_texts=16)
    ckpt = save_reference_checkpoint(TINY_ARCH, root / "ckpt.pt")
    other = root / "other.pt"  # the same architecture with other weights: another checkpoint hash
    weights = torch.load(ckpt, weights_only=True)
    weights["state_dict"]["module.logit_scale"] += 1.0
    torch.save(weights, other)
    common = ["--num-workers", "0", "--device", "cpu", *TINY_FLAGS]
    argv = ["--data", str(root), "--split", "valid", "--resume", str(ckpt), "--output-dir", str(root / "out")]
    assert run_main([*argv, "--no-progress", "--calibrate", "isotonic", *common]) == 0
    summary = json.loads((root / "out" / "summary.json").read_text())
    calib = C.Calibrator.load(root / "out" / "calib.json")
    assert summary["calibration"]["file"].endswith("calib.json") and calib.method == "isotonic"
    assert calib.checkpoint["sha256"] == C.checkpoint_sha256(ckpt)
    assert (root / "out" / "reliability.png").is_file()
    # the dataset input of the calibrate CLI gives the same pairs, so the same fit
    argv = ["--data", str(root), "--resume", str(ckpt), "--output-dir", str(root / "cal"), "--method", "isotonic"]
    assert C.main([*argv, "--no-plots", "--target-precision", "0.5", *common]) == 0
    assert C.Calibrator.load(root / "cal" / "calib.json").params == calib.params
    capsys.readouterr()

    index = ["--out", str(root / "idx"), "--resume", str(ckpt), "--no-progress", *common]
    assert search_main(["index", "--image-data", str(root / "lmdb" / "valid" / "imgs"), *index]) == 0
    query = ["query", "--index", str(root / "idx"), "一只猫", "--top-k", "6", "--device", "cpu", "--json"]
    capsys.readouterr()
    assert search_main([*query, "--calibration", str(root / "out" / "calib.json")]) == 0
    captured = capsys.readouterr()
    hits = json.loads(captured.out.strip().splitlines()[-1])
    assert "fitted on" not in captured.err  # same checkpoint: no warning
    np.testing.assert_allclose([h["probability"] for h in hits], calib([h["score"] for h in hits]), atol=1e-6)
    cut = sorted(h["probability"] for h in hits)[3]
    argv = [*query, "--calibration", str(root / "out" / "calib.json"), "--min-probability", str(cut)]
    assert search_main(argv) == 0
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert kept == [h for h in hits if h["probability"] >= cut]
    assert search_main([*query, "--calibration", str(root / "out" / "calib.json"), "--resume", str(other)]) == 0
    err = capsys.readouterr().err
    assert "fitted on" in err and str(ckpt) in err and str(other) in err
    assert search_main([*query, "--min-probability", "0.5"]) == 2
    assert "needs --calibration" in capsys.readouterr().err
