"""Tokenizer throughput: cn_clip.tokenize against the reference cn-clip 1.6.0, on the same jieba phrases.

The reference runs in its own venv (``--ref-python``, default ``$CN_CLIP_REF_PYTHON`` or .refvenv) as a subprocess;
ours runs in this process. Two workloads: jieba phrases (pure Chinese, as compatibility.md#baselines) and mixed
Chinese/Latin/digit titles.
Both sides tokenise the same texts to ``[N, 52]`` tensors; each timing is the median of ``--repeats`` calls after
``--warmup`` untimed calls. Our first ("cold") call is reported separately: it builds the tokenizer and checks each
new character once (see cn_clip/tokenizer.py). The table also says how many texts each back end took. Outputs are
compared for equality (exit 1 if they differ).

    .venv/bin/python benchmarks/tokenize_speed.py [--texts 10000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reference  # benchmarks/reference.py: where the reference venv is

DEFAULT_REF_PYTHON = reference.REF_PYTHON

_REFERENCE_SCRIPT = """
import json, statistics, sys, time
import cn_clip
from cn_clip.clip import tokenize
assert "site-packages" in cn_clip.__file__, cn_clip.__file__
texts = json.load(open(sys.argv[1], encoding="utf-8"))
warmup, repeats, context_length = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for _ in range(warmup):
    out = tokenize(texts, context_length=context_length)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    out = tokenize(texts, context_length=context_length)
    times.append(time.perf_counter() - start)
out.numpy().tofile(sys.argv[5])
print(json.dumps({"times": times}))
"""


def _jieba_words() -> list[str]:
    import jieba

    dictionary = Path(jieba.__file__).parent / "dict.txt"
    return [line.split(" ")[0] for line in dictionary.read_text(encoding="utf-8").splitlines()]


def jieba_phrases(count: int, seed: int = 0) -> list[str]:
    """``count`` phrases of 3–8 random words from jieba's dictionary (mean ≈ 16–18 tokens, like
    compatibility.md#baselines)."""
    words = _jieba_words()
    rng = random.Random(seed)
    return ["".join(rng.sample(words, rng.randint(3, 8))) for _ in range(count)]


def mixed_phrases(count: int, seed: int = 1) -> list[str]:
    """Product-title-like phrases: jieba words mixed with Latin-script dictionary entries, numbers and spaces."""
    words = _jieba_words()
    latin = [w for w in words if any("a" <= c.lower() <= "z" for c in w)]
    rng = random.Random(seed)
    phrases = []
    for _ in range(count):
        parts = rng.sample(words, rng.randint(2, 5)) + rng.sample(latin, rng.randint(1, 2)) + [str(rng.randint(1, 999))]
        rng.shuffle(parts)
        phrases.append(rng.choice(["", " "]).join(parts))
    return phrases


def machine_name() -> str:
    from cn_clip.deploy.benchmark import cpu_model

    cpu = cpu_model()
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def time_calls(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_reference(ref_python: str, texts: list[str], args: argparse.Namespace):
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        texts_path, ids_path = Path(tmp, "texts.json"), Path(tmp, "ids.bin")
        texts_path.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
        cmd = [ref_python, "-P", "-c", _REFERENCE_SCRIPT, str(texts_path)]
        cmd += [str(args.warmup), str(args.repeats), str(args.context_length), str(ids_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"reference run failed ({' '.join(cmd[:2])}):\n{proc.stderr}")
        times = json.loads(proc.stdout.strip().splitlines()[-1])["times"]
        ids = np.fromfile(ids_path, dtype=np.int64).reshape(len(texts), args.context_length)
    return times, ids


def row(name: str, times: list[float], n: int) -> str:
    median = statistics.median(times)
    return f"| {name} | {median:.3f} | {min(times):.3f} | {n / median:,.0f} |"


def lanes(texts: list[str]) -> str:
    """How many texts each lane of the shared tokenizer takes (see FullTokenizer.encode_batch)."""
    from cn_clip.tokenizer import _GREEK_CAPITAL_SIGMA, get_tokenizer, to_unicode

    tokenizer = get_tokenizer()
    counts = {"per-character": 0, "segmented": 0, "Python": 0}
    for text in map(to_unicode, texts):
        if tokenizer._solo_ids(text) is not None:
            counts["per-character"] += 1
        elif _GREEK_CAPITAL_SIGMA not in text:
            counts["segmented"] += 1
        else:
            counts["Python"] += 1
    fast = tokenizer._fast
    rust = f"; {len(tokenizer._runs)} memoised runs, chars proven for Rust: {len(fast.safe)}" if fast else ""
    return ", ".join(f"{name} {count}" for name, count in counts.items()) + rust


def bench_workload(label: str, texts: list[str], args: argparse.Namespace) -> bool:
    """Print one table; return whether our ids equal the reference's."""
    import torch

    from cn_clip.tokenizer import FullTokenizer, get_tokenizer, tokenize

    get_tokenizer.cache_clear()
    start = time.perf_counter()
    ours = tokenize(texts, context_length=args.context_length)
    cold = time.perf_counter() - start
    fast_times = time_calls(lambda: tokenize(texts, context_length=args.context_length), args.warmup, args.repeats)
    python_only = FullTokenizer(use_fast=False)
    python_times = time_calls(lambda: [python_only.encode(t) for t in texts], 1, max(3, args.repeats // 2))
    mean_tokens = float((ours != 0).sum(dim=1).to(torch.float64).mean()) - 2

    print(
        f"\n{label}: {len(texts):,} texts, mean {mean_tokens:.1f} tokens without [CLS]/[SEP], "
        f"context {args.context_length}; lanes: {lanes(texts)}"
    )
    print("| tokenizer | median s | min s | texts/s |")
    print("|---|---|---|---|")
    ref_ids = None
    if Path(args.ref_python).exists():
        ref_times, ref_ids = run_reference(args.ref_python, texts, args)
        print(row("reference `cn_clip.clip.tokenize` (1.6.0)", ref_times, len(texts)))
    else:
        print(f"| reference | not run: {args.ref_python} missing | | |")
    print(row("cn_clip `tokenize`, first call (build + character checks)", [cold], len(texts)))
    print(row("cn_clip `tokenize`", fast_times, len(texts)))
    print(row("cn_clip pure-Python back end only (ids, no tensor)", python_times, len(texts)))
    if ref_ids is None:
        return True
    same = bool((ours.numpy() == ref_ids).all())
    print(f"identical to the reference: {same}")
    return same


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--context-length", type=int, default=52)
    parser.add_argument("--ref-python", default=DEFAULT_REF_PYTHON)
    args = parser.parse_args(argv)

    import torch  # imported up front so that the first-call timing does not include it

    torch.set_num_threads(2)
    print(f"machine: {machine_name()}")
    ok = bench_workload("jieba phrases (Chinese)", jieba_phrases(args.texts), args)
    ok &= bench_workload("mixed Chinese / Latin / digits", mixed_phrases(args.texts), args)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    # This file's name shadows the standard library's ``tokenize`` (used by linecache/torch): drop its folder.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    main()
