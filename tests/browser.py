"""Open local HTML files in a real headless Chromium, for tests of what a page
shows (the run report, the documentation site's front page).

It drives the system's Chromium (Debian's ``chromium`` package, installed by
``ci/setup.sh``) through Playwright's ``executable_path``, so no browser is
downloaded.  Pages get no network: every http(s) request is refused and
recorded, which is how a test sees that a page is self-contained::

    from tests.browser import Browser, distinct_colours, need_browser

    def test_page(tmp_path):
        need_browser()                        # skips, saying why, if missing
        with Browser() as browser:
            page = browser.open(tmp_path / "page.html", ready="document.body")
            assert not page.errors            # console errors, uncaught exceptions
            assert not page.blocked           # URLs the page tried to fetch
            assert page.evaluate("document.title") == "..."
            png = page.screenshot(tmp_path / "page.png")
            assert distinct_colours(png) > 16

``Browser`` starts Chromium once; open as many pages as needed before it
closes.  ``page.raw`` is Playwright's page for anything else.  While it is
open, Playwright's own event loop runs in the calling thread, so
``asyncio.run`` must run in another thread meanwhile.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest

__all__ = ["Browser", "Page", "chromium_path", "distinct_colours", "need_browser"]

#: what to install when the browser is missing
HINT = "apt-get install chromium (ci/setup.sh does) and pip install playwright"


def chromium_path() -> str | None:
    """``$ASYNCFLOW_CHROMIUM``, else ``chromium`` (or ``chromium-browser``) on
    the PATH; None if there is none."""
    found = os.environ.get("ASYNCFLOW_CHROMIUM")
    return found or shutil.which("chromium") or shutil.which("chromium-browser")


def need_browser() -> str:
    """The Chromium to use.  A checkout without it or Playwright skips the
    calling test and still runs the rest; in CI (``$CI`` set, as CI services
    set it), where ``ci/setup.sh`` installs both, a missing one fails instead."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable(f"needs Playwright: {HINT}")
    path = chromium_path()
    if path is None:
        _unavailable(f"needs a system Chromium: {HINT}")
    return path


def _unavailable(why: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


class Page:
    """One loaded page and what went wrong in it."""

    def __init__(self, raw: Any, errors: list[str], blocked: list[str]) -> None:
        self.raw = raw
        #: console messages of type "error" and uncaught exceptions, as text
        self.errors = errors
        #: the http(s) URLs the page tried to fetch (all were refused)
        self.blocked = blocked
        #: seconds from navigation until ``ready`` held
        self.load_seconds = 0.0

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        return self.raw.evaluate(expression)

    def screenshot(
        self, path: str | Path | None = None, full_page: bool = False
    ) -> bytes:
        """A PNG of the viewport (or the whole page), also written to ``path``."""
        return bytes(
            self.raw.screenshot(
                path=None if path is None else str(path), full_page=full_page
            )
        )


class Browser:
    """Headless Chromium for the length of a ``with`` block."""

    def __init__(self, width: int = 1200, height: int = 900) -> None:
        self.viewport = {"width": width, "height": height}
        self._playwright: Any = None
        self._browser: Any = None

    def __enter__(self) -> Browser:
        from playwright.sync_api import sync_playwright

        executable = need_browser()
        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(
                executable_path=executable, headless=True
            )
        except BaseException:
            self._playwright.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._browser.close()
        finally:
            self._playwright.stop()

    def open(
        self, path: str | Path, ready: str | None = None, timeout: float = 30.0
    ) -> Page:
        """Load a local file; with ``ready``, also wait until that JavaScript
        expression is truthy (the page's own rendering done).  Raises
        Playwright's TimeoutError after ``timeout`` seconds."""
        raw = self._browser.new_page(viewport=self.viewport)
        page = Page(raw, [], [])
        raw.on(
            "console",
            lambda m: page.errors.append(m.text) if m.type == "error" else None,
        )
        raw.on("pageerror", lambda exc: page.errors.append(f"uncaught: {exc}"))

        def refuse(route: Any) -> None:
            page.blocked.append(route.request.url)
            route.abort()

        raw.route("http*://**", refuse)
        started = time.perf_counter()
        raw.goto(Path(path).resolve().as_uri(), timeout=timeout * 1000)
        if ready is not None:
            raw.wait_for_function(ready, timeout=timeout * 1000)
        page.load_seconds = time.perf_counter() - started
        return page


def distinct_colours(png: bytes) -> int:
    """How many colours a screenshot holds: a blank or failed page has one or
    two.  Without Pillow, counts distinct byte values of the compressed data
    instead, which is also tiny for a blank image."""
    try:
        from PIL import Image
    except ImportError:
        return len(set(png[64:]))
    with Image.open(io.BytesIO(png)) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return len(colours) if colours is not None else 1 << 20
