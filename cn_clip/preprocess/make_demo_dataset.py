"""Create the embedded demo dataset (real photos shipped with scikit-image, hand-written Chinese captions).

    python -m cn_clip.preprocess.make_demo_dataset --out DATAPATH
    python -m cn_clip.preprocess.build_lmdb_dataset --data_dir DATAPATH/datasets/demo --splits train,valid,test

Offline and deterministic; see data_docs/demo.md for provenance and licences.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cn_clip.cli.runner import run_cli, setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="DATAPATH: writes DATAPATH/datasets/{demo,demo_cls}")
    parser.add_argument("--views", type=int, default=16, help="augmented views per source image")
    parser.add_argument("--max-side", type=int, default=128, help="longest image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bilingual",
        action="store_true",
        help="write datasets/demo_bilingual: Chinese and English captions (valid_en/test_en splits for English)",
    )
    args = parser.parse_args(argv)
    from cn_clip.data.demo import BILINGUAL_DATASET, DATASET, make_demo

    counts = make_demo(args.out, views=args.views, max_side=args.max_side, seed=args.seed, bilingual=args.bilingual)
    name = BILINGUAL_DATASET if args.bilingual else DATASET
    print(
        f"Demo dataset in {args.out}/datasets/{name} ({counts['train_images']} train, {counts['valid_images']} valid, "
        f"{counts['test_images']} test images; {counts['texts']} captions) and {args.out}/datasets/demo_cls "
        f"({counts['classes']} classes)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
