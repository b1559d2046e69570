"""`precision: auto`: bf16 autocast only where bf16 is native, decided before a unit is keyed."""

from __future__ import annotations

import pytest

from tasks.core import resources
from tasks.core.recipe import DistillConfig, QuantizeConfig
from tasks.core.resources import (
    Resources,
    concrete_precision,
    native_bf16,
    settle_for_machine,
)


@pytest.mark.parametrize("flags, native", [("fpu avx2 fma", False),
                                           ("fpu avx512f avx512_bf16", True),
                                           ("fpu amx_bf16 amx_tile", True)])
def test_native_bf16_reads_the_cpu_flags(tmp_path, monkeypatch, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    native_bf16.cache_clear()
    try:
        assert native_bf16("cpu") is native
        assert concrete_precision("auto", "cpu") == ("bf16-autocast" if native else "fp32")
    finally:
        native_bf16.cache_clear()


def test_explicit_precisions_and_cuda_are_kept():
    assert concrete_precision("fp32", "cuda") == "fp32"
    assert concrete_precision("bf16-autocast", "cpu") == "bf16-autocast"
    assert concrete_precision("auto", "cuda") == "bf16-autocast"


def test_auto_is_settled_before_the_unit_key(monkeypatch):
    monkeypatch.setattr(resources, "native_bf16", lambda device: False)
    settled = settle_for_machine("distill", DistillConfig(precision="auto"), Resources())
    assert settled.precision == "fp32"
    monkeypatch.setattr(resources, "native_bf16", lambda device: True)
    assert settle_for_machine("distill", DistillConfig(precision="auto"), None).precision == \
        "bf16-autocast"
    quantize = QuantizeConfig()
    assert settle_for_machine("quantize", quantize, None) is quantize
