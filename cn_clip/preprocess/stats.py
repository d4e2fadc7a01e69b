"""Dataset statistics of a raw dataset dir: what ``--context-length`` to pick, how clean the captions are.

    python -m cn_clip.preprocess.stats DATAPATH/datasets/MUGE --context-length 52

Per split: texts, images, pairs; images per text and texts per image; caption length in characters, jieba words and
tokens (with [CLS]/[SEP]); the share of captions truncated at ``--context-length``; the [UNK] token rate; duplicate
captions; the most frequent words. Printed as a table and written as JSON (``--json``, default ``DIR/stats.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cn_clip.cli.args import add_context_length_arg
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.errors import DataError

_logger = logging.getLogger(__name__)
UNK = "[UNK]"


def _summary(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "min": 0, "p50": 0, "p95": 0, "p99": 0, "max": 0}
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    mean = round(statistics.fmean(ordered), 2)
    return {"mean": mean, "min": ordered[0], "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "max": ordered[-1]}


def _count_images(path: Path) -> tuple[int, set[str]]:
    ids: set[str] = set()
    count = 0
    with open(path, "rb") as handle:
        for line in handle:
            head = line.split(b"\t", 1)[0].strip()
            if head:
                ids.add(head.decode("utf-8", "replace"))
                count += 1
    return count, ids


def _is_word(word: str) -> bool:
    return any(ch.isalnum() for ch in word)


def split_stats(data_dir: Path, split: str, context_length: int, top_k: int) -> dict:
    """Statistics of one split (the TSV is optional: only its ids are read)."""
    import jieba

    from cn_clip.data.formats import read_text_records
    from cn_clip.tokenizer import get_tokenizer, normalize_text

    jieba.setLogLevel(logging.WARNING)
    tokenizer = get_tokenizer()
    texts_path = data_dir / f"{split}_texts.jsonl"
    chars, words, tokens = [], [], []
    images_per_text: list[int] = []
    texts_per_image: Counter = Counter()
    word_counts: Counter = Counter()
    caption_counts: Counter = Counter()
    unk = total_tokens = truncated = 0
    for _line, record in read_text_records(texts_path):
        text = normalize_text(record.text)
        pieces = tokenizer.tokenize(text)
        segmented = [w for w in jieba.lcut(record.text) if _is_word(w)]
        chars.append(len(record.text))
        words.append(len(segmented))
        tokens.append(len(pieces) + 2)
        truncated += len(pieces) + 2 > context_length
        unk += pieces.count(UNK)
        total_tokens += len(pieces)
        word_counts.update(segmented)
        caption_counts[text.strip()] += 1
        images_per_text.append(len(record.image_ids))
        texts_per_image.update(str(image_id) for image_id in record.image_ids)
    n_texts = len(chars)
    imgs_path = data_dir / f"{split}_imgs.tsv"
    n_images, image_ids = _count_images(imgs_path) if imgs_path.is_file() else (len(texts_per_image), set())
    per_image = [texts_per_image.get(i, 0) for i in image_ids] if image_ids else list(texts_per_image.values())
    duplicates = sum(count for count in caption_counts.values() if count > 1)
    return {
        "texts": n_texts,
        "images": n_images,
        "pairs": sum(images_per_text),
        "images_per_text": _summary(images_per_text),
        "texts_per_image": _summary(per_image),
        "images_without_text": sum(1 for count in per_image if count == 0),
        "chars": _summary(chars),
        "words": _summary(words),
        "tokens": _summary(tokens),
        "context_length": context_length,
        "truncated_share": round(truncated / n_texts, 4) if n_texts else 0.0,
        "unk_rate": round(unk / total_tokens, 5) if total_tokens else 0.0,
        "duplicate_captions": duplicates,
        "unique_captions": len(caption_counts),
        "top_words": word_counts.most_common(top_k),
    }


def compute(data_dir: str | Path, splits: Sequence[str] | None = None, context_length: int = 52, top_k: int = 20):
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a directory")
    if splits is None:
        splits = [s for s in ("train", "valid", "test") if (data_dir / f"{s}_texts.jsonl").is_file()]
    if not splits:
        raise DataError(f"{data_dir}: no {{split}}_texts.jsonl files")
    return {split: split_stats(data_dir, split, context_length, top_k) for split in splits}


def format_table(stats: dict) -> str:
    rows = [
        ("texts / images / pairs", lambda s: f"{s['texts']} / {s['images']} / {s['pairs']}"),
        ("images per text (mean, max)", lambda s: f"{s['images_per_text']['mean']}, {s['images_per_text']['max']}"),
        ("texts per image (mean, max)", lambda s: f"{s['texts_per_image']['mean']}, {s['texts_per_image']['max']}"),
        ("images without text", lambda s: str(s["images_without_text"])),
        ("chars (mean, p95, max)", lambda s: f"{s['chars']['mean']}, {s['chars']['p95']}, {s['chars']['max']}"),
        ("words (mean, p95, max)", lambda s: f"{s['words']['mean']}, {s['words']['p95']}, {s['words']['max']}"),
        ("tokens (mean, p95, p99, max)", lambda s: "{mean}, {p95}, {p99}, {max}".format(**s["tokens"])),
        ("truncated at context length", lambda s: f"{100 * s['truncated_share']:.2f}% @ {s['context_length']}"),
        ("[UNK] rate", lambda s: f"{100 * s['unk_rate']:.3f}%"),
        ("duplicate captions", lambda s: f"{s['duplicate_captions']} ({s['unique_captions']} unique)"),
        ("top words", lambda s: " ".join(word for word, _ in s["top_words"][:8])),
    ]
    splits = list(stats)
    header = ["", *splits]
    body = [[name, *(fmt(stats[split]) for split in splits)] for name, fmt in rows]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = [
        " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *body]
    ]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="raw dataset dir with {split}_texts.jsonl (and {split}_imgs.tsv)")
    parser.add_argument("--splits", default=None, help="comma-separated (default: those present)")
    add_context_length_arg(parser)  # reports the share of texts truncated at this length
    parser.add_argument("--top-k", type=int, default=20, help="how many frequent words to list")
    parser.add_argument("--json", default=None, help="output JSON path (default: DATA_DIR/stats.json)")
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    stats = compute(args.data_dir, splits, args.context_length, args.top_k)
    print(format_table(stats))
    from cn_clip.fileio import atomic_write

    out = Path(args.json) if args.json else Path(args.data_dir) / "stats.json"
    with atomic_write(out) as handle:
        json.dump(stats, handle, ensure_ascii=False, indent=1)
        handle.write("\n")
    print(f"Statistics written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
