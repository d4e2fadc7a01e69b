"""Encoding throughput: cn_clip vs the reference (cn-clip 1.6.0, own venv) vs transformers' ChineseCLIPModel.

All three load the same weights: deterministic fp16-representable tensors of tests/fixtures/fixture_weights.py saved
as a reference checkpoint (and converted to an HF folder with cn_clip.deploy.hf). Inputs are identical too: random
normalised images, and real-length Chinese phrases (jieba dictionary words, mean ≈ 18 tokens) tokenised to 52.
Each measurement runs in a fresh process (peak RSS from getrusage), passes are interleaved, and the table reports
the best and median pass. The reference gets its own padded-to-52 input (what its API takes); HF gets the batch
padded to its longest text with an attention mask (``padding=True``); cn_clip takes the 52-wide input and trims.

    .venv/bin/python benchmarks/encode.py [--models ViT-B-16,RN50] [--image-batch 16] [--text-batch 64]
        [--precisions fp32,bf16] [--passes 2] [--calls 3] [--threads 2] [--impls ours,reference,hf,onnx-int8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reference  # benchmarks/reference.py: where the reference venv is

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"ViT-B-16": "ViT-B-16@RoBERTa-wwm-ext-base-chinese", "RN50": "RN50@RBT3-chinese"}
GFLOP_PER_IMAGE = {"ViT-B-16": 35.2, "RN50": 10.8}  # multiply-adds × 2 at 224 px (fvcore-style count)
FMA_PEAK_GFLOPS = 190.0  # 2-core AVX2 FMA peak of the project machine (compatibility.md#baselines)


# ----------------------------------------------------------------------------------------------------- worker
def worker(spec: dict) -> dict:
    """Runs in the measured interpreter (ours or the reference's venv): load, warm up, time ``calls`` calls."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    encode = _load_encoder(spec)
    if spec["kind"] == "image":
        inputs = torch.randn(spec["batch"], 3, 224, 224, generator=torch.Generator().manual_seed(0))
    else:
        inputs = torch.from_numpy(np.load(spec["tokens"])[: spec["batch"]])
    if spec["impl"] == "onnx-int8":
        inputs = inputs.numpy()
    times = []
    with torch.inference_mode():
        for i in range(spec["warmup"] + spec["calls"]):
            start = time.perf_counter()
            encode(inputs)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - start)
    rss_gb = _peak_rss_gb()
    return {"median_s": statistics.median(times), "min_s": min(times), "rss_gb": rss_gb}


def _peak_rss_gb() -> float:
    """VmHWM: this process's own high-water mark (``ru_maxrss`` is inherited across fork + exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _load_encoder(spec: dict):  # noqa: ANN202
    import torch

    impl, kind, dtype = spec["impl"], spec["kind"], getattr(torch, spec["dtype"])
    if impl == "reference":
        from cn_clip.clip.utils import create_model as reference_create

        ckpt = torch.load(spec["ckpt"], map_location="cpu")
        model = reference_create(spec["arch"], ckpt).float().eval()
        return model.encode_image if kind == "image" else model.encode_text
    if impl == "ours":
        from cn_clip.models.factory import convert_weights, create_model

        model = create_model(spec["arch"], checkpoint=spec["ckpt"])
        if dtype != torch.float32:
            convert_weights(model, dtype)
        return model.encode_image if kind == "image" else model.encode_text
    if impl == "hf":
        from transformers import ChineseCLIPModel

        model = ChineseCLIPModel.from_pretrained(spec["hf_dir"], dtype=dtype).eval()
        if kind == "image":
            return lambda x: model.get_image_features(pixel_values=x.to(dtype))
        return lambda t: _hf_text(model, t)
    if impl == "onnx-int8":
        from cn_clip.deploy.onnx_export import create_session, run_session

        session = create_session(spec["onnx"], "cpu", spec["threads"])
        if kind == "image":
            return lambda x: run_session(session, x)
        return lambda t: run_session(session, t[:, : int((t != 0).any(0).nonzero()[0].max()) + 1])
    raise ValueError(impl)


def _hf_text(model, tokens):  # noqa: ANN001, ANN202
    longest = int((tokens != 0).any(0).nonzero().max()) + 1  # what HF's tokenizer(padding=True) would give
    tokens = tokens[:, :longest]
    return model.get_text_features(input_ids=tokens, attention_mask=(tokens != 0).long())


# ----------------------------------------------------------------------------------------------------- driver
def machine() -> str:
    from cn_clip.deploy.benchmark import cpu_model

    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.python_implementation()} {platform.python_version()}"


def make_phrases(count: int, seed: int = 0) -> list[str]:
    """Real-length Chinese phrases: 4–12 jieba dictionary words (frequency ≥ 1000), joined (≈ 18 tokens)."""
    import random

    import jieba

    words = []
    with open(Path(jieba.__file__).with_name("dict.txt"), encoding="utf-8") as handle:
        for line in handle:
            word, freq = line.split()[:2]
            if int(freq) >= 1000:
                words.append(word)
    rng = random.Random(seed)
    return ["".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(count)]


def prepare(tmp: Path, model: str, impls: list[str]) -> dict:
    """Checkpoint (+ HF folder, int8 ONNX) with the fixture weights, and the token file."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from fixture_weights import KEYS_DIR, read_key_shapes, reference_checkpoint

    arch = ARCH[model]
    ckpt = tmp / f"{model}.pt"
    torch.save(reference_checkpoint(read_key_shapes(KEYS_DIR / f"{arch}.tsv")), ckpt)
    paths = {"ckpt": str(ckpt), "arch": arch}
    if "hf" in impls and model != "RN50":
        from cn_clip.deploy.hf import checkpoint_to_hf

        paths["hf_dir"] = str(checkpoint_to_hf(ckpt, tmp / f"{model}-hf", arch))
    if "onnx-int8" in impls:
        from cn_clip.deploy.onnx_export import export_encoder
        from cn_clip.models.factory import create_model

        clip = create_model(arch, checkpoint=ckpt)
        for kind in ("img", "txt"):
            result = export_encoder(clip, kind, tmp / model, precisions=("int8",))
            paths[f"onnx_{kind}"] = str(result.paths["int8"])
            print(f"  {result.reports[0]}", file=sys.stderr)
    from cn_clip.tokenizer import tokenize

    tokens = tokenize(make_phrases(256)).numpy()
    np.save(tmp / "tokens.npy", tokens)
    paths["tokens"] = str(tmp / "tokens.npy")
    lengths = (tokens != 0).sum(1)
    print(f"  text lengths: mean {lengths.mean():.1f} tokens, max {lengths.max()}", file=sys.stderr)
    return paths


def run_worker(python: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env["PYTHONPATH"] = ""  # the reference venv must not see our checkout
    cwd = "/" if spec["impl"] == "reference" else str(ROOT)
    out = subprocess.run(
        [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )
    if out.returncode:
        raise RuntimeError(f"{spec['impl']} {spec['kind']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cases(args: argparse.Namespace, model: str, paths: dict) -> list[dict]:
    specs = []
    batches = [("image", int(b)) for b in args.image_batch.split(",")] + [
        ("text", int(b)) for b in args.text_batch.split(",")
    ]
    for kind, batch in batches:
        for precision in args.precisions:
            for impl in args.impls:
                if impl == "hf" and model == "RN50":
                    continue  # transformers has no ResNet Chinese-CLIP
                if impl in ("reference", "onnx-int8") and precision != "fp32":
                    continue  # the reference has no bf16 path on CPU; int8 is its own precision
                spec = {
                    "impl": impl,
                    "kind": kind,
                    "batch": batch,
                    "dtype": {"fp32": "float32", "bf16": "bfloat16"}[precision],
                    "threads": args.threads,
                    "warmup": args.warmup,
                    "calls": args.calls,
                    **paths,
                }
                if impl == "onnx-int8":
                    spec["onnx"] = paths["onnx_img" if kind == "image" else "onnx_txt"]
                specs.append(spec)
    return specs


def label(spec: dict) -> str:
    precision = "int8" if spec["impl"] == "onnx-int8" else {"float32": "fp32", "bfloat16": "bf16"}[spec["dtype"]]
    name = {"ours": "cn_clip", "reference": "reference 1.6.0", "hf": "HF ChineseCLIPModel", "onnx-int8": "cn_clip ONNX"}
    return f"{name[spec['impl']]} {precision}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="ViT-B-16,RN50")
    parser.add_argument("--image-batch", default="16", help="comma-separated batch sizes, e.g. 1,16,64")
    parser.add_argument("--text-batch", default="64", help="comma-separated batch sizes, e.g. 1,16,64")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--impls", default="ours,reference,hf")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ref-python", default=reference.REF_PYTHON)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    args.impls, args.precisions = args.impls.split(","), args.precisions.split(",")
    print(f"machine: {machine()}; torch threads {args.threads}; {args.passes} interleaved passes × {args.calls} calls")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            print(f"preparing {model} ...", file=sys.stderr)
            paths = prepare(Path(tmp), model, args.impls)
            specs = cases(args, model, paths)
            results: dict[int, list[dict]] = {i: [] for i in range(len(specs))}
            for _ in range(args.passes):
                for i, spec in enumerate(specs):
                    python = args.ref_python if spec["impl"] == "reference" else sys.executable
                    results[i].append(run_worker(python, spec))
                    print(f"  {model} {spec['kind']} {label(spec)}: {results[i][-1]}", file=sys.stderr)
            rows += summarise(model, specs, results)
    print(table(rows))


def summarise(model: str, specs: list[dict], results: dict[int, list[dict]]) -> list[dict]:
    rows = []
    baseline = {}
    for i, spec in enumerate(specs):
        best = min(r["min_s"] for r in results[i])
        median = statistics.median(r["median_s"] for r in results[i])
        row = {
            "model": model,
            "kind": spec["kind"],
            "batch": spec["batch"],
            "impl": label(spec),
            "best": spec["batch"] / best,
            "median": spec["batch"] / median,
            "rss": max(r["rss_gb"] for r in results[i]),
        }
        if spec["impl"] == "reference":
            baseline[spec["kind"]] = row["best"]
        rows.append(row)
    for row in rows:
        row["vs_ref"] = row["best"] / baseline[row["kind"]] if row["kind"] in baseline else None
        if row["kind"] == "image":
            row["peak"] = row["best"] * GFLOP_PER_IMAGE[model] / FMA_PEAK_GFLOPS
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | input | batch | implementation | items/s best | items/s median | × reference | peak RSS GB |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['vs_ref']:.2f}×" if r["vs_ref"] else "–"
        peak = f" ({100 * r['peak']:.0f}% FMA peak)" if "peak" in r else ""
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['batch']} | {r['impl']} | {r['best']:.2f}{peak} | "
            f"{r['median']:.2f} | {ratio} | {r['rss']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
