"""Quantization layout rules that need only shapes, not torch.

Shared by the quantize stage (checked on a checkpoint's real shapes) and by the rule check
before a run (`tasks.rules`, on shapes predicted from config.json and the prune plan), so both
say the same thing and `pkdq validate` does not pay for importing torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

from tasks.core.recipe import QuantizeConfig

ALLOWED_GROUP_SIZES: tuple[int, ...] = get_args(
    QuantizeConfig.model_fields["group_size"].annotation
)
# vLLM's Marlin kernels (gptq_marlin / awq_marlin): GPTQ_MARLIN_MIN_THREAD_K / _N in
# vllm/model_executor/layers/quantization/utils/marlin_utils.py
MARLIN_K_MULTIPLE = 128  # in_features tile
MARLIN_N_MULTIPLE = 64  # out_features tile
MARLIN_SOURCE = "vLLM marlin_utils.py: GPTQ_MARLIN_MIN_THREAD_K = 128"


def working_group_sizes(in_features: Iterable[int]) -> list[int]:
    """Recipe group sizes that divide every in_features (empty when none does)."""
    sizes = list(in_features)
    return [g for g in ALLOWED_GROUP_SIZES if all(n % g == 0 for n in sizes)]


def group_size_hint(in_features: Iterable[int]) -> str:
    """What to use instead of a group size that leaves partial groups."""
    working = working_group_sizes(in_features)
    if working:
        return f"group sizes that would work: {', '.join(map(str, working))}"
    return (f"none of {', '.join(map(str, ALLOWED_GROUP_SIZES))} works; prune with round_to a "
            "multiple of the group size")


def marlin_k_note(offending: dict[str, int]) -> str:
    """One line for layers whose in_features Marlin cannot tile (names -> in_features)."""
    names = ", ".join(f"{name} ({size})" for name, size in offending.items())
    return (f"vLLM Marlin kernels need in_features divisible by {MARLIN_K_MULTIPLE}; not: "
            f"{names}; vLLM would use its slower non-Marlin kernel")
