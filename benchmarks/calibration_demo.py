"""Scores on the demo: calibration of the CLIP-loss model, and SigLIP against CLIP loss with the same recipe.

Replays ``make demo``'s steps into ``--out`` (demo data → LMDB → the demo recipe: ViT-Tiny + BERT-Tiny-chinese from
scratch, batch 32, 10 epochs, lr 1e-3, fp32 on the CPU), once with ``--loss clip`` and once with ``--loss siglip``
(each timed), then on the demo validation split:

- retrieval recall of both models (``cn_clip.eval.run``), the baseline being the CLIP loss;
- calibration of both models' cosines (``cn_clip.eval.calibrate`` with its defaults: 5 hardest + 5 random negatives
  per text, 30 % of the texts held out): ECE / Brier / ROC-AUC of the raw cosine, of the softmax over all
  candidates (the model's own temperature), of Platt, isotonic and temperature calibration and, for SigLIP, of its
  own sigmoid; the cosine threshold for 90 % precision; the two plots (copied to ``--plots-dir``).

    .venv/bin/python benchmarks/calibration_demo.py --out /tmp/scores_demo [--plots-dir docs/images]

Existing checkpoints in ``--out`` are reused (with the training minutes recorded when they were made).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--vision-model", "ViT-Tiny", "--text-model", "BERT-Tiny-chinese"]
RECIPE = [
    "--batch-size", "32", "--valid-batch-size", "44", "--max-epochs", "10", "--lr", "1e-3", "--warmup", "10",
    "--wd", "0.001", "--log-interval", "2", "--valid-step-interval", "0", "--valid-epoch-interval", "1",
    "--save-step-frequency", "999999", "--save-epoch-frequency", "1", "--report-training-batch-acc",
    "--context-length", "52", "--accum-freq", "1", "--mask-ratio", "0", "--precision", "fp32",
    "--num-workers", "1", "--valid-num-workers", "1", *MODEL,
]  # fmt: skip
METHODS = ("platt", "isotonic", "temperature")


def _python(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", *args], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)


def build_data(out: Path) -> Path:
    data = out / "datasets" / "demo"
    if not (data / "lmdb" / "train" / "pairs" / "data.mdb").is_file():
        _python("cn_clip.preprocess.make_demo_dataset", "--out", str(out))
        _python("cn_clip.preprocess.build_lmdb_dataset", "--data_dir", str(data), "--splits", "train,valid,test",
                "--overwrite")  # fmt: skip
    return data


def train(out: Path, data: Path, loss: str) -> tuple[Path, float]:
    """The demo recipe with ``--loss``; returns the checkpoint and the training wall-clock minutes."""
    name = f"demo_{loss}"
    ckpt = out / "experiments" / name / "checkpoints" / "epoch_latest.pt"
    stamp = ckpt.with_name("train_minutes.json")
    if not (ckpt.is_file() and stamp.is_file()):
        start = time.time()
        _python("cn_clip.training.main", "--train-data", str(data / "lmdb" / "train"), "--val-data",
                str(data / "lmdb" / "valid"), "--logs", str(out / "experiments"), "--name", name, "--loss", loss,
                *RECIPE)  # fmt: skip
        stamp.write_text(json.dumps({"minutes": (time.time() - start) / 60}))
    return ckpt, json.loads(stamp.read_text())["minutes"]


def evaluate(out: Path, data: Path, loss: str, ckpt: Path) -> dict:
    """``eval.run --calibrate`` (Platt) on the valid split, then the other methods on the same feature files."""
    from cn_clip.eval.calibrate import FitOptions, calibrate_features, ground_truth_rows, model_scale_and_bias
    from cn_clip.eval.featio import read_feature_files

    eval_dir = out / "eval" / loss
    _python("cn_clip.eval.run", "--data", str(data), "--split", "valid", "--resume", str(ckpt), *MODEL,
            "--output-dir", str(eval_dir), "--num-workers", "1", "--precision", "fp32", "--no-progress",
            "--calibrate", "platt")  # fmt: skip
    summary = json.loads((eval_dir / "summary.json").read_text())
    images, texts = read_feature_files(
        [(eval_dir / "valid_imgs.img_feat.jsonl", "image_id"), (eval_dir / "valid_texts.txt_feat.jsonl", "text_id")]
    )
    truth = ground_truth_rows(data / "valid_texts.jsonl")
    scale, bias = model_scale_and_bias(ckpt)
    fits = {}
    for method in (*METHODS, *(("siglip",) if bias is not None else ())):
        options = FitOptions(method, target_precision=0.9, logit_scale=scale, logit_bias=bias)
        plots = eval_dir / method
        fitted = calibrate_features(texts.ids, texts.matrix, images.ids, images.matrix, truth, options,
                                    checkpoint=ckpt, output_dir=plots)  # fmt: skip
        fits[method] = fitted.calibrator.report
    return {"summary": summary, "fits": fits, "scale": scale, "bias": bias, "eval_dir": eval_dir}


def _row(name: str, m: dict) -> str:
    return f"| {name} | {m['ece']:.3f} | {m['brier']:.3f} | {m['roc_auc']:.3f} |"


def report(results: dict[str, dict], minutes: dict[str, float]) -> str:
    from cn_clip.deploy.benchmark import cpu_model

    lines = [f"Machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}", ""]
    lines += ["| loss | train min | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 | mean recall |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for loss, result in results.items():
        r = result["summary"]["results"]
        t, i = r["text_to_image"]["recall"], r["image_to_text"]["recall"]
        both = (t["mean_recall"] + i["mean_recall"]) / 2
        lines.append(
            f"| {loss} | {minutes[loss]:.1f} | {t['r1']:.2f} | {t['r5']:.2f} | {t['r10']:.2f} | {i['r1']:.2f} | "
            f"{i['r5']:.2f} | {i['r10']:.2f} | {both:.2f} |"
        )
    for loss, result in results.items():
        fits = result["fits"]
        held = fits["platt"]["holdout"]
        lines += ["", f"{loss} model (exp(logit_scale) = {result['scale']:.2f}"
                  + (f", logit_bias = {result['bias']:.3f}" if result["bias"] is not None else "")
                  + f"); held-out: {held['texts']} texts, {held['pairs']} pairs, {held['positives']} positives", "",
                  "| probability | ECE | Brier | ROC-AUC |", "|---|---|---|---|"]  # fmt: skip
        before = fits["platt"]["metrics"]["before"]
        lines.append(_row("raw cosine (clipped to [0, 1])", before["cosine"]))
        lines.append(_row("softmax over all candidates", before["softmax"]))
        if "siglip" in before:
            lines.append(_row("SigLIP's own sigmoid", before["siglip"]))
        for method in METHODS:
            lines.append(_row(f"{method} (calibrated)", fits[method]["metrics"]["after"]))
        threshold = fits["platt"]["threshold"]
        if threshold["cosine"] is None:
            lines.append("\n90 % precision: not reached by any cosine threshold on the held-out pairs")
        else:
            lines.append(
                f"\n90 % precision: cosine ≥ {threshold['cosine']:.4f} "
                f"(Platt probability {threshold['probability']:.3f}): "
                f"held-out precision {threshold['precision']:.3f}, recall {threshold['recall']:.3f}"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work dir (demo data, checkpoints, eval outputs)")
    parser.add_argument("--plots-dir", type=Path, default=None, help="copy the CLIP model's two plots here")
    args = parser.parse_args()
    data = build_data(args.out)
    results, minutes = {}, {}
    for loss in ("clip", "siglip"):
        ckpt, minutes[loss] = train(args.out, data, loss)
        results[loss] = evaluate(args.out, data, loss, ckpt)
    print(report(results, minutes))
    if args.plots_dir is not None:
        args.plots_dir.mkdir(parents=True, exist_ok=True)
        for loss, method in (("clip", "platt"), ("clip", "isotonic"), ("siglip", "siglip")):
            for name in ("reliability.png", "precision_recall.png"):
                source = results[loss]["eval_dir"] / method / name
                shutil.copyfile(source, args.plots_dir / f"scores_{loss}_{method}_{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
