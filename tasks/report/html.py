"""One self-contained HTML page from a generic page description.

The page must open anywhere, forever: from a copied run folder, an e-mail attachment, a machine
without network. So there is nothing external at all (inline CSS, PNGs as data: URIs), and a
Content-Security-Policy that forbids any fetch, so a stray external reference shows up as a broken
image in the browser check instead of silently loading.

Every numeric table cell carries `data-json` (its dotted path in report.json) and `data-value`
(the exact float), so `tasks.report.browser.check_rendered` can prove the rendered numbers are the
report's numbers. A tiny inline script records, after load, how many images failed to decode
(`body[data-broken-images]`) and that the page rendered (`body[data-rendered="1"]`).

Page: {"title", "subtitle", "sections": [...]}; section kinds: table, image, warnings, text, code
(see `render_section`). A table cell is a plain string or {"text", "json", "value"}.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from html import escape
from typing import Any

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } .subtitle { color: #555; margin-top: 0; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
.note { color: #555; font-size: 0.9em; }
.warnings { border: 2px solid #c62828; background: #fdecea; padding: 0.6em 1em;
            border-radius: 4px; }
.warnings.none { border-color: #2e7d32; background: #edf7ed; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table.generations td { white-space: pre-wrap; vertical-align: top; min-width: 12em;
                      font-size: 0.92em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""

# Runs after load, so every data: image has had its chance to decode.
SCRIPT = """
window.addEventListener("load", function () {
  var n = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) { n++; }
  }
  document.body.dataset.brokenImages = String(n);
  document.body.dataset.rendered = "1";
});
"""


def _cell(cell: Any) -> str:
    """A table cell; a numeric one carries its report.json path and exact value."""
    if isinstance(cell, dict):
        attrs = ""
        if cell.get("json") is not None and cell.get("value") is not None:
            attrs = (f' data-json="{escape(str(cell["json"]))}"'
                     f' data-value="{escape(repr(float(cell["value"])))}"')
        return f'<td class="num"{attrs}>{escape(str(cell.get("text", "")))}</td>'
    return f"<td>{escape(str(cell))}</td>"


def _heading(section: dict[str, Any]) -> str:
    return f"<h2>{escape(section['title'])}</h2>\n" if section.get("title") else ""


def _table(section: dict[str, Any]) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in section["columns"])
    body = "\n".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>"
                     for row in section["rows"])
    note = (f'<p class="note">{escape(section["note"])}</p>\n' if section.get("note") else "")
    css = f' class="{escape(section["css_class"])}"' if section.get("css_class") else ""
    return (f"{_heading(section)}<table{css}>\n<thead><tr>{head}</tr></thead>\n"
            f"<tbody>\n{body}\n</tbody>\n</table>\n{note}")


def _image(section: dict[str, Any]) -> str:
    data = base64.b64encode(section["png"]).decode("ascii")
    alt = escape(section.get("alt") or section.get("title") or "figure")
    return f'{_heading(section)}<img src="data:image/png;base64,{data}" alt="{alt}">\n'


def _warnings(section: dict[str, Any]) -> str:
    items = section.get("items") or []
    title = escape(section.get("title") or "Warnings")
    if not items:
        return f'<h2>{title}</h2>\n<div class="warnings none">none</div>\n'
    lis = "\n".join(f"<li>{escape(str(item))}</li>" for item in items)
    return f'<h2>{title}</h2>\n<div class="warnings"><ul>\n{lis}\n</ul></div>\n'


def _text(section: dict[str, Any]) -> str:
    paragraphs = [p for p in str(section["text"]).split("\n\n") if p.strip()]
    return _heading(section) + "".join(f"<p>{escape(p)}</p>\n" for p in paragraphs)


def _code(section: dict[str, Any]) -> str:
    return f"{_heading(section)}<pre><code>{escape(str(section['text']))}</code></pre>\n"


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "table": _table, "image": _image, "warnings": _warnings, "text": _text, "code": _code,
}


def render_section(section: dict[str, Any]) -> str:
    kind = section.get("kind")
    if kind not in RENDERERS:
        raise ValueError(f"unknown section kind {kind!r}; one of {sorted(RENDERERS)}")
    return RENDERERS[kind](section)


def render_html(page: dict[str, Any]) -> str:
    """The whole page as one HTML string with no external reference."""
    title = escape(page["title"])
    subtitle = (f'<p class="subtitle">{escape(page["subtitle"])}</p>\n'
                if page.get("subtitle") else "")
    body = "".join(render_section(s) for s in page.get("sections", []))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{title}</h1>\n{subtitle}{body}<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
