"""Checkpoint load time: cn_clip's ``load_from_name`` vs the reference's (cn-clip 1.6.0, own venv).

Both load the same file in the reference layout (``{"state_dict": {"module.…": …}, "epoch", "step", "name"}``) with
the released key and shape list (tests/fixtures/state_dict_keys) and deterministic random values
(tests/fixtures/fixture_weights.py), stored fp32 like the released files (3.8 GB for ViT-H-14; ``--dtype fp16``
halves that). Each run is a fresh process; ours and the reference alternate; the page cache is warmed by reading
the file once before the first run. Columns: ``load_from_name(path, device="cpu", vision_model_name=…,
text_model_name=…, input_resolution=…)`` alone (the modules it imports are imported first), then load plus the
first image and text features (memory-mapped weights are read when first used, so this is the honest total), the
same from process start (imports included), and the process's peak RSS. Medians of ``--runs``.

``--search`` also times a CLI's time to its first result: ``python -m cn_clip.search query`` on an index of a few
images built with the ViT-B-16 checkpoint, this tree against ``--baseline-tree`` (e.g. a ``git archive`` of the
commit before the change).

    .venv/bin/python benchmarks/load_time.py [--models RN50,ViT-B-16] [--runs 3] [--dtype fp32]
        [--search --baseline-tree /tmp/before] [--out benchmarks/results/load_time.md]
"""

from __future__ import annotations

import sys

# A script started from benchmarks/ would put this folder first on the import path; nothing here shadows stdlib,
# but keep the path clean so the reference's venv imports its own cn_clip.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCH = {
    "RN50": "RN50@RBT3-chinese",
    "ViT-B-16": "ViT-B-16@RoBERTa-wwm-ext-base-chinese",
    "ViT-H-14": "ViT-H-14@RoBERTa-wwm-ext-large-chinese",
}
# benchmarks/reference.py, read by path: this script keeps its own folder off sys.path (above)
REF_PYTHON = runpy.run_path(str(Path(__file__).with_name("reference.py")))["REF_PYTHON"]


# ----------------------------------------------------------------------------------------------------- worker
def worker(spec: dict) -> dict:
    """Runs in the measured interpreter (ours or the reference's): time load_from_name, then the first features."""
    import torch

    torch.set_num_threads(spec["threads"])
    import cn_clip.clip as clip

    # What load_from_name imports lazily (ours) is imported here, outside the timed call, as the reference does at
    # `import cn_clip.clip`; the process-start column counts all imports for both.
    clip.tokenize(["预热"], context_length=52)
    clip.image_transform(224)
    if spec["impl"] == "ours":
        import transformers.models.bert.modeling_bert  # noqa: F401

        import cn_clip.models.factory  # noqa: F401

    vision, text = spec["arch"].split("@")
    start = time.perf_counter()
    model, _ = clip.load_from_name(
        spec["ckpt"], device="cpu", vision_model_name=vision, text_model_name=text, input_resolution=224
    )
    loaded = time.perf_counter() - start
    model.eval()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = clip.tokenize(["一只猫"], context_length=52)
    with torch.no_grad():
        model.encode_image(image)
        model.encode_text(tokens)
    first = time.perf_counter() - start
    return {"load_s": loaded, "first_s": first, "process_s": time.time() - spec["t0"], "rss_gb": _peak_rss_gb()}


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# ----------------------------------------------------------------------------------------------------- driver
def make_checkpoint(arch: str, dtype: str, out: Path) -> Path:
    """The reference file layout with the released keys and shapes, one tensor generated at a time."""
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from fixture_weights import KEYS_DIR, fixture_tensor, read_key_shapes

    path = out / f"{arch}.{dtype}.pt"
    if path.is_file():
        return path
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    state = {}
    for key, shape in read_key_shapes(KEYS_DIR / f"{arch}.tsv"):
        value = fixture_tensor(key, shape)
        state[f"module.{key}"] = value if not value.is_floating_point() else value.to(dtypes[dtype])
    tmp = path.with_suffix(".part")
    torch.save({"epoch": 1, "step": 10, "name": "load_time", "state_dict": state}, tmp)
    os.replace(tmp, path)
    return path


def warm_page_cache(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(1 << 24):
            pass


def run_worker(impl: str, spec: dict) -> dict:
    if impl == "reference":  # -P and a cwd outside the repo: the reference venv imports its own cn_clip
        cmd, env, cwd = [REF_PYTHON, "-P", __file__], dict(os.environ), tempfile.gettempdir()
        env.pop("PYTHONPATH", None)
    else:
        cmd, env, cwd = [sys.executable, __file__], {**os.environ, "PYTHONPATH": str(ROOT)}, str(ROOT)
    spec = {**spec, "impl": impl, "t0": time.time()}
    proc = subprocess.run(
        [*cmd, "--worker", json.dumps(spec)], env=env, cwd=cwd, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{impl} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_load(models: list[str], runs: int, dtype: str, threads: int, workdir: Path) -> list[str]:
    rows = [
        "| model | file | implementation | load_from_name (s) | speed-up | load + first features (s) | "
        "process start → first features (s) | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for short in models:
        arch = ARCH[short]
        path = make_checkpoint(arch, dtype, workdir)
        warm_page_cache(path)
        spec = {"arch": arch, "ckpt": str(path), "threads": threads}
        results: dict[str, list[dict]] = {"reference": [], "ours": []}
        for _ in range(runs):
            for impl in results:  # interleaved: a slow spell on the shared machine hits both
                results[impl].append(run_worker(impl, spec))
                print(short, impl, results[impl][-1], flush=True)
        median = {impl: {k: statistics.median(r[k] for r in res) for k in res[0]} for impl, res in results.items()}
        size = f"{path.stat().st_size / 1e9:.2f} GB {dtype}"
        for impl in ("reference", "ours"):
            m = median[impl]
            speedup = median["reference"]["load_s"] / m["load_s"]
            label = "reference cn-clip 1.6.0" if impl == "reference" else "cn_clip"
            rows.append(
                f"| {short} | {size} | {label} | {m['load_s']:.2f} | {speedup:.1f}× | {m['first_s']:.2f} | "
                f"{m['process_s']:.2f} | {m['rss_gb']:.2f} |"
            )
        if short == "ViT-H-14":
            path.unlink()  # 3.8 GB: do not leave it behind
    return rows


def bench_search(runs: int, baseline: Path, workdir: Path) -> list[str]:
    """Wall time of ``python -m cn_clip.search query`` (process start to exit) on a small ViT-B-16 index."""
    import numpy as np
    from PIL import Image

    ckpt = make_checkpoint(ARCH["ViT-B-16"], "fp32", workdir)
    photos = workdir / "photos"
    photos.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    index = workdir / "index"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "cn_clip.search", "index", "--image-data", str(photos), "--resume", str(ckpt)]
        + ["--out", str(index), "--overwrite", "--device", "cpu", "--num-workers", "0", "--no-progress"],
        env=env,
        check=True,
        capture_output=True,
    )
    warm_page_cache(ckpt)
    trees = {"before": baseline, "after": ROOT}
    times: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(runs):
        for name, tree in trees.items():
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "cn_clip.search", "query", "--index", str(index), "一只猫", "--top-k", "5"]
                + ["--device", "cpu"],
                env={**os.environ, "PYTHONPATH": str(tree)},
                cwd=str(tree),
                check=True,
                capture_output=True,
            )
            times[name].append(time.perf_counter() - start)
            print("search query", name, f"{times[name][-1]:.2f} s", flush=True)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    return [
        "| command | before (s) | after (s) | speed-up |",
        "|---|---|---|---|",
        f"| `python -m cn_clip.search query` (ViT-B-16, 753 MB fp32) | {before:.2f} | {after:.2f} | "
        f"{before / after:.1f}× |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="RN50,ViT-B-16,ViT-H-14")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--search", action="store_true", help="also time `search query` against --baseline-tree")
    parser.add_argument("--baseline-tree", type=Path, help="a checkout of the code before the change")
    parser.add_argument("--workdir", type=Path, help="keep checkpoints here (ViT-H-14: removed)")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from cn_clip.deploy.benchmark import cpu_model

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        models = [m for m in args.models.split(",") if m]
        lines = [f"Machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads; {args.runs} runs each."]
        lines += ["", *bench_load(models, args.runs, args.dtype, args.threads, workdir)] if models else []
        if args.search:
            if args.baseline_tree is None:
                raise SystemExit("--search needs --baseline-tree")
            lines += ["", *bench_search(args.runs, args.baseline_tree.resolve(), workdir)]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
