"""WebDataset shards and CSV/JSONL file lists: same pairs and losses as LMDB, sharding, resume, bad data, http."""

from __future__ import annotations

import contextlib
import csv
import functools
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cn_clip.data.lmdb_build import build_lmdb
from cn_clip.data.loader import DataCfg, SplitCfg, get_data, resolve_dataset_type
from cn_clip.data.wds_build import build_webdataset
from cn_clip.data.wds_dataset import WdsCfg, WebDatasetPairs
from cn_clip.errors import ConfigError, DataError
from cn_clip.transforms import image_transform
from tests.helpers import TINY_ARCH, TINY_FLAGS
from tests.training import helpers as training_helpers

from .helpers import image_bytes, write_split

N_IMAGES = 12  # 24 pairs: two captions per image


def _raw(data_dir: Path, split: str = "train", n: int = N_IMAGES) -> None:
    images = [(100 + i, image_bytes(i, "JPEG", size=(40, 32))) for i in range(n)]
    texts = [
        {"text_id": 2 * i + k, "text": f"第{i}张图片的说明{k}", "image_ids": [100 + i]}
        for i in range(n)
        for k in (0, 1)
    ]
    write_split(data_dir, split, images, texts)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """raw → LMDB → shards (from the LMDB, 5 per shard) → a CSV of the exported image files."""
    root = tmp_path_factory.mktemp("wds")
    _raw(root)
    _raw(root, "valid", n=4)
    build_lmdb(root, ["train", "valid"])
    build_webdataset(root, ["train", "valid"], root / "wds", shard_size=5, source="lmdb")
    (root / "photos").mkdir()
    from cn_clip.data.lmdb_dataset import LMDBDataset

    for split in ("train", "valid"):
        lmdb = LMDBDataset(root / "lmdb" / split, split)
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filepath", "title", "image_id", "text_id"])
            for i in range(lmdb.number_samples):
                image_id, text_id, text = lmdb.read_pair(i)
                name = f"photos/{image_id}.jpg"
                raw = lmdb._envs.txn("imgs").get(str(image_id).encode())
                from cn_clip.data.formats import b64decode_image

                (root / name).write_bytes(b64decode_image(bytes(raw)))
                writer.writerow([name, text, image_id, text_id])
        lmdb.close()
    return root


def _train_shards(root: Path, split: str = "train") -> str:
    return str(root / "wds" / f"{split}.txt")


def _keys(path: str, *, shuffle: bool, batch: int = 4, workers: int = 0, **kw) -> list[list[int]]:
    cfg = DataCfg(SplitCfg(path, batch, workers), shuffle=shuffle, seed=7, **kw)
    info = get_data(cfg, 1, 0, 32)["train"]
    info.sampler.set_epoch(1)
    return [batch[4].tolist() for batch in info.dataloader]


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_sources_give_the_lmdb_pairs(built: Path, shuffle: bool) -> None:
    lmdb = _keys(str(built / "lmdb" / "train"), shuffle=shuffle)
    csv_keys = _keys(str(built / "train.csv"), shuffle=shuffle)
    assert csv_keys == lmdb  # a file list uses the LMDB's sampler: same order with shuffling on too
    shards = _keys(_train_shards(built), shuffle=shuffle)
    if not shuffle:
        assert shards == lmdb
    else:  # its own shuffle (shard order, windows), every pair once
        assert sorted(sum(shards, [])) == sorted(sum(lmdb, [])) and shards != lmdb


def _train(root: Path, logs: Path, data: str, *extra: str, steps: int = 6) -> dict:
    args = training_helpers.tiny_args(logs, "--no-shuffle", *extra, steps=steps, data=data)
    return training_helpers.train(args)


def test_training_from_shards_and_csv_matches_lmdb(built: Path, tmp_path: Path) -> None:
    val = ["--valid-step-interval", "3"]
    lmdb = _train(
        built, tmp_path / "a", str(built / "lmdb" / "train"), "--val-data", str(built / "lmdb" / "valid"), *val
    )
    shards = _train(built, tmp_path / "b", _train_shards(built), "--val-data", _train_shards(built, "valid"), *val)
    files = _train(built, tmp_path / "c", str(built / "train.csv"), "--val-data", str(built / "valid.csv"), *val)
    assert len(lmdb["losses"]) == 6
    assert shards["losses"] == lmdb["losses"]
    assert files["losses"] == lmdb["losses"]
    assert shards["validation"] == lmdb["validation"] == files["validation"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte ranges (``Range: bytes=a-b``), as object stores serve them."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        wanted = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not wanted.startswith("bytes=") or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        first, _, last = wanted.removeprefix("bytes=").partition("-")
        start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start : end + 1])

    def end_headers(self) -> None:
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()


@contextlib.contextmanager
def _serve(directory: Path) -> Iterator[str]:
    """``directory`` over HTTP on 127.0.0.1 for the block; yields the base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_shards_train_through_an_http_url(built: Path, tmp_path: Path) -> None:
    with _serve(built / "wds") as base:
        url = f"{base}/train-{{000000..000004}}.tar"
        assert resolve_dataset_type(url) == "webdataset"
        remote = _train(built, tmp_path / "http", url, steps=3)
    local = _train(built, tmp_path / "local", _train_shards(built), steps=3)
    assert remote["losses"] == local["losses"]


def _dataset(root: Path, rank: int = 0, world: int = 1, batch: int = 3, **kw) -> WebDatasetPairs:
    cfg = WdsCfg(_train_shards(root), "train", batch, world, rank, seed=5, shuffle_window=4, **kw)
    return WebDatasetPairs(cfg, image_transform(32))


def _epoch(dataset: WebDatasetPairs, epoch: int, workers: int, start: int = 0) -> list[list[int]]:
    from torch.utils.data import DataLoader

    dataset.set_epoch(epoch)
    dataset.set_start(start * dataset.cfg.batch_size)
    return [batch[4].tolist() for batch in DataLoader(dataset, batch_size=None, num_workers=workers)]


def test_two_ranks_two_workers_read_every_sample_once(built: Path) -> None:
    every = sorted(sum(_epoch(_dataset(built), 0, 0), []))
    assert len(every) == len(set(every)) == 2 * N_IMAGES
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            batches = _epoch(_dataset(built, rank, 2), epoch, workers=2)
            assert len(batches) == _dataset(built, rank, 2).num_batches == 4
            seen += sum(batches, [])
        assert sorted(seen) == every  # 2 ranks x 4 batches x 3 = 24: each pair exactly once
    assert _epoch(_dataset(built, 0, 2), 0, 2) != _epoch(_dataset(built, 0, 2), 1, 2)  # a new order each epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_a_started_epoch_continues_at_the_same_batch(built: Path, workers: int) -> None:
    full = _epoch(_dataset(built), 3, workers)
    for start in (1, 5):
        assert _epoch(_dataset(built), 3, workers, start) == full[start:]


def test_resampled_epochs_follow_the_seed_and_the_weights(built: Path) -> None:
    first = _epoch(_dataset(built, resampled=True, num_samples=30), 0, 0)
    assert len(first) == 10 and first == _epoch(_dataset(built, resampled=True, num_samples=30), 0, 0)
    assert first != _epoch(_dataset(built, resampled=True, num_samples=30), 1, 0)
    half = _train_shards(built).replace("train.txt", "train-{000000..000001}.tar")
    rest = _train_shards(built).replace("train.txt", "train-{000002..000004}.tar")
    cfg = WdsCfg(f"{half}::{rest}", "train", 4, 1, 0, num_samples=400, resampled=True, factors=(1.0, 0.0))
    keys = set(sum(_epoch(WebDatasetPairs(cfg, image_transform(32)), 0, 0), []))
    assert keys == set(sum(_epoch(_dataset(built, shuffle=False), 0, 0), [])[:10])  # the first source only
    with pytest.raises(ConfigError, match="must be ≥ 1, got 0"):
        WebDatasetPairs(WdsCfg(half, "train", 4, 1, 0, num_samples=0), image_transform(32))
    with pytest.raises(ConfigError, match="needs --dataset-resampled"):
        WebDatasetPairs(WdsCfg(half, "train", 4, 1, 0, factors=(1.0,)), image_transform(32))


class _Killed(Exception):
    pass


def test_kill_and_resume_on_shards(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cn_clip.training import loop

    data = _train_shards(built)
    argv = ["--shuffle", "--use-augment", "--save-step-frequency", "4"]
    straight = _train(built, tmp_path / "a", data, *argv, steps=7)  # killed after step 4 (saved); 6 steps an epoch
    original, count = loop.Trainer.train_step, {"n": 0}

    def step(self, batches, step):
        if count["n"] == 4:
            raise _Killed
        count["n"] += 1
        return original(self, batches, step)

    with monkeypatch.context() as patch:
        patch.setattr(loop.Trainer, "train_step", step)
        with pytest.raises(_Killed):
            _train(built, tmp_path / "b", data, *argv, steps=7)
    resumed = _train(built, tmp_path / "b", data, *argv, steps=7)
    assert resumed["losses"] == straight["losses"][4:]


def _rewrite_member(shard: Path, key_suffix: str, data: bytes) -> None:
    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            body = tar.extractfile(info).read()
            if info.name.endswith(key_suffix):
                body = data
            members.append((info.name, body))
    with tarfile.open(shard, "w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(built / "wds", tmp_path / "wds")
    return tmp_path


def test_a_corrupt_member_fails_or_is_skipped(copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    _rewrite_member(copy / "wds" / "train-000001.tar", "000000006.jpg", b"\xff\xd8\xff not a jpeg")
    with pytest.raises(DataError, match=r"train-000001.tar: sample 000000006: image_id .*cannot open .jpg"):
        _epoch(_dataset(copy, shuffle=False), 0, 0)
    dataset = _dataset(copy, shuffle=False, on_bad_sample="skip")
    batches = _epoch(dataset, 0, 0)
    assert len(batches) == 8 and dataset.stats["skipped"] == 1
    assert "skipping bad sample" in caplog.text


def test_a_truncated_shard_fails_after_retries_or_is_reported(copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    shard = copy / "wds" / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * 0.6)])
    with pytest.raises(DataError, match=r"train-000002.tar: unreadable from sample \d of 5 after 3 retries"):
        _epoch(_dataset(copy, shuffle=False), 0, 0)
    assert "retry 3/3" in caplog.text
    dataset = _dataset(copy, shuffle=False, on_bad_sample="skip")
    assert len(_epoch(dataset, 0, 0)) == 8
    assert dataset.stats["retries"] == 3 and dataset.stats["skipped"] >= 1
    assert "replaced by repeats" in caplog.text


def test_builders_report_problems_the_same_way(tmp_path: Path) -> None:
    from .test_lmdb_build import _cut_jpeg

    images = [(1, image_bytes(1, "JPEG", size=(64, 64))), (2, _cut_jpeg(0.6))]
    texts = [{"text_id": 1, "text": "a", "image_ids": [1]}, {"text_id": 2, "text": "b", "image_ids": [2, 9]}]
    write_split(tmp_path, "train", images, texts, imgs_lines=["3\tnot base64!"], texts_lines=["{bad json"])
    with pytest.raises(DataError) as lmdb_error:
        build_lmdb(tmp_path, ["train"])
    with pytest.raises(DataError) as wds_error:
        build_webdataset(tmp_path, ["train"])
    assert str(wds_error.value) == str(lmdb_error.value)
    assert "train_imgs.tsv:2: image_id 2: not an image Pillow can open" in str(wds_error.value)
    assert not (tmp_path / "wds").exists() or not list((tmp_path / "wds").glob("*.tar"))
    build_webdataset(tmp_path, ["train"], skip_bad=True)
    index = json.loads((tmp_path / "wds" / "index.json").read_text())
    assert index["splits"]["train"]["count"] == 1 and index["shards"][0]["count"] == 1


def test_a_killed_build_leaves_no_shard_under_its_final_name(tmp_path: Path, monkeypatch) -> None:
    from cn_clip.data import wds_build

    _raw(tmp_path)
    calls = {"n": 0}
    original = wds_build.ShardWriter.write

    def write(self, *args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise _Killed
        return original(self, *args)

    monkeypatch.setattr(wds_build.ShardWriter, "write", write)
    with pytest.raises(_Killed):
        build_webdataset(tmp_path, ["train"], shard_size=3)
    assert not list((tmp_path / "wds").glob("*.tar")) and not (tmp_path / "wds" / "index.json").exists()
    monkeypatch.undo()
    results = build_webdataset(tmp_path, ["train"], shard_size=10, shard_bytes=4096)
    assert results[0].count == 2 * N_IMAGES and all(s.count <= 2 for s in results[0].shards)


def test_dataset_type_from_the_path(built: Path) -> None:
    assert resolve_dataset_type(str(built / "lmdb" / "train")) == "lmdb"
    assert resolve_dataset_type(str(built / "train.csv")) == "csv"
    assert resolve_dataset_type("x/captions.jsonl") == "jsonl"
    assert resolve_dataset_type("shards/{00000..00127}.tar") == "webdataset"
    assert resolve_dataset_type("s3://bucket/a.tar::s3://bucket/b.tar") == "webdataset"
    assert resolve_dataset_type("pipe:aws s3 cp s3://b/a.tar -") == "webdataset"
    assert resolve_dataset_type("synthetic:8") == "synthetic"
    assert resolve_dataset_type(str(built / "train.csv"), "webdataset") == "webdataset"
    with pytest.raises(ConfigError, match="pass --dataset-type"):
        resolve_dataset_type(str(built / "photos" / "100.jpg"))


def test_jsonl_list_with_several_captions(tmp_path: Path) -> None:
    from cn_clip.data.filelist import FileListDataset

    (tmp_path / "a.png").write_bytes(image_bytes(0))
    lines = [{"filepath": "a.png", "title": ["一只猫", "猫在睡觉"]}, {"filepath": "missing.png", "title": "狗"}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), "utf-8")
    dataset = FileListDataset(str(tmp_path / "list.jsonl"), "train", transform=image_transform(32))
    assert [dataset.read_pair(i) for i in range(3)] == [
        ("a.png", "1:0", "一只猫"),
        ("a.png", "1:1", "猫在睡觉"),
        ("missing.png", "2", "狗"),
    ]
    assert torch.equal(dataset[0][0], dataset[1][0])
    with pytest.raises(DataError, match="train pair 2: image_id missing.png: .*missing.png not found"):
        dataset[2]
    (tmp_path / "bad.csv").write_text("path,caption\na.png,x\n", "utf-8")
    with pytest.raises(DataError, match=r"bad.csv:2: no 'filepath' value \(columns: path, caption"):
        FileListDataset(str(tmp_path / "bad.csv"))


def test_extraction_reads_the_same_images_from_every_source(built: Path, tmp_path: Path, vit_ckpt: Path) -> None:
    from cn_clip.data.sources import image_dataset

    def items(path: str, **kw) -> dict:
        dataset = image_dataset(path, resolution=32, **kw)
        return dict(dataset[i] for i in range(len(dataset)))

    lmdb = items(str(built / "lmdb" / "train" / "imgs"))
    assert len(lmdb) == N_IMAGES and list(lmdb) == list(items(str(built / "lmdb" / "train")))
    for other in (items(_train_shards(built)), items(str(built / "train.csv"), dataset_type="csv")):
        assert other.keys() == lmdb.keys() and all(torch.equal(other[k], lmdb[k]) for k in lmdb)

    from cn_clip.eval.extract_features import main

    (tmp_path / "t.jsonl").write_text('{"text_id": 1, "text": "猫"}\n', "utf-8")
    out = tmp_path / "feats.jsonl"
    argv = ["--extract-image-feats", "--image-data", _train_shards(built), "--image-feat-output-path", str(out)]
    argv += ["--text-data", str(tmp_path / "t.jsonl"), "--resume", str(vit_ckpt)]
    argv += [*TINY_FLAGS, "--num-workers", "0", "--no-progress", "--precision", "fp32"]
    assert main([*argv, "--dataset-type", "webdataset"]) == 0
    assert len(out.read_text().splitlines()) == N_IMAGES


def test_stream_flags_on_indexed_data_are_an_error(built: Path) -> None:
    for kw in ({"resampled": True}, {"upsampling_factors": (1.0,)}):
        with pytest.raises(ConfigError, match="applies to WebDataset shards; .* is csv data"):
            get_data(DataCfg(SplitCfg(str(built / "train.csv"), 4), **kw), 1, 0, 32)
    with pytest.raises(ConfigError, match="--train-num-samples/--val-num-samples applies"):
        get_data(DataCfg(SplitCfg(str(built / "lmdb" / "train"), 4, num_samples=8)), 1, 0, 32)


def test_search_index_from_shards_and_a_csv(built: Path, tmp_path: Path) -> None:
    from cn_clip.search import store
    from cn_clip.search.index import ImageReading, build_index
    from tests.helpers import seeded_checkpoint

    ckpt = seeded_checkpoint(tmp_path / "c.pt")
    reading = ImageReading(num_workers=0, progress=False)
    ids = {}
    for name, source in (
        ("lmdb", built / "lmdb" / "train" / "imgs"),
        ("wds", _train_shards(built)),
        ("csv", built / "train.csv"),
    ):
        meta = build_index(source, ckpt, tmp_path / name, architecture=TINY_ARCH, device="cpu", reading=reading)
        ids[name] = [str(i) for i in store.load(tmp_path / name).ids]
        assert meta["count"] == N_IMAGES
    assert sorted(ids["wds"]) == sorted(ids["csv"]) == sorted(ids["lmdb"])
    assert [s["kind"] for s in ("lmdb", "wds", "csv") for s in store.read_meta(tmp_path / s)["sources"]] == [
        "lmdb", "shards", "files",
    ]  # fmt: skip


def test_search_serves_images_of_every_source(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search page shows shard and file-list images: each row's bytes are the LMDB's for that image id, from a
    local index and from an index of shards and a CSV behind http:// (--dataset-type on the command line)."""
    from cn_clip.models.factory import create_model
    from cn_clip.search.__main__ import main as search_main
    from cn_clip.search.engine import SearchEngine
    from tests.helpers import seeded_checkpoint

    ckpt = seeded_checkpoint(tmp_path / "c.pt")
    flags = [*TINY_FLAGS, "--resume", str(ckpt), "--device", "cpu", "--num-workers", "0", "--no-progress"]
    expected = {path.stem: path.read_bytes() for path in (built / "photos").glob("*.jpg")}  # the LMDB's bytes
    with _serve(built) as base:
        sources = {
            "wds": ["--image-data", _train_shards(built)],
            "csv": ["--image-data", str(built / "train.csv"), "--dataset-type", "csv"],
            "http-wds": ["--image-data", f"{base}/wds/train-{{000000..000004}}.tar", "--dataset-type", "webdataset"],
            "http-csv": ["--image-data", f"{base}/train.csv"],
        }
        model = create_model(TINY_ARCH)
        for name, argv in sources.items():
            assert search_main(["index", *argv, "--out", str(tmp_path / name), *flags]) == 0, name
            engine = SearchEngine(tmp_path / name, model)
            served = {str(engine.gallery.ids[row]): engine.image_bytes(engine.gallery, row) for row in range(N_IMAGES)}
            assert served == {key: expected[key] for key in served}, name


def test_eval_run_from_shards_and_a_csv_scores_like_lmdb(built: Path, tmp_path: Path) -> None:
    """eval.run on the valid split's shards and CSV: the pairs become {split}_texts.jsonl, and the predictions and
    scores are the LMDB run's, byte for byte."""
    from cn_clip.eval.run import main as eval_main
    from tests.helpers import seeded_checkpoint

    ckpt = seeded_checkpoint(tmp_path / "c.pt")
    common = ["--split", "valid", "--resume", str(ckpt), "--num-workers", "0", "--no-progress", "--device", "cpu"]
    runs = {
        "lmdb": [str(built)],
        "wds": [_train_shards(built, "valid")],
        "csv": [str(built / "valid.csv"), "--dataset-type", "csv"],
    }
    for name, data in runs.items():
        assert eval_main(["--data", *data, "--output-dir", str(tmp_path / name), *common, *TINY_FLAGS]) == 0
    texts = [json.loads(line) for line in (tmp_path / "wds" / "valid_texts.jsonl").read_text("utf-8").splitlines()]
    assert texts == [json.loads(line) for line in (built / "valid_texts.jsonl").read_text("utf-8").splitlines()]
    for name in ("valid_predictions.jsonl", "valid_tr_predictions.jsonl", "output.json", "output_tr.json"):
        expected = (tmp_path / "lmdb" / name).read_bytes()
        assert (tmp_path / "wds" / name).read_bytes() == expected, name
        assert (tmp_path / "csv" / name).read_bytes() == expected, name
    summary = json.loads((tmp_path / "csv" / "summary.json").read_text("utf-8"))
    assert summary["num_texts"] == 8 and summary["num_images"] == 4


def test_eval_run_source_errors(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cn_clip.eval.run import main as eval_main

    base = ["--resume", str(tmp_path / "none.pt"), "--device", "cpu", *TINY_FLAGS]
    assert eval_main(["--data", str(built / "valid.csv"), *base]) == 2  # results need a place
    assert "give --output-dir" in capsys.readouterr().err
    assert eval_main(["--data", str(built / "lmdb" / "valid"), "--output-dir", str(tmp_path), *base]) == 2
    assert "one split's LMDB" in capsys.readouterr().err


def test_images_of_a_list_need_no_caption_column(built: Path, tmp_path: Path) -> None:
    """Extraction and indexing read only the image column; training and evaluation still require captions."""
    from cn_clip.data.sources import caption_records, image_dataset

    photos = tmp_path / "photos.csv"
    photos.write_text("path\n" + "".join(f"{p}\n" for p in sorted((built / "photos").glob("*.jpg"))), "utf-8")
    dataset = image_dataset(photos, dataset_type="csv", resolution=32, img_key="path")
    assert len(dataset) == len(list((built / "photos").glob("*.jpg"))) and dataset[0][1].shape == (3, 32, 32)
    with pytest.raises(DataError, match="no 'title' value"):
        caption_records(photos, "csv", img_key="path")
