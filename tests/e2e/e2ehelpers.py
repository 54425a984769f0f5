"""Helpers for the browser tests: a `streamlit run` server, a TCP proxy that can cut connections, page waits.

The server runs the real app as a subprocess in its own process group; Playwright drives Debian's
Chromium against it. Everything waits by polling for what should be on the page (never fixed sleeps
alone), with generous timeouts so the tests hold on a loaded 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-dev-shm-usage",
]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
# A net that renders and trains in seconds: ResNet-8, width 4, 16x16 inputs (16 is the default size).
TINY = {"d": "8", "w": "4"}
# 500 shapes in batches of 32: 16 steps an epoch.
TINY_RUN = {**TINY, "bs": "32", "nt": "500"}
SESSION_TTL_S = 6  # server.disconnectedSessionTTL of the test server
JOB_CAP = 2  # RESVIZ_MAX_JOBS of the test server (the app's default)
WAIT_MS = 90_000  # the first render of a page imports torch and builds nets: allow for a busy machine

EXCEPTION = '[data-testid="stException"]'
PLOT = ".js-plotly-plot"
STATUS = '[data-testid="stStatusWidget"]'
UPLOAD = '[data-testid="stFileUploaderDropzoneInput"]'
SIDEBAR = '[data-testid="stSidebar"]'
ERROR_ALERT = '[data-testid="stAlertContentError"]'
# Every plotly chart on the page as {title, traces: [{name, type, x, y}]}, title without markup. Charts that
# Streamlit keeps on screen as stale copies while a rerun replaces them are left out.
PLOT_DATA_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
  .filter(p => !p.closest('[data-stale="true"]'))
  .map(p => ({
    title: (((p.layout || {}).title || {}).text || '').replace(/<[^>]*>/g, ''),
    traces: (p.data || []).map(t => ({name: t.name || '', type: t.type || '',
        x: t.x ? Array.from(t.x) : [], y: t.y ? Array.from(t.y) : []}))}))"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # localhost only
        return r.status, r.read()


class Server:
    """`streamlit run app.py` on a free localhost port, in its own process group."""

    def __init__(self, env: dict[str, str], options: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
               "--server.port", str(self.port), "--server.address", "127.0.0.1"]
        for key, value in options.items():
            cmd += [f"--{key}", value]
        self._log_fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            return http_get(f"{self.url}/_stcore/health", timeout=5)[1].strip() == b"ok"
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no health answer in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Terminate the whole process group (the server and anything it started), then reap it."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log_fh.close()

    def group_alive(self) -> bool:
        """Whether any process of the server's process group is left (none should be after :meth:`stop`)."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


class Proxy:
    """A TCP relay in front of the server whose open connections can be cut, like a network blip."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="e2e-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Close every open connection (the browser sees its websocket drop and reconnects)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


# -- page helpers ---------------------------------------------------------------------------------
def page_url(base: str, path: str = "", params: dict[str, str] | None = None) -> str:
    query = f"?{urlencode(params)}" if params else ""
    return f"{base}/{path}{query}"


def poll(check: Callable[[], Any], timeout: float = 60.0, every: float = 0.5, what: str = "condition") -> Any:
    """Call ``check`` until it returns something truthy; its value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
        time.sleep(every)


def wait_idle(page, timeout: float = 60.0) -> None:
    """Wait until Streamlit's running indicator has been absent for two checks in a row."""
    quiet = 0

    def settled() -> bool:
        nonlocal quiet
        quiet = quiet + 1 if page.locator(STATUS).count() == 0 else 0
        return quiet >= 2

    poll(settled, timeout, every=0.3, what="the script run to finish")


def open_page(page, url: str, ready: str, timeout_ms: int = WAIT_MS) -> None:
    """Go to ``url`` and wait for the selector ``ready`` and for the script run to finish."""
    page.goto(url)
    page.wait_for_selector(ready, timeout=timeout_ms)
    wait_idle(page, timeout_ms / 1000)


def location(page) -> str:
    """The address bar as the page sees it now (``page.url`` only follows events the sync API has processed)."""
    return page.evaluate("() => window.location.href")


def assert_no_exception(page) -> None:
    n = page.locator(EXCEPTION).count()
    assert n == 0, page.locator(EXCEPTION).all_inner_texts()


def error_texts(page) -> list[str]:
    return page.locator(ERROR_ALERT).all_inner_texts()


def plot_data(page) -> list[dict]:
    return page.evaluate(PLOT_DATA_JS)


def find_plot(page, title_part: str) -> dict | None:
    return next((p for p in plot_data(page) if title_part.lower() in p["title"].lower()), None)


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sidebar_text(page) -> str:
    return page.locator(SIDEBAR).inner_text()


def slots(page) -> tuple[int, int] | None:
    """(training worker threads, cap) from the sidebar's server-load line, or None when it is not shown."""
    m = re.search(r"Training on this server: (\d+) of (\d+) runs", sidebar_text(page))
    return (int(m.group(1)), int(m.group(2))) if m else None


def choose(page, combobox: str, option: str) -> None:
    """Pick ``option`` in the selectbox or multiselect labelled ``combobox`` and wait until the pick holds.

    The list is opened from the keyboard (a click may scroll the page first, and the list closes on
    scroll); if a rerun swallowed the key press, typing the option's text opens the filtered list.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.get_by_role("combobox", name=combobox, exact=True)
    box.scroll_into_view_if_needed()
    item = page.get_by_role("option", name=option, exact=True)
    for attempt in range(4):
        box.focus()
        if attempt % 2:
            box.fill(option)
        else:
            page.keyboard.press("ArrowDown")
        try:
            item.click(timeout=5000)
            break
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
            wait_idle(page)
    else:
        raise AssertionError(f"{option!r} never appeared in {combobox!r}")
    if box.get_attribute("aria-expanded") == "true":  # a multiselect's list stays open after a pick
        page.keyboard.press("Escape")
    box.blur()
    tags = page.locator('[data-testid="stMultiSelectTagsContainer"]').filter(has=box)
    poll(lambda: option in (tags.inner_text() if tags.count() else box.input_value()), 30, what=f"{combobox} = {option}")


def pick(page, option: str, then: str | None = None, role: str = "radio", timeout: float = 90.0) -> None:
    """Click the radio option (or checkbox) labelled ``option`` until it is checked and ``then`` is on the page.

    A click that lands while a rerun replaces the widgets can be lost; it is repeated, never assumed.
    """
    radio = page.get_by_role(role, name=option, exact=True)
    label = page.get_by_text(option, exact=True)
    deadline = time.monotonic() + timeout

    def holds() -> bool:
        return radio.is_checked() and (then is None or page.locator(then).count() > 0)

    while True:
        if not radio.is_checked():
            label.click()
        try:
            poll(holds, min(15.0, max(1.0, deadline - time.monotonic())), what=f"{option!r} to hold")
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{option!r} was clicked but never held (then={then!r})") from None
            wait_idle(page)
