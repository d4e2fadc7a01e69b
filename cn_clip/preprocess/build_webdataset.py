"""Raw TSV/JSONL splits, or their LMDB, → WebDataset shards for ``--dataset-type webdataset`` (docs/data.md).

    python -m cn_clip.preprocess.build_webdataset --data_dir ${DATAPATH}/datasets/MUGE --splits train,valid \
        --out ${DATAPATH}/datasets/MUGE/wds --shard-size 1000 [--shard-bytes 1GB]

Raw input is validated exactly as by build_lmdb_dataset: every problem is listed with file:line and id, then the
command exits non-zero with nothing written (``--skip-bad`` drops the bad rows). Shards are complete or absent, and
``{out}/index.json`` records each shard's split, sample count and bytes for the reader.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cn_clip.cli.args import add_build_validation_args
from cn_clip.cli.runner import run_cli, setup_logging
from cn_clip.preprocess.build_lmdb_dataset import parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data_dir", required=True, help="directory with {split}_imgs.tsv/{split}_texts.jsonl or lmdb/"
    )
    parser.add_argument("--splits", required=True, help="comma-separated splits, processed in this order")
    parser.add_argument("--out", default=None, help="output directory (default: {data_dir}/wds)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--shard-bytes", type=parse_size, default=None, help="bytes per shard at most, e.g. 1GB")
    parser.add_argument("--source", choices=("auto", "raw", "lmdb"), default="auto", help="auto: raw files if present")
    parser.add_argument("--lmdb_dir", default=None, help="LMDB root for --source lmdb (default: {data_dir}/lmdb)")
    add_build_validation_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from cn_clip.data.lmdb_build import parse_splits
    from cn_clip.data.wds_build import build_webdataset

    args = build_parser().parse_args(argv)
    setup_logging()
    results = build_webdataset(
        args.data_dir,
        parse_splits(args.splits),
        args.out,
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        skip_bad=args.skip_bad,
        check_images=args.check_images,
        lmdb_dir=args.lmdb_dir,
        source=args.source,
        workers=args.workers,
        report=args.report,
    )
    for result in results:
        print(f"{result.split}: {result.count} samples in {len(result.shards)} shard(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
