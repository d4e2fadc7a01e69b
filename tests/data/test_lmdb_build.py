"""build_lmdb_dataset: reference layout, up-front validation, atomic writes, --skip-bad."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from cn_clip.cli.runner import run_cli
from cn_clip.data import lmdb_build
from cn_clip.errors import DataError
from cn_clip.preprocess.build_lmdb_dataset import main

from .helpers import FIXTURES, b64, good_split, image_bytes, leftovers, lmdb_items, write_split

REPO = Path(__file__).resolve().parents[2]


def _dump(lmdb_dir: Path, splits) -> dict:
    out = {}
    for split in splits:
        out[split] = {
            sub: [[k.hex(), v.hex()] for k, v in sorted(lmdb_items(lmdb_dir / split / sub).items())]
            for sub in ("imgs", "pairs")
        }
    return out


def test_layout_is_byte_identical_to_the_reference(tmp_path):
    reference = json.loads((FIXTURES / "reference_dump.json").read_text(encoding="utf-8"))
    assert main(["--data_dir", str(FIXTURES / "raw"), "--splits", "train,valid,test", "--lmdb_dir", str(tmp_path)]) == 0
    assert _dump(tmp_path, ("train", "valid", "test")) == reference


def test_counts_ids_and_pickles(raw_dir):
    assert main(["--data_dir", str(raw_dir), "--splits", "train"]) == 0
    pairs = lmdb_items(raw_dir / "lmdb" / "train" / "pairs")
    imgs = lmdb_items(raw_dir / "lmdb" / "train" / "imgs")
    assert pairs[b"num_samples"] == b"3" and imgs[b"num_images"] == b"3"
    assert pickle.loads(pairs[b"1"]) == (101, 1, "第1张图片")
    assert imgs[b"102"] == b64(image_bytes(2)).encode()


def test_splits_keep_the_given_order(raw_dir, capsys):
    good_split(raw_dir, "valid")
    assert main(["--data_dir", str(raw_dir), "--splits", "valid,train,valid"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "Dataset splits to be processed: valid, train"
    assert out.index("valid split pairs") < out.index("train split pairs")
    assert out.rstrip().endswith("done!")


def test_test_split_texts_without_images(tmp_path):
    write_split(tmp_path, "test", [(1, image_bytes())], [{"text_id": 1, "text": "无图", "image_ids": []}])
    assert main(["--data_dir", str(tmp_path), "--splits", "test"]) == 0
    assert lmdb_items(tmp_path / "lmdb" / "test" / "pairs") == {b"num_samples": b"0"}


# ------------------------------------------------------------------------------------------------- validation table

BAD_CASES = {
    "one field": (
        {"imgs_lines": ["1003"]},
        "train_imgs.tsv:4: expected 2 tab-separated fields (image_id, base64), found 1",
    ),
    "three fields": ({"imgs_lines": ["1003\tQUJD\tx"]}, "train_imgs.tsv:4: expected 2 tab-separated fields"),
    "base64 alphabet": (
        {"imgs_lines": ["1003\t@@@@"]},
        "train_imgs.tsv:4: image_id 1003: invalid base64: character '@'",
    ),
    "base64 length": ({"imgs_lines": ["1003\tQUJDR"]}, "train_imgs.tsv:4: image_id 1003: invalid base64: length 5"),
    "base64 padding": (
        {"imgs_lines": ["1003\tQU==QUJD"]},
        "train_imgs.tsv:4: image_id 1003: invalid base64: '=' padding",
    ),
    "not an image": (
        {"imgs_lines": ["1003\t" + b64(b"this is not an image at all")]},
        "train_imgs.tsv:4: image_id 1003: not an image Pillow can open",
    ),
    "duplicate image id": (
        {"imgs_lines": ["101\t" + b64(image_bytes(9))]},
        "train_imgs.tsv:4: image_id 101: duplicate image id (first at line 2)",
    ),
    "reserved image id": (
        {"imgs_lines": ["num_images\t" + b64(image_bytes(9))]},
        "train_imgs.tsv:4: image_id num_images: reserved key",
    ),
    "bad JSON": ({"texts_lines": ['{"text_id": 9, "text": "x", ']}, "train_texts.jsonl:4: invalid JSON"),
    "not an object": ({"texts_lines": ["[1, 2]"]}, "train_texts.jsonl:4: expected a JSON object, found list"),
    "missing fields": (
        {"texts_lines": ['{"text_id": 9, "text": "x"}']},
        "train_texts.jsonl:4: missing field(s) image_ids",
    ),
    "image_ids not a list": (
        {"texts_lines": ['{"text_id": 9, "text": "x", "image_ids": 100}']},
        "train_texts.jsonl:4: text_id 9: image_ids must be a list",
    ),
    "bool id": (
        {"texts_lines": ['{"text_id": true, "text": "x", "image_ids": []}']},
        "train_texts.jsonl:4: text_id True must be",
    ),
    "duplicate text id": (
        {"texts_lines": ['{"text_id": 1, "text": "x", "image_ids": [100]}']},
        "train_texts.jsonl:4: text_id 1: duplicate text id (first at line 2)",
    ),
    "missing image id": (
        {"texts_lines": ['{"text_id": 9, "text": "x", "image_ids": [100, 999]}']},
        "train_texts.jsonl:4: text_id 9: image_id 999 not in train_imgs.tsv",
    ),
    "int id vs zero-padded key": (
        {
            "imgs_lines": ["007\t" + b64(image_bytes(9))],
            "texts_lines": ['{"text_id": 9, "text": "x", "image_ids": [7]}'],
        },
        "train_texts.jsonl:4: text_id 9: image_id 7 not in train_imgs.tsv",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_reported_and_nothing_is_written(tmp_path, capsys, case):
    extra, expected = BAD_CASES[case]
    images = [(100 + i, image_bytes(i)) for i in range(3)]
    texts = [{"text_id": i, "text": f"图{i}", "image_ids": [100 + i]} for i in range(3)]
    write_split(tmp_path, "train", images, texts, **extra)
    code = run_cli(main, ["--data_dir", str(tmp_path), "--splits", "train"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err, err
    assert "nothing was written" in err
    assert leftovers(tmp_path / "lmdb") == []


def test_missing_file_is_reported(tmp_path, capsys):
    good_split(tmp_path)
    (tmp_path / "train_imgs.tsv").unlink()
    assert run_cli(main, ["--data_dir", str(tmp_path), "--splits", "train"]) == 2
    assert f"train_imgs.tsv: file not found in {tmp_path}" in capsys.readouterr().err


def test_missing_data_dir(tmp_path, capsys):
    assert run_cli(main, ["--data_dir", str(tmp_path / "nope"), "--splits", "train"]) == 2
    assert "The data_dir does not exist!" in capsys.readouterr().err


def test_all_problems_at_once_and_capped(tmp_path):
    good_split(tmp_path, "valid")
    bad_imgs = [f"{500 + i}\tnot-base64!" for i in range(25)]
    write_split(tmp_path, "train", [(1, image_bytes())], [{"text_id": 1, "text": "x", "image_ids": [1, 2]}], bad_imgs)
    with pytest.raises(DataError) as info:
        lmdb_build.build_lmdb(tmp_path, ["valid", "train"])
    message = str(info.value)
    assert message.startswith("26 problem(s) in 2 file(s); nothing was written")
    assert "train_imgs.tsv:2: image_id 500: invalid base64" in message
    assert "... and 6 more" in message
    assert leftovers(tmp_path / "lmdb") == []  # the clean valid split is not built either


def test_report_file_lists_every_problem(tmp_path):
    bad_imgs = [f"{500 + i}\t@" for i in range(25)]
    write_split(tmp_path, "train", [(1, image_bytes())], [{"text_id": 1, "text": "x", "image_ids": [1]}], bad_imgs)
    with pytest.raises(DataError, match="full list in"):
        lmdb_build.build_lmdb(tmp_path, ["train"], report=tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "failed" and len(report["problems"]) == 25
    assert report["problems"][0] == {
        "file": "train_imgs.tsv",
        "line": 2,
        "id": "image_id 500",
        "problem": report["problems"][0]["problem"],
    }


def _cut_jpeg(share: float = 0.6) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    truncated = buf.getvalue()[: int(len(buf.getvalue()) * share)]
    return truncated[: len(truncated) // 3 * 3]  # base64 length stays a multiple of 4


@pytest.mark.parametrize("check", [[], ["--check-images", "full"]], ids=["header", "full"])
def test_truncated_jpeg_is_reported_with_line_and_id(tmp_path, check):
    good = image_bytes(1, "JPEG", size=(64, 64))
    images = [(1, good), (2, _cut_jpeg(0.6))]
    texts = [{"text_id": i, "text": "x", "image_ids": [i]} for i in (1, 2)]
    write_split(tmp_path, "train", images, texts)
    argv = ["--data_dir", str(tmp_path), "--splits", "train", "--lmdb_dir", str(tmp_path / "a"), *check]
    with pytest.raises(DataError, match=r"train_imgs.tsv:2: image_id 2: not an image Pillow can open .*truncated"):
        main(argv)
    assert not (tmp_path / "a" / "train").exists()
    assert main([*argv, "--skip-bad"]) == 0  # the truncated row is dropped, the good one kept
    assert (
        main(["--data_dir", str(tmp_path), "--splits", "train", "--lmdb_dir", str(tmp_path / "c"), "--no-check-images"])
        == 0
    )


def test_urlsafe_crlf_and_grayscale_rgba_webp_are_accepted(tmp_path):
    import base64

    images = [
        (1, image_bytes(1, "PNG", mode="L")),
        (2, image_bytes(2, "PNG", mode="RGBA")),
        (3, image_bytes(3, "WEBP")),
    ]
    lines = [f"{i}\t{base64.urlsafe_b64encode(raw).decode()}\r" for i, raw in images]
    texts = [{"text_id": i, "text": "表情 😀 “引号”", "image_ids": [i]} for i, _ in images]
    write_split(tmp_path, "train", texts=texts, imgs_lines=lines)
    assert main(["--data_dir", str(tmp_path), "--splits", "train"]) == 0
    assert lmdb_items(tmp_path / "lmdb" / "train" / "imgs")[b"num_images"] == b"3"


# ------------------------------------------------------------------------------------------------------- skip-bad


def test_skip_bad_drops_rows_and_reports_them(tmp_path):
    images = [(1, image_bytes(1)), (2, image_bytes(2))]
    texts = [
        {"text_id": 10, "text": "好", "image_ids": [1, 3]},
        {"text_id": 11, "text": "坏图", "image_ids": [4]},
        {"text_id": 12, "text": "也好", "image_ids": [2]},
    ]
    write_split(
        tmp_path, "train", images, texts, imgs_lines=["3\t" + b64(b"not an image"), "4\t@@"], texts_lines=["{oops"]
    )
    report = tmp_path / "dropped.json"
    assert main(["--data_dir", str(tmp_path), "--splits", "train", "--skip-bad", "--report", str(report)]) == 0
    pairs = lmdb_items(tmp_path / "lmdb" / "train" / "pairs")
    assert pairs[b"num_samples"] == b"2"
    assert [pickle.loads(pairs[k]) for k in (b"0", b"1")] == [(1, 10, "好"), (2, 12, "也好")]
    assert set(lmdb_items(tmp_path / "lmdb" / "train" / "imgs")) == {b"1", b"2", b"num_images"}
    dropped = json.loads((tmp_path / "lmdb" / "train" / "build_report.json").read_text(encoding="utf-8"))["dropped"]
    lines = sorted((d["file"], d["line"]) for d in dropped)
    assert lines == [
        ("train_imgs.tsv", 3),
        ("train_imgs.tsv", 4),
        ("train_texts.jsonl", 1),
        ("train_texts.jsonl", 2),
        ("train_texts.jsonl", 4),
    ]
    assert "has a bad image (train_imgs.tsv:3)" in json.dumps(dropped, ensure_ascii=False)
    assert len(json.loads(report.read_text(encoding="utf-8"))["dropped"]) == 5


# ----------------------------------------------------------------------------------------------------- atomicity


def test_existing_target_needs_overwrite(raw_dir, capsys):
    assert main(["--data_dir", str(raw_dir), "--splits", "train"]) == 0
    assert run_cli(main, ["--data_dir", str(raw_dir), "--splits", "train"]) == 2
    assert "LMDB target already exists" in capsys.readouterr().err
    good_split(raw_dir, n=5)
    assert main(["--data_dir", str(raw_dir), "--splits", "train", "--overwrite"]) == 0
    assert lmdb_items(raw_dir / "lmdb" / "train" / "imgs")[b"num_images"] == b"5"


def test_failure_mid_build_leaves_old_target_untouched(raw_dir, monkeypatch):
    assert main(["--data_dir", str(raw_dir), "--splits", "train"]) == 0
    before = lmdb_items(raw_dir / "lmdb" / "train" / "pairs")
    good_split(raw_dir, n=5)

    def explode(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(lmdb_build, "_write_images", explode)
    with pytest.raises(OSError, match="simulated"):
        main(["--data_dir", str(raw_dir), "--splits", "train", "--overwrite"])
    assert lmdb_items(raw_dir / "lmdb" / "train" / "pairs") == before
    assert leftovers(raw_dir / "lmdb") == ["train"]


def test_map_grows_from_a_tiny_start(tmp_path):
    images = [(i, image_bytes(i, size=(64, 64))) for i in range(40)]
    texts = [{"text_id": i, "text": "图" * 200, "image_ids": [i]} for i in range(40)]
    write_split(tmp_path, "train", images, texts)
    lmdb_build.build_lmdb(tmp_path, ["train"], map_size=1 << 16)
    assert len(lmdb_items(tmp_path / "lmdb" / "train" / "imgs")) == 41
    data = tmp_path / "lmdb" / "train" / "imgs" / "data.mdb"
    assert data.stat().st_size < 4 << 20  # the file is truncated to what is used, not left at the map size


def test_parallel_workers_and_small_windows_give_the_same_lmdb(tmp_path, monkeypatch):
    images = [(i, image_bytes(i, size=(20, 20))) for i in range(30)]
    texts = [{"text_id": i, "text": "图", "image_ids": [i]} for i in range(30)]
    write_split(tmp_path, "train", images, texts, imgs_lines=["77\t@@", "", "78\t" + b64(image_bytes(78))])
    lmdb_build.build_lmdb(tmp_path, ["train"], workers=1, skip_bad=True, lmdb_dir=tmp_path / "plain")
    for name, value in [("_PARALLEL_MIN_BYTES", 0), ("_MIN_CHUNK", 1024), ("_MAX_CHUNK", 2048), ("_WINDOW", 3000)]:
        monkeypatch.setattr(lmdb_build, name, value)
    monkeypatch.setattr(lmdb_build, "_REMAP_BYTES", 5000)
    with pytest.raises(DataError, match="train_imgs.tsv:31: image_id 77"):
        lmdb_build.build_lmdb(tmp_path, ["train"], workers=2)
    lmdb_build.build_lmdb(tmp_path, ["train"], workers=2, skip_bad=True, lmdb_dir=tmp_path / "chunked")
    expected = lmdb_items(tmp_path / "plain" / "train" / "imgs")
    assert set(expected) == {str(i).encode() for i in [*range(30), 78]} | {b"num_images"}
    assert lmdb_items(tmp_path / "chunked" / "train" / "imgs") == expected


_STALL = """
import sys, time
from cn_clip.data import lmdb_build
from cn_clip.preprocess.build_lmdb_dataset import main
original = lmdb_build.LmdbWriter.put
def put(self, key, value):
    original(self, key, value)
    if key == b"5":
        self.flush(); print("STALLED", flush=True); time.sleep(60)
lmdb_build.LmdbWriter.put = put
main(sys.argv[1:])
"""


@pytest.mark.reliability
def test_killed_build_leaves_nothing_at_the_target(tmp_path):
    images = [(i, image_bytes(i)) for i in range(10)]
    write_split(tmp_path, "train", images, [{"text_id": i, "text": "图", "image_ids": [i]} for i in range(10)])
    proc = subprocess.Popen(
        [sys.executable, "-c", _STALL, "--data_dir", str(tmp_path), "--splits", "train"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = iter(proc.stdout.readline, "")
        assert any(line.strip() == "STALLED" for line in lines)
        assert any(name.startswith(".train.") for name in leftovers(tmp_path / "lmdb"))
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "lmdb" / "train").exists()
    # The temp sibling stays after SIGKILL; training never reads it, and the next build warns about it.
    assert main(["--data_dir", str(tmp_path), "--splits", "train"]) == 0


def test_library_returns_counts_and_only_the_cli_prints(tmp_path: Path, capsys) -> None:
    results = lmdb_build.build_lmdb(FIXTURES / "raw", ["train", "valid"], tmp_path / "lib")
    assert capsys.readouterr().out == ""
    assert [(r.split, r.n_pairs > 0, r.n_images > 0) for r in results] == [("train", True, True), ("valid", True, True)]
    assert (
        main(["--data_dir", str(FIXTURES / "raw"), "--splits", "train,valid", "--lmdb_dir", str(tmp_path / "cli")]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Dataset splits to be processed: train, valid" and lines[-1] == "done!"
    train = results[0]
    assert (
        lines[1]
        == f"Finished serializing {train.n_pairs} train split pairs into {tmp_path / 'cli' / 'train' / 'pairs'}."
    )
    assert len(lines) == 6
