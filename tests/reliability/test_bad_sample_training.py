"""A corrupted image inside a training LMDB: default policy fails naming the id; ``skip`` trains and counts."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from cn_clip.cli.runner import run_cli
from tests.helpers import TINY_FLAGS

pytestmark = pytest.mark.reliability


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((32, 32), 40 + seed).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corrupted_lmdb(tmp_path_factory) -> Path:
    from cn_clip.data.lmdb_build import build_lmdb

    raw = tmp_path_factory.mktemp("raw")
    images = {i: _jpeg(i) for i in range(8)}
    images[5] = images[5][: len(images[5]) // 2]  # truncated JPEG: the header still opens, the pixels do not
    (raw / "train_imgs.tsv").write_text(
        "".join(f"{i}\t{base64.b64encode(b).decode()}\n" for i, b in images.items()), encoding="utf-8"
    )
    texts = [{"text_id": 100 + i, "text": f"第{i}张图片", "image_ids": [i]} for i in images]
    (raw / "train_texts.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), "utf-8")
    build_lmdb(raw, ["train"], check_images="off")  # as an LMDB built by the reference (no validation) would be
    return raw / "lmdb" / "train"


def _argv(lmdb: Path, logs: Path, *extra: str) -> list[str]:
    return [
        "--train-data", str(lmdb), *TINY_FLAGS,
        "--batch-size", "4", "--num-workers", "0", "--logs", str(logs), "--name", "bad", "--max-steps", "2",
        "--precision", "fp32", "--warmup", "1", *extra,
    ]  # fmt: skip


def test_default_policy_fails_naming_the_image(corrupted_lmdb: Path, tmp_path: Path, capsys) -> None:
    from cn_clip.training.main import main

    code = run_cli(main, _argv(corrupted_lmdb, tmp_path))
    err = capsys.readouterr().err
    assert code == 2
    assert "image_id 5" in err and "truncated" in err.lower() and "Traceback" not in err


def test_skip_policy_trains_and_counts(corrupted_lmdb: Path, tmp_path: Path, capsys) -> None:
    from cn_clip.training.main import main

    code = run_cli(main, _argv(corrupted_lmdb, tmp_path, "--on-bad-sample", "skip"))
    err = capsys.readouterr().err  # the trainer configures logging itself (console + file)
    assert code == 0
    assert "skipping bad sample (1 so far)" in err and "image_id 5" in err
    assert (tmp_path / "bad" / "checkpoints" / "epoch_latest.pt").is_file()
