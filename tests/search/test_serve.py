"""The search service through FastAPI's TestClient: results against brute force, images, paging, reload, and every
refusal of the safety rules (status code and message)."""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cn_clip.search.__main__ import main
from cn_clip.search.engine import SearchEngine
from cn_clip.search.serve import Limits, ServeConfig, create_app, load_engine
from tests.helpers import TINY_FLAGS, make_retrieval_dataset, png_bytes
from tests.helpers import seeded_checkpoint as tiny_checkpoint


def build(root: Path) -> Path:
    make_retrieval_dataset(root, n_images=30)
    ckpt = tiny_checkpoint(root / "ckpt.pt", seed=3)
    argv = ["index", "--image-data", str(root / "lmdb" / "valid" / "imgs"), "--out", str(root / "idx")]
    assert (
        main([*argv, "--resume", str(ckpt), "--num-workers", "0", "--no-progress", "--device", "cpu", *TINY_FLAGS]) == 0
    )
    return root / "idx"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> SearchEngine:
    idx = build(tmp_path_factory.mktemp("serve"))
    engine = load_engine(ServeConfig(index=str(idx), device="cpu"))
    yield engine
    engine.close()


@pytest.fixture
def client(engine: SearchEngine) -> TestClient:
    return TestClient(create_app(engine, Limits(watch_interval=0)), raise_server_exceptions=False)


def exact(engine: SearchEngine, vector: np.ndarray) -> list:
    gallery = engine.gallery
    scores = np.asarray(gallery.vectors, np.float64) @ vector
    return [gallery.ids[j] for j in np.argsort(-scores, kind="stable")], scores


def test_text_search_equals_brute_force_and_pages(client: TestClient, engine: SearchEngine) -> None:
    body = client.get("/api/search", params={"q": "红色连衣裙", "k": 30}).json()
    order, scores = exact(engine, engine.encode_text("红色连衣裙").result())
    assert [hit["id"] for hit in body["results"]] == order
    np.testing.assert_allclose([hit["score"] for hit in body["results"]], sorted(scores, reverse=True), atol=1e-5)
    hit = body["results"][0]
    assert hit == {"id": order[0], "rank": 1, "score": hit["score"], "image_url": f"/api/images/{order[0]}"}
    assert body["total"] == 30 and body["has_more"] is False and body["query"] == "红色连衣裙"
    page2 = client.get("/api/search", params={"q": "红色连衣裙", "k": 7, "offset": 7}).json()
    assert [h["id"] for h in page2["results"]] == order[7:14] and page2["results"][0]["rank"] == 8
    assert page2["has_more"] is True


def test_image_upload_and_similar(client: TestClient, engine: SearchEngine) -> None:
    raw = client.get("/api/images/105").content
    assert raw == png_bytes(5)  # the stored bytes, untouched
    body = client.post("/api/search", files={"image": ("q.png", raw, "image/png")}, params={"k": 3}).json()
    assert body["results"][0]["id"] == 105 and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert (
        client.post("/api/search", content=raw, headers={"content-type": "image/png"}).json()["results"][0]["id"] == 105
    )
    similar = client.get("/api/similar/105", params={"k": 29}).json()
    order, _ = exact(engine, np.asarray(engine.gallery.vectors[engine.gallery.row_of["105"]]))
    assert [h["id"] for h in similar["results"]] == [i for i in order if i != 105] and similar["similar_to"] == 105
    assert similar["has_more"] is False


def test_thumbnails_health_info_and_page(client: TestClient) -> None:
    from PIL import Image

    response = client.get("/api/images/101", params={"size": 16})
    assert response.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.content)).size) == 16
    assert client.get("/api/health").json() == {"status": "ok", "count": 30, "generation": 0}
    info = client.get("/api/info").json()
    assert info["architecture"] == "ViT-Tiny@BERT-Tiny-chinese" and info["dim"] == 64 and info["index_type"] == "flat"
    assert info["count"] == 30 and info["calibrated"] is False and info["build_seconds"] >= 0
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and "图片搜索" in page.text
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200


def test_calibrated_probabilities(engine: SearchEngine) -> None:
    engine.calibrator = lambda cosine: 1 / (1 + np.exp(-(20 * cosine - 5)))
    try:
        client = TestClient(create_app(engine, Limits(watch_interval=0)))
        hits = client.get("/api/search", params={"q": "猫", "k": 5}).json()["results"]
    finally:
        engine.calibrator = None
    for hit in hits:
        assert hit["probability"] == pytest.approx(1 / (1 + np.exp(-(20 * hit["score"] - 5))), abs=1e-5)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG header announcing 10^10 pixels with one tiny compressed row: a decompression bomb's signature."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("files", "status", "message"),
    [
        ({"image": ("big.png", b"\0" * (300 * 1024), "image/png")}, 413, "upload over the 0.25 MB limit"),
        ({"image": ("bomb.png", bomb_png(), "image/png")}, 400, "decompression bomb"),
        ({"image": ("notes.txt", b"just some text", "text/plain")}, 400, "not an image"),
        ({"image": ("cut.png", png_bytes(1)[:60], "image/png")}, 400, "cannot decode the image"),
        ({"other": ("x", b"", "text/plain")}, 400, "no image uploaded"),
    ],
)
def test_bad_uploads(engine: SearchEngine, files: dict, status: int, message: str) -> None:
    client = TestClient(create_app(engine, Limits(max_upload_mb=0.25, watch_interval=0)))
    response = client.post("/api/search", files=files)
    assert response.status_code == status and message in response.json()["detail"]


def test_pixel_limit_is_configurable(engine: SearchEngine) -> None:
    client = TestClient(create_app(engine, Limits(max_image_pixels=100, watch_interval=0)))
    response = client.post("/api/search", files={"image": ("q.png", png_bytes(1), "image/png")})  # 24×20
    assert response.status_code == 400 and "24×20 pixels, over the limit of 100" in response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/images/999",
        "/api/images/..%2F..%2Fetc%2Fpasswd",
        "/api/images/%2e%2e/%2e%2e/etc/passwd",
        "/api/images//etc/passwd",
        "/api/images/%2Fetc%2Fpasswd",
        "/api/images/101%2F",
        "/api/images/..%5C101",
        "/api/similar/999",
        "/api/similar/%2e%2e%2f101",
    ],
)
def test_unknown_ids_and_paths_are_404(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404 and "detail" in response.json()


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/search?q=猫&k=0", "k"),
        ("/api/search?q=猫&k=201", "k"),
        ("/api/search?q=猫&k=ten", "k"),
        ("/api/search?q=猫&offset=-1", "offset"),
        ("/api/search", "q"),
        ("/api/search?q=", "q"),
        ("/api/search?q=%20%20", "q"),
        ("/api/search?q=" + "长" * 201, "q"),
        ("/api/images/101?size=4", "size"),
        ("/api/similar/101?k=0", "k"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(client: TestClient, url: str, field: str) -> None:
    response = client.get(url)
    assert response.status_code == 422
    assert response.json()["field"] == field and response.json()["detail"].startswith(f"{field}: ")


def test_no_traceback_reaches_the_client(
    client: TestClient, engine: SearchEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("secret internals at /srv/data")

    monkeypatch.setattr(engine, "search", broken)
    with caplog.at_level(logging.ERROR, logger="cn_clip.search.serve"):
        response = client.get("/api/search", params={"q": "猫"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; the server log has the details"}
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "secret internals" in caplog.text and "GET /api/search failed" in caplog.text


def test_concurrency_is_bounded(engine: SearchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    release, entered = threading.Event(), threading.Event()
    original = engine.image

    def slow(*args: object) -> tuple:
        entered.set()
        release.wait(10)
        return original(*args)

    monkeypatch.setattr(engine, "image", slow)
    client = TestClient(create_app(engine, Limits(max_concurrency=1, watch_interval=0)))
    first: list = []
    thread = threading.Thread(target=lambda: first.append(client.get("/api/images/101")))
    thread.start()
    assert entered.wait(10)
    busy = client.get("/api/health")
    release.set()
    thread.join()
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert first[0].status_code == 200 and client.get("/api/health").status_code == 200


def test_text_queries_are_micro_batched(engine: SearchEngine) -> None:
    futures = [engine.encode_text(text) for text in ["猫", "狗", "汽车", "蓝天白云"] * 4]
    vectors = np.stack([f.result() for f in futures])
    alone = np.stack([engine.encode_text(text).result() for text in ["猫", "狗", "汽车", "蓝天白云"]])
    np.testing.assert_allclose(vectors[:4], alone, atol=1e-5)
    assert max(engine.batcher.batch_sizes[-20:]) > 1


def test_reload_and_watch_pick_up_new_generations(tmp_path: Path) -> None:
    idx = build(tmp_path)
    engine = load_engine(ServeConfig(index=str(idx), device="cpu"))
    try:
        folder = tmp_path / "new"
        folder.mkdir()
        for i, name in enumerate(["n0.png", "n1.png", "猫 2.png"]):  # a Chinese name with a space: quoted URL
            (folder / name).write_bytes(png_bytes(200 + i))
        with TestClient(create_app(engine, Limits(watch_interval=0))) as client:
            assert main(["add", "--index", str(idx), "--image-data", str(folder), "--num-workers", "0",
                         "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
            assert client.get("/api/health").json()["count"] == 30  # not watching: still the old generation
            body = client.post("/api/reload").json()
            assert body["reloaded"] is True and body["count"] == 33 and body["generation"] == 1
            assert client.get("/api/images/n1.png").content == png_bytes(201)
            upload = client.post("/api/search", files={"image": ("q.png", png_bytes(202), "image/png")})
            top = upload.json()["results"][0]
            assert top["id"] == "猫 2.png" and top["image_url"] == "/api/images/%E7%8C%AB%202.png"
            assert client.get(top["image_url"]).content == png_bytes(202)
            assert client.post("/api/reload").json()["reloaded"] is False
            (idx / "meta.json").write_text((idx / "meta.json").read_text().replace('"dim": 64', '"dim": 64,,'))
            refused = client.post("/api/reload")
            assert refused.status_code == 409 and "still serving generation 1" in refused.json()["detail"]
            assert "meta.json:" in refused.json()["detail"] and client.get("/api/health").json()["count"] == 33
            (idx / "meta.json").write_text((idx / "meta.json").read_text().replace('"dim": 64,,', '"dim": 64'))
        with TestClient(create_app(engine, Limits(watch_interval=0.05))) as client:
            assert main(["remove", "--index", str(idx), "--ids", "n0.png", "101"]) == 0
            deadline = time.monotonic() + 10
            while client.get("/api/health").json()["count"] != 31 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.get("/api/health").json() == {"status": "ok", "count": 31, "generation": 2}
            assert client.get("/api/images/n0.png").status_code == 404
    finally:
        engine.close()


def test_add_remove_cli_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    idx = build(tmp_path)
    argv = ["add", "--index", str(idx), "--image-data", str(tmp_path / "lmdb" / "valid" / "imgs"), "--num-workers", "0"]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 2
    assert "duplicate image ids refused (already in the index: '100', '101'" in capsys.readouterr().err
    assert main(["remove", "--index", str(idx), "--ids", "100", "nope"]) == 2
    err = capsys.readouterr().err
    assert "ids not in" in err and "'nope'" in err and "'100'" not in err
    assert json.loads((idx / "meta.json").read_text())["generation"] == 0
