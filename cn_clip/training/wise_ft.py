"""WiSE-FT (Wortsman et al., 2022): weight-space interpolation between a zero-shot and a fine-tuned checkpoint.

    python -m cn_clip.training.wise_ft --zeroshot A.pt --finetuned B.pt --alpha 0.5 --out C.pt
    python -m cn_clip.training.wise_ft --zeroshot A.pt --finetuned B.pt --alphas 0,0.25,0.5,0.75,1 \\
        --eval-data DATAPATH/datasets/MUGE/lmdb/valid --retention-data DATAPATH/datasets/cifar-100 \\
        --max-retention-drop 2 --out C.pt --report-dir wise_ft/

The result, ``(1 − α)·A + α·B`` key by key, is a reference-format checkpoint (``module.`` keys, ``epoch``/``step``/
``name``, no optimizer) that loads everywhere a fine-tuned one does. ``--zeroshot`` may also be a released name
(``ViT-B-16``), read from the download cache. With ``--alphas`` every α is scored on the target validation split
(mean recall, as the trainer's validation computes it) and on a retention zero-shot set (top-1, see
``training/retention.py``); the table is printed and written as JSON and a PNG plot, and the α with the best target
score whose retention is at most ``--max-retention-drop`` points below the zero-shot model's is picked (and written
to ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cn_clip.cli.args import add_context_length_arg, add_device_arg, add_num_workers_arg
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.errors import CheckpointError, ConfigError
from cn_clip.weights import key_differences, listed_keys

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- interpolation
def read_endpoint(spec: str, download_root: str | None = None) -> dict[str, torch.Tensor]:
    """The clean state dict (no ``module.``) of a checkpoint file or a released model name."""
    from cn_clip.models.pretrained import PRETRAINED
    from cn_clip.weights import clean_state_dict, read_checkpoint, state_dict_of

    path = Path(spec).expanduser()
    if not path.exists() and spec in PRETRAINED:
        from cn_clip.models.factory import released_file

        path = released_file(spec, download_root)
    return clean_state_dict(state_dict_of(read_checkpoint(path), str(path)))


def check_same_architecture(
    zeroshot: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], names: tuple[str, str] = ("A", "B")
) -> None:
    """Same keys with the same shapes, or a :class:`CheckpointError` that names the keys that differ."""
    only_b, only_a, reshaped = key_differences(finetuned, zeroshot)
    shapes = [f"{k} {list(zeroshot[k].shape)} vs {list(finetuned[k].shape)}" for k in reshaped]
    if not (only_a or only_b or shapes):
        return
    parts = []
    if only_a:
        parts.append(f"only in {names[0]}: {listed_keys(only_a)}")
    if only_b:
        parts.append(f"only in {names[1]}: {listed_keys(only_b)}")
    if shapes:
        parts.append(f"shapes differ: {listed_keys(shapes)}")
    detail = "; ".join(parts)
    raise CheckpointError(f"{names[0]} and {names[1]} are different architectures, cannot interpolate ({detail})")


def interpolate(
    zeroshot: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 − alpha)·zeroshot + alpha·finetuned`` per key, in the finetuned key order.

    ``alpha`` 0 and 1 return exact copies of the endpoints. Floating tensors are mixed in the wider of the two
    dtypes; integer buffers (BatchNorm's ``num_batches_tracked``) come from the nearer endpoint.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    check_same_architecture(zeroshot, finetuned)
    out: dict[str, torch.Tensor] = {}
    for key, b in finetuned.items():
        a = zeroshot[key]
        if alpha == 0.0 or (not b.is_floating_point() and alpha < 0.5):
            out[key] = a.clone()
        elif alpha == 1.0 or not b.is_floating_point():
            out[key] = b.clone()
        else:
            dtype = torch.promote_types(a.dtype, b.dtype)
            out[key] = (1.0 - alpha) * a.to(dtype) + alpha * b.to(dtype)
    return out


def save_checkpoint(state: Mapping[str, torch.Tensor], path: str | Path, name: str) -> Path:
    """Write ``state`` as a reference-format checkpoint, atomically."""
    from cn_clip.fileio import atomic_torch_save

    payload = {"epoch": 0, "step": 0, "name": name, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    atomic_torch_save(payload, path)
    return Path(path)


# --------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def target_recall(
    model: Any,
    split_dir: str,
    device: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    context_length: int = 52,
) -> dict[str, float]:
    """Text→image / image→text R@1/5/10 and their mean (%) of ``model`` on an LMDB split (as ``--val-data``)."""
    from cn_clip.data.loader import DataCfg, SplitCfg, build_split
    from cn_clip.training.loop import pair_recall

    split = SplitCfg(split_dir, batch_size, num_workers)
    info = build_split(
        "val", split, DataCfg(train=split, context_length=context_length), 1, 0, model.cfg.vision.image_resolution
    )
    was_training = model.training
    model.eval()
    images, texts, image_keys, text_keys = [], [], [], []
    for raw_images, raw_texts, _eos, raw_image_keys, raw_text_keys in info.dataloader:
        images.append(model.encode_image(raw_images.to(device)).float())
        texts.append(model.encode_text(raw_texts.to(device)).float())
        image_keys.append(raw_image_keys)
        text_keys.append(raw_text_keys)
    model.train(was_training)
    image = torch.nn.functional.normalize(torch.cat(images), dim=-1)
    text = torch.nn.functional.normalize(torch.cat(texts), dim=-1)
    return pair_recall(image, text, torch.cat(image_keys), torch.cat(text_keys))


@dataclasses.dataclass(frozen=True)
class SweepRow:
    alpha: float
    mean_recall: float  # target validation split, %
    retention_top1: float  # retention zero-shot set, %
    retention_drop: float  # points below the zero-shot model (alpha 0); negative = better


@dataclasses.dataclass(frozen=True)
class SweepCfg:
    eval_data: str  # LMDB split dir of the target task's validation pairs
    retention_data: str  # ELEVATER zero-shot folder (label_cn.txt + class folders)
    device: str = "cpu"
    batch_size: int = 64
    num_workers: int = 0
    context_length: int = 52


def sweep(
    zeroshot: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], alphas: Sequence[float], cfg: SweepCfg
) -> list[SweepRow]:
    """Score every α (and α = 0 for the retention baseline, whether listed or not)."""
    from cn_clip.models.factory import create_model, infer_architecture, load_checkpoint_into
    from cn_clip.training.retention import open_retention_set, zero_shot_top1

    check_same_architecture(zeroshot, finetuned)
    rset = open_retention_set(cfg.retention_data)
    model = create_model(infer_architecture(finetuned), device=cfg.device)
    scores: dict[float, tuple[float, float]] = {}
    for alpha in sorted({0.0, *alphas}):
        load_checkpoint_into(model, interpolate(zeroshot, finetuned, alpha))
        model.to(cfg.device).eval()
        recall = target_recall(model, cfg.eval_data, cfg.device, cfg.batch_size, cfg.num_workers, cfg.context_length)
        top1 = zero_shot_top1(model, rset, cfg.device, cfg.batch_size, cfg.num_workers, cfg.context_length)
        scores[alpha] = (recall["mean_recall"], top1)
        _logger.info("alpha %.3g: target mean recall %.2f, retention top-1 %.2f", alpha, *scores[alpha])
    base = scores[0.0][1]
    return [SweepRow(a, scores[a][0], scores[a][1], base - scores[a][1]) for a in alphas]


def pick_alpha(rows: Sequence[SweepRow], max_retention_drop: float) -> SweepRow:
    """The best target score among the rows within the allowed retention drop (ties: the smaller α)."""
    allowed = [r for r in rows if r.retention_drop <= max_retention_drop]
    if not allowed:
        raise ConfigError(
            f"no alpha keeps retention within {max_retention_drop} points of the zero-shot model; "
            "add smaller alphas (0 is always allowed) or raise --max-retention-drop"
        )
    return max(allowed, key=lambda r: (r.mean_recall, -r.alpha))


def format_table(rows: Sequence[SweepRow], best: SweepRow | None = None) -> str:
    lines = [f"{'alpha':>6} | {'target mean recall':>18} | {'retention top-1':>15} | {'retention drop':>14}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        mark = "  <- picked" if best is not None and r.alpha == best.alpha else ""
        lines.append(
            f"{r.alpha:>6.3g} | {r.mean_recall:>18.2f} | {r.retention_top1:>15.2f} | {r.retention_drop:>14.2f}{mark}"
        )
    return "\n".join(lines)


def write_report(rows: Sequence[SweepRow], best: SweepRow, max_drop: float, report_dir: str | Path) -> list[Path]:
    """``wise_ft_sweep.json`` and ``wise_ft_sweep.png`` (target score against retention) in ``report_dir``."""
    from cn_clip.fileio import atomic_write

    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "rows": [dataclasses.asdict(r) for r in rows],
        "picked": dataclasses.asdict(best),
        "max_retention_drop": max_drop,
    }
    with atomic_write(out / "wise_ft_sweep.json") as handle:
        handle.write(json.dumps(payload, indent=1) + "\n")
    plot_sweep(rows, best, out / "wise_ft_sweep.png")
    return [out / "wise_ft_sweep.json", out / "wise_ft_sweep.png"]


def plot_sweep(rows: Sequence[SweepRow], best: SweepRow | None, path: str | Path, title: str = "WiSE-FT") -> None:
    """Target mean recall (y) against retention top-1 (x), one point per α, joined in α order."""
    from cn_clip.extras import require
    from cn_clip.fileio import atomic_write

    matplotlib = require("matplotlib", "the WiSE-FT plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    ax.plot([r.retention_top1 for r in rows], [r.mean_recall for r in rows], "o-", color="tab:blue")
    for r in rows:
        ax.annotate(f"α={r.alpha:g}", (r.retention_top1, r.mean_recall), textcoords="offset points", xytext=(4, 4))
    if best is not None:
        ax.plot([best.retention_top1], [best.mean_recall], "*", color="tab:red", markersize=14, label="picked")
        ax.legend(loc="best")
    ax.set_xlabel("retention: zero-shot top-1 (%)")
    ax.set_ylabel("target: mean recall (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- CLI
def _alphas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alphas {text!r}: comma-separated numbers, e.g. 0,0.5,1") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"--alphas {text!r}: every alpha must be in [0, 1]")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cn_clip.training.wise_ft",
        description="WiSE-FT: interpolate a zero-shot and a fine-tuned checkpoint, optionally searching alpha.",
    )
    parser.add_argument("--zeroshot", required=True, help="the starting checkpoint, or a released name (ViT-B-16)")
    parser.add_argument("--finetuned", required=True, help="the fine-tuned checkpoint (same architecture)")
    parser.add_argument("--download-root", default=None, help="cache of released weights (default ~/.cache/clip)")
    parser.add_argument("--out", default=None, help="write the interpolated (or the picked) checkpoint here")
    mix = parser.add_mutually_exclusive_group(required=True)
    mix.add_argument("--alpha", type=float, default=None, help="weight of the fine-tuned model, in [0, 1]")
    mix.add_argument("--alphas", type=_alphas, default=None, help="comma-separated alphas to score, e.g. 0,0.5,1")
    sweep_group = parser.add_argument_group("alpha search (with --alphas)")
    sweep_group.add_argument("--eval-data", default=None, help="target validation split: LMDB dir (as --val-data)")
    sweep_group.add_argument("--retention-data", default=None, help="zero-shot set: label_cn.txt + class folders")
    sweep_group.add_argument(
        "--max-retention-drop", type=float, default=1.0, help="points of retention top-1 one may lose (default 1)"
    )
    sweep_group.add_argument("--report-dir", default=".", help="where wise_ft_sweep.json / .png go")
    sweep_group.add_argument("--batch-size", type=int, default=64, help="images / texts per batch")
    add_num_workers_arg(sweep_group)
    add_context_length_arg(sweep_group)
    add_device_arg(sweep_group)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    if args.alphas is not None and not (args.eval_data and args.retention_data):
        raise ConfigError("--alphas needs --eval-data (LMDB split) and --retention-data (zero-shot folder)")
    if args.alpha is not None and args.out is None:
        raise ConfigError("--alpha needs --out (where to write the interpolated checkpoint)")
    zeroshot = read_endpoint(args.zeroshot, args.download_root)
    finetuned = read_endpoint(args.finetuned, args.download_root)
    check_same_architecture(zeroshot, finetuned, (args.zeroshot, args.finetuned))
    alpha = args.alpha
    if args.alphas is not None:
        from cn_clip.runtime import resolve_device

        cfg = SweepCfg(
            args.eval_data,
            args.retention_data,
            resolve_device(args.device),
            args.batch_size,
            args.num_workers,
            args.context_length,
        )
        rows = sweep(zeroshot, finetuned, args.alphas, cfg)
        best = pick_alpha(rows, args.max_retention_drop)
        print(format_table(rows, best))
        for path in write_report(rows, best, args.max_retention_drop, args.report_dir):
            print(f"wrote {path}")
        alpha = best.alpha
        print(f"picked alpha {alpha:g} (retention within {args.max_retention_drop:g} points of the zero-shot model)")
    if args.out is not None:
        name = f"wise-ft alpha={alpha:g} of {Path(args.zeroshot).name} and {Path(args.finetuned).name}"
        save_checkpoint(interpolate(zeroshot, finetuned, alpha), args.out, name)
        print(f"wrote {args.out} (alpha {alpha:g})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
