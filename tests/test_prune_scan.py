"""`pkdq prune-scan` on the tiny Llama: terminal summary, JSON with every score, a PNG plot."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pkdq.cli import app

runner = CliRunner()


def test_prune_scan_prints_and_saves_json_and_png(tiny_llama_ref, tmp_path):
    out = tmp_path / "scan"
    result = runner.invoke(app, ["prune-scan", str(tiny_llama_ref.path), "--out", str(out),
                                 "--samples", "4", "--seq-len", "32", "--ppl-skip"])
    assert result.exit_code == 0, result.output
    assert "layers by block influence (least important first)" in result.output
    assert "layer  1: groups [" in result.output
    data = json.loads((out / "scan.json").read_text())
    assert len(data["block_influence"]) == 2 and len(data["ppl_skip"]) == 2
    assert [len(h) for h in data["query_heads"]] == [4, 4]
    assert [len(g) for g in data["kv_groups"]] == [2, 2]
    assert len(data["ffn"][0]) == 128 and len(data["hidden"]) == 64
    assert (out / "scan.png").read_bytes()[:4] == b"\x89PNG"


def test_prune_scan_refuses_an_unknown_model_in_one_line(tmp_path):
    result = runner.invoke(app, ["prune-scan", str(tmp_path / "nothing-here")])
    assert result.exit_code == 2
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
