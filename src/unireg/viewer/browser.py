"""Open a report page in headless Chromium through Playwright: the browser test and the
report benchmark drive the page this way (``pip install playwright``; Debian's ``chromium``,
no browser download)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# software WebGL (SwiftShader: no GPU, no display) and none of the browser's own network
# services, which a closed network refuses
CHROMIUM_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader", "--disable-background-networking", "--disable-sync",
    "--disable-component-update", "--no-first-run", "--disable-quic",
)  # fmt: skip
READY = "window.unireg && (window.unireg.ready || window.unireg.errors.length > 0)"


def chromium_path() -> Path:
    """Debian's Chromium (``chromium`` on the PATH, else ``/usr/bin/chromium``)."""
    return Path(shutil.which("chromium") or "/usr/bin/chromium")


@contextmanager
def headless_chromium() -> Iterator[Any]:
    """A Playwright ``Browser`` on Debian's Chromium, closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium_path()), args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


def open_report(browser: Any, path: str | Path, *, timeout_ms: int = 90_000) -> tuple[Any, dict]:
    """Open a page and wait until it has drawn (or failed); returns the Playwright page and
    a log of its console messages and requests (filled as the page runs)."""
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    log: dict[str, list] = {"console": [], "requests": []}
    page.on("console", lambda m: log["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: log["console"].append(("pageerror", str(e))))
    page.on("request", lambda r: log["requests"].append(r.url))
    page.goto(Path(path).resolve().as_uri())
    # polled from here: ``wait_for_function`` polls inside the page with ``eval``, which the
    # page's Content-Security-Policy refuses whenever the page is not ready at the first look
    deadline = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(f"() => Boolean({READY})"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: the page did not draw within {timeout_ms / 1000:g} s")
        page.wait_for_timeout(100)
    return page, log
