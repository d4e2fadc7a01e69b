"""Importers (from_folder, export_images), dataset statistics and the embedded demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cn_clip.cli.runner import run_cli
from cn_clip.data.lmdb_build import build_lmdb
from cn_clip.errors import DataError
from cn_clip.preprocess import export_images, from_folder, make_demo_dataset, stats

from .helpers import image_bytes, lmdb_items, write_split


def _folder(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    for i in range(6):
        name = f"sub/img{i}.jpg" if i % 2 else f"img{i}.png"
        (images / name).write_bytes(image_bytes(i, "JPEG" if i % 2 else "PNG", size=(40, 30)))
    rows = ["image_path,caption,split"]
    rows += [f"{f'sub/img{i}.jpg' if i % 2 else f'img{i}.png'},第{i}张,," for i in range(6)]
    rows += ['img0.png,"另一条,带逗号的描述",', "sub/img5.jpg,固定在测试集,test"]
    captions = tmp_path / "captions.csv"
    captions.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return images, captions


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_from_folder_round_trips_through_lmdb_and_export(tmp_path):
    images, captions = _folder(tmp_path)
    out = tmp_path / "ds"
    argv = ["--images", str(images), "--captions", str(captions), "--out", str(out), "--split-ratios", "4,1,1"]
    assert from_folder.main(argv) == 0
    texts = [json.loads(line) for s in ("train", "valid", "test") for line in _lines(out / f"{s}_texts.jsonl")]
    assert sorted(t["text_id"] for t in texts) == list(range(1, 9))
    assert {t["text"] for t in texts if t["image_ids"] == [1]} == {"第0张", "另一条,带逗号的描述"}
    test_ids = [json.loads(line)["image_ids"] for line in _lines(out / "test_texts.jsonl")]
    assert [6] in test_ids  # the row with split=test pins its image
    build_lmdb(out, ["train", "valid", "test"])
    paths = dict(line.split("\t") for line in _lines(out / "image_paths.tsv"))
    for split in ("train", "valid", "test"):
        exported = tmp_path / "export" / split
        assert export_images.main([str(out / "lmdb" / split / "imgs"), "--out", str(exported)]) == 0
        for file in exported.iterdir():
            assert file.read_bytes() == (images / paths[file.stem]).read_bytes()
    first = {s: (out / f"{s}_imgs.tsv").read_bytes() for s in ("train", "valid", "test")}
    assert from_folder.main([*argv[:5], str(tmp_path / "again"), *argv[6:]]) == 0
    assert first == {s: (tmp_path / "again" / f"{s}_imgs.tsv").read_bytes() for s in ("train", "valid", "test")}


def test_from_folder_resizes_and_reencodes(tmp_path):
    from PIL import Image

    images, captions = _folder(tmp_path)
    out = tmp_path / "small"
    assert (
        from_folder.main(["--images", str(images), "--captions", str(captions), "--out", str(out), "--max-side", "16"])
        == 0
    )
    assert export_images.main([str(out / "train_imgs.tsv"), "--out", str(tmp_path / "x"), "--limit", "2"]) == 0
    files = sorted((tmp_path / "x").iterdir())
    assert len(files) == 2 and all(f.suffix == ".jpg" for f in files)
    assert all(max(Image.open(f).size) == 16 for f in files)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image_path,caption\nimg0.png,\n", "captions.csv:2: needs an image_path and a caption"),
        ("file,text,split\nimg0.png,x,dev\n", "captions.csv:2: split 'dev' is not one of"),
        ("image_path,caption\nnope.png,x\n", "1 image file(s) not found under"),
    ],
)
def test_from_folder_reports_bad_captions(tmp_path, capsys, content, message):
    images, captions = _folder(tmp_path)
    captions.write_text(content, encoding="utf-8")
    assert (
        run_cli(from_folder.main, ["--images", str(images), "--captions", str(captions), "--out", str(tmp_path / "o")])
        == 2
    )
    assert message in capsys.readouterr().err


def test_from_folder_reads_jsonl(tmp_path):
    images, _ = _folder(tmp_path)
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"image_path": "img0.png", "caption": "一"}\n{"image": "img2.png", "text": "二"}\n', "utf-8")
    summary = from_folder.convert(images, captions, tmp_path / "o", ratios=(1, 0, 0))
    assert summary == {
        "train": {"images": 2, "texts": 2},
        "valid": {"images": 0, "texts": 0},
        "test": {"images": 0, "texts": 0},
    }


def test_export_rejects_missing_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        export_images.export(tmp_path / "nope", tmp_path / "out")


def test_stats_on_a_tiny_split(tmp_path, capsys):
    texts = [
        {"text_id": 1, "text": "一只可爱的小猫", "image_ids": [1, 2]},
        {"text_id": 2, "text": "一只可爱的小猫", "image_ids": [2]},
        {"text_id": 3, "text": "很长很长很长很长的描述文字", "image_ids": [3]},
        {"text_id": 4, "text": "没有图片 🦖", "image_ids": []},
    ]
    write_split(tmp_path, "test", [(i, image_bytes(i)) for i in (1, 2, 3, 4)], texts)
    assert stats.main([str(tmp_path), "--context-length", "10", "--json", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["test"]
    assert (result["texts"], result["images"], result["pairs"]) == (4, 4, 4)
    assert result["images_per_text"]["max"] == 2 and result["texts_per_image"]["max"] == 2
    assert result["images_without_text"] == 1
    assert result["chars"]["max"] == 13 and result["tokens"]["max"] == 15
    assert result["truncated_share"] == 0.25
    assert result["unk_rate"] > 0  # the Thai letter is not in the vocabulary
    assert result["duplicate_captions"] == 2 and result["unique_captions"] == 3
    assert result["top_words"][0][0] in {"一只", "可爱", "小猫", "很长"}
    assert "truncated at context length" in capsys.readouterr().out


def test_demo_dataset_is_real_deterministic_and_builds(tmp_path):
    argv = ["--out", str(tmp_path / "a"), "--views", "5", "--max-side", "32"]
    assert make_demo_dataset.main(argv) == 0
    assert make_demo_dataset.main(["--out", str(tmp_path / "b"), *argv[2:]]) == 0
    demo_a, demo_b = tmp_path / "a" / "datasets" / "demo", tmp_path / "b" / "datasets" / "demo"
    for name in ("train_imgs.tsv", "test_texts.jsonl"):
        assert (demo_a / name).read_bytes() == (demo_b / name).read_bytes()
    cls = tmp_path / "a" / "datasets" / "demo_cls"
    labels = (cls / "label_cn.txt").read_text(encoding="utf-8").splitlines()
    assert len(labels) == 22 and "猫" in labels and "宇航员" in labels
    assert sorted(p.name for p in (cls / "test").iterdir())[:2] == ["000", "001"]
    assert len(list((cls / "test" / "004").iterdir())) == 4  # valid + test views
    build_lmdb(demo_a, ["train", "valid", "test"])
    assert lmdb_items(demo_a / "lmdb" / "train" / "imgs")[b"num_images"] == b"22"
    assert lmdb_items(demo_a / "lmdb" / "test" / "pairs")[b"num_samples"] == b"44"


def test_bilingual_demo_keeps_the_chinese_demo_and_adds_english(tmp_path):
    import json

    from cn_clip.data.demo import ENGLISH_TEMPLATES, load_classes

    classes = load_classes()
    assert all(len(c.captions_en) == len(c.captions) == 4 for c in classes)
    assert all(caption.isascii() for c in classes for caption in c.captions_en)
    argv = ["--views", "5", "--max-side", "32"]
    assert make_demo_dataset.main(["--out", str(tmp_path / "zh"), *argv]) == 0
    assert make_demo_dataset.main(["--out", str(tmp_path / "bi"), "--bilingual", *argv]) == 0
    assert not (tmp_path / "zh" / "datasets" / "demo_bilingual").exists()
    assert not (tmp_path / "zh" / "datasets" / "demo_cls" / "templates_en.txt").exists()
    zh, bi = tmp_path / "zh" / "datasets" / "demo", tmp_path / "bi" / "datasets" / "demo_bilingual"

    def texts(path):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    for split in ("train", "valid", "test"):
        assert (zh / f"{split}_imgs.tsv").read_bytes() == (bi / f"{split}_imgs.tsv").read_bytes()
    for split in ("valid", "test"):
        assert (bi / f"{split}_en_imgs.tsv").read_bytes() == (bi / f"{split}_imgs.tsv").read_bytes()
        chinese, english = texts(bi / f"{split}_texts.jsonl"), texts(bi / f"{split}_en_texts.jsonl")
        assert [r["text"] for r in chinese] == [r["text"] for r in texts(zh / f"{split}_texts.jsonl")]
        assert [r["image_ids"] for r in english] == [r["image_ids"] for r in chinese]
        assert all(r["text"].isascii() for r in english)
    train = texts(bi / "train_texts.jsonl")
    assert len(train) == 2 * len(texts(zh / "train_texts.jsonl"))  # each Chinese caption and its English one
    assert [r["text"] for r in train[0::2]] == [r["text"] for r in texts(zh / "train_texts.jsonl")]
    assert len({r["text_id"] for r in train}) == len(train)
    templates = (tmp_path / "bi" / "datasets" / "demo_cls" / "templates_en.txt").read_text(encoding="utf-8")
    assert templates.splitlines() == list(ENGLISH_TEMPLATES)
    build_lmdb(bi, ["train", "valid", "valid_en"])
    assert lmdb_items(bi / "lmdb" / "valid_en" / "pairs")[b"num_samples"] == b"44"
