"""Regenerate docs/images/search_page.png: the search page for the `make demo` index, in headless Debian chromium.

    python docs/images/make_search_screenshot.py demo_out/index "一只猫" docs/images/search_page.png

Serves the index on a free 127.0.0.1 port (as `python -m cn_clip.search serve` does), runs the query in the page,
waits for the thumbnails, saves a 1000×760 screenshot and shrinks it to a palette PNG. Chinese needs a CJK font
(Debian: fonts-wqy-microhei).
"""

from __future__ import annotations

import shutil
import socket
import sys
import threading
import time
from urllib.parse import quote


def main(index: str, query: str, out: str) -> None:
    import uvicorn
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from cn_clip.search.serve import Limits, ServeConfig, create_app, load_engine

    engine = load_engine(ServeConfig(index=index, device="cpu"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, Limits(watch_interval=0)), port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--window-size=1000,760", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/?q={quote(query)}")
        loaded = "const i=[...document.querySelectorAll('#grid img')];"
        loaded += "return i.length && i.every(x => x.complete && x.naturalWidth)"
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(loaded))
        driver.save_screenshot(out)
    finally:
        driver.quit()
        server.should_exit = True
    Image.open(out).convert("RGB").quantize(colors=64).save(out, optimize=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
