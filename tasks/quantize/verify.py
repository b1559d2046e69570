"""Load a written checkpoint back through every available loader and compare its logits.

A cheap sanity signal (top-1 agreement, KL in nats per token against the float input on one
training-text block), recorded in the stage metrics so a broken save never passes unseen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tasks.core.common import one_line
from tasks.core.gptq_checkpoint import QuantizeError, load_quantized


def _load_with_transformers(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu").eval()


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(ids.to(device)).logits.float().cpu()


def reference_logits(src: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    try:
        return _logits(model, ids)
    finally:
        del model


def _agreement(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(ref || got) in nats per token: a cheap sanity signal."""
    if not torch.isfinite(got).all():
        raise QuantizeError("quantized model produced non-finite logits")
    ref_lp = torch.log_softmax(ref, dim=-1)
    got_lp = torch.log_softmax(got, dim=-1)
    kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return {"top1_agreement": round(top1, 4), "kl_nats": round(kl, 5)}


def verify_loaders(path: Path, ids: torch.Tensor, ref: torch.Tensor,
                    device: str) -> dict[str, Any]:
    """Load the written checkpoint back through each available loader and compare logits."""
    results: dict[str, Any] = {}
    model = load_quantized(path, device=device)
    results["gptqmodel"] = {"dtype": str(model.dtype).replace("torch.", ""),
                            **_agreement(ref, _logits(model, ids))}
    del model
    method = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    if method.get("quant_method") == "gptq":
        try:
            import optimum  # noqa: F401 - transformers' GPTQ integration imports it
        except ImportError:
            results["transformers"] = "not verified: transformers' GPTQ loader needs optimum"
            return results
    try:
        model = _load_with_transformers(path)
        results["transformers"] = {"dtype": str(model.dtype).replace("torch.", ""),
                                   **_agreement(ref, _logits(model, ids))}
    except Exception as exc:  # noqa: BLE001 - reported, the gptqmodel loader already passed
        results["transformers"] = f"failed: {one_line(exc)}"
    return results
