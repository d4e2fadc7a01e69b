"""Text-encode cost against context length (52/128/256/512): cn_clip's text tower vs transformers' BertModel.

The tower is ViT-B-16's RoBERTa-wwm-ext-base-chinese (12 layers, width 768) with random weights (seeded). Baseline:
``transformers.BertModel`` with the same weights and its default (eager) attention, fed the padded batch and its
attention mask, as a plain Hugging Face encoder is used. cn_clip: ``CLIP.encode_text`` (SDPA attention, padding
columns trimmed, [CLS] projected). Two inputs per length:

- ``full``: every text fills the context (real long captions): the cost of the length itself;
- ``short``: real-length captions (≈ 18 tokens) padded to the context, what a large --context-length costs when
  most captions are short (cn_clip trims the padding, the baseline attends over it masked).

Same run, calls alternating between the two, best of ``--calls`` after one warm-up; features are checked to agree.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/text_length.py [--batch 8] [--calls 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

LENGTHS = (52, 128, 256, 512)
ARCH = "ViT-B-16@RoBERTa-wwm-ext-base-chinese"


def baseline_model(model):  # noqa: ANN001, ANN201
    """transformers' BertModel (eager attention) holding the tower's weights, plus the projection."""
    from transformers import BertModel

    config = model.bert.config.__class__.from_dict(model.bert.config.to_dict())
    config._attn_implementation = "eager"
    bert = BertModel(config, add_pooling_layer=False).eval()
    bert.load_state_dict(model.bert.state_dict())
    projection = model.text_projection.detach()

    def encode(text: torch.Tensor) -> torch.Tensor:
        mask = (text != 0).long()
        return bert(input_ids=text, attention_mask=mask).last_hidden_state[:, 0] @ projection

    return encode


def inputs(batch: int, length: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    text = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        used = length if kind == "full" else int(torch.randint(10, 27, (1,), generator=gen))
        text[row, :used] = torch.randint(106, 21128, (used,), generator=gen)
        text[row, 0], text[row, used - 1] = 101, 102
    return text


def best_s(fns: list, text: torch.Tensor, calls: int) -> list[float]:  # noqa: ANN001
    """Fastest of ``calls`` timed calls per function, the functions alternating call by call (after one warm-up
    each), so that a busy machine slows both alike; the minimum is the least disturbed call."""
    for fn in fns:
        fn(text)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(calls):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn(text)
            bucket.append(time.perf_counter() - start)
    return [min(bucket) for bucket in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from cn_clip.models.factory import create_model

    model = create_model(ARCH).eval()
    ours, theirs = model.encode_text, baseline_model(model)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for kind in ("full", "short"):
            for length in LENGTHS:
                text = inputs(args.batch, length, kind, gen)
                diff = float((ours(text) - theirs(text)).abs().max())
                t_ours, t_base = best_s([ours, theirs], text, args.calls)
                rows.append((kind, length, t_ours, t_base, diff))
                print(f"{kind} {length}: cn_clip {t_ours * 1e3:.0f} ms, BertModel {t_base * 1e3:.0f} ms", flush=True)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
        f"{ARCH.split('@')[1]} text tower, random weights, batch {args.batch}, best of {args.calls} alternating calls\n"
    )
    print("| input | context | cn_clip ms/batch | BertModel (eager) ms/batch | speed-up | texts/s (cn_clip) | max|Δ| |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, length, t_ours, t_base, diff in rows:
        label = "full-length texts" if kind == "full" else "short texts (≈18 tokens), padded"
        print(
            f"| {label} | {length} | {t_ours * 1e3:.0f} | {t_base * 1e3:.0f} | {t_base / t_ours:.2f}× "
            f"| {args.batch / t_ours:.1f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
