"""Forgetting experiment on the demo data (CPU, a few minutes): adapt a model to new classes, measure what it kept.

1. The 22 demo classes are split in two halves: "old" (classes 0–10) and "new" (11–21).
2. A tiny ViT-Tiny@BERT-Tiny-chinese model is trained from scratch on the old half: the "pretrained" model.
3. It is adapted to the new half in several ways, each with the same data, steps and seed:
   full fine-tuning; LoRA (``--lora-r``) and locked layers (``--lock-image-unlocked-groups`` /
   ``--lock-text-unlocked-layers``) when this trainer has those flags; a locked image tower (``--freeze-vision``);
   and WiSE-FT between the pretrained and the fully fine-tuned weights over α.
4. Target = mean recall (%) on the new half's valid split; retention = zero-shot top-1 (%) on the old half's classes
   (``demo_cls`` valid+test views, Chinese class-name prompts), plus the old valid split's mean recall.

The goal the table is read against: a configuration that beats full fine-tuning on retention while keeping at least
90 % of its target gain over the pretrained model ("kept gain").

    .venv/bin/python benchmarks/forgetting.py [--out /tmp/forgetting] [--pretrain-epochs 15] [--adapt-epochs 8]
        [--alphas 0,0.2,0.4,0.5,0.6,0.8,1] [--results benchmarks/results/forgetting]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCH_FLAGS = ["--vision-model", "ViT-Tiny", "--text-model", "BERT-Tiny-chinese"]
VIEWS_PER_CLASS = 16  # make_demo's default: image ids run class by class, 16 per class
OLD, NEW = range(0, 11), range(11, 22)


# ------------------------------------------------------------------------------------------------------ data
def _class_of_image(image_id: int) -> int:
    return (image_id - 1) // VIEWS_PER_CLASS


def split_demo(out: Path) -> dict[str, Path]:
    """Demo data → ``old``/``new`` retrieval LMDBs (train, valid) and the old half's zero-shot folder."""
    from cn_clip.data.demo import make_demo
    from cn_clip.data.lmdb_build import build_lmdb

    make_demo(out / "demo_raw")
    raw = out / "demo_raw" / "datasets" / "demo"
    paths: dict[str, Path] = {}
    for half, classes in (("old", OLD), ("new", NEW)):
        root = out / half
        root.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid"):
            rows = [r for r in (raw / f"{split}_imgs.tsv").read_text().splitlines() if r]
            keep = {int(r.split("\t", 1)[0]) for r in rows if _class_of_image(int(r.split("\t", 1)[0])) in classes}
            (root / f"{split}_imgs.tsv").write_text("".join(r + "\n" for r in rows if int(r.split("\t")[0]) in keep))
            texts = [t for t in (raw / f"{split}_texts.jsonl").read_text(encoding="utf-8").splitlines() if t]
            kept = [t for t in texts if json.loads(t)["image_ids"][0] in keep]
            (root / f"{split}_texts.jsonl").write_text("".join(t + "\n" for t in kept), encoding="utf-8")
        build_lmdb(root, ["train", "valid"], overwrite=True)
        paths[f"{half}_train"], paths[f"{half}_valid"] = root / "lmdb" / "train", root / "lmdb" / "valid"
    cls = out / "demo_raw" / "datasets" / "demo_cls"
    retention = out / "old_cls"
    shutil.rmtree(retention, ignore_errors=True)
    (retention / "test").mkdir(parents=True)
    labels = (cls / "label_cn.txt").read_text(encoding="utf-8").splitlines()
    (retention / "label_cn.txt").write_text("".join(labels[c] + "\n" for c in OLD), encoding="utf-8")
    for c in OLD:
        shutil.copytree(cls / "test" / f"{c:03d}", retention / "test" / f"{c:03d}")
    paths["old_cls"] = retention
    return paths


# -------------------------------------------------------------------------------------------------- training
def trainer_flags() -> set[str]:
    from cn_clip.training.params import build_parser

    return {option for action in build_parser()._actions for option in action.option_strings}


def run_training(logs: Path, name: str, train_data: Path, epochs: int, lr: float, *extra: str) -> Path:
    from cn_clip.training.main import train
    from cn_clip.training.params import parse_args

    argv = [
        "--train-data", str(train_data), *ARCH_FLAGS, "--batch-size", "32", "--num-workers", "0",
        "--logs", str(logs), "--name", name, "--lr", str(lr), "--warmup", "10", "--wd", "0.001",
        "--max-epochs", str(epochs), "--precision", "fp32", "--log-interval", "1000", "--valid-epoch-interval", "0",
        "--save-epoch-frequency", str(epochs), "--seed", "123", "--device", "cpu", *extra,
    ]  # fmt: skip
    start = time.time()
    train(parse_args(argv))
    logging.getLogger("forgetting").info("trained %s in %.0f s", name, time.time() - start)
    return logs / name / "checkpoints" / "epoch_latest.pt"


def variants(flags: set[str], pretrained: Path, lora_lr: float) -> list[tuple[str, float | None, list[str]]]:
    """``(label, lr override, extra flags)`` of each adaptation this trainer supports."""
    start = ["--resume", str(pretrained), "--reset-data-offset", "--reset-optimizer"]
    out: list[tuple[str, float | None, list[str]]] = [("full fine-tuning", None, start)]
    if "--lora-r" in flags:
        out.append(("LoRA r=8 (both towers)", lora_lr, [*start, "--lora-r", "8"]))
    if "--lock-image-unlocked-groups" in flags and "--lock-text-unlocked-layers" in flags:
        locked = ["--lock-image-unlocked-groups", "1", "--lock-text-unlocked-layers", "1"]
        out.append(("locked layers (last block of each tower trains)", None, [*start, *locked]))
    out.append(("locked image tower (--freeze-vision)", None, [*start, "--freeze-vision"]))
    return out


# -------------------------------------------------------------------------------------------------- scoring
def score(state: dict, paths: dict[str, Path]) -> dict[str, float]:
    from cn_clip.models.factory import create_model, load_checkpoint_into
    from cn_clip.training.retention import open_retention_set, zero_shot_top1
    from cn_clip.training.wise_ft import target_recall

    model = create_model("ViT-Tiny@BERT-Tiny-chinese")
    load_checkpoint_into(model, state)
    return {
        "target_mean_recall": target_recall(model, str(paths["new_valid"]))["mean_recall"],
        "retention_top1": zero_shot_top1(model, open_retention_set(paths["old_cls"])),
        "old_mean_recall": target_recall(model, str(paths["old_valid"]))["mean_recall"],
    }


def read_state(path: Path) -> dict:
    from cn_clip.training.wise_ft import read_endpoint

    return read_endpoint(str(path))


def add_gains(rows: list[dict], base: dict, full: dict) -> None:
    full_gain = full["target_mean_recall"] - base["target_mean_recall"]
    for row in rows:
        gain = row["target_mean_recall"] - base["target_mean_recall"]
        row["kept_gain_pct"] = 100.0 * gain / full_gain if full_gain > 0 else float("nan")
        row["meets_goal"] = bool(
            row["method"] != "full fine-tuning"
            and row["retention_top1"] > full["retention_top1"]
            and row["kept_gain_pct"] >= 90.0
        )


# -------------------------------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    head = "| method | target mean recall (new) | retention top-1 (old) | old mean recall | kept gain | goal |"
    lines = [head, "|---|---:|---:|---:|---:|:-:|"]
    for r in rows:
        kept = "—" if r["method"] == "pretrained (old half only)" else f"{r['kept_gain_pct']:.0f} %"
        lines.append(
            f"| {r['method']} | {r['target_mean_recall']:.2f} | {r['retention_top1']:.2f} | "
            f"{r['old_mean_recall']:.2f} | {kept} | {'yes' if r['meets_goal'] else ''} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from cn_clip.extras import require

    matplotlib = require("matplotlib", "the forgetting plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    wise = [r for r in rows if r["method"].startswith("WiSE-FT")]
    curve = [rows[0], *wise, rows[1]]  # α = 0 is the pretrained model, α = 1 the fully fine-tuned one
    ax.plot([r["retention_top1"] for r in curve], [r["target_mean_recall"] for r in curve], "o-", label="WiSE-FT (α)")
    for r in wise:
        ax.annotate(r["method"].split("=")[1], (r["retention_top1"], r["target_mean_recall"]), xytext=(3, 3),
                    textcoords="offset points", fontsize=8)  # fmt: skip
    for r in rows:
        if not r["method"].startswith("WiSE-FT"):
            ax.plot([r["retention_top1"]], [r["target_mean_recall"]], "s", markersize=8, label=r["method"])
    ax.set_xlabel("retention: zero-shot top-1 on the old classes (%)")
    ax.set_ylabel("target: mean recall on the new classes (%)")
    ax.set_title("Adapting without forgetting (demo data, ViT-Tiny, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/cn_clip_forgetting", help="work directory (data, runs)")
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--adapt-epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="pretraining and fine-tuning learning rate")
    parser.add_argument("--lora-lr", type=float, default=5e-3, help="LoRA's learning rate (adapters start at 0)")
    parser.add_argument("--alphas", default="0,0.2,0.4,0.5,0.6,0.8,1")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "forgetting"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from cn_clip.cli.runner import setup_logging

    setup_logging(logging.WARNING)
    logging.getLogger("forgetting").setLevel(logging.INFO)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out)
    start = time.time()
    paths = split_demo(out)
    logs = out / "runs"
    shutil.rmtree(logs, ignore_errors=True)
    pretrained = run_training(logs, "pretrained", paths["old_train"], args.pretrain_epochs, args.lr)
    base_state = read_state(pretrained)
    rows = [{"method": "pretrained (old half only)", **score(base_state, paths)}]
    flags = trainer_flags()
    states = {}
    for label, lr, extra in variants(flags, pretrained, args.lora_lr):
        name = label.split(" (")[0].replace(" ", "_").replace("=", "")
        ckpt = run_training(logs, name, paths["new_train"], args.adapt_epochs, lr or args.lr, *extra)
        states[label] = read_state(ckpt)
        rows.append({"method": label, **score(states[label], paths)})
    from cn_clip.training.wise_ft import interpolate

    full = states["full fine-tuning"]
    for alpha in [float(a) for a in args.alphas.split(",")]:
        if alpha in (0.0, 1.0):
            continue  # the pretrained and the fully fine-tuned rows
        rows.append({"method": f"WiSE-FT α={alpha:g}", **score(interpolate(base_state, full, alpha), paths)})
    add_gains(rows, rows[0], rows[1])
    missing = [f for f in ("--lora-r", "--lock-image-unlocked-groups") if f not in flags]
    header = (
        f"Forgetting on the demo data: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}; {args.pretrain_epochs} pretraining / {args.adapt_epochs} adaptation epochs, "
        f"lr {args.lr:g} (LoRA {args.lora_lr:g}); total {time.time() - start:.0f} s"
        + (f"; not run (flags absent in this trainer): {', '.join(missing)}" if missing else "")
    )
    text = header + "\n\n" + table(rows)
    print(text)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    results.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    plot(rows, results.with_suffix(".png"))
    print(f"wrote {results.with_suffix('.md')}, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
