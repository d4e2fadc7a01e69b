"""Matryoshka and long-caption experiments on the embedded demo data (README "多语言 / Multilingual").

Three tiny models (ViT-Tiny@BERT-Tiny-chinese, from scratch, the `make demo` recipe: batch 32, lr 1e-3, warm-up 10,
wd 1e-3, 10 epochs, fp32) are trained on the demo's train split:

- ``plain``: Chinese captions, context 52 (exactly `make demo`'s training);
- ``matryoshka``: the same with ``--matryoshka-dims 64,32,16,8`` (the tiny model's embed_dim is 64);
- ``long``: long captions at context 128. A long caption is all the captions written for the photo (its four Chinese
  and four English ones), concatenated starting from the record's own caption: about 100 tokens.

Tables (valid split, 44 images):

1. recall@1/5/10 against the feature width k (64 … 2) (``encode_*(dim=k)``: first k coordinates, re-normalised) for
   ``plain`` and ``matryoshka``, the share of full-width mean recall kept, and the FAISS flat index size per width;
2. text→image recall of ``plain`` and ``long`` with short captions at 52 tokens, long captions cut at 52 tokens and
   long captions at 128 tokens.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/demo_variants.py --out /tmp/demo_variants [--only plain,matryoshka,long]

Checkpoints are cached under ``--out/runs``, so ``--only`` runs can train in parallel and a final run without
``--only`` prints the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

RECIPE = [
    "--batch-size", "32", "--valid-batch-size", "44", "--max-epochs", "10", "--lr", "1e-3", "--warmup", "10",
    "--wd", "0.001", "--precision", "fp32", "--num-workers", "0", "--valid-num-workers", "0",
    "--vision-model", "ViT-Tiny", "--text-model", "BERT-Tiny-chinese", "--log-interval", "20", "--device", "cpu",
]  # fmt: skip
DIMS = (64, 32, 16, 8)  # trained with --matryoshka-dims
EVAL_DIMS = (*DIMS, 4, 2)  # evaluated (4 and 2: below the trained widths, to show where truncation breaks)
VARIANTS = {
    "plain": ("demo", ["--context-length", "52"]),
    "matryoshka": ("demo", ["--context-length", "52", "--matryoshka-dims", ",".join(map(str, DIMS))]),
    "long": ("demo_long", ["--context-length", "128"]),
}


def build_data(out: Path) -> None:
    """The demo dataset, its long-caption copy (same images, long texts) and their LMDBs."""
    from cn_clip.data.demo import load_classes, make_demo
    from cn_clip.preprocess.build_lmdb_dataset import main as build_lmdb

    datasets = out / "datasets"
    if not (datasets / "demo" / "lmdb" / "train").is_dir():
        make_demo(out)
        build_lmdb(["--data_dir", str(datasets / "demo"), "--splits", "train,valid", "--overwrite"])
    long_dir = datasets / "demo_long"
    if (long_dir / "lmdb" / "train").is_dir():
        return
    by_caption = {}
    for cls in load_classes():
        everything = [*cls.captions, *cls.captions_en]
        for i, caption in enumerate(cls.captions):
            by_caption[caption] = "。".join(everything[i:] + everything[:i])
    long_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        (long_dir / f"{split}_imgs.tsv").write_bytes((datasets / "demo" / f"{split}_imgs.tsv").read_bytes())
        lines = (datasets / "demo" / f"{split}_texts.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]
        for record in records:
            record["text"] = by_caption[record["text"]]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (long_dir / f"{split}_texts.jsonl").write_text(text, encoding="utf-8")
    build_lmdb(["--data_dir", str(long_dir), "--splits", "train,valid", "--overwrite"])


def train_variant(out: Path, name: str) -> Path:
    from cn_clip.training.main import train
    from cn_clip.training.params import parse_args

    dataset, extra = VARIANTS[name]
    ckpt = out / "runs" / name / "checkpoints" / "epoch_latest.pt"
    if ckpt.is_file():
        return ckpt
    data = out / "datasets" / dataset / "lmdb"
    argv = ["--train-data", str(data / "train"), "--val-data", str(data / "valid"), "--logs", str(out / "runs")]
    start = time.perf_counter()
    train(parse_args([*argv, "--name", name, *RECIPE, *extra]))
    print(f"trained {name} in {time.perf_counter() - start:.0f} s")
    return ckpt


def features(ckpt: Path, dataset: Path, context_length: int) -> tuple:
    """Full-width L2-normalised (image, text) features of the valid split and its text→image ground truth."""
    from cn_clip.eval import features as F
    from cn_clip.eval.featio import Features
    from cn_clip.eval.transform_ir_annotation_to_tr import read_annotation_pairs

    model, _ = F.load_eval_model("ViT-Tiny@BERT-Tiny-chinese", ckpt, "cpu", "fp32", context_length=context_length)
    opts = F.ExtractOptions(context_length=context_length, progress=False)
    res = model.cfg.vision.image_resolution
    images = F.extract_images(F.TorchEncoder(model.encode_image, "cpu"), dataset / "lmdb/valid/imgs", res, None, opts)
    texts = F.extract_texts(F.TorchEncoder(model.encode_text, "cpu"), dataset / "valid_texts.jsonl", None, opts)
    truth = dict(read_annotation_pairs(dataset / "valid_texts.jsonl"))
    return Features(images.ids, images.matrix, "image_id"), Features(texts.ids, texts.matrix, "text_id"), truth


def recall(images, texts, truth, dim: int | None = None) -> dict:
    from cn_clip.eval.featio import Features
    from cn_clip.eval.topk import evaluate_retrieval
    from cn_clip.models.matryoshka import truncate

    def cut(feats: Features) -> Features:
        if dim is None:
            return feats
        return Features(feats.ids, truncate(torch.from_numpy(feats.matrix), dim).numpy(), feats.id_key)

    return evaluate_retrieval(cut(images), cut(texts), truth, backend="numpy")


def index_bytes(matrix, dim: int) -> int:
    import faiss

    from cn_clip.models.matryoshka import truncate

    index = faiss.IndexFlatIP(dim)
    index.add(truncate(torch.from_numpy(matrix), dim).numpy())
    return len(faiss.serialize_index(index))


def _fmt(r: dict) -> str:
    return f"{r['r1']:.1f} / {r['r5']:.1f} / {r['r10']:.1f}"


def matryoshka_table(out: Path, ckpts: dict[str, Path]) -> list[str]:
    data = out / "datasets" / "demo"
    feats = {name: features(ckpts[name], data, 52) for name in ("plain", "matryoshka")}
    full = {name: recall(*feats[name])["mean_recall"] for name in feats}
    n_images = len(feats["plain"][0].ids)
    lines = [
        "| dim | plain: t2i R@1/5/10 | plain: i2t R@1/5/10 | plain: mean (% of full) "
        "| matryoshka: t2i R@1/5/10 | matryoshka: i2t R@1/5/10 | matryoshka: mean (% of full) "
        f"| index bytes ({n_images} images) | index per 1M images |",
        "|---:|---|---|---:|---|---|---:|---:|---:|",
    ]
    for dim in EVAL_DIMS:
        cells = []
        for name in ("plain", "matryoshka"):
            r = recall(*feats[name], dim=dim)
            share = 100 * r["mean_recall"] / full[name]
            cells += [_fmt(r["text_to_image"]), _fmt(r["image_to_text"]), f"{r['mean_recall']:.1f} ({share:.0f} %)"]
        size = index_bytes(feats["plain"][0].matrix, dim)
        lines.append(f"| {dim} | " + " | ".join(cells) + f" | {size:,} | {4 * dim * 10**6 / 2**20:.0f} MiB |")
    return lines


def long_caption_table(out: Path, ckpts: dict[str, Path]) -> list[str]:
    short, long = out / "datasets" / "demo", out / "datasets" / "demo_long"
    settings = [
        ("short captions @52", short, 52),
        ("long captions @52 (cut)", long, 52),
        ("long captions @128", long, 128),
    ]
    lines = ["| model | " + " | ".join(s[0] for s in settings) + " |", "|---|" + "---|" * len(settings)]
    for name, label in (("plain", "trained on short captions, context 52"), ("long", "trained on long, context 128")):
        cells = []
        for _, data, length in settings:
            r = recall(*features(ckpts[name], data, length))["text_to_image"]
            cells.append(f"{_fmt(r)} (mean {r['mean_recall']:.1f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (data, checkpoints)")
    parser.add_argument("--only", default=None, help="train only these variants (comma-separated), no tables")
    parser.add_argument("--results", type=Path, default=None, help="also write the tables to this markdown file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1, as torchrun sets for `make demo`)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build_data(args.out)
    names = args.only.split(",") if args.only else list(VARIANTS)
    ckpts = {name: train_variant(args.out, name) for name in names}
    if args.only:
        return
    header = [
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; valid split of the demo (44 images, 44 captions); recall in %",
        "",
        "Recall against Matryoshka width (text→image and image→text R@1/5/10):",
        "",
    ]
    lines = header + matryoshka_table(args.out, ckpts)
    lines += ["", "Text→image R@1/5/10, short against long captions:", ""] + long_caption_table(args.out, ckpts)
    print("\n".join(lines))
    if args.results:
        args.results.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
