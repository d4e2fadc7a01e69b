"""Convert between reference checkpoints, Hugging Face ``ChineseCLIPModel`` folders and open_clip checkpoints.

    python -m cn_clip.convert to-hf CKPT OUT_DIR [--arch ViT-B-16@RoBERTa-wwm-ext-base-chinese] [--overwrite]
    python -m cn_clip.convert from-hf HF_DIR CKPT
    python -m cn_clip.convert to-reference CKPT OUT.pt   (drops cn_clip's extra keys, e.g. a SigLIP logit_bias)
    python -m cn_clip.convert from-open-clip OPEN_CLIP_CKPT CKPT --arch xlm-roberta-base-ViT-B-32
    python -m cn_clip.convert to-open-clip CKPT OUT_DIR --arch ViT-B-32-gelu@xlm-roberta-base [--overwrite]

ViT towers convert losslessly both ways; the RN50 tower has no HF counterpart (clear error). ``--arch`` of the
open_clip commands is one of our ``vision@text`` names or an open_clip name we map (see docs/multilingual.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cn_clip.cli.runner import run_cli, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cn_clip.convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="reference checkpoint → ChineseCLIPModel folder")
    to_hf.add_argument("checkpoint", help="reference .pt checkpoint (or .safetensors)")
    to_hf.add_argument("out_dir", help="folder to create: config.json, model.safetensors, tokenizer, processor")
    to_hf.add_argument("--arch", default=None, help="'vision@text' or released name (default: inferred from shapes)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    from_hf = commands.add_parser("from-hf", help="ChineseCLIPModel folder → reference checkpoint")
    from_hf.add_argument("hf_dir", help="folder with config.json and model.safetensors")
    from_hf.add_argument("checkpoint", help="output .pt in the reference layout")
    to_ref = commands.add_parser("to-reference", help="cn_clip checkpoint → file with the reference's keys only")
    to_ref.add_argument("checkpoint", help="cn_clip .pt checkpoint")
    to_ref.add_argument("output", help="output .pt (epoch, step, name, state_dict)")
    from_oc = commands.add_parser("from-open-clip", help="open_clip checkpoint → our checkpoint")
    from_oc.add_argument("source", help="open_clip .bin/.pt/.safetensors (training file or state dict)")
    from_oc.add_argument("checkpoint", help="output .pt in our layout")
    from_oc.add_argument("--arch", required=True, help="'vision@text' or an open_clip name, e.g. roberta-ViT-B-32")
    to_oc = commands.add_parser("to-open-clip", help="our checkpoint → open_clip weights + model config")
    to_oc.add_argument("checkpoint", help="our .pt checkpoint")
    to_oc.add_argument("out_dir", help="folder to create: open_clip_pytorch_model.bin, open_clip_config.json")
    to_oc.add_argument("--arch", required=True, help="'vision@text' of the checkpoint (an HF text tower)")
    to_oc.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    return parser


def convert(argv: Sequence[str] | None = None) -> int:
    from cn_clip.deploy.hf import checkpoint_to_hf, hf_to_checkpoint
    from cn_clip.deploy.openclip import checkpoint_to_open_clip, open_clip_to_checkpoint

    args = build_parser().parse_args(argv)
    if args.command == "to-reference":
        from cn_clip.training.checkpoint import export_reference

        export_reference(args.checkpoint, args.output)
        print(f"Reference checkpoint written to {args.output}")
    elif args.command == "from-open-clip":
        out = open_clip_to_checkpoint(args.source, args.checkpoint, args.arch)
        print(f"Checkpoint written to {out}")
    elif args.command == "to-open-clip":
        out = checkpoint_to_open_clip(args.checkpoint, args.out_dir, args.arch, args.overwrite)
        print(f"open_clip weights and model config written to {out}")
    elif args.command == "to-hf":
        out = checkpoint_to_hf(args.checkpoint, args.out_dir, args.arch, args.overwrite)
        print(f"Hugging Face ChineseCLIPModel written to {out}")
    else:
        out = hf_to_checkpoint(args.hf_dir, args.checkpoint)
        print(f"Reference checkpoint written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    return run_cli(convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
