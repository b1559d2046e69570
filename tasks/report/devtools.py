"""A live web app in headless Chromium: open a URL, wait until text shows, read it, screenshot it.

`browser.py` renders a finished file once (`--dump-dom`); a single-page app such as the Prefect UI
fetches its data after load, for as long as it takes, so a fixed time budget either waits too long
or reads the page before the data came. This drives Chromium over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: fd 3 in, fd 4 out, JSON messages ending in NUL), which needs no port
and no package: navigate, poll `document.body.innerText` until every expected string is there (or
time runs out), then return the text and the DOM and save a screenshot.

    with LivePage() as page:
        seen = page.open("http://127.0.0.1:4200/runs", expect=["Completed"])
        page.screenshot(Path("runs.png"))
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.report.browser import CHROMIUM_FLAGS, MISSING, find_chromium

READ_CHUNK = 1 << 16


class DevToolsError(RuntimeError):
    """Chromium did not start, exited, or answered a command with an error."""


@dataclass
class Seen:
    """What a page showed: its URL, visible text, DOM, and which expected strings were missing."""

    url: str
    text: str
    dom: str
    missing: list[str] = field(default_factory=list)
    waited_s: float = 0.0


class LivePage:
    """One headless Chromium with one tab, driven over the DevTools pipe. Use as a context manager.

    Chromium gets a fresh profile (deleted on close) and the offline flags of `browser.py`.
    """

    def __init__(self, width: int = 1440, height: int = 1000, timeout_s: float = 60.0) -> None:
        self.width, self.height, self.timeout_s = width, height, timeout_s
        self._proc: subprocess.Popen | None = None
        self._profile: tempfile.TemporaryDirectory | None = None
        self._to_chrome = self._from_chrome = -1
        self._buffer = b""
        self._next_id = 0
        self._session = ""

    # --- process and pipe -------------------------------------------------------------------
    def __enter__(self) -> LivePage:
        binary = find_chromium()
        if binary is None:
            raise DevToolsError(MISSING)
        self._profile = tempfile.TemporaryDirectory(prefix="pkdq-chromium-")
        chrome_in, self._to_chrome = os.pipe()    # we write, chromium reads on its fd 3
        self._from_chrome, chrome_out = os.pipe()  # chromium writes on its fd 4, we read

        def to_fds_3_and_4() -> None:  # in the child, before exec: the fds the pipe flag expects
            high_in = fcntl.fcntl(chrome_in, fcntl.F_DUPFD, 10)  # neither may clobber the other
            high_out = fcntl.fcntl(chrome_out, fcntl.F_DUPFD, 10)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}",
               "--remote-debugging-pipe", f"--window-size={self.width},{self.height}",
               "--hide-scrollbars", "about:blank"]
        try:  # fds 3 and 4 are open here (pipes take the lowest free), so pass_fds may name them
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, pass_fds=(3, 4),
                                          preexec_fn=to_fds_3_and_4, start_new_session=True)
        finally:
            os.close(chrome_in)
            os.close(chrome_out)
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.call("Target.attachToTarget", targetId=target,
                                      flatten=True)["sessionId"]
            self.call("Page.enable", session=True)
            self.call("Emulation.setDeviceMetricsOverride", session=True, width=self.width,
                      height=self.height, deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            try:
                self.call("Browser.close")
            except (DevToolsError, OSError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        for fd in (self._to_chrome, self._from_chrome):
            if fd >= 0:
                os.close(fd)
        self._to_chrome = self._from_chrome = -1
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to_chrome, data):]

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise DevToolsError(f"chromium did not answer within {self.timeout_s:.0f} s")
            chunk = os.read(self._from_chrome, READ_CHUNK)
            if not chunk:
                raise DevToolsError("chromium closed the DevTools pipe (exited?)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events in between are dropped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        self._send(message)
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._receive(deadline)
            if reply.get("id") != self._next_id:
                continue
            if "error" in reply:
                raise DevToolsError(f"{method}: {reply['error'].get('message', reply['error'])}")
            return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression[:60]}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    # --- what a test uses ---------------------------------------------------------------------
    def open(self, url: str, expect: list[str] | tuple[str, ...] = (),
             wait_s: float = 60.0, settle_s: float = 1.0) -> Seen:
        """Navigate to `url`; poll the visible text until it holds every `expect` string.

        Returns what was shown when all were there (after `settle_s` more, so late requests
        land in the screenshot too) or when `wait_s` ran out; `missing` names what never showed.
        """
        start = time.monotonic()
        self.call("Page.navigate", session=True, url=url)
        missing = list(expect)
        while True:
            text = self.evaluate("document.body ? document.body.innerText : ''") or ""
            missing = [want for want in expect if want not in text]
            if not missing or time.monotonic() - start > wait_s:
                break
            time.sleep(0.5)
        if not missing and settle_s:
            time.sleep(settle_s)
            text = self.evaluate("document.body ? document.body.innerText : ''") or ""
        dom = self.evaluate("document.documentElement.outerHTML") or ""
        return Seen(self.evaluate("location.href") or url, text, dom, missing,
                    time.monotonic() - start)

    def screenshot(self, png_path: Path, full_page: bool = True) -> Path:
        """A PNG of the page as shown now (the whole scrollable page unless full_page=False)."""
        png_path = Path(png_path)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            height = self.evaluate("Math.max(document.documentElement.scrollHeight, "
                                   "document.body ? document.body.scrollHeight : 0)") or 0
            params["clip"] = {"x": 0, "y": 0, "width": self.width,
                              "height": max(int(height), self.height), "scale": 1}
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        png_path.write_bytes(base64.b64decode(data))
        return png_path
