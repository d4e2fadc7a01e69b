"""Typed configs: the flags map onto DataCfg/TrainCfg once, and the data layer runs from a DataCfg alone."""

from __future__ import annotations

import dataclasses

import pytest

from cn_clip.data.loader import DataCfg, SplitCfg, get_data
from cn_clip.training.config import LoraCfg, LossCfg, TrainCfg
from cn_clip.training.loop import resolve_max_steps
from cn_clip.training.params import data_config, parse_args, train_config


def test_get_data_from_a_data_cfg() -> None:
    cfg = DataCfg(
        train=SplitCfg("synthetic:10", batch_size=4), val=SplitCfg("synthetic:6", 3), context_length=12, seed=5
    )
    data = get_data(cfg, world_size=2, rank=1, resolution=32)
    assert (data["train"].num_samples, data["train"].num_batches, data["train"].batch_size) == (16, 2, 4)
    assert (data["val"].num_samples, data["val"].num_batches) == (6, 1)
    images, texts, _eos, image_keys, _text_keys = next(iter(data["train"].dataloader))
    assert tuple(images.shape) == (4, 3, 32, 32) and tuple(texts.shape) == (4, 12) and len(image_keys) == 4
    assert data["train"].sampler.seed == 5 and "val" not in get_data(dataclasses.replace(cfg, val=None), 1, 0, 32)


def test_flags_map_onto_the_configs() -> None:
    args = parse_args(
        ["--train-data", "synthetic:8", "--val-data", "v", "--batch-size", "6", "--valid-batch-size", "2",
         "--num-workers", "3", "--valid-num-workers", "0", "--use-augment", "--context-length", "24", "--seed", "9",
         "--on-bad-sample", "skip", "--skip-aggregate", "--kd_loss_weight", "2", "--max-steps", "7", "--name", "x"]
    )  # fmt: skip
    assert data_config(args) == DataCfg(
        train=SplitCfg("synthetic:8", 6, 3, augment=True),
        val=SplitCfg("v", 2, 0),
        context_length=24,
        seed=9,
        on_bad_sample="skip",
    )
    cfg = train_config(args)
    assert cfg.loss == LossCfg(aggregate=False, kd_loss_weight=2.0) and (cfg.name, cfg.max_steps, cfg.seed) == (
        "x",
        7,
        9,
    )
    assert cfg.lr == args.lr and cfg.warmup == 500 and cfg.log_interval == 10
    assert data_config(parse_args(["--train-data", "synthetic:8"])).val is None


def test_every_train_cfg_field_is_a_flag() -> None:
    args = parse_args(["--train-data", "synthetic:8"])
    fields = {f.name for f in dataclasses.fields(TrainCfg)} - {"loss", "lora"}
    loss_fields = {f.name for f in dataclasses.fields(LossCfg)} - {"kind"}  # kind is --loss
    assert fields <= set(vars(args)) and loss_fields <= set(vars(args)) and "loss" in vars(args)
    assert {f"lora_{f.name}" for f in dataclasses.fields(LoraCfg)} <= set(vars(args))


@pytest.mark.parametrize(
    ("max_steps", "max_epochs", "accum", "batches", "expected"),
    [(None, 3, 1, 10, (30, 3)), (None, 2, 4, 10, (4, 2)), (25, 99, 1, 10, (25, 3)), (5, 1, 2, 10, (5, 1))],
)
def test_resolve_max_steps(max_steps, max_epochs, accum, batches, expected) -> None:
    assert resolve_max_steps(max_steps, max_epochs, accum, batches) == expected
