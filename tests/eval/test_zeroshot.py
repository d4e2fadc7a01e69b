"""Zero-shot evaluation: reference parity (RN50 golden JSON and classifier), brute-force metrics on a tiny folder,
template data, ELEVATER schema, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.eval import zeroshot as Z
from cn_clip.eval.zeroshot_evaluation import main
from tests.fixtures.fixture_weights import materialise
from tests.helpers import FIXTURES, TINY_ARCH, TINY_FLAGS, make_class_folder, save_reference_checkpoint

GOLDEN = FIXTURES / "extract_zeroshot"
LABELS = ("猫", "狗", "汽车", "“Apple”手机", "红色的连衣裙", "蓝天")
SCHEMA_KEYS = [
    "model_name", "dataset_name", "num_trainable_params", "num_params", "num_visual_params",
    "num_backbone_params", "n_shot", "rnd_seeds", "predictions",
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, vit_ckpt: Path) -> dict[str, Path]:
    root = make_class_folder(tmp_path_factory.mktemp("zs"), LABELS, per_class=2)
    return {"root": root, "ckpt": vit_ckpt}


def _run(folder: dict[str, Path], out: Path, *extra: str) -> int:
    argv = [
        "--datapath", str(folder["root"] / "test"), "--label-file", str(folder["root"] / "label_cn.txt"),
        "--dataset", "tiny", "--save-dir", str(out), "--resume", str(folder["ckpt"]), "--num-workers", "0",
        "--img-batch-size", "5", "--no-progress", "--device", "cpu", *TINY_FLAGS, *extra,
    ]  # fmt: skip
    return main(argv)


def _printed(out: str) -> dict[str, float]:
    return {k: float(v) for k, v in (line.split(": ") for line in out.splitlines() if line.startswith("zeroshot-"))}


def _brute_force(
    folder: dict[str, Path], templates: list[str], scale: float = 100.0, dim: int | None = None
) -> tuple[np.ndarray, list]:
    """One text and one image at a time, straight from the files: probs [N, C] and targets (``dim``: Matryoshka)."""
    from PIL import Image

    from cn_clip.models.factory import create_model
    from cn_clip.tokenizer import normalize_text, tokenize
    from cn_clip.transforms import image_transform

    model = create_model(TINY_ARCH, checkpoint=folder["ckpt"])
    norm = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    with torch.no_grad():
        columns = []
        for name in LABELS:
            texts = [tokenize([normalize_text(t.replace("{c}", name))]) for t in templates]
            rows = [norm(model.encode_text(text, dim=dim))[0] for text in texts]
            mean = torch.stack(rows).mean(0)
            columns.append(mean / mean.norm())
        classifier = torch.stack(columns, 1)
        probs, targets = [], []
        for c in range(len(LABELS)):
            for path in sorted((folder["root"] / "test" / str(c)).iterdir()):
                image = image_transform(64)(Image.open(path).convert("RGB"))[None]
                probs.append((scale * norm(model.encode_image(image, dim=dim)) @ classifier).softmax(-1)[0].numpy())
                targets.append(c)
    return np.stack(probs), targets


def _naive_metrics(probs: np.ndarray, targets: list) -> dict[str, float]:
    ranked = [sorted(range(len(row)), key=lambda c: -row[c]) for row in probs]
    top1 = [r[0] == t for r, t in zip(ranked, targets, strict=True)]
    per_class = [np.mean([h for h, t in zip(top1, targets, strict=True) if t == c]) for c in sorted(set(targets))]
    return {
        "zeroshot-top1": float(np.mean(top1)),
        "zeroshot-top5": float(np.mean([t in r[:5] for r, t in zip(ranked, targets, strict=True)])),
        "zeroshot-mean-per-class": float(np.mean(per_class)),
    }


def test_brute_force_metrics_and_schema(folder: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert _run(folder, tmp_path, "--templates", "food") == 0
    out = capsys.readouterr().out
    probs, targets = _brute_force(folder, Z.template_sets()["food"])
    naive = _naive_metrics(probs, targets)
    printed = _printed(out)
    assert printed == pytest.approx(naive, abs=1e-12)
    assert 0 < naive["zeroshot-top1"] < naive["zeroshot-top5"] < 1  # the tiny model is neither perfect nor blind
    assert out.splitlines()[-5:] == [
        "Result:", f"zeroshot-top1: {printed['zeroshot-top1']}", f"zeroshot-top5: {printed['zeroshot-top5']}",
        f"zeroshot-mean-per-class: {printed['zeroshot-mean-per-class']}", "Finished.",
    ]  # fmt: skip
    payload = json.loads((tmp_path / "tiny.json").read_text())
    assert list(payload) == SCHEMA_KEYS
    assert payload["model_name"] == "CN-CLIP-ViT-Tiny" and payload["dataset_name"] == "tiny"
    assert payload["n_shot"] == 0 and payload["rnd_seeds"] == [123] and payload["num_trainable_params"] == 0
    assert payload["num_params"] == payload["num_backbone_params"] > payload["num_visual_params"] > 0
    predictions = np.array(payload["predictions"])
    assert predictions.shape == (1, len(targets), len(LABELS))
    assert all(round(v, 6) == v for v in predictions.ravel().tolist())
    np.testing.assert_allclose(predictions[0], probs, atol=2e-6)


def test_index_logit_scale_and_template_file(folder: dict[str, Path], tmp_path: Path, capsys) -> None:
    model_scale = float(torch.load(folder["ckpt"])["state_dict"]["module.logit_scale"].exp())
    (tmp_path / "mine.txt").write_text("一张{c}的照片\n\n{}的图片\n", encoding="utf-8")
    index = [5, 0, 11, 3]
    (tmp_path / "index.json").write_text(json.dumps(index))
    extra = [
        "--templates",
        str(tmp_path / "mine.txt"),
        "--logit-scale",
        "model",
        "--index",
        str(tmp_path / "index.json"),
    ]
    assert _run(folder, tmp_path, *extra) == 0
    probs, targets = _brute_force(folder, ["一张{c}的照片", "{c}的图片"], scale=model_scale)
    assert _printed(capsys.readouterr().out) == pytest.approx(_naive_metrics(probs, targets), abs=1e-12)
    predictions = np.array(json.loads((tmp_path / "tiny.json").read_text())["predictions"][0])
    np.testing.assert_allclose(predictions, probs[index], atol=2e-6)


@pytest.mark.slow  # builds RN50 twice: ~15-30 s on 2 cores
@pytest.mark.parity
def test_matches_reference_zeroshot_evaluation(tmp_path: Path, capsys) -> None:
    """The reference's output JSON and top-1 for the same RN50 checkpoint, folder, labels and index.json."""
    inputs = json.loads((GOLDEN / "inputs.json").read_text(encoding="utf-8"))
    paths = materialise(inputs, tmp_path / "data")
    ckpt = save_reference_checkpoint("RN50@RBT3-chinese", tmp_path / "ckpt.pt")
    argv = [
        "--vision-model", "RN50", "--text-model", "RBT3-chinese", "--precision", "fp32",
        "--label-file", str(paths["labels"]), "--datapath", str(paths["folder"]), "--dataset", "food-101",
        "--index", str(paths["index"]), "--save-dir", str(tmp_path), "--img-batch-size", "2",
        "--resume", str(ckpt), "--num-workers", "0", "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    golden_npz = np.load(GOLDEN / "zeroshot.npz")
    assert _printed(capsys.readouterr().out)["zeroshot-top1"] == float(golden_npz["top1"])
    ours = json.loads((tmp_path / "food-101.json").read_text())
    golden = json.loads((GOLDEN / "zeroshot.json").read_text())
    assert {k: v for k, v in ours.items() if k != "predictions"} == {
        k: v for k, v in golden.items() if k != "predictions"
    }
    np.testing.assert_allclose(
        ours["predictions"], golden["predictions"], atol=5e-6, rtol=0
    )  # features agree to 1e-5; both sides round to 6 decimals
    # The classifier recipe itself (openai templates[:40]), against the reference's zero_shot_classifier.
    from cn_clip.eval.features import TorchEncoder
    from cn_clip.models.factory import create_model

    model = create_model("RN50@RBT3-chinese", checkpoint=ckpt)
    templates = Z.template_sets()["openai"][:40]
    weights = Z.build_classifier(TorchEncoder(model.encode_text, "cpu"), inputs["zeroshot"]["labels"], templates)
    np.testing.assert_allclose(weights, golden_npz["classifier"], atol=1e-5, rtol=0)


def test_bundled_templates_are_the_references() -> None:
    sets = Z.template_sets()
    expected = {"openai": 183, "aircraft": 100, "food": 21, "flower": 32, "eurosat": 24, "country211": 4}
    expected |= {"normal": 1, "hatefulmemes": 2, "kitti": 3, "cars": 7, "dtd": 6, "patch": 3, "pet": 6}
    expected |= {"cifar100": 11, "caltech101": 16, "fer": 5, "imagenet": 80}
    assert {k: len(v) for k, v in sets.items()} == expected
    assert len(set(sets["openai"])) == 179 and sets["openai"][0] == "{c}的照片"
    assert len(set(sets["imagenet"])) == 78 and all(t.endswith("。") for t in sets["imagenet"])
    assert all("{c}" in t for templates in sets.values() for t in templates)
    names = Z.imagenet_classnames()
    assert len(names) == 1000 and names.count("太阳镜") == 2
    chosen = {d: Z.load_templates(None, d)[0] for d in ("food-101", "resisc45_clip", "imagenet", "cifar-100")}
    assert chosen == {"food-101": "food", "resisc45_clip": "eurosat", "imagenet": "openai", "cifar-100": "openai"}


def test_metrics_on_hand_made_scores() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.1, 0.3], [0.2, 0.5, 0.3]], dtype=np.float32)
    metrics = Z.zeroshot_metrics(probs, np.array([0, 1, 1, 1]), ks=(1, 2, 5))
    assert metrics == {"top1": 0.5, "top2": 0.75, "top5": 1.0, "mean_per_class": pytest.approx((1 + 1 / 3) / 2)}


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"labels": 3, "folders": ["0", "1"]}, "has 2 class folders but the label file lists 3 classes"),
        ({"labels": 11, "folders": [str(i) for i in range(11)]}, "class folder '10' sorts at position 2"),
    ],
)
def test_folder_layout_errors(layout: dict, message: str, tmp_path: Path, folder: dict[str, Path], capsys) -> None:
    (tmp_path / "label_cn.txt").write_text("\n".join(f"类{i}" for i in range(layout["labels"])), encoding="utf-8")
    for name in layout["folders"]:
        (tmp_path / "test" / name).mkdir(parents=True)
        (tmp_path / "test" / name / "a.png").write_bytes((folder["root"] / "test" / "0" / "0.png").read_bytes())
    argv = ["--datapath", str(tmp_path / "test"), "--resume", str(folder["ckpt"]), "--num-workers", "0", *TINY_FLAGS]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_template_file_names_the_line(tmp_path: Path, folder: dict[str, Path], capsys) -> None:
    (tmp_path / "t.txt").write_text("{c}的照片\n没有占位符\n", encoding="utf-8")
    assert _run(folder, tmp_path, "--templates", str(tmp_path / "t.txt")) == 2
    assert "t.txt:2: template '没有占位符' has no {c}" in capsys.readouterr().err


def test_dim_keeps_the_first_coordinates(folder: dict[str, Path], tmp_path: Path, capsys) -> None:
    """``--dim k``: classifier and image features both cut to their first k coordinates and re-normalised (the brute
    force with ``encode_*(dim=k)``); a width beyond embed_dim is one line."""
    assert _run(folder, tmp_path, "--templates", "food", "--dim", "8") == 0
    printed = _printed(capsys.readouterr().out)
    probs, targets = _brute_force(folder, Z.template_sets()["food"], dim=8)
    assert printed == pytest.approx(_naive_metrics(probs, targets), abs=1e-12)
    predictions = json.loads((tmp_path / "tiny.json").read_text())["predictions"][0]
    np.testing.assert_allclose(predictions, probs, atol=5e-6)  # 8-d cosines × 100: batched float32 sums differ more
    assert _run(folder, tmp_path / "bad", "--dim", "65") == 2
    assert "--dim 65: must be an integer between 1 and the model's embed_dim 64" in capsys.readouterr().err
