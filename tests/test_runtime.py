"""cn_clip.runtime: the one table of device and precision choices, rank detection and work sharing."""

from __future__ import annotations

import pytest
import torch

from cn_clip import runtime
from cn_clip.errors import ConfigError


@pytest.mark.parametrize(
    ("given", "cuda", "local_rank", "per_rank", "expected"),
    [
        ("cpu", True, "1", True, "cpu"),
        ("cuda:3", False, None, True, "cuda:3"),
        ("mps", False, None, True, "mps"),
        (None, False, "1", True, "cpu"),
        (None, True, None, True, "cuda:0"),
        (None, True, "1", True, "cuda:1"),
        (None, True, "1", False, "cuda"),
    ],
)
def test_resolve_device_table(monkeypatch, given, cuda, local_rank, per_rank, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert runtime.resolve_device(given, per_rank=per_rank) == expected


@pytest.mark.parametrize(
    ("precision", "weights", "train_cpu", "train_cuda", "infer_cpu_autocast", "infer_cuda_autocast"),
    [
        ("fp32", None, None, None, False, False),
        ("amp", None, None, torch.float16, False, True),
        ("fp16", torch.float16, None, torch.float16, False, False),
        ("bf16", torch.bfloat16, torch.bfloat16, torch.bfloat16, False, False),
    ],
)
def test_precision_table(precision, weights, train_cpu, train_cuda, infer_cpu_autocast, infer_cuda_autocast) -> None:
    assert runtime.check_precision(precision) == precision
    assert runtime.weight_dtype(precision) == weights
    assert runtime.autocast_dtype(precision, torch.device("cpu")) == train_cpu
    assert runtime.autocast_dtype(precision, torch.device("cuda", 0)) == train_cuda
    assert isinstance(runtime.inference_autocast(precision, "cpu"), torch.autocast) is infer_cpu_autocast
    if torch.cuda.is_available():
        assert isinstance(runtime.inference_autocast(precision, "cuda:0"), torch.autocast) is infer_cuda_autocast


def test_unknown_precision_is_one_clear_error() -> None:
    for call in (runtime.check_precision, runtime.weight_dtype):
        with pytest.raises(ConfigError, match=r"unknown precision 'fp8'; choose from amp, fp16, fp32, bf16"):
            call("fp8")


def test_fp16_on_cpu_warns(caplog) -> None:
    with caplog.at_level("WARNING", logger="cn_clip.runtime"):
        runtime.check_precision("fp16", "cpu")
    assert "--precision fp16 on the CPU is slow" in caplog.text


def test_precision_flag_uses_the_one_list() -> None:
    import argparse

    from cn_clip.cli.args import add_precision_arg

    parser = argparse.ArgumentParser()
    add_precision_arg(parser)
    assert tuple(parser._option_string_actions["--precision"].choices) == runtime.PRECISIONS


def test_no_launcher_means_one_process_and_no_group(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not runtime.launched()
    env = runtime.init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.backend, env.is_primary, env.distributed) == (0, 1, None, True, False)
    assert env.device == torch.device("cpu")
    runtime.barrier(env)  # no-ops without a group
    tensor = torch.ones(2)
    assert runtime.all_reduce_sum(tensor, env) is tensor
    assert runtime.all_gather_list(tensor, env) == [tensor]
    assert runtime.broadcast_object({"a": 1}, env) == {"a": 1}
    runtime.cleanup(env)


def test_launcher_detection(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert not runtime.launched()
    monkeypatch.setenv("RANK", "1")
    assert runtime.launched()


def test_shard_is_round_robin_and_covers_everything() -> None:
    items = list(range(10))
    shares = [runtime.shard(items, runtime.DistEnv(rank=r, world_size=3)) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(x for share in shares for x in share) == items
    assert runtime.shard(items, runtime.DistEnv()) == items


def test_runtime_import_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, cn_clip.runtime, cn_clip.cli.args; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
