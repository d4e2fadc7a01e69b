"""LoRA on both towers: only adapters train, checkpoints stay plain (merged, low-rank, reference-loadable), adapter
files are small, resume is exact; partial unlocking and layer-wise LR decay."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_clip.cli.runner import run_cli
from cn_clip.errors import ConfigError
from cn_clip.models.factory import create_model, load_from_name
from cn_clip.training.config import LoraCfg
from cn_clip.training.lora import adapter_parameters, attach, read_adapter
from cn_clip.training.lora import main as lora_main
from cn_clip.training.params import lora_config, parse_args
from tests.helpers import FIXTURES, REPO
from tests.training.helpers import tiny_args, train

RANK = 2
ARCHS = ("ViT-Tiny@BERT-Tiny-chinese", "RN-Tiny@BERT-Tiny-chinese")
LORA_FLAGS = ["--lora-r", str(RANK), "--lora-alpha", "4", "--lora-targets", "attn,mlp", "--lr", "5e-3"]


def _fixture_state(arch: str) -> dict[str, torch.Tensor]:
    from tests.fixtures.fixture_weights import KEYS_DIR, fixture_state_dict, read_key_shapes

    return fixture_state_dict(read_key_shapes(KEYS_DIR / f"{arch}.tsv"))


def _arch_args(logs: Path, arch: str, *extra: str, steps: int = 3) -> list[str]:
    argv = tiny_args(logs, *extra, steps=steps)
    argv[argv.index("--vision-model") + 1] = arch.split("@")[0]
    return argv


def _ckpt(logs: Path, name: str = "epoch_latest.pt") -> dict:
    return torch.load(logs / "run" / "checkpoints" / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", params=ARCHS)
def lora_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    """A 3-step LoRA run from the fixture weights; returns ``(arch, logs, initial state)``."""
    arch = request.param
    logs = tmp_path_factory.mktemp("lora")
    init = {f"module.{k}": v for k, v in _fixture_state(arch).items()}
    torch.save({"epoch": 0, "step": 0, "name": "init", "state_dict": init}, logs / "init.pt")
    train(_arch_args(logs, arch, *LORA_FLAGS, "--resume", str(logs / "init.pt"), "--reset-data-offset"))
    return arch, logs, init


def _lora_model(arch: str, extra: dict) -> torch.nn.Module:
    model = create_model(arch, checkpoint=_fixture_state(arch))
    attach(model, LoraCfg.from_dict(extra["config"]), seed=0, resume=extra)
    return model.eval()


def test_only_adapters_train_and_the_base_is_bit_identical(lora_run: tuple) -> None:
    arch, logs, init = lora_run
    ckpt = _ckpt(logs)
    extra = ckpt["cn_clip"]["lora"]
    state = ckpt["state_dict"]
    assert list(state) == list(init)  # reference keys, reference order, nothing else
    adapted = {f"module.{k}" for k in extra["base"]}
    for key, value in init.items():
        kept = extra["base"][key[len("module.") :]] if key in adapted else state[key]
        assert torch.equal(kept, value), key  # BatchNorm running statistics included
    assert any(not torch.equal(state[k], init[k]) for k in adapted)
    model = _lora_model(arch, extra)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in model.named_parameters() if "lora_" in name}
    assert set(adapter_parameters(model)) == set(extra["adapters"])


def test_merged_checkpoint_matches_the_lora_model_and_each_update_is_low_rank(lora_run: tuple) -> None:
    arch, logs, init = lora_run
    extra = _ckpt(logs)["cn_clip"]["lora"]
    merged, _ = load_from_name(str(logs / "run" / "checkpoints" / "epoch_latest.pt"), device="cpu",
                               vision_model_name=arch.split("@")[0], text_model_name=arch.split("@")[1])  # fmt: skip
    lora = _lora_model(arch, extra)
    images, texts = torch.randn(3, 3, 64, 64), torch.randint(1, 1000, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(images), lora.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(merged.encode_text(texts), lora.encode_text(texts), atol=1e-5, rtol=0)
    state = merged.state_dict()
    for key, base in extra["base"].items():
        delta = state[key].double() - base.double()
        blocks = delta.chunk(3) if key.endswith("in_proj_weight") else [delta]
        for block in blocks:  # packed q/k/v: each third has its own rank-r update
            assert torch.linalg.matrix_rank(block, atol=1e-6) <= RANK, key
    assert len(extra["base"]) == (2 * 4 if arch.startswith("ViT") else 4) + 2 * 6  # per layer: ViT 4, BERT 6


def test_adapter_file_is_small_and_apply_and_merge_rebuild_the_checkpoint(lora_run: tuple, tmp_path: Path) -> None:
    arch, logs, _ = lora_run
    ckdir = logs / "run" / "checkpoints"
    adapter = ckdir / "epoch_latest.lora.safetensors"
    assert adapter.stat().st_size <= 0.05 * (ckdir / "epoch_latest.pt").stat().st_size
    cfg, tensors = read_adapter(adapter)
    assert cfg.r == RANK and all(k.endswith((".lora_A", ".lora_B")) for k in tensors)
    state = _ckpt(logs)["state_dict"]
    argv = ["apply", "--base", str(logs / "init.pt"), "--adapter", str(adapter), "--out", str(tmp_path / "a.pt")]
    assert run_cli(lora_main, argv) == 0
    applied = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    assert list(applied) == list(state)
    for key, value in state.items():
        torch.testing.assert_close(applied[key], value, atol=1e-6, rtol=0, msg=key)
    assert run_cli(lora_main, ["merge", str(ckdir / "epoch_latest.pt"), "--out", str(tmp_path / "m.pt")]) == 0
    plain = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(plain) == {"epoch", "step", "name", "state_dict"}
    assert all(torch.equal(plain["state_dict"][k], v) for k, v in state.items())


def test_merged_checkpoint_exports_to_hugging_face(lora_run: tuple, tmp_path: Path) -> None:
    from cn_clip.convert import main as convert_main

    arch, logs, _ = lora_run
    if not arch.startswith("ViT"):
        pytest.skip("the Hugging Face ChineseCLIPModel has no ResNet image tower")
    assert convert_main(["to-hf", str(logs / "run" / "checkpoints" / "epoch_latest.pt"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


def test_apply_refuses_an_adapter_for_another_architecture(lora_run: tuple, tmp_path: Path, capsys) -> None:
    arch, logs, _ = lora_run
    other = next(a for a in ARCHS if a != arch)
    base = {f"module.{k}": v for k, v in _fixture_state(other).items()}
    torch.save({"state_dict": base}, tmp_path / "other.pt")
    adapter = logs / "run" / "checkpoints" / "epoch_latest.lora.safetensors"
    argv = ["apply", "--base", str(tmp_path / "other.pt"), "--adapter", str(adapter), "--out", str(tmp_path / "x.pt")]
    assert run_cli(lora_main, argv) == 2
    assert "adapter does not fit the base weights" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_checkpoint_loads_in_the_reference(arch: str, tmp_path: Path) -> None:
    """Golden: the reference package loaded the same merged state strictly (tests/fixtures/gen_lora_fixtures.py)."""
    from tests.fixtures.fixture_weights import fixture_images
    from tests.fixtures.gen_lora_fixtures import RESOLUTION, lora_merged_state

    golden = np.load(FIXTURES / "lora" / f"{arch}.npz")
    torch.save({"epoch": 1, "step": 1, "name": "lora", "state_dict": lora_merged_state(arch)}, tmp_path / "m.pt")
    vision, text = arch.split("@")
    model, _ = load_from_name(str(tmp_path / "m.pt"), device="cpu", vision_model_name=vision, text_model_name=text)
    with torch.no_grad():
        image = model.encode_image(fixture_images(RESOLUTION)).double().numpy()
        text_features = model.encode_text(torch.from_numpy(golden["text_ids"])).double().numpy()
    np.testing.assert_allclose(image, golden["image_features"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(text_features, golden["text_features"], atol=1e-5, rtol=0)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    flags = [*LORA_FLAGS, "--lora-dropout", "0.1", "--lora-train-proj", "--accum-freq", "2", "--mask-ratio", "0.5"]
    train(tiny_args(tmp_path / "a", *flags, steps=4, data="synthetic:16:4"))
    train(tiny_args(tmp_path / "b", *flags, steps=2, data="synthetic:16:4"))
    train(tiny_args(tmp_path / "b", *flags, steps=4, data="synthetic:16:4"))  # auto-resume from epoch_latest.pt
    a, b = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    la, lb = a["cn_clip"]["lora"], b["cn_clip"]["lora"]
    assert all(torch.equal(la["adapters"][k], lb["adapters"][k]) for k in la["adapters"])
    first = _ckpt(tmp_path / "a", "epoch1.pt")["state_dict"]["module.text_projection"]  # --lora-train-proj trains it
    assert not torch.equal(a["state_dict"]["module.text_projection"], first)
    _, tensors = read_adapter(tmp_path / "a" / "run" / "checkpoints" / "epoch2.lora.safetensors")
    assert {"text_projection", "logit_scale", "visual.proj"} <= set(tensors)


@pytest.mark.parametrize(
    "flags",
    [["--grad-checkpointing", "--precision", "bf16", "--local-loss", "--gather-with-grad"], ["--lora-towers", "text"]],
    ids=["ckpt-bf16-local-loss", "text-only"],
)
def test_lora_composes_with_trainer_options(tmp_path: Path, flags: list[str]) -> None:
    train(tiny_args(tmp_path, *LORA_FLAGS, *flags, steps=2))
    extra = _ckpt(tmp_path)["cn_clip"]["lora"]
    towers = {key.split(".")[0] for key in extra["base"]}
    assert towers == ({"bert"} if "text" in flags else {"bert", "visual"})


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--lora-towers", "text,audio"], "--lora-towers 'text,audio': use a comma list of text, vision"),
        (["--lora-targets", "ffn"], "--lora-targets 'ffn': use a comma list of attn, mlp"),
        (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
        (["--freeze-vision"], "--freeze-vision with --lora-towers text,vision: drop vision from --lora-towers"),
        (["--layer-decay", "0.9"], "--layer-decay does not combine with --lora-r"),
    ],
)
def test_lora_flag_errors(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        lora_config(parse_args(tiny_args(tmp_path, "--lora-r", "4", *flags)))


def test_resuming_with_other_lora_settings_is_an_error(tmp_path: Path) -> None:
    train(tiny_args(tmp_path, *LORA_FLAGS, steps=1))
    with pytest.raises(ConfigError, match="r: checkpoint 2, flags 3"):
        train(tiny_args(tmp_path, *LORA_FLAGS, "--lora-r", "3", steps=2))


# ---- partial unlocking and layer decay ------------------------------------------------------------------------------
def _trainable(tmp_path: Path, arch: str, *flags: str) -> set[str]:
    from cn_clip.training.main import _build_model

    args = parse_args(_arch_args(tmp_path, arch, *flags))
    model = _build_model(args, argparse.Namespace(distributed=False, world_size=1))
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _under(names: set[str], *prefixes: str) -> set[str]:
    return {n for n in names if n.startswith(prefixes)}


def test_unlocked_layer_flags_leave_exactly_the_expected_parameters_trainable(tmp_path: Path) -> None:
    vit = "ViT-Tiny@BERT-Tiny-chinese"
    everything = _trainable(tmp_path, vit)
    text = _trainable(tmp_path, vit, "--lock-text-unlocked-layers", "1")
    assert text == everything - _under(everything, "bert.embeddings.", "bert.encoder.layer.0.")
    assert _under(text, "bert.") and "text_projection" in text
    image = _trainable(tmp_path, vit, "--lock-image-unlocked-groups", "2")
    unlocked = _under(everything, "visual.transformer.resblocks.1.", "visual.ln_post.") | {"visual.proj"}
    assert image == everything - (_under(everything, "visual.") - unlocked)
    assert _trainable(tmp_path, vit, "--lock-image-unlocked-groups", "0") == everything - _under(everything, "visual.")
    rn = "RN-Tiny@BERT-Tiny-chinese"
    everything = _trainable(tmp_path, rn)
    image = _trainable(tmp_path, rn, "--lock-image-unlocked-groups", "1", "--lock-text-unlocked-layers", "0")
    assert image == _under(everything, "visual.attnpool.") | {"text_projection", "logit_scale"}
    with pytest.raises(ConfigError, match="--lock-image-unlocked-groups 9: this tower has 6 groups"):
        _trainable(tmp_path, rn, "--lock-image-unlocked-groups", "9")


def test_layer_decay_scales_by_depth_with_projections_at_full_rate(tmp_path: Path) -> None:
    from cn_clip.training.optim import param_groups
    from cn_clip.training.unlock import layer_scales

    model = create_model("ViT-Tiny@BERT-Tiny-chinese")
    scales = layer_scales(model, 0.5)
    assert scales["visual.proj"] == 1 and "text_projection" not in scales and "logit_scale" not in scales
    assert scales["visual.transformer.resblocks.1.attn.in_proj_weight"] == 0.5
    assert scales["visual.conv1.weight"] == 0.5**3  # stem, block 0, [block 1 + ln_post], proj
    assert scales["bert.encoder.layer.1.output.dense.weight"] == 0.5
    assert scales["bert.embeddings.word_embeddings.weight"] == 0.5**3
    groups = param_groups(model, 0.2, "reference", scales)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    from cn_clip.training.engine import Engine

    engine = Engine(model, torch.optim.AdamW(groups, lr=1.0), argparse.Namespace(device=torch.device("cpu"),
                    distributed=False, world_size=1))  # fmt: skip
    engine.set_lr(0.1)
    assert engine.lr == pytest.approx(0.1)
    assert sorted({round(g["lr"], 6) for g in engine.optimizer.param_groups}) == [0.0125, 0.025, 0.05, 0.1]
    train(tiny_args(tmp_path, "--layer-decay", "0.7", "--lock-text-unlocked-layers", "1", steps=2))


# ---- real processes (slow): SIGKILL + resume, torchrun gloo, DeepSpeed ZeRO-2 ---------------------------------------
@pytest.mark.slow
@pytest.mark.reliability
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    import sys

    from tests.training.test_reliability import kill_and_resume

    flags = [*LORA_FLAGS, "--lora-dropout", "0.1", "--save-step-frequency", "1", "--accum-freq", "2"]

    def cmd(logs: Path) -> list[str]:
        return [sys.executable, "-m", "cn_clip.training.main", *tiny_args(logs, *flags, steps=6, data="synthetic:24:4")]

    note = kill_and_resume(cmd, tmp_path, 6)
    a, b = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b")
    assert all(torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items()), note
    la, lb = a["cn_clip"]["lora"]["adapters"], b["cn_clip"]["lora"]["adapters"]
    assert all(torch.equal(la[k], lb[k]) for k in la), note


@pytest.mark.slow
def test_lora_under_torchrun_two_gloo_processes(tmp_path: Path) -> None:
    import subprocess

    from tests.training.test_distributed import _env, _torchrun

    argv = tiny_args(tmp_path, *LORA_FLAGS, "--grad-checkpointing", "--local-loss", "--gather-with-grad", steps=3)
    subprocess.run(_torchrun(2, "-m", "cn_clip.training.main", "--", *argv), check=True, env=_env(), cwd=REPO,
                   timeout=300, capture_output=True)  # fmt: skip
    log = next((tmp_path / "run").glob("out_*.log")).read_text()
    assert "Global Batch Size: 8" in log and "LoRA r=2" in log
    assert (tmp_path / "run" / "checkpoints" / "epoch_latest.lora.safetensors").is_file()
    load_from_name(str(tmp_path / "run" / "checkpoints" / "epoch_latest.pt"), device="cpu")


@pytest.mark.slow
@pytest.mark.timeout(900)  # two 2-process DeepSpeed launches
def test_lora_under_deepspeed_zero2(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess

    from tests.training.test_deepspeed import DEEPSPEED

    if not DEEPSPEED.exists() and shutil.which("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{DEEPSPEED.parent}:{os.environ['PATH']}",
    }

    def launch(steps: int, port: int) -> str:
        argv = tiny_args(tmp_path, *LORA_FLAGS, "--deepspeed", "--deepspeed_config", "run_scripts/ds_config_zero2.json",
                         steps=steps)  # fmt: skip
        cmd = [
            str(DEEPSPEED),
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            "--module",
            "cn_clip.training.main",
            *argv,
        ]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=500, capture_output=True)
        return "".join(p.read_text() for p in sorted((tmp_path / "run").glob("out_*.log")))

    assert "Global Steps: 2/2" in launch(2, 29751)
    first = _ckpt(tmp_path)
    assert not any("lora" in k or "base_layer" in k for k in first["state_dict"])
    log = launch(3, 29752)  # auto-resume: adapters from the DeepSpeed state
    assert "optimizer state is restored from the DeepSpeed checkpoint" in log and "Global Steps: 3/3" in log
    extra = _ckpt(tmp_path)["cn_clip"]["lora"]
    assert all(torch.equal(extra["base"][k], first["cn_clip"]["lora"]["base"][k]) for k in extra["base"])


def _saved_bytes_and_grads(model: torch.nn.Module, images: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for one image-tower backward (distinct storages), and the adapters' gradients."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model.encode_image(images).square().sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return sum(storages.values()), grads


def test_frozen_vit_mlps_are_recomputed_with_the_same_gradients() -> None:
    """LoRA on attention only leaves the ViT MLPs frozen: they are recomputed in backward, which keeps less and gives
    bit-identical adapter gradients."""
    torch.manual_seed(0)
    model = create_model(ARCHS[0]).train()
    attach(model, LoraCfg(r=RANK, alpha=4.0, targets=("attn",)), seed=0)
    with torch.no_grad():  # non-zero B, so gradients reach every adapter
        for name, param in adapter_parameters(model).items():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    blocks = model.visual.transformer.resblocks
    assert all(block.recompute_mlp for block in blocks)
    images = torch.randn(4, 3, model.cfg.vision.image_resolution, model.cfg.vision.image_resolution)
    recomputed, grads = _saved_bytes_and_grads(model, images)
    for block in blocks:
        block.recompute_mlp = False
    stored, expected = _saved_bytes_and_grads(model, images)
    assert grads.keys() == expected.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grad, expected[name]), name
    assert recomputed < 0.8 * stored, (recomputed, stored)
    for block in blocks:
        block.recompute_mlp = True
    model.visual.set_grad_checkpointing(True)  # whole blocks checkpointed: the MLP is not checkpointed twice
    _, checkpointed = _saved_bytes_and_grads(model, images)
    for name, grad in checkpointed.items():
        assert torch.equal(grad, expected[name]), name
    attach(mlp_model := create_model(ARCHS[0]), LoraCfg(r=RANK, alpha=4.0, targets=("attn", "mlp")), seed=0)
    assert not any(block.recompute_mlp for block in mlp_model.visual.transformer.resblocks)  # trained MLPs: stored
