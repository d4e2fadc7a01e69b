"""Search service benchmark: a bounded load test of ``python -m cn_clip.search serve`` on 127.0.0.1, and the build
time, memory and recall@10 of the index types.

Part 1 (load): a 100,000-image flat gallery of synthetic 512-d features served with the ViT-B-16@RoBERTa-wwm-ext-
base-chinese towers (random weights: released weights cannot be downloaded here; the cost of a forward pass does
not depend on the weights). The server runs in its own process, built exactly as ``serve`` builds it (model and
index loaded and warmed before the port opens). K client threads send requests for T seconds each phase: text
queries (GET /api/search), then image uploads (POST /api/search, a 224×224 JPEG); then a second server whose queries go
through the exported ONNX towers (``serve --text-onnx/--image-onnx``, int8 by default). Baseline in the same run:
the same encode + search called in-process, one at a time, with no HTTP.
Part 2 (indexes): synthetic clustered features (rows around 1,000 centres, cosine ≈ 0.9 to their centre, as image
features cluster by content), 100,000 × 512 for flat / ivf / hnsw, and 1,000,000 × 512 for the approximate types
that fit the 1 GB goal. Memory is the serialised index size, which is what FAISS holds in RAM. recall@10 is
against exact search for 1,000 queries (gallery rows plus noise), the same measure ``index`` stores.

    .venv/bin/python benchmarks/serve.py [--clients 4] [--seconds 20] [--onnx int8] [--skip-load] [--skip-index]
        [--skip-1m]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# OpenMP threads that spin while waiting stall each other on a shared, oversubscribed machine; sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ARCH = "ViT-B-16@RoBERTa-wwm-ext-base-chinese"
MAX_CLIENTS, MAX_SECONDS = 16, 120
QUERIES = ["红色连衣裙", "一只猫在草地上", "海边的日落", "黑色运动鞋", "蓝天白云", "杰尼龟", "城市夜景", "手机壳"]


def machine() -> str:
    from cn_clip.deploy.benchmark import cpu_model

    return f"{platform.node()} | {cpu_model()} | {os.cpu_count()} cores | Python {platform.python_version()}"


def clustered(n: int, dim: int = 512, centres: int = 1000, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """L2-normalised rows ``centre + noise·N(0, I)``, built in chunks (1M × 512 float32 is 2 GB)."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((centres, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        rows = centre[rng.integers(0, centres, stop - start)]
        rows += noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def write_gallery(directory: Path, n: int) -> Path:
    """A flat index directory of ``n`` synthetic rows whose images all come from one small folder."""
    from PIL import Image

    from cn_clip.search import store

    folder = directory / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    meta = {"architecture": ARCH, "checkpoint": "(random weights)", "resolution": 224, "context_length": 52}
    meta |= {"logit_scale": 100.0, "precision": "fp32", "sources": [{"kind": "folder", "path": str(folder)}]}
    locations = [[0, f"{i % 16}.jpg"] for i in range(n)]
    store.create(directory / "idx", clustered(n), list(range(n)), locations, meta, "flat")
    return directory / "idx"


def bench_model():
    """The served model: ViT-B-16 towers, randomly initialised from a fixed seed (the same in every process)."""
    import torch

    from cn_clip.models.factory import create_model

    torch.manual_seed(0)
    return create_model(ARCH).eval()


def export_towers(work: Path, precision: str) -> dict[str, str]:
    """``serve --text-onnx/--image-onnx``'s inputs: the bench model's towers exported to ONNX at ``precision``."""
    from cn_clip.deploy import onnx_export as O

    model = bench_model()
    paths = {}
    for kind in ("txt", "img"):
        started = time.perf_counter()
        O.export_encoder(model, kind, work / "bench", precisions=(precision,), check=False)
        print(f"exported the {kind} tower ({precision}) in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        paths[kind] = str(O.onnx_path(work / "bench", kind, precision))
    return paths


def serve_child(index_dir: str, port: int, ready: multiprocessing.Event, onnx: dict[str, str] | None = None) -> None:
    """The server process: what ``serve`` does, with a randomly initialised model instead of a checkpoint."""
    import uvicorn

    from cn_clip.search.engine import SearchEngine
    from cn_clip.search.serve import Limits, create_app, onnx_encoder

    model = bench_model()
    names = {"txt": "text_encoder", "img": "image_encoder"}
    encoders = {names[kind]: onnx_encoder(path, model, "cpu", kind) for kind, path in (onnx or {}).items()}
    engine = SearchEngine(index_dir, model, device="cpu", **encoders)
    engine.warm_up()
    app = create_app(engine, Limits(watch_interval=0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=lambda: (time.sleep(0.5), ready.set()), daemon=True).start()
    server.run()


def jpeg(size: int = 224) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = np.random.default_rng(2).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run_clients(client: Callable[[int], None], clients: int) -> float:
    """Run ``client(worker)`` on ``clients`` threads at once; wall seconds until all are done."""
    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began


def load_phase(url: str, clients: int, seconds: float, kind: str) -> dict:
    """K threads, each sending requests back to back for ``seconds``; latencies of the successful ones."""
    import httpx

    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    body = jpeg()
    stop_at = time.perf_counter() + seconds

    def client(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as session:
            i = worker
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                if kind == "text":
                    response = session.get("/api/search", params={"q": QUERIES[i % len(QUERIES)], "k": 20})
                else:
                    response = session.post("/api/search", files={"image": ("q.jpg", body, "image/jpeg")})
                took = time.perf_counter() - start
                with lock:
                    (latencies.append(took) if response.status_code == 200 else errors.append(response.status_code))
                i += clients

    wall = run_clients(client, clients)
    ms = 1e3 * np.asarray(latencies)
    p50, p95, p99 = np.percentile(ms, [50, 95, 99]) if len(ms) else (float("nan"),) * 3
    return {"kind": kind, "clients": clients, "requests": len(ms), "errors": len(errors), "qps": len(ms) / wall,
            "p50": p50, "p95": p95, "p99": p99}  # fmt: skip


def in_process_baseline(index_dir: Path, n: int, clients: int, seconds: float) -> dict:
    """The same work with no HTTP: one text at a time (median of ``n``), then ``clients`` threads for ``seconds``
    with micro-batching off (``max_batch`` 1) and on (32): what batching buys on this machine."""
    from cn_clip.search.engine import SearchEngine

    engine = SearchEngine(index_dir, bench_model(), device="cpu")
    engine.warm_up()

    def one(i: int) -> float:
        start = time.perf_counter()
        vector = engine.encode_text(QUERIES[i % len(QUERIES)]).result()
        engine.search(engine.gallery, vector, 20, 0)
        return time.perf_counter() - start

    single = float(np.median([one(i) for i in range(n)]))
    out = {"p50": 1e3 * single, "qps": 1 / single}
    for max_batch in (1, 32):
        engine.batcher.max_batch = max_batch
        done: list[float] = []
        stop_at = time.perf_counter() + seconds

        def client(worker: int, done: list[float] = done, stop_at: float = stop_at) -> None:
            i = worker
            while time.perf_counter() < stop_at:
                done.append(one(i))
                i += clients

        wall = run_clients(client, clients)
        out[f"batch{max_batch}"] = (len(done) / wall, 1e3 * float(np.median(done)))
    engine.close()
    return out


def start_server(index_dir: Path, onnx: dict[str, str] | None) -> tuple[Any, str, float]:
    """A server process on a free port of 127.0.0.1, once it listens: (process, base URL, start-up seconds)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    started = time.perf_counter()
    child = context.Process(target=serve_child, args=(str(index_dir), port, ready, onnx), daemon=True)
    child.start()
    if not ready.wait(600):
        child.kill()
        raise RuntimeError("the server did not start in 10 minutes")
    return child, f"http://127.0.0.1:{port}", time.perf_counter() - started


def run_load(args: argparse.Namespace, work: Path) -> list[str]:
    index_dir = write_gallery(work, args.gallery)
    child, url, startup = start_server(index_dir, None)
    try:
        phases = [load_phase(url, args.clients, args.seconds, kind) for kind in ("text", "image")]
        single = load_phase(url, 1, args.seconds / 2, "text")
    finally:
        child.kill()
        child.join()
    onnx_rows = []
    for precision in filter(None, args.onnx.split(",")):
        child, url, _ = start_server(index_dir, export_towers(work, precision))
        try:
            for kind, clients in (("text", 1), ("text", args.clients), ("image", args.clients)):
                row = load_phase(url, clients, args.seconds / (2 if clients == 1 else 1), kind)
                onnx_rows.append({**row, "kind": f"{kind} (--{kind}-onnx {precision})"})
        finally:
            child.kill()
            child.join()
    baseline = in_process_baseline(index_dir, 50, args.clients, args.seconds / 2)
    lines = [
        f"### Load test: {args.gallery:,} images (flat), {ARCH}, CPU fp32; server start + warm-up {startup:.1f} s",
        "",
        "| queries | clients | requests | errors | p50 ms | p95 ms | p99 ms | QPS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in (single, *phases, *onnx_rows):
        lines.append(
            f"| {row['kind']} → image | {row['clients']} | {row['requests']} | {row['errors']} | {row['p50']:.1f} "
            f"| {row['p95']:.1f} | {row['p99']:.1f} | {row['qps']:.1f} |"
        )
    lines.append(f"| baseline: text encode + search in-process, no HTTP | 1 | 50 | 0 | {baseline['p50']:.1f} | | "
                 f"| {baseline['qps']:.1f} |")  # fmt: skip
    for max_batch, label in ((1, "off"), (32, "on")):
        qps, p50 = baseline[f"batch{max_batch}"]
        lines.append(f"| in-process text, micro-batching {label} | {args.clients} | | | {p50:.1f} | | | {qps:.1f} |")
    return lines


def measure_index(kind: str, matrix: np.ndarray, queries: np.ndarray, settings: tuple[dict, ...] = ()) -> list[dict]:
    """Build ``kind``; one row for its default search settings, plus one per extra ivfpq search-time setting
    (``nprobe``: inverted lists visited; ``k_factor``: PQ candidates per wanted hit re-ranked with the SQ8 codes)
    measured on the same index."""
    import faiss

    from cn_clip.search import ann

    index, spec, stats = ann.build_measured(kind, matrix)
    size = faiss.serialize_index(index).nbytes

    def row(label: str, recall: float) -> dict:
        start = time.perf_counter()
        index.search(queries, 10)
        per_query = 1e3 * (time.perf_counter() - start) / len(queries)
        return {"kind": label, "factory": spec.factory, "rows": len(matrix), "build": stats["build_seconds"],
                "mib": size / 2**20, "recall": recall, "ms": per_query}  # fmt: skip

    rows = [row(kind, stats.get("recall_at_10", 1.0))]
    for setting in settings if kind == "ivfpq" else ():
        ann.apply_params(index, {**spec.params, **setting})
        label = ", ".join(f"{name} {value}" for name, value in {**spec.params, **setting}.items())
        rows.append(row(f"ivfpq ({label})", ann.recall_at_k(index, matrix)))
    return rows


def run_indexes(args: argparse.Namespace) -> list[str]:
    rows = []
    queries = clustered(1000, seed=5)
    settings = tuple(
        {name: int(value) for name, value in (pair.split("=") for pair in setting.split(":"))}
        for setting in args.ivfpq_settings.split(",")
        if setting
    )
    if not args.only_1m:
        matrix = clustered(100_000)
        for kind in ("flat", "ivf", "hnsw", "ivfpq"):
            rows += measure_index(kind, matrix, queries, settings)
            print(rows[-1], file=sys.stderr, flush=True)
        del matrix
    if not args.skip_1m:
        matrix = clustered(1_000_000)
        for kind in args.types_1m.split(","):
            rows += measure_index(kind, matrix, queries, settings)
            print(rows[-1], file=sys.stderr, flush=True)
    lines = [
        "### Index types (synthetic clustered 512-d features, 1,000 queries, recall@10 against exact search)",
        "",
        "| rows | type | FAISS | build s | memory MiB | recall@10 | ms / query (batch of 1,000) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['rows']:,} | {row['kind']} | `{row['factory']}` | {row['build']:.1f} | {row['mib']:.0f} "
            f"| {row['recall']:.3f} | {row['ms']:.2f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help=f"concurrent clients K (at most {MAX_CLIENTS})")
    parser.add_argument("--seconds", type=float, default=20, help=f"seconds per phase T (at most {MAX_SECONDS})")
    parser.add_argument("--gallery", type=int, default=100_000, help="gallery size of the load test")
    parser.add_argument(
        "--onnx",
        default="int8",
        help="also serve queries through the exported towers at these precisions (--text-onnx/--image-onnx; "
        "comma-separated fp32,fp16,int8; '' for none)",
    )
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--skip-1m", action="store_true", help="leave out the 1,000,000-row indexes")
    parser.add_argument("--types-1m", default="ivfpq", help="approximate types built at 1,000,000 rows")
    parser.add_argument("--only-1m", action="store_true", help="leave out the 100,000-row indexes")
    parser.add_argument(
        "--ivfpq-settings", default="", help="extra ivfpq search settings, e.g. k_factor=32,nprobe=500:k_factor=32"
    )
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    if not (1 <= args.clients <= MAX_CLIENTS and 0 < args.seconds <= MAX_SECONDS):
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds 0..{MAX_SECONDS}")
    lines = [f"Machine: {machine()}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_load:
            lines += [*run_load(args, Path(tmp)), ""]
    if not args.skip_index:
        lines += run_indexes(args)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
