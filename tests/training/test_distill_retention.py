"""Offline distillation from any local teacher (both towers), the retention report and --valid-at-start."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cn_clip.errors import ConfigError
from cn_clip.training.retention import RetentionMonitor
from cn_clip.training.teacher import Teacher, load_teacher
from tests.helpers import RN_TINY_ARCH as RN_TINY
from tests.helpers import TINY_ARCH as TINY
from tests.helpers import make_class_folder
from tests.helpers import seeded_checkpoint as tiny_checkpoint
from tests.training.helpers import tiny_args, train


def _log(logs: Path) -> str:
    return next((logs / "run").glob("out_*.log")).read_text(encoding="utf-8")


def test_distillation_from_a_tiny_teacher_of_another_architecture_lowers_the_distillation_loss(tmp_path: Path) -> None:
    teacher = tiny_checkpoint(tmp_path / "rn_teacher.pt", arch=RN_TINY, seed=7)
    extra = ["--distillation", "--teacher-model-name", str(teacher), "--distillation-weight", "20", "--lr", "3e-3"]
    result = train(tiny_args(tmp_path / "logs", *extra, steps=6, data="synthetic:32:4", batch=8))
    kd = result["distill_losses"]
    assert len(kd) == 6 and all(x > 0 for x in kd)
    assert sum(kd[-3:]) / 3 < 0.7 * sum(kd[:3]) / 3, kd
    log = _log(tmp_path / "logs")
    assert f"Teacher model loaded from {teacher} ({RN_TINY}, distilling image + text)" in log
    assert "| Distill Loss: " in log


def test_text_only_distillation_and_bad_tower_names(tmp_path: Path) -> None:
    teacher = tiny_checkpoint(tmp_path / "t.pt", seed=3)
    extra = ["--distillation", "--teacher-model-name", str(teacher), "--distillation-towers", "text"]
    result = train(tiny_args(tmp_path / "a", *extra, steps=2))
    assert len(result["distill_losses"]) == 2 and "distilling text)" in _log(tmp_path / "a")
    with pytest.raises(ConfigError, match="--distillation-towers: choose from image, text"):
        train(tiny_args(tmp_path / "b", "--distillation", "--teacher-model-name", str(teacher),
                        "--distillation-towers", "audio", steps=1))  # fmt: skip


def test_hugging_face_folder_teacher_gives_the_same_features(tmp_path: Path, tiny_model) -> None:
    from cn_clip.deploy.hf import save_hf_folder

    save_hf_folder(tiny_model.state_dict(), tiny_model.cfg, tmp_path / "hf")
    teacher = load_teacher(str(tmp_path / "hf"))
    images, texts = torch.randn(2, 3, 64, 64), torch.tensor([[101, 345, 102, 0], [101, 678, 999, 102]])
    feats = teacher(images, texts)
    with torch.no_grad():
        assert torch.allclose(feats["image"], tiny_model.encode_image(images), atol=1e-5)
        assert torch.allclose(feats["text"], tiny_model.encode_text(texts), atol=1e-5)


def test_teacher_resizes_images_to_its_resolution(tiny_model) -> None:
    teacher = Teacher(tiny_model, "mem", towers=["image"])
    out = teacher(torch.randn(3, 3, 32, 32), torch.zeros(3, 4, dtype=torch.long))
    assert set(out) == {"image"} and out["image"].shape == (3, tiny_model.cfg.vision.embed_dim)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training


@pytest.mark.parametrize(
    "name,expected",
    [
        ("damo/multi-modal_clip-vit-large-patch14_zh", "pass --teacher-model-name ViT-L-14"),
        ("damo/multi-modal_team-vit-large-patch14_multi-modal-similarity", "modelscope download --model damo/"),
        ("missing/teacher.pt", "teacher checkpoint missing/teacher.pt does not exist"),
        ("ViT-Q-99", "is not a released name (ViT-B-16"),
    ],
)
def test_unloadable_teachers_are_one_line_errors(name: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_teacher(name)
    message = str(info.value)
    assert expected in message and "\n" not in message
    if name.startswith("damo/"):
        assert "--teacher-model-name DIR" in message and "offline" in message


def test_retention_report_and_valid_at_start_appear_in_the_log(tmp_path: Path) -> None:
    retention = make_class_folder(tmp_path / "cls")
    extra = [
        "--retention-data", str(retention), "--valid-at-start", "--val-data", "synthetic:8:4",
        "--valid-step-interval", "2", "--valid-epoch-interval", "0", "--save-step-frequency", "2",
    ]  # fmt: skip
    result = train(tiny_args(tmp_path / "logs", *extra, steps=4, batch=4))
    log = _log(tmp_path / "logs")
    assert "Validation Result (epoch 1 @ 0 steps)" in log
    assert f"Retention before training ({retention}, 3 classes) | zero-shot top-1: " in log
    assert f"Retention @ 2 steps ({retention}) | zero-shot top-1: " in log and "change: " in log
    assert "Retention @ 4 steps" in log
    steps = [r["steps"] for r in result["retention"]]
    assert steps == [0, 2, 4] and result["retention"][0]["retention_change"] == 0.0
    assert "retention_top1" in result["validation"]
    ckpt = torch.load(tmp_path / "logs/run/checkpoints/epoch_latest.pt", map_location="cpu", weights_only=True)
    assert ckpt["cn_clip"]["retention_baseline"] == {
        "data": str(retention),
        "top1": result["retention"][0]["retention_top1"],
    }


def test_valid_at_start_needs_validation_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--valid-at-start needs --val-data"):
        train(tiny_args(tmp_path, "--valid-at-start", steps=1))


def test_retention_drop_beyond_the_threshold_warns(tmp_path: Path, tiny_model, caplog, monkeypatch) -> None:
    monitor = RetentionMonitor(make_class_folder(tmp_path / "cls"), warn_drop=5.0)
    values = iter([60.0, 57.0, 50.0])
    monkeypatch.setattr(monitor, "measure", lambda model: next(values))
    with caplog.at_level(logging.INFO, logger="cn_clip.training.retention"):
        assert monitor.check(tiny_model, 0) == {"retention_top1": 60.0, "retention_change": 0.0}
        assert monitor.check(tiny_model, 10)["retention_change"] == -3.0
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        assert monitor.check(tiny_model, 20)["retention_change"] == -10.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fell 10.00 points" in warnings[0] and "--retention-warn 5" in warnings[0]


def test_zero_shot_top1_matches_the_zeroshot_evaluation_cli(tmp_path: Path, capsys) -> None:
    from cn_clip.eval.zeroshot_evaluation import main as zeroshot_main
    from cn_clip.models.factory import create_model
    from cn_clip.training.retention import open_retention_set, zero_shot_top1

    root = make_class_folder(tmp_path / "cls", per_class=4)
    ckpt = tiny_checkpoint(tmp_path / "m.pt", seed=5)
    model = create_model(TINY, ckpt)
    ours = zero_shot_top1(model, open_retention_set(root))
    argv = ["--datapath", str(root / "test"), "--label-file", str(root / "label_cn.txt"), "--dataset", "cls",
            "--resume", str(ckpt), "--vision-model", "ViT-Tiny", "--text-model", "BERT-Tiny-chinese",
            "--num-workers", "0", "--save-dir", str(tmp_path), "--precision", "fp32", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert zeroshot_main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("zeroshot-top1"))
    assert 100 * float(line.split(":")[1].split()[0]) == pytest.approx(ours, abs=1e-6)


def test_bad_retention_layout_is_a_clear_error(tmp_path: Path) -> None:
    from cn_clip.errors import DataError
    from cn_clip.training.retention import open_retention_set

    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="no label_cn.txt"):
        open_retention_set(tmp_path / "x")
