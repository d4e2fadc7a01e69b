"""Downloads against a local HTTP server: verified, atomic, re-fetched when corrupt, clear when offline."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cn_clip.errors import DownloadError
from cn_clip.hub import download

PAYLOAD = b"cn_clip test weights " * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    root = tmp_path / "served"
    root.mkdir()
    (root / "good.pt").write_bytes(PAYLOAD)
    (root / "bad.pt").write_bytes(PAYLOAD[:-1] + b"!")
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args) -> None:
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()


def test_download_verifies_and_caches(server, tmp_path: Path) -> None:
    base, requests = server
    target = tmp_path / "cache" / "w.pt"
    assert download([f"{base}/good.pt"], target, SHA) == target
    assert target.read_bytes() == PAYLOAD
    assert not target.with_name("w.pt.part").exists()
    count = len(requests)
    download([f"{base}/good.pt"], target, SHA)
    assert len(requests) == count  # cached and verified: no second request


def test_bad_mirror_falls_back_and_corrupt_cache_is_refetched(server, tmp_path: Path) -> None:
    base, _ = server
    target = tmp_path / "w.pt"
    target.write_bytes(b"partial")
    download([f"{base}/bad.pt", f"{base}/good.pt"], target, SHA)
    assert target.read_bytes() == PAYLOAD


def test_all_mirrors_fail_with_clear_message(server, tmp_path: Path) -> None:
    base, _ = server
    target = tmp_path / "w.pt"
    urls = [f"{base}/bad.pt", f"{base}/missing.pt", "http://127.0.0.1:9/unreachable.pt"]
    with pytest.raises(DownloadError) as info:
        download(urls, target, SHA, timeout_s=2)
    message = str(info.value)
    assert "bad.pt: SHA-256" in message and "missing.pt" in message and "unreachable.pt" in message
    assert f"place it at {target}" in message
    assert not target.exists() and not target.with_name("w.pt.part").exists()


def test_directory_target_refused(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="is not a regular file"):
        download(["http://127.0.0.1:9/x"], tmp_path, SHA)


def test_load_from_name_offline_names_url_and_path(tmp_path: Path, monkeypatch) -> None:
    from cn_clip.models import pretrained

    info = pretrained.PRETRAINED["RN50"]
    monkeypatch.setattr(type(info), "urls", property(lambda self: ["http://127.0.0.1:9/" + self.filename]))
    from cn_clip.models.factory import load_from_name

    with pytest.raises(DownloadError, match=f"place it at {tmp_path / 'clip_cn_rn50.pt'}"):
        load_from_name("RN50", device="cpu", download_root=str(tmp_path))
