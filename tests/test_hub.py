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


_DOWNLOADER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from cn_clip.hub import download
download([sys.argv[1]], sys.argv[2], sys.argv[3], timeout_s=120)  # the server holds the first reply
"""


def test_two_processes_share_one_cache(tmp_path: Path) -> None:
    """Two processes fetch the same file into one cache: one download (the other waits on the lock), one intact,
    verified file, no temp files left. The server holds the response until the second process is seen waiting."""
    import os
    import subprocess
    import sys
    import time

    payload = os.urandom(3 << 20)
    sha = hashlib.sha256(payload).hexdigest()
    release = threading.Event()
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            release.wait(60)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            for start in range(0, len(payload), 1 << 18):
                self.wfile.write(payload[start : start + (1 << 18)])

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/w.pt"
    cache = tmp_path / "cache"
    target = cache / "w.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = []
    try:
        for log in logs:
            with open(log, "wb") as err:
                cmd = [sys.executable, "-c", _DOWNLOADER, url, str(target), sha]
                procs.append(subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL, env=env))
        deadline = time.monotonic() + 60
        while not any("Waiting for another process" in log.read_text(errors="replace") for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no process waited"
            time.sleep(0.05)
        release.set()
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        release.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        httpd.shutdown()
    assert codes == [0, 0], [log.read_text() for log in logs]
    assert requests == ["/w.pt"]
    assert target.read_bytes() == payload
    from cn_clip.hub import is_verified

    assert is_verified(target, sha)
    assert sorted(p.name for p in cache.iterdir()) == ["w.pt", "w.pt.lock", "w.pt.sha256"]
