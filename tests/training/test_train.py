"""End-to-end ``cn_clip.training.main`` runs in-process on synthetic data with the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cn_clip.cli.runner import run_cli
from cn_clip.errors import CheckpointError
from cn_clip.training import loop
from cn_clip.training.main import main
from tests.helpers import FIXTURES, TINY_ARCH
from tests.training.helpers import latest_state, tiny_args, train


class _Killed(Exception):
    pass


def test_loss_goes_down_and_files_are_reference_layout(tmp_path: Path) -> None:
    extra = [
        "--val-data",
        "synthetic:8:4",
        "--valid-epoch-interval",
        "5",
        "--save-epoch-frequency",
        "2",
        "--lr",
        "5e-3",
    ]
    result = train(tiny_args(tmp_path, *extra, steps=10, data="synthetic:16:4", batch=8))
    losses = result["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    ckdir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["epoch2.pt", "epoch4.pt", "epoch5.pt", "epoch_latest.pt"]
    ckpt = torch.load(ckdir / "epoch5.pt", weights_only=True)
    assert ckpt["epoch"] == 5 and ckpt["step"] == 10 and ckpt["name"] == "run"
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    assert set(ckpt["optimizer"]) == {"state", "param_groups"}
    assert result["validation"]["mean_recall"] >= 0
    log = next((tmp_path / "run").glob("out_*.log")).read_text()
    assert "Rank 0 | Global Steps: 1/10 | Train Epoch: 1 [8/16 (50%)] | Loss: " in log
    assert "| Global Batch Size: 8" in log
    assert "Validation Result (epoch 5 @ 10 steps) | Valid Loss: " in log
    assert next((tmp_path / "run").glob("params_*.txt")).read_text().startswith("accum_freq: 1\n")


def test_checkpoint_loads_with_load_from_name(tmp_path: Path) -> None:
    from cn_clip.models.factory import load_from_name

    train(tiny_args(tmp_path, steps=2))
    model, _ = load_from_name(str(tmp_path / "run/checkpoints/epoch_latest.pt"), device="cpu")
    assert not model.training


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    original = loop.Trainer.train_step
    count = {"n": 0}

    def step(self, batches, step):
        if count["n"] == calls:
            raise _Killed
        count["n"] += 1
        return original(self, batches, step)

    monkeypatch.setattr(loop.Trainer, "train_step", step)


@pytest.mark.parametrize(
    "extra,kill_at",
    [([], 3), ([], 4), (["--accum-freq", "2", "--mask-ratio", "0.5"], 1)],
    ids=["mid-epoch", "epoch-boundary", "accum-flip"],
)
def test_resume_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], kill_at: int) -> None:
    argv = [*extra, "--save-step-frequency", "1"]
    straight = train(tiny_args(tmp_path / "a", *argv, steps=6))
    with monkeypatch.context() as patch:
        _interrupt_after(patch, kill_at)
        with pytest.raises(_Killed):
            train(tiny_args(tmp_path / "b", *argv, steps=6))
    resumed = train(tiny_args(tmp_path / "b", *argv, steps=6))  # auto-resume from epoch_latest.pt
    assert resumed["losses"] == straight["losses"][kill_at:]
    a, b = latest_state(tmp_path / "a"), latest_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_resume_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = run_cli(main, tiny_args(tmp_path, "--resume", str(tmp_path / "nope.pt")))
    assert code == 2
    assert "nope.pt: no such checkpoint file" in capsys.readouterr().err


def test_mismatched_resume_names_keys(tmp_path: Path, rn_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="missing keys: .*unexpected keys"):
        train(tiny_args(tmp_path, "--resume", str(rn_ckpt)))


def test_released_style_file_resumes_without_optimizer(tmp_path: Path, vit_ckpt: Path) -> None:
    argv = tiny_args(tmp_path, "--resume", str(vit_ckpt), "--reset-data-offset", "--reset-optimizer", steps=2)
    result = train(argv)  # vit_ckpt has no optimizer state, like a released file
    assert len(result["losses"]) == 2


def test_logs_none_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train(tiny_args("none", steps=1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag,frozen", [("--freeze-vision", "visual."), ("--freeze-text", "bert.")])
def test_frozen_tower_is_bit_identical(tmp_path: Path, flag: str, frozen: str) -> None:
    from cn_clip.models.factory import create_model

    torch.manual_seed(123)  # what the trainer does before building the model (seed 123, rank 0)
    initial = create_model(TINY_ARCH).state_dict()
    train(tiny_args(tmp_path, flag, steps=2))
    state = {k.removeprefix("module."): v for k, v in latest_state(tmp_path).items()}
    same = [k for k in state if k.startswith(frozen)]
    assert same and all(torch.equal(state[k], initial[k]) for k in same)
    other = "bert.encoder.layer.0.output.dense.weight" if frozen == "visual." else "visual.proj"
    assert not torch.equal(state[other], initial[other])


def test_flip_mask_count_and_same_mask_in_both_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = loop.Trainer._features

    def features(self, batch, step, micro):
        hook = self.engine.module.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
        try:
            out = original(self, batch, step, micro)
            again = original(self, batch, step, micro)  # the mask is a function of (seed, step, micro, rank)
            if not torch.is_grad_enabled():
                torch.testing.assert_close(out[0], again[0], rtol=0, atol=0)
            return out
        finally:
            hook.remove()

    monkeypatch.setattr(loop.Trainer, "_features", features)
    train(tiny_args(tmp_path, "--accum-freq", "2", "--mask-ratio", "0.5", steps=1))
    assert set(seen) == {1 + 8}  # 64px / 16 = 4×4 patches, keep floor(16 · 0.5) = 8, plus [CLS]


def test_keep_last_k(tmp_path: Path) -> None:
    train(tiny_args(tmp_path, "--save-step-frequency", "1", "--keep-last-k", "2", steps=5))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["epoch2.pt", "epoch_2_5.pt", "epoch_latest.pt"]


def test_resnet_flip_is_a_clear_error(tmp_path: Path) -> None:
    from cn_clip.errors import ConfigError

    argv = tiny_args(tmp_path, "--mask-ratio", "0.5")
    argv[argv.index("ViT-Tiny")] = "RN-Tiny"
    with pytest.raises(ConfigError, match="only implemented for VisualTransformer"):
        train(argv)


def test_fixture_dir_exists() -> None:
    assert (FIXTURES / "training" / "steps.npz").is_file()


def test_distillation_with_a_local_teacher(tmp_path: Path, rn_ckpt: Path) -> None:
    teacher = rn_ckpt
    result = train(tiny_args(tmp_path, "--distillation", "--teacher-model-name", str(teacher), steps=2))
    assert len(result["losses"]) == 2
    log = next((tmp_path / "run").glob("out_*.log")).read_text()
    assert f"Teacher model loaded from {teacher}" in log


def test_unknown_teacher_is_a_clear_error(tmp_path: Path) -> None:
    from cn_clip.errors import ConfigError

    with pytest.raises(ConfigError, match="modelscope"):
        train(tiny_args(tmp_path, "--distillation", "--teacher-model-name", "damo/some-teacher", steps=1))
