"""The HTML report: escaping and number tags (fast), then the real page in headless Chromium.

tests/data/sample_run holds the JSON files of a real finished run (smollm2-ffn25-kd-w4, no model
weights): run.json, every stage's eval.json / eval_samples.json / metrics.json / stage.json and the
KD stage's loss_curve.json. The Chromium tests skip only when Debian's chromium is not installed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

from tasks.report import browser
from tasks.report.html import render_html

SAMPLE_RUN = Path(__file__).parent / "data" / "sample_run"
PIXEL = base64.b64decode(  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")

needs_chromium = pytest.mark.skipif(
    browser.find_chromium() is None,
    reason="Debian's chromium is not installed (apt-get install chromium)")


def _page() -> dict:
    return {
        "title": "<script>alert('t')</script>", "subtitle": "a & b",
        "sections": [
            {"kind": "warnings", "items": ["<b>bold</b> warning"]},
            {"kind": "table", "title": "T<1>", "columns": ["name", "value"],
             "rows": [["<i>x</i>", {"text": "1.5 > 1", "json": "a.b.0", "value": 1.5}],
                      ["y", {"text": "n/a"}]],
             "note": "note <here>"},
            {"kind": "image", "title": "img", "png": PIXEL, "alt": "a \"quoted\" alt"},
            {"kind": "text", "title": "t", "text": "one <p>\n\ntwo"},
            {"kind": "code", "title": "c", "text": "{\"k\": \"<v>\"}"},
        ],
    }


def test_render_html_escapes_text_and_tags_numbers():
    html = render_html(_page())
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#x27;t&#x27;)" in html
    for raw in ("<b>bold</b>", "<i>x</i>", "T<1>", "note <here>", "one <p>", "<v>"):
        assert raw not in html
    assert "&lt;b&gt;bold&lt;/b&gt; warning" in html and "a &amp; b" in html
    assert re.search(r'<td class="num" data-json="a\.b\.0" data-value="1\.5">1\.5 &gt; 1</td>',
                     html)
    assert '<td class="num">n/a</td>' in html  # a numeric-looking cell without a report number
    assert 'alt="a &quot;quoted&quot; alt"' in html
    assert "data:image/png;base64," in html
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "<link" not in html
    assert "@import" not in html and "url(" not in html
    assert "document.body.dataset.brokenImages" in html


def test_empty_warnings_say_none_and_unknown_section_is_refused():
    html = render_html({"title": "t", "sections": [{"kind": "warnings", "items": []}]})
    assert '<div class="warnings none">none</div>' in html
    with pytest.raises(ValueError, match="unknown section kind"):
        render_html({"title": "t", "sections": [{"kind": "chart"}]})


def test_lookup_and_check_dom_catch_wrong_and_missing_numbers():
    report = {"stages": [{"x": 1.0}, {"retention": {"benchmarks": {"a.b": {"ratio": 0.25}}}}]}
    assert browser.lookup(report, "stages.1.retention.benchmarks.a.b.ratio") == 0.25
    with pytest.raises(KeyError):
        browser.lookup(report, "stages.5.x")
    dom = ('<body data-rendered="1" data-broken-images="0"><img src="x">'
           '<td data-json="stages.0.x" data-value="1.0"></td>'
           '<td data-json="stages.1.retention.benchmarks.a.b.ratio" data-value="0.26"></td>'
           '<td data-json="stages.0.y" data-value="2.0"></td></body>')
    result = browser.check_dom(dom, report)
    assert result["rendered"] and result["broken_images"] == 0 and result["images"] == 1
    assert result["numbers_checked"] == 3
    assert [(m["path"], m["why"]) for m in result["mismatches"]] == [
        ("stages.1.retention.benchmarks.a.b.ratio", "value differs"),
        ("stages.0.y", "path not in report.json")]


def test_missing_chromium_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    with pytest.raises(RuntimeError, match=r"apt-get install chromium"):
        browser.dump_dom(tmp_path / "x.html")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """write_report on a copy of the sample run: (paths, report.json as loaded)."""
    from tasks.report.run_report import write_report

    run_dir = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(SAMPLE_RUN, run_dir)
    paths = write_report(run_dir)
    return paths, json.loads(paths["json"].read_text())


def test_write_report_adds_a_self_contained_html(report):
    paths, data = report
    assert set(paths) == {"markdown", "json", "html"}
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") >= 4  # ppl, accuracy, size, KD loss curve
    assert "KD loss curve (02-distill)" in html and "Environment" in html
    assert data["run"]["model"]["fingerprint"] in html and "5feffd09701268bb" in html
    # without a browser: every tagged number in the page is the report.json number
    raw = browser.check_dom(html, data)
    assert raw["numbers_checked"] >= 10 and raw["mismatches"] == []
    assert 'data-json="stages.3.retention.average_retention.mean"' in html


def test_artifacts_helper_publishes_table_and_plots(report, monkeypatch):
    import flows.artifacts as artifacts
    from tasks.report.page import quality_figures

    made: dict[str, dict] = {}

    def recorder(kind: str):
        def create(**kwargs):
            made[kind] = kwargs
            return kind
        return create

    monkeypatch.setattr(artifacts, "create_table_artifact", recorder("table"))
    monkeypatch.setattr(artifacts, "create_markdown_artifact", recorder("md"))
    _, data = report
    figures = quality_figures({"run": data})
    assert set(figures) == {"ppl", "accuracy", "size"}
    artifacts.publish_report_artifacts(data, figures)
    table = made["table"]["table"]
    assert made["table"]["key"] == "pkdq-retention-table"
    assert {"stage", "benchmark", "score", "score ± se", "retention s/b ± se"} <= set(table[0])
    assert any(row["stage"] == "03-quantize" and row["benchmark"] == "arc_easy" for row in table)
    assert made["md"]["markdown"].count("](data:image/png;base64,") == 3


@needs_chromium
def test_report_renders_in_chromium_with_the_report_numbers(report, tmp_path):
    paths, data = report
    result = browser.check_rendered(paths["html"], data)
    assert result["rendered"], result
    assert result["broken_images"] == 0
    assert result["images"] >= 4
    assert result["numbers_checked"] >= 10
    assert result["mismatches"] == []
    shot = browser.screenshot(paths["html"], tmp_path / "report.png")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@needs_chromium
def test_chromium_check_catches_a_tampered_number_and_a_broken_image(report, tmp_path):
    paths, data = report
    html = paths["html"].read_text()
    path = "stages.2.retention.benchmarks.piqa.ratio"
    value = browser.lookup(data, path)
    tag = f'data-json="{path}" data-value="{value!r}"'
    assert tag in html
    tampered = tmp_path / "tampered.html"
    tampered.write_text(html.replace(tag, f'data-json="{path}" data-value="0.5"', 1)
                        .replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    result = browser.check_rendered(tampered, data)
    assert result["rendered"]
    assert [m["path"] for m in result["mismatches"]] == [path]
    assert result["broken_images"] == 1
