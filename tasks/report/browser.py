"""Headless Chromium: render a report page, screenshot it, and check it against report.json.

A report page can be valid HTML and still be wrong where it matters: an image that does not decode,
a number formatted from the wrong field. `check_rendered` loads the page in a real browser and
compares every tagged numeric cell (`data-json` path, `data-value`) with report.json.

Uses Debian's `chromium` package; the flags keep it offline and free of profile side effects.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync")
TIMEOUT_S = 120
REL_TOL = 1e-9
MISSING = "chromium not found; install Debian's chromium: apt-get install chromium"


def find_chromium() -> str | None:
    """Path of the chromium binary, or None."""
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _run(html_path: Path, *extra: str) -> str:
    binary = find_chromium()
    if binary is None:
        raise RuntimeError(MISSING)
    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="pkdq-chromium-") as profile:
        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"chromium timed out after {TIMEOUT_S} s on {url}") from exc
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"chromium exited {done.returncode} on {url}: {tail}")
    return done.stdout


def dump_dom(html_path: Path) -> str:
    """The DOM after load (scripts run), as chromium serialises it."""
    return _run(html_path, "--dump-dom")


def screenshot(html_path: Path, png_path: Path, width: int = 1280, height: int = 2000) -> Path:
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _run(html_path, f"--screenshot={png_path}", f"--window-size={width},{height}")
    if not png_path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot at {png_path}")
    return png_path


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted path; list indices are path parts ("stages.2.eval.params").

    A dict key that itself contains dots is matched too (longest key first), so a benchmark
    named "a.b" stays addressable. Raises KeyError with the path when nothing matches.
    """
    parts = path.split(".")
    node, i = data, 0
    while i < len(parts):
        if isinstance(node, list):
            try:
                node, i = node[int(parts[i])], i + 1
            except (ValueError, IndexError):
                raise KeyError(path) from None
            continue
        if not isinstance(node, dict):
            raise KeyError(path)
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in node:
                node, i = node[key], j
                break
        else:
            raise KeyError(path)
    return node


class _DomScan(HTMLParser):
    """Body data attributes, image count, and every (data-json, data-value) pair."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.body: dict[str, str | None] = {}
        self.images = 0
        self.numbers: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "body":
            self.body = found
        elif tag == "img":
            self.images += 1
        if "data-json" in found:
            self.numbers.append((found["data-json"] or "", found.get("data-value") or ""))


def _same(html_value: str, json_value: Any) -> bool:
    try:
        a, b = float(html_value), float(json_value)
    except (TypeError, ValueError):
        return False
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0.0)


def check_dom(dom: str, report_json: dict[str, Any]) -> dict[str, Any]:
    """`check_rendered` on an already dumped DOM (pure; testable without a browser)."""
    scan = _DomScan()
    scan.feed(dom)
    mismatches = []
    for path, html_value in scan.numbers:
        try:
            json_value = lookup(report_json, path)
        except KeyError:
            mismatches.append({"path": path, "html": html_value, "json": None,
                               "why": "path not in report.json"})
            continue
        if not _same(html_value, json_value):
            mismatches.append({"path": path, "html": html_value, "json": json_value,
                               "why": "value differs"})
    broken = scan.body.get("data-broken-images")
    return {
        "rendered": scan.body.get("data-rendered") == "1",
        "broken_images": int(broken) if broken and broken.isdigit() else -1,
        "images": scan.images,
        "numbers_checked": len(scan.numbers),
        "mismatches": mismatches,
    }


def check_rendered(html_path: Path, report_json: dict[str, Any]) -> dict[str, Any]:
    """Render in headless chromium; count broken images; compare tagged numbers to report_json.

    `broken_images` is -1 when the page's load script never reported (then `rendered` is False).
    """
    return check_dom(dump_dom(html_path), report_json)
