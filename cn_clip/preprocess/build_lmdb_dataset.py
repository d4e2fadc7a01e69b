"""Serialise raw TSV/JSONL splits into LMDB (same command line and layout as the reference, plus safety flags).

    python -m cn_clip.preprocess.build_lmdb_dataset --data_dir ${DATAPATH}/datasets/MUGE --splits train,valid,test

Every row is validated before anything is written; problems are listed with file:line and id, then the command exits
non-zero. Each split is built in a temporary directory beside ``{lmdb_dir}/{split}`` and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from cn_clip.cli.args import add_build_validation_args
from cn_clip.cli.runner import run_cli, setup_logging

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str) -> int:
    """``"512M"`` / ``"2G"`` / ``"1048576"`` → bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", value, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {value!r}; use bytes or a K/M/G/T suffix")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data_dir", required=True, help="directory with {split}_imgs.tsv and {split}_texts.jsonl files"
    )
    parser.add_argument("--splits", required=True, help="comma-separated splits, processed in this order")
    parser.add_argument("--lmdb_dir", default=None, help="output directory (default: {data_dir}/lmdb)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing {lmdb_dir}/{split} on success")
    add_build_validation_args(parser)
    parser.add_argument(
        "--map-size", type=parse_size, default=None, help="initial LMDB map size, e.g. 4G (default: from input size)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    from cn_clip.data.lmdb_build import build_lmdb, parse_splits

    splits = parse_splits(args.splits)
    print("Dataset splits to be processed: {}".format(", ".join(splits)))
    results = build_lmdb(
        args.data_dir,
        splits,
        args.lmdb_dir,
        overwrite=args.overwrite,
        skip_bad=args.skip_bad,
        check_images=args.check_images,
        workers=args.workers,
        map_size=args.map_size,
        report=args.report,
    )
    for result in results:
        print(f"Finished serializing {result.n_pairs} {result.split} split pairs into {result.path / 'pairs'}.")
        print(f"Finished serializing {result.n_images} {result.split} split images into {result.path / 'imgs'}.")
    print("done!")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
