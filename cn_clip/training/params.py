"""Training flags: the reference's names and defaults (compatibility.md#training-flags), the shared groups of
cli/args.py, and additions."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cn_clip.cli.args import (
    add_context_length_arg,
    add_debug_arg,
    add_device_arg,
    add_model_args,
    add_num_workers_arg,
    add_precision_arg,
    add_resume_arg,
)
from cn_clip.data.loader import DataCfg, SplitCfg
from cn_clip.data.sources import add_source_args
from cn_clip.errors import ConfigError
from cn_clip.training.config import LoraCfg, LossCfg, TrainCfg
from cn_clip.training.optim import WD_GROUPS, default_hparams


def _data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--train-data", required=True, help="train split: LMDB dir, shards, CSV/JSONL, synthetic:N[:C]")
    group.add_argument("--val-data", default=None, help="validation split (same kinds); none = no validation")
    _source_args(group)
    add_num_workers_arg(group)  # the training loader
    group.add_argument("--valid-num-workers", type=int, default=1, help="validation DataLoader workers")
    group.add_argument("--batch-size", type=int, default=64, help="batch size per process")
    group.add_argument("--valid-batch-size", type=int, default=64, help="validation batch size per process")
    group.add_argument("--use-augment", action="store_true", default=False, help="random training augmentation")
    group.add_argument(
        "--on-bad-sample", choices=("fail", "skip"), default="fail", help="unreadable pair: stop (default) or skip"
    )


def _source_args(group: argparse._ArgumentGroup) -> None:
    """The readers beside LMDB (docs/data.md): WebDataset shards and CSV/JSONL lists of image files."""
    add_source_args(group)  # --dataset-type and the file-list columns
    group.add_argument("--train-num-samples", type=int, default=None, help="WebDataset: samples per epoch")
    group.add_argument("--val-num-samples", type=int, default=None, help="WebDataset: validation samples")
    group.add_argument("--dataset-resampled", action="store_true", default=False, help="shards drawn w/ replacement")
    group.add_argument(
        "--train-data-upsampling-factors", default=None, help="'::'-separated weights of the '::'-joined sources"
    )
    group.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True, help="shuffle training data")
    group.add_argument("--shuffle-window", type=int, default=1000, help="WebDataset: samples shuffled together")


def _log_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging and checkpoints")
    group.add_argument("--logs", default="./logs/", help="output root; 'none' or '' writes nothing")
    group.add_argument("--name", default="train_clip", help="experiment dir under --logs")
    group.add_argument("--log-interval", type=int, default=10, help="log every N steps")
    group.add_argument("--report-training-batch-acc", action="store_true", default=False, help="log in-batch acc")
    group.add_argument("--valid-step-interval", type=int, default=None, help="validate every N steps; none/0 = off")
    group.add_argument("--valid-epoch-interval", type=int, default=1, help="validate every N epochs; 0 = off")
    group.add_argument("--save-epoch-frequency", type=int, default=1, help="write epochN.pt every N epochs")
    group.add_argument("--save-step-frequency", type=int, default=-1, help="write epoch_E_S.pt every N steps")
    group.add_argument(
        "--keep-last-k", "--keep-last", dest="keep_last_k", type=int, default=0, help="keep the newest K epoch*.pt"
    )
    group.add_argument("--tensorboard", action="store_true", default=False, help="TensorBoard scalars in the run dir")
    add_debug_arg(group)


def _optim_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--max-steps", type=int, default=None, help="total optimizer steps (wins over --max-epochs)")
    group.add_argument("--max-epochs", type=int, default=32, help="epochs")
    group.add_argument("--lr", type=float, default=None, help="learning rate (default per model)")
    group.add_argument("--beta1", type=float, default=None, help="Adam beta1 (default per model)")
    group.add_argument("--beta2", type=float, default=None, help="Adam beta2 (default per model)")
    group.add_argument("--eps", type=float, default=None, help="Adam epsilon (default per model)")
    group.add_argument("--wd", type=float, default=0.2, help="weight decay of the decay group")
    group.add_argument("--wd-groups", choices=WD_GROUPS, default="reference", help="decay grouping (see optim.py)")
    group.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    group.add_argument("--skip-scheduler", action="store_true", default=False, help="constant LR")
    group.add_argument("--grad-clip-norm", type=float, default=None, help="clip the global grad norm")
    group.add_argument("--accum-freq", type=int, default=1, help="feature-caching accumulation over k micro-batches")
    group.add_argument("--seed", type=int, default=123, help="seeds the sampler, torch, FLIP masks, augmentation")


def _model_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_context_length_arg(parser, interpolate=True)
    add_precision_arg(parser)
    add_resume_arg(parser)
    group = parser.add_argument_group("model training")
    group.add_argument("--reset-optimizer", action="store_true", default=False, help="don't load optimizer state")
    group.add_argument("--reset-data-offset", action="store_true", default=False, help="don't restore epoch/step")
    group.add_argument("--mask-ratio", type=float, default=0, help="FLIP: fraction of patches dropped (ViT)")
    group.add_argument("--clip-weight-path", default=None, help="flat CLIP dict to initialise the image tower")
    group.add_argument("--bert-weight-path", default=None, help="flat BERT dict to initialise the text tower")
    group.add_argument("--freeze-vision", action="store_true", default=False, help="image tower frozen (LiT)")
    group.add_argument("--freeze-text", action="store_true", default=False, help="text tower frozen")
    group.add_argument("--grad-checkpointing", action="store_true", default=False, help="recompute activations")
    group.add_argument(
        "--use-flash-attention",
        action="store_true",
        default=False,
        help="kept for the reference's scripts: SDPA already picks the flash kernel on GPU; validation uses autocast",
    )
    group.add_argument("--use-bn-sync", action="store_true", default=False, help="SyncBatchNorm (ResNet)")


def _adaptation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adaptation (docs/adaptation.md)")
    group.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 = off (full fine-tuning)")
    group.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling alpha/r (default: alpha = r)")
    group.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    group.add_argument("--lora-towers", default="text,vision", help="comma list of text, vision")
    group.add_argument("--lora-targets", default="attn", help="attn or attn,mlp")
    group.add_argument(
        "--lora-train-proj", action="store_true", default=False, help="also train the projections and logit_scale"
    )
    group.add_argument(
        "--lock-text-unlocked-layers", type=int, default=None, help="freeze BERT except its last N layers"
    )
    group.add_argument(
        "--lock-image-unlocked-groups", type=int, default=None, help="freeze the image tower except its last N groups"
    )
    group.add_argument("--layer-decay", type=float, default=None, help="layer-wise LR decay G (projections at 1)")


def _matryoshka_dims(text: str) -> tuple[int, ...]:
    from cn_clip.models.matryoshka import parse_dims

    try:
        return parse_dims(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _loss_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loss")
    group.add_argument(
        "--loss", choices=("clip", "siglip"), default="clip", help="clip: softmax InfoNCE; siglip: pairwise sigmoid"
    )
    group.add_argument("--gather-with-grad", action="store_true", default=False, help="autograd all-gather")
    group.add_argument("--skip-aggregate", action="store_true", default=False, help="local [B, B] loss only")
    group.add_argument("--local-loss", action="store_true", default=False, help="only this rank's rows (O(B·N))")
    group.add_argument(
        "--mask-duplicates",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pairs sharing an image or text id are not negatives (--no-mask-duplicates: the reference)",
    )
    group.add_argument(
        "--matryoshka-dims",
        type=_matryoshka_dims,
        default=(),
        help="nested-dimension losses over these leading feature widths, e.g. 512,256,128,64",
    )
    group.add_argument("--distillation", action="store_true", default=False, help="feature distillation")
    group.add_argument(
        "--teacher-model-name", default=None, help="teacher: released name, checkpoint file or Hugging Face folder"
    )
    group.add_argument(
        "--kd_loss_weight", "--distillation-weight", type=float, default=0.5, help="weight of each distillation loss"
    )


def _adaptation_check_args(parser: argparse.ArgumentParser) -> None:
    """Distillation extras and the retention / pre-flight checks (docs/training.md)."""
    group = parser.add_argument_group("distillation and retention")
    group.add_argument(
        "--distillation-towers", default="image,text", help="towers whose features are distilled: image, text or both"
    )
    group.add_argument("--teacher-download-root", default=None, help="released teachers' cache (default ~/.cache/clip)")
    group.add_argument("--retention-data", default=None, help="zero-shot set (label_cn.txt + class folders) to watch")
    group.add_argument("--retention-warn", type=float, default=5.0, help="warn when retention top-1 drops > N points")
    group.add_argument("--valid-at-start", action="store_true", default=False, help="validate before the first step")


def _launcher_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launcher")
    group.add_argument("--deepspeed", action="store_true", default=False, help="run under DeepSpeed")
    group.add_argument("--deepspeed_config", "--deepspeed-config", default=None, help="DeepSpeed JSON config")
    add_device_arg(group)
    # the deepspeed launcher appends --local_rank=N; the rank is read from the environment instead
    group.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cn_clip.training.main", description="Contrastive fine-tuning of Chinese CLIP."
    )
    for add in (
        _data_args, _log_args, _optim_args, _model_args, _adaptation_args, _loss_args, _adaptation_check_args,
        _launcher_args,
    ):  # fmt: skip
        add(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    lr, (beta1, beta2), eps = default_hparams(args.vision_model)
    for name, value in (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.aggregate = not args.skip_aggregate
    return args


def data_config(args: argparse.Namespace) -> DataCfg:
    """The data layer's settings from the parsed flags."""
    factors = args.train_data_upsampling_factors
    train = SplitCfg(args.train_data, args.batch_size, args.num_workers, args.use_augment, args.train_num_samples)
    val = SplitCfg(args.val_data, args.valid_batch_size, args.valid_num_workers, num_samples=args.val_num_samples)
    return DataCfg(
        train=train,
        val=val if args.val_data else None,
        context_length=args.context_length,
        seed=args.seed,
        on_bad_sample=args.on_bad_sample,
        dataset_type=args.dataset_type,
        shuffle=args.shuffle,
        resampled=args.dataset_resampled,
        upsampling_factors=tuple(float(x) for x in factors.split("::")) if factors else None,
        shuffle_window=args.shuffle_window,
        csv_img_key=args.csv_img_key,
        csv_caption_key=args.csv_caption_key,
        csv_separator=args.csv_separator,
    )


def _comma_list(flag: str, value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    bad = [item for item in items if item not in allowed]
    if not items or bad:
        raise ConfigError(f"{flag} {value!r}: use a comma list of {', '.join(allowed)}")
    return tuple(item for item in allowed if item in items)


def lora_config(args: argparse.Namespace) -> LoraCfg | None:
    """``None`` without ``--lora-r``; otherwise the checked adapter settings."""
    if not args.lora_r:
        return None
    if args.lora_r < 0:
        raise ConfigError(f"--lora-r must be ≥ 0, got {args.lora_r}")
    if not 0 <= args.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    towers = _comma_list("--lora-towers", args.lora_towers, ("text", "vision"))
    for flag, tower in (("--freeze-text", "text"), ("--freeze-vision", "vision")):
        if getattr(args, flag[2:].replace("-", "_")) and tower in towers:
            raise ConfigError(f"{flag} with --lora-towers {args.lora_towers}: drop {tower} from --lora-towers")
    for flag in ("--lock-text-unlocked-layers", "--lock-image-unlocked-groups", "--layer-decay"):
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            raise ConfigError(f"{flag} does not combine with --lora-r (LoRA freezes the whole base model)")
    return LoraCfg(
        r=args.lora_r,
        alpha=float(args.lora_alpha if args.lora_alpha is not None else args.lora_r),
        dropout=args.lora_dropout,
        towers=towers,
        targets=_comma_list("--lora-targets", args.lora_targets, ("attn", "mlp")),
        train_proj=args.lora_train_proj,
    )


def train_config(args: argparse.Namespace) -> TrainCfg:
    """The loop's settings from the parsed flags (``max_steps``/``max_epochs`` already resolved)."""
    loss = LossCfg(
        kind=args.loss,
        aggregate=args.aggregate,
        gather_with_grad=args.gather_with_grad,
        local_loss=args.local_loss,
        mask_duplicates=args.mask_duplicates,
        kd_loss_weight=args.kd_loss_weight,
        matryoshka_dims=args.matryoshka_dims,
    )
    same = (
        "name", "max_steps", "max_epochs", "lr", "warmup", "skip_scheduler", "accum_freq", "seed", "mask_ratio",
        "freeze_vision", "freeze_text", "use_flash_attention", "log_interval", "report_training_batch_acc",
        "valid_step_interval", "save_step_frequency", "keep_last_k",
    )  # fmt: skip
    values = {name: getattr(args, name) for name in same}
    lora = lora_config(args)
    if lora is not None:  # a tower without adapters is frozen: it runs in eval mode like --freeze-*
        values["freeze_text"] = values["freeze_text"] or "text" not in lora.towers
        values["freeze_vision"] = values["freeze_vision"] or "vision" not in lora.towers
    return TrainCfg(loss=loss, lora=lora, **values)
