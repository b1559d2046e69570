"""Mixed 4/8-bit GGUF: which decoder layers to write in Q8_0, chosen by measurement.

A 4-bit file loses unevenly: on the default's SmolLM2 the best single layer in Q8_0 wins back
3x the held-out KL of the median one (bench/results/mixed_precision.md), and choosing layers by
that measurement beat llama.cpp's first-and-last placement at every layer count. llama.cpp
stores a type per tensor, so a layer's linears in Q8_0 cost a known 16 bytes more per 32
weights (34-byte blocks instead of 18): a size budget turns into a layer count exactly.

Sensitivity of layer i: KL from the stage's float input (what quantization lost, not what the
cut lost) to the model as the file would hold it with layer i alone in Q8_0. The text is the
calibration source's held-out slice (KD's held-out Wikipedia files for the bundled text): not
the calibration blocks GPTQ fitted, never an evaluation split. The 8-bit weights are llama.cpp's
own Q8_0 rounding of the float input (gguf-py), within 0.5% perplexity of float on SmolLM2; a
GPTQ pass at 8 bits for those layers would need a per-layer checkpoint format every loader
reads, which the GPTQ folder beside the file does not have.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
BLOCK = 32
EXTRA_BYTES_PER_BLOCK = 34 - 18  # a Q8_0 block against a Q4_0 one, 32 weights each


def layer_weight_keys(state: dict[str, Any]) -> dict[int, list[str]]:
    """{layer index: state-dict keys of its 2-D weights (the linears GGUF quantizes)}."""
    out: dict[int, list[str]] = {}
    for key, tensor in state.items():
        found = LAYER_KEY.search(key)
        if found and key.endswith(".weight") and tensor.dim() == 2:
            out.setdefault(int(found.group(1)), []).append(key)
    return dict(sorted(out.items()))


def mixed_keys(state: dict[str, Any], layers: Iterable[int]) -> set[str]:
    """The weight keys of `layers` (refusing an index the model does not have)."""
    per_layer = layer_weight_keys(state)
    wanted = set(layers)
    unknown = sorted(wanted - set(per_layer))
    if unknown:
        raise ValueError(f"layers {unknown} are not in the model (it has {len(per_layer)})")
    return {key for i in wanted for key in per_layer[i]}


def extra_bytes(state: dict[str, Any]) -> dict[int, int]:
    """{layer: bytes it adds in Q8_0 over Q4_0} (rows not a multiple of 32 are F16 in both)."""
    return {layer: sum(state[key].numel() // BLOCK * EXTRA_BYTES_PER_BLOCK for key in keys
                       if state[key].shape[-1] % BLOCK == 0)
            for layer, keys in layer_weight_keys(state).items()}


def ggml_round_trip(weight: Any, ggml_type: str = "q8_0") -> Any:
    """`weight` as llama.cpp holds it in `ggml_type` (gguf-py's reference rounding), fp32."""
    import gguf
    import numpy as np
    import torch

    data = np.ascontiguousarray(weight.detach().float().cpu().numpy())
    kind = gguf.GGMLQuantizationType[ggml_type.upper()]
    back = gguf.quants.dequantize(gguf.quants.quantize(data, kind), kind)
    return torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(data.shape))


def _batches(ids: Any, batch: int) -> list[Any]:
    return [ids[i:i + batch] for i in range(0, len(ids), batch)]


def _logprobs(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)


def _kl_sum(reference: Any, got: Any) -> float:
    """Summed KL(reference || got) over a batch's tokens; both hold log-probs."""
    return float((reference.exp() * (reference - got)).sum(-1).sum())


def decoder_layers(model: Any) -> dict[int, Any]:
    """{layer index: decoder layer module}, the indices `layer_weight_keys` uses."""
    found = {}
    for name, module in model.named_modules():
        hit = re.search(r"(?:^|\.)layers\.(\d+)$", name)
        if hit:
            found[int(hit.group(1))] = module
    return dict(sorted(found.items()))


class PrefixReplay:
    """The all-4-bit model's decoder-layer outputs, kept per batch, so that scoring layer i in
    Q8_0 recomputes only layers i and after.

    Layers before i hold the same 4-bit weights in every such pass, so their outputs are the
    base pass's bit for bit; each of them returns the output layer i-1 gave in the base pass
    (the loop feeds it on to layer i), and the work saved is half the decoder on average. The
    embedding, final norm and head still run as usual, so any architecture whose decoder layers
    are called in order (every family pkdq exports) replays unchanged.
    """

    def __init__(self, model: Any) -> None:
        self.layers = decoder_layers(model)
        self.outputs: dict[int, list[Any]] = {index: [] for index in self.layers}
        self.batch = 0

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Keep every layer's output of the forwards run inside (the base pass, in order)."""
        def keep(index: int):
            def hook(_module: Any, _args: Any, output: Any) -> None:
                self.outputs[index].append(output)
            return hook

        handles = [layer.register_forward_hook(keep(index))
                   for index, layer in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def from_layer(self, start: int) -> Iterator[None]:
        """Forwards inside skip the layers before `start`: each returns the base pass's output
        of layer start-1 for the current `batch`."""
        before = [index for index in self.layers if index < start]
        if not before:
            yield
            return
        cached = self.outputs[before[-1]]

        def replayed(*_args: Any, **_kwargs: Any) -> Any:
            return cached[self.batch]

        saved = {index: self.layers[index].__dict__.get("forward") for index in before}
        for index in before:
            self.layers[index].forward = replayed
        try:
            yield
        finally:
            for index in before:
                if saved[index] is None:
                    del self.layers[index].forward
                else:
                    self.layers[index].forward = saved[index]


@dataclass
class Q8Plan:
    """The layers to write in Q8_0 and the measurement that chose them (the stage's record)."""

    layers: list[int]
    base_kl: float
    scores: list[dict[str, Any]]  # per layer, most sensitive first: layer, kl, gain
    extra_bytes: dict[int, int]  # per layer, in Q8_0 over Q4_0
    heldout: dict[str, Any]
    wall_s: float
    limit: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"layers": self.layers, "chosen_by": "held-out KL to the stage's float input, "
                "one layer in Q8_0 at a time", "base_kl": self.base_kl,
                "scores": self.scores,
                "extra_bytes": {str(k): v for k, v in self.extra_bytes.items()},
                "heldout": self.heldout, "limit": self.limit, "wall_s": round(self.wall_s, 2),
                "q8_0_weights": "llama.cpp's Q8_0 rounding (gguf-py) of the float input"}


def rank_layers(quantized: Any, float_model: Any, ids: Any, batch: int = 2
                ) -> tuple[float, list[dict[str, Any]]]:
    """(KL of the all-4-bit model, per-layer scores most sensitive first): each layer's weights
    in `quantized` swapped for the Q8_0 rounding of `float_model`'s, scored, swapped back. The
    layers before the swapped one are replayed from the base pass (`PrefixReplay`)."""
    import torch

    started = time.perf_counter()
    batches = _batches(ids, batch)
    tokens = ids.shape[0] * ids.shape[1]
    reference = [_logprobs(float_model, b) for b in batches]
    replay = PrefixReplay(quantized)
    with replay.recording():
        base = sum(_kl_sum(ref, _logprobs(quantized, b))
                   for ref, b in zip(reference, batches, strict=True)) / tokens
    state, float_state = quantized.state_dict(), float_model.state_dict()
    per_layer = layer_weight_keys(state)
    scores = []
    for n, (layer, keys) in enumerate(per_layer.items(), 1):
        saved = {key: state[key].clone() for key in keys}
        with torch.no_grad():
            for key in keys:
                state[key].copy_(ggml_round_trip(float_state[key]))
        total = 0.0
        with replay.from_layer(layer):
            for replay.batch, (ref, b) in enumerate(zip(reference, batches, strict=True)):
                total += _kl_sum(ref, _logprobs(quantized, b))
        kl = total / tokens
        with torch.no_grad():
            for key in keys:
                state[key].copy_(saved[key])
        scores.append({"layer": layer, "kl": kl, "gain": base - kl})
        print(f"[quantize] q8_0 sensitivity: layer {n}/{len(per_layer)} (layer {layer}): KL "
              f"{kl:.4f} against {base:.4f} all 4-bit ({time.perf_counter() - started:.0f}s)",
              file=sys.stderr, flush=True)
    return base, sorted(scores, key=lambda row: -row["gain"])


def layers_within(ranked: list[int], extra: dict[int, int], base_bytes: int,
                  budget_bytes: int) -> list[int]:
    """Down the ranking, every layer whose Q8_0 bytes still fit between the 4-bit file and the
    budget (layers differ in size after a non-uniform cut, so a smaller one may still fit)."""
    room, chosen = budget_bytes - base_bytes, []
    for layer in ranked:
        if 0 < extra[layer] <= room:
            chosen.append(layer)
            room -= extra[layer]
    return chosen
