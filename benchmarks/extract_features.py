"""Feature-extraction benchmark: ``cn_clip.eval.extract_features`` against the reference script, same inputs.

RN50@RBT3-chinese with the deterministic fixture weights (tests/fixtures/fixture_weights.py), N random Chinese
texts of 2–40 characters and M random 256×256 JPEGs in an ``imgs`` LMDB. Both run as subprocesses (wall time
includes start-up and model loading; the reference runs from its own venv with ``.cuda()`` made a no-op by the
fixture generator's wrapper, ``--precision fp32`` on both sides). Passes alternate reference/ours; features are
checked equal to 1e-5.

    .venv/bin/python benchmarks/extract_features.py [--texts 1000] [--images 64] [--passes 2]

Measured 2026-11-25 (2-core AMD EPYC, shared and loaded; --texts 1000 --images 48 --passes 2, min of 2):
1000 texts: reference 47.95 s, cn_clip 25.73 s (1.86x); 48 images: 22.67 s vs 21.23 s (1.07x). Each side
spends ~10 s starting up and building the model; the image tower is compute-bound (compatibility.md#baselines).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reference  # benchmarks/reference.py: where the reference venv is

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
REF_WRAPPER = (
    "import sys; sys.path.insert(0, {fixtures!r})\n"
    "from gen_extract_zeroshot_fixtures import run_reference_script\n"
    "run_reference_script('extract_features', sys.argv[1:])\n"
)


def make_data(root: Path, n_texts: int, n_images: int) -> tuple[Path, Path]:
    import lmdb
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    texts = root / "bench_texts.jsonl"
    with open(texts, "w", encoding="utf-8") as handle:
        for i in range(n_texts):
            text = "".join(rng.choice(chars, int(rng.integers(2, 41))))
            handle.write(json.dumps({"text_id": i, "text": text, "image_ids": []}, ensure_ascii=False) + "\n")
    imgs = root / "lmdb" / "imgs"
    imgs.mkdir(parents=True)
    env = lmdb.open(str(imgs), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i in range(n_images):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            import base64

            txn.put(str(1000 + i).encode(), base64.b64encode(buffer.getvalue()))
        txn.put(b"num_images", str(n_images).encode())
    env.close()
    return texts, imgs


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--ref-python", default=reference.REF_PYTHON)
    args = parser.parse_args()
    # benchmarks/tokenize.py would shadow the standard library's tokenize (torch reaches it through linecache).
    sys.path[:] = [p for p in sys.path if p not in ("", str(Path(__file__).parent))]
    sys.path.insert(0, str(FIXTURES))
    import numpy as np
    import torch
    from fixture_weights import KEYS_DIR, read_key_shapes, reference_checkpoint

    from cn_clip.eval.featio import read_features

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        texts, imgs = make_data(tmp, args.texts, args.images)
        ckpt = tmp / "ckpt.pt"
        torch.save(reference_checkpoint(read_key_shapes(KEYS_DIR / "RN50@RBT3-chinese.tsv")), ckpt)
        common = ["--image-data", str(imgs), "--text-data", str(texts), "--resume", str(ckpt), "--precision", "fp32"]
        common += ["--vision-model", "RN50", "--text-model", "RBT3-chinese"]
        sides = {
            "reference": [args.ref_python, "-c", REF_WRAPPER.format(fixtures=str(FIXTURES))],
            "cn_clip": [sys.executable, "-m", "cn_clip.eval.extract_features", "--no-progress"],
        }
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.passes):
            for side, cmd in sides.items():
                for kind, flag in (("texts", "--extract-text-feats"), ("images", "--extract-image-feats")):
                    outputs = ["--text-feat-output-path", str(tmp / f"{side}.txt.jsonl")]
                    outputs += ["--image-feat-output-path", str(tmp / f"{side}.img.jsonl")]
                    env_cwd = tmp if side == "reference" else ROOT  # the reference must not import our cn_clip
                    times.setdefault((side, kind), []).append(timed([*cmd, flag, *common, *outputs], env_cwd))
        for name, key in (("txt", "text_id"), ("img", "image_id")):
            ref = read_features(tmp / f"reference.{name}.jsonl", key)
            ours = read_features(tmp / f"cn_clip.{name}.jsonl", key)
            assert ref.ids == ours.ids
            diff = float(np.abs(ref.matrix - ours.matrix).max())
            assert diff <= 1e-5, diff
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}"
    )
    print(f"{'workload':<34}{'reference s (min)':>18}{'cn_clip s (min)':>18}{'speed-up':>10}")
    for kind, n in (("texts", args.texts), ("images", args.images)):
        ref, ours = min(times[("reference", kind)]), min(times[("cn_clip", kind)])
        label = f"{n} {kind}, RN50@RBT3, fp32, CPU"
        print(f"{label:<34}{ref:>18.2f}{ours:>18.2f}{ref / ours:>9.2f}x")


if __name__ == "__main__":
    main()
