"""``python -m cn_clip.training.main``: contrastive fine-tuning with the reference's flags (compatibility.md#training).

Runs as one plain process (CPU or one GPU), under ``torchrun`` (gloo on CPU, nccl on GPU) or under the
``deepspeed`` launcher with ``--deepspeed --deepspeed_config F``. Orchestration only; the work is in the modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from cn_clip.runtime import DistEnv

_logger = logging.getLogger("cn_clip.training")
RN_FLIP_NOTE = (
    "Note: mask_ratio > 0 (FLIP strategy) is currently only implemented for VisualTransformer. "
    "It will not function for ResNet backbone."
)


def _run_dir(args: argparse.Namespace) -> Path | None:
    if args.logs is None or str(args.logs).strip().lower() in ("", "none"):
        return None
    return Path(args.logs) / args.name


def _setup_logging(args: argparse.Namespace, env: DistEnv, run_dir: Path | None, time_suffix: str) -> None:
    log_file = None
    if run_dir is not None and env.is_primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_file = str(run_dir / f"out_{time_suffix}.log")
    setup_logging(logging.DEBUG if args.debug else logging.INFO, log_file, prefix=f"Rank {env.rank} | ")


def _seed_everything(seed: int, rank: int) -> None:
    import numpy as np
    import torch

    random.seed(seed + rank)
    np.random.seed((seed + rank) % (2**32))
    torch.manual_seed(seed + rank)


def _check_args(args: argparse.Namespace, model: Any) -> None:
    if args.mask_ratio and not model.is_vit:
        raise ConfigError(f"--mask-ratio {args.mask_ratio}: {RN_FLIP_NOTE}")
    if not 0 <= args.mask_ratio < 1:
        raise ConfigError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    if args.accum_freq < 1 or args.batch_size < 1 or args.valid_batch_size < 1:
        raise ConfigError("--accum-freq, --batch-size and --valid-batch-size must be ≥ 1")
    if args.matryoshka_dims:
        from cn_clip.models.matryoshka import check_dims

        check_dims(args.matryoshka_dims, model.cfg.embed_dim)
    if args.distillation and not args.teacher_model_name:
        raise ConfigError("--distillation needs --teacher-model-name")
    if args.valid_at_start and not args.val_data:
        raise ConfigError("--valid-at-start needs --val-data")
    if args.use_flash_attention:
        from cn_clip.models.text import SDPA_NOTE

        _logger.info("Using FlashAttention: %s; validation runs under autocast, as in the reference.", SDPA_NOTE)


def _build_model(args: argparse.Namespace, env: DistEnv) -> Any:
    import torch

    from cn_clip.models.factory import create_model, load

    for path, what in ((args.clip_weight_path, "CLIP"), (args.bert_weight_path, "BERT")):
        if path and not os.path.isfile(path):
            raise ConfigError(f"Pretrained {what} weight not exists! ({path})")
    model = create_model(f"{args.vision_model.replace('/', '-')}@{args.text_model}", text_weights=True)
    load(model, "cpu", args.clip_weight_path, args.bert_weight_path)
    _check_args(args, model)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
        _logger.info("Grad-checkpointing activated.")
    if args.use_bn_sync and env.distributed and env.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.freeze_vision:
        for param in model.visual.parameters():
            param.requires_grad = False
        _logger.info("The visual encoder is freezed during training.")
    if args.freeze_text:
        for param in model.text_parameters():
            param.requires_grad = False
        _logger.info("The text encoder is frozen during training.")
    from cn_clip.training.unlock import lock_towers

    lock_towers(model, args.lock_text_unlocked_layers, args.lock_image_unlocked_groups)
    return model


def _attach_lora(args: argparse.Namespace, model: Any, ckpt: dict | None) -> None:
    """LoRA adapters after the weights are in; a LoRA checkpoint restores its unmerged base and adapters."""
    from cn_clip.training.params import lora_config

    cfg = lora_config(args)
    saved = ((ckpt or {}).get("cn_clip") or {}).get("lora")
    if cfg is None:
        if saved is not None:
            _logger.info("The checkpoint is a LoRA run's; training its merged weights without adapters")
        return
    from cn_clip.training.lora import attach

    attach(model, cfg, args.seed, saved)


def _resume_path(args: argparse.Namespace, checkpoint_dir: Path | None) -> Path | None:
    if args.resume:
        path = Path(args.resume).expanduser()
        from cn_clip.models.pretrained import PRETRAINED

        if not path.exists() and args.resume in PRETRAINED:  # a released name, e.g. --resume ViT-B-16
            from cn_clip.models.factory import released_file

            return released_file(args.resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint file (refusing to train from scratch)")
        return path
    if checkpoint_dir is not None and (checkpoint_dir / "epoch_latest.pt").is_file():
        path = checkpoint_dir / "epoch_latest.pt"
        _logger.warning("No --resume given: auto-resuming from %s (delete it or change --name to start fresh)", path)
        return path
    return None


def _load_weights(model: Any, path: Path) -> dict:
    from cn_clip.models.factory import load_checkpoint_into
    from cn_clip.weights import read_checkpoint

    _logger.info("=> begin to load checkpoint '%s'", path)
    ckpt = read_checkpoint(path)
    load_checkpoint_into(model, ckpt, str(path))  # grows an interpolated position table first
    return ckpt


def _prepare_logit_bias(args: argparse.Namespace, model: Any) -> None:
    """``--loss siglip`` needs the SigLIP bias (kept from a SigLIP checkpoint, else the paper's initial scale and
    bias); ``--loss clip`` has no use for one (an unused parameter would also stall DDP)."""
    if args.loss == "siglip" and not model.has_logit_bias:
        model.init_siglip()
        _logger.info("SigLIP loss: logit_scale = ln 10 and logit_bias = -10 (the SigLIP paper's initialisation)")
    elif args.loss == "clip" and model.has_logit_bias:
        _logger.info("--loss clip: dropping the checkpoint's SigLIP logit_bias (%.4f)", float(model.logit_bias))
        model.set_logit_bias(None)


def _restore_training_state(
    args: argparse.Namespace, engine: Any, ckpt: dict, path: Path, num_batches: int, ckdir: Any
) -> Any:
    from cn_clip.training.checkpoint import Position, resume_position

    position = Position()
    if not args.reset_data_offset:
        position = resume_position(ckpt, num_batches, args.accum_freq)
    if not args.reset_optimizer:
        if engine.is_deepspeed:
            if ckdir is not None and engine.load_extra(ckdir, "last"):
                _logger.info("=> optimizer state is restored from the DeepSpeed checkpoint")
        elif "optimizer" in ckpt:
            try:
                engine.load_optimizer_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{path}: optimizer state does not fit this model/flags ({exc})") from None
            extra = ckpt.get("cn_clip") or {}
            engine.load_scaler_state_dict(extra.get("scaler"))
            _logger.info("=> optimizer state is restored from the checkpoint")
        else:
            _logger.warning("%s has no optimizer state (a released file?): starting a fresh optimizer", path)
    _logger.info("=> loaded checkpoint '%s' (epoch %s @ %s steps)", path, ckpt.get("epoch"), ckpt.get("step"))
    return position


def _build_teacher(args: argparse.Namespace, env: DistEnv) -> Any:
    if not args.distillation:
        return None
    from cn_clip.runtime import local_primary_first
    from cn_clip.training.teacher import load_teacher

    towers = [t.strip() for t in args.distillation_towers.split(",") if t.strip()]
    with local_primary_first(env):  # a released teacher is downloaded once per node into the shared cache
        return load_teacher(args.teacher_model_name, env.device, args.teacher_download_root, towers)


def _build_retention(args: argparse.Namespace, env: DistEnv, engine: Any, ckpt: dict | None) -> Any:
    """The retention monitor of ``--retention-data``; a resumed run keeps the baseline its checkpoint recorded."""
    if not args.retention_data:
        return None
    from cn_clip.training.retention import RetentionMonitor

    if getattr(engine, "zero_stage", 0) == 3:
        raise ConfigError(
            "--retention-data does not work under DeepSpeed ZeRO-3 (parameters are partitioned outside the training "
            "forward); use ZeRO-1/2, or score checkpoints afterwards with cn_clip.eval.zeroshot_evaluation"
        )
    saved = ((ckpt or {}).get("cn_clip") or {}).get("retention_baseline") or {}
    baseline = saved.get("top1") if saved.get("data") == str(args.retention_data) else None
    return RetentionMonitor(
        args.retention_data,
        args.retention_warn,
        env.device,
        args.valid_batch_size,
        args.context_length,
        baseline=baseline,
        autocast=engine.autocast,
    )


def _log_params(args: argparse.Namespace, env: DistEnv, run_dir: Path | None, time_suffix: str) -> None:
    from cn_clip.fileio import atomic_write

    lines = [f"{name}: {getattr(args, name)}" for name in sorted(vars(args))]
    if env.is_primary:
        _logger.info("Params:")
        if run_dir is not None:
            with atomic_write(run_dir / f"params_{time_suffix}.txt") as handle:
                handle.write("".join(line + "\n" for line in lines))
    if env.is_local_primary:
        for line in lines:
            _logger.info("  %s", line)
    if env.device.type == "cuda":
        _logger.info("Use GPU: %d for training", env.local_rank)
    else:
        _logger.info("Use device: %s for training", env.device)


def _make_engine(args: argparse.Namespace, model: Any, env: DistEnv) -> Any:
    from cn_clip.training.engine import DeepSpeedEngine, Engine, resolve_deepspeed_config
    from cn_clip.training.optim import create_optimizer, param_groups

    scales = None
    if args.layer_decay is not None:
        from cn_clip.training.unlock import layer_scales

        if not 0 < args.layer_decay <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
        scales = layer_scales(model, args.layer_decay)
    groups = param_groups(model, args.wd, args.wd_groups, scales)
    optimizer = create_optimizer(groups, args.lr, (args.beta1, args.beta2), args.eps)
    if args.deepspeed:
        config = resolve_deepspeed_config(
            args.deepspeed_config, args.batch_size, args.accum_freq, env.world_size, args.precision, args.grad_clip_norm
        )
        if args.loss == "siglip" and int(config.get("zero_optimization", {}).get("stage", 0)) == 3:
            raise ConfigError("--loss siglip reads logit_bias outside forward, which ZeRO-3 partitions: use ZeRO 1/2")
        return DeepSpeedEngine(model, optimizer, env, config, args.precision)
    return Engine(model, optimizer, env, args.precision, args.grad_clip_norm, static_graph=args.grad_checkpointing)


def _tensorboard(args: argparse.Namespace, env: DistEnv, run_dir: Path | None) -> Any:
    if not (args.tensorboard and env.is_primary and run_dir is not None):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(args: argparse.Namespace) -> dict:
    """Build everything from parsed ``args`` and train; returns a summary (last loss, validation metrics)."""
    from cn_clip.data.loader import get_data
    from cn_clip.models.positions import check_context_length
    from cn_clip.runtime import cleanup, init_distributed, local_primary_first
    from cn_clip.tokenizer import get_tokenizer
    from cn_clip.training.checkpoint import Position
    from cn_clip.training.loop import Trainer, resolve_max_steps
    from cn_clip.training.params import data_config, train_config

    env = init_distributed(args.deepspeed, args.device)
    time_suffix = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d-%H-%M-%S")
    run_dir = _run_dir(args)
    _setup_logging(args, env, run_dir, time_suffix)
    checkpoint_dir = run_dir / "checkpoints" if run_dir is not None else None
    try:
        _seed_everything(args.seed, 0)  # identical initial weights on every rank
        model = _build_model(args, env)
        _seed_everything(args.seed, env.rank)
        with local_primary_first(env):  # a released name is downloaded once per node
            resume = _resume_path(args, checkpoint_dir)
        ckpt = _load_weights(model, resume) if resume else None
        check_context_length(model, args.context_length, args.interpolate_positions)  # after the weights it stretches
        _prepare_logit_bias(args, model)
        _attach_lora(args, model, ckpt)
        model.to(env.device)
        data_cfg = dataclasses.replace(data_config(args), tokenizer=get_tokenizer(model.cfg))
        data = get_data(data_cfg, env.world_size, env.rank, model.cfg.vision.image_resolution)
        args.max_steps, args.max_epochs = resolve_max_steps(
            args.max_steps, args.max_epochs, args.accum_freq, data["train"].num_batches
        )  # before the Params log, which shows the resolved values
        engine = _make_engine(args, model, env)
        _log_params(args, env, run_dir, time_suffix)
        position = Position()
        if ckpt is not None:
            position = _restore_training_state(args, engine, ckpt, resume, data["train"].num_batches, checkpoint_dir)
        trainer = Trainer(
            train_config(args),
            env,
            engine,
            data,
            checkpoint_dir,
            _build_teacher(args, env),
            _tensorboard(args, env, run_dir),
            retention=_build_retention(args, env, engine, ckpt),
        )
        _check_at_start(args, trainer, position)
        _run_epochs(args, trainer, position)
        if trainer.writer is not None:
            trainer.writer.close()
        losses = [float(x) for x in trainer.losses]
        return {
            "losses": losses,
            "validation": getattr(trainer, "last_validation", None),
            "distill_losses": [float(x) for x in trainer.kd_losses],
            "retention": trainer.retention_history,
        }
    finally:
        cleanup(env)


def _check_at_start(args: argparse.Namespace, trainer: Any, position: Any) -> None:
    """Pre-flight: retention before the first step and, with --valid-at-start, validation recall at this step."""
    if args.valid_at_start:
        trainer.validate(position.epoch, position.step)  # includes the retention check
    else:
        trainer.check_retention(position.step)


def _run_epochs(args: argparse.Namespace, trainer: Any, position: Any) -> None:
    from cn_clip.training.checkpoint import Position

    if "val" in trainer.data:
        for flag, value in (
            ("--valid-step-interval", args.valid_step_interval),
            ("--valid-epoch-interval", args.valid_epoch_interval),
        ):
            if value is not None and value <= 0:
                _logger.info("%s %s: this validation cadence is off", flag, value)

    epoch, start_batch = position.epoch, position.batch
    for epoch in range(position.epoch, args.max_epochs):
        _logger.info("Start epoch %d", epoch + 1)
        steps = trainer.train_epoch(epoch, start_batch if epoch == position.epoch else 0)
        done_step = min(trainer.steps_per_epoch * (epoch + 1), args.max_steps)
        epoch_done = done_step == trainer.steps_per_epoch * (epoch + 1)
        batch = trainer.num_batches if epoch_done else (done_step - trainer.steps_per_epoch * epoch) * args.accum_freq
        interval = args.valid_epoch_interval
        if "val" in trainer.data and interval and interval > 0 and (epoch + 1) % interval == 0:
            trainer.validate(epoch, done_step)
        elif "val" not in trainer.data and steps > 0:
            trainer.check_retention(done_step)
        if steps > 0:
            number = epoch + 1
            names = (
                [f"epoch{number}.pt"] if number == args.max_epochs or number % args.save_epoch_frequency == 0 else []
            )
            trainer.save(Position(epoch, batch, done_step), epoch_done, names or ["epoch_latest.pt"])


def main(argv: Sequence[str] | None = None) -> int:
    from cn_clip.training.params import parse_args

    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
