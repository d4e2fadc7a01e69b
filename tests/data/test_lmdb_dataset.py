"""Reading LMDBs: reference-built ones read identically here, ours read by the reference, safe unpickling."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest

from cn_clip.data import formats
from cn_clip.data.lmdb_build import build_lmdb
from cn_clip.data.lmdb_dataset import JsonlTextDataset, LMDBDataset, LMDBImageDataset, pad_dataset
from cn_clip.data.synthetic import SyntheticDataset
from cn_clip.errors import DataError
from tests.helpers import REF_PYTHON, needs_reference

from .helpers import FIXTURES, b64, image_bytes

SPLITS = ("train", "valid", "test")


def _transform():
    from cn_clip.transforms import image_transform

    return image_transform(32)


def _lmdb_from_dump(root: Path) -> Path:
    """Recreate the reference builder's LMDBs from their key/value dump."""
    import lmdb

    dump = json.loads((FIXTURES / "reference_dump.json").read_text(encoding="utf-8"))
    for split, subs in dump.items():
        for sub, items in subs.items():
            (root / split / sub).mkdir(parents=True)
            env = lmdb.open(str(root / split / sub), map_size=1 << 22)
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(bytes.fromhex(key), bytes.fromhex(value))
            env.close()
    return root


def _our_items(lmdb_dir: Path, transform) -> dict:
    out = {}
    for split in SPLITS:
        ds = LMDBDataset(lmdb_dir / split, split="val", max_txt_length=16, transform=transform)
        items = []
        for index in range(ds.number_samples):
            image_id, text_id, text = ds.read_pair(index)
            image, ids, eos = ds[index]
            items.append(
                {
                    "image_id": image_id,
                    "text_id": text_id,
                    "text": text,
                    "ids": ids.tolist(),
                    "eos": eos,
                    "image_sum": float(image.double().sum()),
                    "image_shape": list(image.shape),
                }
            )
        out[split] = {"num_images": ds.number_images, "items": items}
    return out


def _assert_same_items(ours: dict, reference: dict) -> None:
    for split in SPLITS:
        assert ours[split]["num_images"] == reference[split]["num_images"]
        for mine, theirs in zip(ours[split]["items"], reference[split]["items"], strict=True):
            mine, theirs = dict(mine), dict(theirs)
            assert mine.pop("image_sum") == pytest.approx(theirs.pop("image_sum"), abs=1e-3)
            assert mine == theirs


def test_reference_built_lmdb_reads_identically(tmp_path):
    transform = _transform()
    reference = json.loads((FIXTURES / "reference_items.json").read_text(encoding="utf-8"))
    _assert_same_items(_our_items(_lmdb_from_dump(tmp_path), transform), reference)


def test_our_lmdb_round_trips_through_the_dataset(tmp_path):
    transform = _transform()
    build_lmdb(FIXTURES / "raw", SPLITS, tmp_path)
    reference = json.loads((FIXTURES / "reference_items.json").read_text(encoding="utf-8"))
    _assert_same_items(_our_items(tmp_path, transform), reference)


@pytest.mark.slow
@needs_reference
def test_reference_reader_reads_our_lmdb(tmp_path):
    import runpy

    reader = runpy.run_path(str(FIXTURES.parent / "gen_lmdb_fixtures.py"))["READER"]
    build_lmdb(FIXTURES / "raw", SPLITS, tmp_path / "lmdb")
    out = subprocess.run(
        [str(REF_PYTHON), "-c", reader, str(tmp_path / "lmdb"), ",".join(SPLITS)],
        cwd=tmp_path,  # outside the repo and without PYTHONPATH, so the reference imports its own cn_clip
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert json.loads(out) == json.loads((FIXTURES / "reference_items.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ safe unpickling


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle.dumps(_Evil()), "refusing to load global"),
        (pickle.dumps([1, 2, "x"]), "expected (image_id, text_id, text)"),
        (pickle.dumps((1, 2)), "expected (image_id, text_id, text)"),
        (pickle.dumps((True, 2, "x")), "expected (image_id, text_id, text)"),
        (pickle.dumps((1.5, 2, "x")), "expected (image_id, text_id, text)"),
        (pickle.dumps((1, 2, b"bytes")), "expected (image_id, text_id, text)"),
        (b"\x80\x04garbage", "not a (image_id, text_id, text) pickle"),
    ],
)
def test_restricted_unpickler_rejects(payload, message):
    with pytest.raises(DataError) as info:
        formats.loads_pair(payload, "7")
    assert str(info.value).startswith("pairs key 7: ")
    assert message in str(info.value)


def test_restricted_unpickler_accepts_the_format():
    assert formats.loads_pair(formats.dumps_pair("a7", 3, "文本")) == ("a7", 3, "文本")
    assert formats.loads_pair(pickle.dumps((1, "t", "x"), protocol=2)) == (1, "t", "x")


def _tiny_lmdb(root: Path, pairs: list[bytes], images: dict[bytes, bytes]) -> Path:
    import lmdb

    for sub, items in (("pairs", {str(i).encode(): v for i, v in enumerate(pairs)}), ("imgs", images)):
        env = lmdb.open(str(root / sub), map_size=1 << 22)
        with env.begin(write=True) as txn:
            for key, value in items.items():
                txn.put(key, value)
            count_key = formats.NUM_SAMPLES_KEY if sub == "pairs" else formats.NUM_IMAGES_KEY
            txn.put(count_key, str(len(items)).encode())
        env.close()
    return root


def test_dataset_refuses_a_malicious_pair(tmp_path):
    ds = LMDBDataset(_tiny_lmdb(tmp_path, [pickle.dumps(_Evil())], {}), transform=lambda img: img)
    with pytest.raises(DataError, match="refusing to load global"):
        ds[0]


def test_bad_sample_policy(tmp_path):
    pairs = [formats.dumps_pair(5, 1, "缺图"), formats.dumps_pair("s1", 2, "有图")]
    path = _tiny_lmdb(tmp_path, pairs, {b"s1": b64(image_bytes()).encode()})
    strict = LMDBDataset(path, split="train", transform=lambda img: img.size)
    with pytest.raises(DataError, match="train pair 0: image_id 5 not found in"):
        strict[0]
    lenient = LMDBDataset(path, split="train", transform=lambda img: img.size, on_bad_sample="skip")
    image, ids, eos = lenient[0]
    assert image == (8, 6) and lenient.skipped == 1
    assert ids[0] == 101 and ids[eos] == 102


def _size(img):
    return img.size


def test_datasets_open_lmdb_lazily_and_pickle_without_handles(tmp_path):
    path = _tiny_lmdb(tmp_path, [formats.dumps_pair("s1", 2, "x")], {b"s1": b64(image_bytes()).encode()})
    ds = LMDBDataset(path, transform=_size)
    assert ds._envs._envs == {}  # nothing open before a DataLoader would fork
    assert ds.read_image("s1").size == (8, 6)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._envs._envs == {} and clone.read_pair(0) == ("s1", 2, "x")
    pad_dataset(ds, 4)
    assert len(ds) == 4


def test_missing_dirs_use_the_reference_messages(tmp_path):
    with pytest.raises(DataError, match="The LMDB directory .* of train split does not exist!"):
        LMDBDataset(tmp_path / "nope", split="train", transform=lambda img: img)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError, match="image-text pairs does not exist!"):
        LMDBDataset(tmp_path, transform=lambda img: img)


def test_image_dataset_key_order_and_id_types(tmp_path):
    keys = [b"9", b"10", b"007", b"a7"]
    path = _tiny_lmdb(tmp_path, [], {key: b64(image_bytes(i)).encode() for i, key in enumerate(keys)})
    ds = LMDBImageDataset(path / "imgs", transform=lambda img: img.size)
    assert ds.ids == ["007", 10, 9, "a7"]  # byte order: "007" < "10" < "9" < "a7"
    assert ds[1] == (10, (8, 6))
    assert LMDBImageDataset(path / "imgs", transform=lambda img: img, id_type="str").ids == ["007", "10", "9", "a7"]
    with pytest.raises(DataError, match="image key 'a7' is not an integer"):
        LMDBImageDataset(path / "imgs", transform=lambda img: img, id_type="int")


def test_image_id_rules():
    assert formats.image_id_from_key(b"123") == 123
    assert formats.image_id_from_key(b"-4") == -4
    assert formats.image_id_from_key(b"0") == 0
    assert formats.image_id_from_key(b"007") == "007"
    assert formats.image_id_from_key(b"+7") == "+7"
    assert formats.image_id_from_key(b"007", "int") == 7


def test_jsonl_text_dataset(tmp_path):
    path = tmp_path / "valid_texts.jsonl"
    path.write_text('{"text_id": 3, "text": "一只“猫”"}\n\n{"text_id": "x9", "text": "狗", "image_ids": []}\n', "utf-8")
    ds = JsonlTextDataset(path, context_length=8)
    assert len(ds) == 2
    text_id, ids = ds[0]
    assert text_id == 3 and ids.tolist() == [101, 671, 1372, 107, 4344, 107, 102, 0]
    assert ds[1][0] == "x9"
    path.write_text('{"text": "no id"}\n', "utf-8")
    with pytest.raises(DataError, match="valid_texts.jsonl:1: needs a text_id"):
        JsonlTextDataset(path)


def test_synthetic_dataset_is_deterministic():
    ds = SyntheticDataset(num_samples=4, image_size=16, context_length=10, seed=1)
    image, ids, eos = ds[2]
    again = SyntheticDataset(num_samples=4, image_size=16, context_length=10, seed=1)[2]
    assert image.shape == (3, 16, 16) and ids.shape == (10,)
    assert (image == again[0]).all() and (ids == again[1]).all()
    assert ids[0] == 101 and ids[eos] == 102 and (ids[eos + 1 :] == 0).all()
    labelled = SyntheticDataset(num_samples=8, image_size=8, context_length=6, num_classes=2)
    assert labelled[0][1][1] == labelled[2][1][1] != labelled[1][1][1]


def test_dataloader_workers_reopen_the_lmdb(tmp_path):
    import torch

    pairs = [formats.dumps_pair("s1", i, "x") for i in range(6)]
    path = _tiny_lmdb(tmp_path, pairs, {b"s1": b64(image_bytes()).encode()})
    ds = LMDBDataset(path, transform=lambda img: torch.zeros(1), max_txt_length=4)
    ds.read_pair(0)  # the parent has a handle open when the workers fork
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="fork")
    assert [batch[1].shape for batch in loader] == [(3, 4), (3, 4)]
