"""The web page in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) via Selenium,
against the service on 127.0.0.1. Skipped, with the reason, when no browser is installed; `.ci/run` installs one.
Nothing here downloads a browser or a driver.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.helpers import png_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SKIP_REASON = "no chromium/chromedriver on PATH (apt-get install chromium chromium-driver to run the browser test)"

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason=SKIP_REASON)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    import uvicorn

    from cn_clip.search.serve import Limits, ServeConfig, create_app, load_engine

    from .test_serve import build  # the API tests' tiny index: 30 LMDB images, ids 100..129

    idx = build(tmp_path_factory.mktemp("browser"))
    engine = load_engine(ServeConfig(index=str(idx), device="cpu"))
    port = _free_port()
    app = create_app(engine, Limits(watch_interval=0))
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(10)
    engine.close()


@pytest.fixture(scope="module")
def browser():
    selenium = pytest.importorskip("selenium", reason="pip install selenium to run the browser test")
    del selenium
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900", "--lang=zh-CN"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 20.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def thumbnails_loaded(driver) -> int:
    """Number of result thumbnails, once every one has decoded (0 while any is still loading)."""
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#grid .hit img')];"
        "return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0;"
    )


def status(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status").text


def test_search_upload_similar_paging_language(server: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server + "/")
    wait_for(browser, lambda d: "开始搜索" in status(d))  # the empty (idle) state, in Chinese
    box = browser.find_element(By.ID, "q")
    box.send_keys("红色的连衣裙", Keys.ENTER)
    assert wait_for(browser, thumbnails_loaded) == 20
    assert "红色的连衣裙" in status(browser)
    assert unquote(browser.current_url).endswith("/?q=红色的连衣裙")  # shareable
    scores = [float(s.text) for s in browser.find_elements(By.CSS_SELECTOR, "#grid .score")]
    assert scores == sorted(scores, reverse=True)

    browser.find_element(By.ID, "next").click()  # 30 images: page 2 holds ranks 21..30
    wait_for(browser, lambda d: thumbnails_loaded(d) == 10)
    first = browser.find_element(By.CSS_SELECTOR, "#grid .hit .id").text
    assert first.startswith("#21 ") and "page=2" in browser.current_url

    upload = tmp_path / "query.png"
    upload.write_bytes(png_bytes(7))  # the pixels of image 107
    browser.find_element(By.ID, "upload").send_keys(str(upload))
    wait_for(browser, lambda d: "以图搜图" in status(d) and thumbnails_loaded(d))
    hit = browser.find_element(By.CSS_SELECTOR, "#grid .hit")
    assert hit.get_attribute("data-id") == "107"

    browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[1].click()  # "相似图片" for the second hit
    wait_for(browser, lambda d: "相似" in status(d) and thumbnails_loaded(d))
    assert "similar=" in browser.current_url

    browser.find_element(By.ID, "lang").click()
    wait_for(browser, lambda d: "similar" in status(d).lower() and thumbnails_loaded(d))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Image search"
    browser.save_screenshot(str(tmp_path / "search_page.png"))
    assert (tmp_path / "search_page.png").stat().st_size > 1000

    browser.get(server + "/?similar=no-such-id&lang=en")  # the error state
    wait_for(browser, lambda d: "Something went wrong" in status(d))
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
