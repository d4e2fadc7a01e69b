"""``python -m cn_clip.search index|query|add|remove|serve …``.

python -m cn_clip.search index --image-data D/lmdb/valid/imgs --resume CKPT --out IDX
python -m cn_clip.search index --image-data photos/ --resume CKPT --out IDX --index-type auto
python -m cn_clip.search query --index IDX "一只猫" --top-k 5
python -m cn_clip.search query --index IDX --image q.jpg --score softmax
python -m cn_clip.search query --index IDX "一只猫" --calibration calib.json --min-probability 0.5
python -m cn_clip.search add --index IDX --image-data new_photos/
python -m cn_clip.search remove --index IDX --ids 1001 1002
python -m cn_clip.search serve --index IDX [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

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
from cn_clip.data.sources import add_source_args, source_options
from cn_clip.errors import ConfigError
from cn_clip.search.ann import INDEX_TYPES

IMAGE_DATA_HELP = "an imgs LMDB, a folder of images, a CSV/JSONL of image files, or WebDataset shards (path or URL)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cn_clip.search", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="build a FAISS index of image features")
    index.add_argument("--image-data", required=True, help=IMAGE_DATA_HELP)
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
    add_source_args(index.add_argument_group("image sources (docs/data.md)"))
    index.add_argument(
        "--index-type", choices=INDEX_TYPES, default="flat", help="exact flat, approximate ivf|hnsw|ivfpq, or auto"
    )
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
    search.add_argument("--calibration", default=None, help="calib.json: add a match-probability column")
    search.add_argument("--min-probability", type=float, default=None, help="drop hits below (needs --calibration)")
    add = commands.add_parser("add", help="encode more images and add them to an index (atomic)")
    add.add_argument("--index", required=True, help="index directory to grow")
    add.add_argument("--image-data", required=True, help=IMAGE_DATA_HELP)
    add.add_argument("--img-batch-size", type=int, default=64, help="image batch size")
    add_device_arg(add)
    add_image_reader_args(add)
    add_source_args(add.add_argument_group("image sources (docs/data.md)"))

    remove = commands.add_parser("remove", help="remove images from an index by id (atomic)")
    remove.add_argument("--index", required=True, help="index directory")
    remove.add_argument("--ids", required=True, nargs="+", help="image ids to remove")

    serve = commands.add_parser("serve", help="HTTP search API and web page")
    serve.add_argument("--index", required=True, help="index directory (from 'index')")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--resume", default=None, help="checkpoint (default: the one the index was built with)")
    serve.add_argument("--calibration", default=None, help="calib.json: add a match probability to each hit")
    add_device_arg(serve)
    add_precision_arg(serve)
    serve.set_defaults(precision="fp32")
    serve.add_argument(
        "--text-onnx",
        default=None,
        help="encode text queries with this exported text tower (*.txt.int8.onnx: ~7x faster on a CPU); checked "
        "against the checkpoint at start",
    )
    serve.add_argument(
        "--image-onnx",
        default=None,
        help="encode uploaded query images with this exported image tower (*.img.int8.onnx); checked at start",
    )
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted (default 10)")
    serve.add_argument("--max-concurrency", type=int, default=32, help="requests in flight before 503 (default 32)")
    serve.add_argument(
        "--watch-interval", type=float, default=2.0, help="seconds between checks for a new index version (0: off)"
    )
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
        context_length=args.context_length,
        index_type=args.index_type,
        reading=_reading(args),
        overwrite=args.overwrite,
        dim=args.dim,
        interpolate_positions=args.interpolate_positions,
    )
    print(f"Indexed {meta['count']} images ({meta['dim']}-d, {meta['architecture']}) into {args.out}")
    print(_index_line(meta))
    return 0


def _reading(args: argparse.Namespace) -> Any:
    from cn_clip.search.index import ImageReading

    return ImageReading(
        batch_size=args.img_batch_size,
        num_workers=args.num_workers,
        id_type=args.image_id_type,
        progress=not args.no_progress,
        source=source_options(args),
    )


def _index_line(meta: dict) -> str:
    line = f"index type {meta['index_type']} ({meta['factory']}), generation {meta['generation']}"
    if "recall_at_10" in meta:
        line += f", recall@10 against exact search {meta['recall_at_10']:.4f}"
    return line


def run_add(args: argparse.Namespace) -> int:
    from cn_clip.search.index import add_images

    before = _count(args.index)
    meta = add_images(args.index, args.image_data, device=args.device, reading=_reading(args))
    print(f"Added {meta['count'] - before} images to {args.index}: {meta['count']} in all")
    print(_index_line(meta))
    return 0


def _count(index: str) -> int:
    from cn_clip.search.store import read_meta

    return int(read_meta(index)["count"])


def run_remove(args: argparse.Namespace) -> int:
    from cn_clip.search.store import remove

    before = _count(args.index)
    meta = remove(args.index, args.ids)
    print(f"Removed {before - meta['count']} images from {args.index}: {meta['count']} left")
    print(_index_line(meta))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from cn_clip.search.serve import Limits, ServeConfig, serve

    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-concurrency", args.max_concurrency)):
        if value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    limits = Limits(
        max_upload_mb=args.max_upload_mb, max_concurrency=args.max_concurrency, watch_interval=args.watch_interval
    )
    config = ServeConfig(
        index=args.index,
        host=args.host,
        port=args.port,
        resume=args.resume,
        calibration=args.calibration,
        device=args.device,
        precision=args.precision,
        limits=limits,
        text_onnx=args.text_onnx,
        image_onnx=args.image_onnx,
    )
    serve(config)
    return 0


def run_query(args: argparse.Namespace) -> int:
    from cn_clip.search.query import query

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be positive, got {args.top_k}")
    hits = query(
        args.index,
        args.text,
        args.image,
        top_k=args.top_k,
        score=args.score,
        resume=args.resume,
        device=args.device,
        calibration=args.calibration,
        min_probability=args.min_probability,
    )
    if args.json:
        print(json.dumps([hit.to_json() for hit in hits], ensure_ascii=False))
        return 0
    calibrated = args.calibration is not None
    print(f"rank\t{args.score}\t" + ("probability\t" if calibrated else "") + "id\tpath")
    for hit in hits:
        probability = f"{hit.probability:.4f}\t" if calibrated else ""
        print(f"{hit.rank}\t{hit.score:.6f}\t{probability}{hit.id}\t{hit.path or '-'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def entry(args_list: Sequence[str] | None) -> int:
        args = build_parser().parse_args(args_list)
        commands = {"index": run_index, "query": run_query, "add": run_add, "remove": run_remove, "serve": run_serve}
        return commands[args.command](args)

    setup_logging()
    return run_cli(entry, argv)


if __name__ == "__main__":
    raise SystemExit(main())
