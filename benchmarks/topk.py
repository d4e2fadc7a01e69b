"""Top-k retrieval benchmark: cn_clip's make_topk_predictions against the reference script, interleaved.

Part 1 (end to end, the issue's goal): 5,000 texts × 5,000 images × 512 dims, reference-format feature JSONL →
top-10 prediction file. The reference (cn-clip 1.6.0, run from its own venv) is CUDA-only; here its ``.cuda()``
calls are patched to identity at run time (a shim, no copied code). Every one of our outputs is checked
byte-identical to the reference's.
Part 2 (library, large gallery): a 200,000-image gallery from ``.npy``, 1,000 queries: numpy / torch / faiss back
ends, plus a naive per-query Python sort (the reference's algorithm) timed on a few queries and extrapolated.
Each measurement runs in its own process; peak RSS comes from ``wait4``.

    .venv/bin/python benchmarks/topk.py [--passes 3] [--skip-large] [--ref-python .refvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import reference  # benchmarks/reference.py: where the reference venv is

SIZE_ARGS = ("n_images", "n_texts", "dim", "large_gallery", "large_queries")
CUDA_SHIM = (
    "import runpy, sys, torch\n"
    "torch.Tensor.cuda = lambda self, *a, **k: self\n"
    "module = sys.argv[1]\n"
    "sys.argv = [module] + sys.argv[2:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def machine() -> str:
    from cn_clip.deploy.benchmark import cpu_model

    cpu = cpu_model()
    return f"{platform.node()} | {cpu} | {os.cpu_count()} cores | Python {platform.python_version()}"


def run_timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def write_features(path: Path, key: str, ids: range, matrix: np.ndarray) -> None:
    with open(path, "w") as handle:  # the reference's line format: json.dumps of tolist() floats
        for item, row in zip(ids, matrix.tolist(), strict=True):
            handle.write(json.dumps({key: item, "feature": row}) + "\n")


def normalised(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def part_end_to_end(args: argparse.Namespace, work: Path) -> None:
    img, txt = work / "img.jsonl", work / "txt.jsonl"
    # Data are made in a child: Linux keeps ru_maxrss across exec, so a big parent would inflate every child's peak.
    spawn_worker("gen_jsonl", args, work)
    shim = work / "cuda_shim.py"
    shim.write_text(CUDA_SHIM)
    io = ["--image-feats", str(img), "--text-feats", str(txt), "--top-k", "10"]
    ref_out = work / "ref.jsonl"
    variants = {
        "reference (cuda→cpu shim)": [
            args.ref_python,
            "-P",
            str(shim),
            "cn_clip.eval.make_topk_predictions",
            *io,
            "--output",
            str(ref_out),
        ],
        "python start + cn_clip import": [sys.executable, "-c", "import cn_clip.eval.make_topk_predictions"],
    }
    for backend in args.backends:
        variants[f"cn_clip --backend {backend}"] = [
            sys.executable,
            "-m",
            "cn_clip.eval.make_topk_predictions",
            *io,
            "--backend",
            backend,
            "--output",
            str(work / f"{backend}.jsonl"),
        ]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for p in range(args.passes):  # interleaved: load changes hit every variant alike
        for name, cmd in variants.items():
            times[name].append(run_timed(cmd, work))
            print(f"  pass {p + 1} {name}: {times[name][-1][0]:.2f} s", file=sys.stderr)
    identical = {b: (work / f"{b}.jsonl").read_bytes() == ref_out.read_bytes() for b in args.backends}
    ref_median = statistics.median(t for t, _ in times["reference (cuda→cpu shim)"])
    print(
        f"\n### make_topk_predictions, {args.n_texts} texts × {args.n_images} images × {args.dim} dims, top-10, "
        f"JSONL in → JSONL out ({args.passes} interleaved passes)\n"
    )
    print("| command | median s | min s | peak RSS MiB | speed-up (median) | output == reference |")
    print("|---|---|---|---|---|---|")
    for name, runs in times.items():
        walls = [t for t, _ in runs]
        med = statistics.median(walls)
        same = "—" if not name.startswith("cn_clip") else ("yes" if identical[name.split()[-1]] else "**NO**")
        speed = "" if name.startswith("python start") else f"{ref_median / med:.1f}×"
        print(f"| {name} | {med:.2f} | {min(walls):.2f} | {max(r for _, r in runs):.0f} | {speed} | {same} |")


def part_large(args: argparse.Namespace, work: Path) -> None:
    spawn_worker("gen_npy", args, work)
    rows = []
    for backend in [*args.backends, "naive"]:
        _, rss = spawn_worker(backend, args, work)
        result = json.loads((work / f"worker_{backend}.json").read_text())
        rows.append((backend, result, rss))
    print(
        f"\n### top-10 over a {args.large_gallery:,}-image gallery (.npy, memory-mapped), {args.large_queries:,} "
        f"queries × {args.dim} dims, library call (one process each)\n"
    )
    print("| back end | seconds | queries/s | peak RSS MiB | same indices as numpy |")
    print("|---|---|---|---|---|")
    base = np.load(work / "worker_numpy.npy")
    for backend, result, rss in rows:
        if backend == "naive":
            note = f"(per-query Python sort, {result['queries']} queries, extrapolated)"
            same = "yes" if np.array_equal(np.load(work / "worker_naive.npy"), base[: result["queries"]]) else "no"
        else:
            note, same = "", "yes" if np.array_equal(np.load(work / f"worker_{backend}.npy"), base) else "no"
        seconds = result["seconds"] * args.large_queries / result["queries"]
        print(f"| {backend} {note} | {seconds:.2f} | {args.large_queries / seconds:.0f} | {rss:.0f} | {same} |")


def spawn_worker(task: str, args: argparse.Namespace, work: Path) -> tuple[float, float]:
    # -P: benchmarks/ may hold scripts named like stdlib modules; keep them off sys.path.
    sizes = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SIZE_ARGS]
    return run_timed([sys.executable, "-P", __file__, "--worker", task, "--workdir", str(work), *sizes], work)


def generate(task: str, args: argparse.Namespace, work: Path) -> None:
    if task == "gen_jsonl":
        ids = range(1_000_000, 1_000_000 + args.n_images)
        write_features(work / "img.jsonl", "image_id", ids, normalised(args.n_images, args.dim, 0))
        write_features(work / "txt.jsonl", "text_id", range(args.n_texts), normalised(args.n_texts, args.dim, 1))
    else:
        np.save(work / "gallery.npy", normalised(args.large_gallery, args.dim, 2))
        np.save(work / "queries.npy", normalised(args.large_queries, args.dim, 3))


def worker(backend: str, work: Path) -> None:
    from cn_clip.eval.topk import topk_search

    if backend == "torch":  # import cost is not search cost: load the back end before the clock starts
        import torch  # noqa: F401
    elif backend == "faiss":
        import faiss  # noqa: F401
    gallery = np.load(work / "gallery.npy", mmap_mode="r")
    queries = np.load(work / "queries.npy")
    if backend == "naive":  # the reference's algorithm: every score of a query into a list, sorted in Python
        queries = queries[:20]
        start = time.perf_counter()
        chunk = np.asarray(gallery)
        out = []
        for q in queries:
            scores = (q[None] @ chunk.T)[0].tolist()
            out.append([j for j, _ in sorted(enumerate(scores), key=lambda x: x[1], reverse=True)[:10]])
        indices = np.array(out)
    else:
        start = time.perf_counter()
        indices = topk_search(queries, gallery, 10, backend=backend).indices
    seconds = time.perf_counter() - start
    np.save(work / f"worker_{backend}.npy", indices)
    (work / f"worker_{backend}.json").write_text(json.dumps({"seconds": seconds, "queries": len(queries)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--n-images", type=int, default=5000)
    parser.add_argument("--n-texts", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--backends", nargs="+", default=["numpy", "torch", "faiss"])
    parser.add_argument("--ref-python", default=reference.REF_PYTHON, help="interpreter with cn-clip==1.6.0")
    parser.add_argument("--skip-reference-part", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--large-gallery", type=int, default=200_000)
    parser.add_argument("--large-queries", type=int, default=1000)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    if args.worker in ("gen_jsonl", "gen_npy"):
        generate(args.worker, args, Path(args.workdir))
        return
    if args.worker:
        worker(args.worker, Path(args.workdir))
        return
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if not args.skip_reference_part:
            part_end_to_end(args, Path(tmp))
        if not args.skip_large:
            part_large(args, Path(tmp))


if __name__ == "__main__":
    main()
