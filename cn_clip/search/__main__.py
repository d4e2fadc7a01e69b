"""``python -m cn_clip.search index …`` / ``python -m cn_clip.search query …``.

python -m cn_clip.search index --image-data D/lmdb/valid/imgs --resume CKPT --out IDX
python -m cn_clip.search index --image-data photos/ --resume CKPT --out IDX
python -m cn_clip.search query --index IDX "一只猫" --top-k 5
python -m cn_clip.search query --index IDX --image q.jpg --score softmax
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from cn_clip.cli.args import (
    add_context_length_arg,
    add_device_arg,
    add_image_reader_args,
    add_matryoshka_dim_arg,
    add_model_args,
    add_precision_arg,
    add_resume_arg,
)
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cn_clip.search", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="build a FAISS index of image features")
    index.add_argument("--image-data", required=True, help="an imgs LMDB directory or a folder of images")
    add_resume_arg(index)
    index.add_argument("--out", required=True, help="index directory to write")
    add_model_args(index)
    index.set_defaults(vision_model=None, text_model=None)  # None: inferred from the checkpoint's shapes
    add_precision_arg(index)
    index.set_defaults(precision="fp32")
    add_context_length_arg(index, interpolate=True)
    index.add_argument("--img-batch-size", type=int, default=64, help="image batch size")
    add_device_arg(index)
    add_image_reader_args(index)
    index.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
    add_matryoshka_dim_arg(index)

    search = commands.add_parser("query", help="search an index with a text or an image")
    search.add_argument("--index", required=True, help="index directory (from 'index')")
    search.add_argument("text", nargs="?", default=None, help="query text (text→image)")
    search.add_argument("--image", default=None, help="query image file (image→image)")
    search.add_argument("--top-k", type=int, default=5, help="number of hits")
    search.add_argument("--score", choices=("cosine", "softmax"), default="cosine", help="see docs: cosine vs softmax")
    search.add_argument("--resume", default=None, help="checkpoint (default: the one the index was built with)")
    add_device_arg(search)
    search.add_argument("--json", action="store_true", help="print the hits as one JSON list")
    return parser


def run_index(args: argparse.Namespace) -> int:
    from cn_clip.search.index import build_index

    if (args.vision_model is None) != (args.text_model is None):
        raise ConfigError("give both --vision-model and --text-model, or neither (inferred from the checkpoint)")
    architecture = f"{args.vision_model}@{args.text_model}" if args.vision_model else None
    meta = build_index(
        args.image_data,
        args.resume,
        args.out,
        architecture=architecture,
        device=args.device,
        precision=args.precision,
        batch_size=args.img_batch_size,
        num_workers=args.num_workers,
        context_length=args.context_length,
        id_type=args.image_id_type,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        dim=args.dim,
        interpolate_positions=args.interpolate_positions,
    )
    print(f"Indexed {meta['count']} images ({meta['dim']}-d, {meta['architecture']}) into {args.out}")
    return 0


def run_query(args: argparse.Namespace) -> int:
    from cn_clip.search.query import query

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be positive, got {args.top_k}")
    hits = query(
        args.index, args.text, args.image, top_k=args.top_k, score=args.score, resume=args.resume, device=args.device
    )
    if args.json:
        print(json.dumps([hit.to_json() for hit in hits], ensure_ascii=False))
        return 0
    print(f"rank\t{args.score}\tid\tpath")
    for hit in hits:
        print(f"{hit.rank}\t{hit.score:.6f}\t{hit.id}\t{hit.path or '-'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def entry(args_list: Sequence[str] | None) -> int:
        args = build_parser().parse_args(args_list)
        return run_index(args) if args.command == "index" else run_query(args)

    setup_logging()
    return run_cli(entry, argv)


if __name__ == "__main__":
    raise SystemExit(main())
