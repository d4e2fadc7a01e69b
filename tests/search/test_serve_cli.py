"""`python -m cn_clip.search serve` as users run it: a real process that loads, warms up, then binds 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_serve import build  # noqa: E402

REPO = Path(__file__).parents[2]


def test_serve_binds_localhost_after_warm_up(tmp_path: Path) -> None:
    import httpx
    import psutil

    idx = build(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cn_clip.search", "serve", "--index", str(idx), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail(f"serve did not answer: {proc.stdout.read() if proc.poll() is not None else 'timeout'}")
        assert health.json()["count"] == 30
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert [(addr.ip, addr.port) for addr in listening] == [("127.0.0.1", port)]
        hits = httpx.get(f"http://127.0.0.1:{port}/api/search", params={"q": "猫", "k": 3}).json()["results"]
        assert [hit["rank"] for hit in hits] == [1, 2, 3]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert out.index("warmed up") < out.index("Uvicorn running on http://127.0.0.1:")


def test_serve_refuses_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cn_clip.search.__main__ import main

    assert main(["serve", "--index", str(tmp_path), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb must be positive, got 0.0" in capsys.readouterr().err
    assert main(["serve", "--index", str(tmp_path)]) == 2
    assert "not a search index (meta.json missing" in capsys.readouterr().err
