"""A full disk gives one clear error and leaves nothing half-written (simulated by patched writes)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cn_clip.cli.runner import run_cli
from cn_clip.fileio import atomic_write

pytestmark = pytest.mark.reliability


def _write_raw(data_dir: Path) -> None:
    import base64
    import io
    import json

    from PIL import Image

    data_dir.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    (data_dir / "train_imgs.tsv").write_text(f"1\t{b64}\n2\t{b64}\n", encoding="utf-8")
    lines = [{"text_id": 1, "text": "红色方块", "image_ids": [1]}, {"text_id": 2, "text": "另一张", "image_ids": [2]}]
    (data_dir / "train_texts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def test_lmdb_build_on_a_full_disk(tmp_path: Path, monkeypatch, capsys) -> None:
    import lmdb

    from cn_clip.data import lmdb_build
    from cn_clip.preprocess.build_lmdb_dataset import main

    data_dir = tmp_path / "raw"
    _write_raw(data_dir)

    def full_disk(self) -> None:
        raise lmdb.DiskError("mdb_txn_commit: No space left on device")

    monkeypatch.setattr(lmdb_build.LmdbWriter, "flush", full_disk)
    code = run_cli(main, ["--data_dir", str(data_dir), "--splits", "train"])
    err = capsys.readouterr().err
    assert code == 2
    assert "No space left on device" in err and "nothing was written" in err and "Traceback" not in err
    assert not (data_dir / "lmdb" / "train").exists()
    leftovers = list((data_dir / "lmdb").iterdir()) if (data_dir / "lmdb").exists() else []
    assert leftovers == []


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "epoch_latest.pt"
    target.write_bytes(b"previous checkpoint")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"), atomic_write(target, "wb") as handle:
        handle.write(b"new checkpoint")
    assert target.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_latest.pt"]


def test_runner_turns_enospc_into_one_line(capsys) -> None:
    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.jsonl")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err.strip() == "error: no space left on device while writing /data/out.jsonl"
