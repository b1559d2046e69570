"""What each ordering of P, KD and Q means, and which steps orderings share."""

from __future__ import annotations

import pytest

from tasks.compare.orderings import DEFAULT_ORDERS, parse_orders, plan_ordering, shared_prefixes
from tasks.core.recipe import RecipeError, load_recipe, parse_recipe

RECIPE = "smollm2-ffn25-kd-w4"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(RECIPE)


def test_every_default_order_has_all_three_stages_and_ends_on_the_grid(recipe):
    for order in DEFAULT_ORDERS:
        steps = plan_ordering(recipe, order).steps
        kinds = [s.kind for s in steps]
        assert {"prune", "distill", "quantize"} <= set(kinds), order
        # the final weights sit on a quantization grid: the last quantize comes after the last
        # prune, and KD after Q is quantization-aware
        last_q = max(i for i, s in enumerate(steps) if s.kind == "quantize")
        last_p = max(i for i, s in enumerate(steps) if s.kind == "prune")
        assert last_q > last_p, order
        for i, step in enumerate(steps):
            if step.kind == "distill" and any(s.kind == "quantize" for s in steps[:i]):
                assert step.role == "qat-kd", order


def test_substitutes_are_spelled_out(recipe):
    roles = {o: [s.role for s in plan_ordering(recipe, o).steps] for o in DEFAULT_ORDERS}
    assert roles["P-KD-Q"] == ["prune", "kd", "quantize"]
    assert roles["KD-P-Q"] == ["self-kd", "prune", "quantize"]
    assert roles["P-Q-KD"] == ["prune", "quantize", "qat-kd"]
    assert roles["Q-KD-P"] == ["quantize", "qat-kd", "prune", "requantize"]
    note = plan_ordering(recipe, "KD-P-Q").steps[0].note
    assert "self-distillation" in note


def test_shared_prefix_gets_one_unit_id(recipe):
    orderings = [plan_ordering(recipe, o) for o in DEFAULT_ORDERS]
    ids = {o.name: o.unit_ids("fp", 1) for o in orderings}
    assert ids["P-KD-Q"][0] == ids["P-Q-KD"][0]  # the same prune of the same base model
    assert ids["P-KD-Q"][1] != ids["P-Q-KD"][1]
    assert len({ids["KD-P-Q"][0], ids["Q-KD-P"][0], ids["P-KD-Q"][0]}) == 3
    first = shared_prefixes(orderings, "fp", 1)
    assert first[ids["P-Q-KD"][0]] == "P-KD-Q"
    # a different seed or base model changes every id
    assert plan_ordering(recipe, "P-KD-Q").unit_ids("fp", 2)[0] != ids["P-KD-Q"][0]
    assert plan_ordering(recipe, "P-KD-Q").unit_ids("other", 1)[0] != ids["P-KD-Q"][0]


@pytest.mark.parametrize("text, message", [
    ("P-KD-X", "unknown stage letter 'X'"),
    ("P-KD", "must use each of the recipe's stages once"),
    ("P-KD-Q,p-kd-q", "listed twice"),
    ("", "at least one ordering"),
])
def test_bad_orders_are_refused_in_one_line(recipe, text, message):
    with pytest.raises(RecipeError, match=message) as info:
        parse_orders(text, recipe)
    assert "\n" not in str(info.value)


def test_orders_are_normalised(recipe):
    assert parse_orders(" p-kd-q , Q-KD-P", recipe) == ["P-KD-Q", "Q-KD-P"]


def _raw(stages):
    return {"name": "x", "stages": stages}


def test_production_recipes_keep_pkdq_but_ordering_experiments_may_permute():
    stages = [{"quantize": {}}, {"distill": {}}, {"prune": {"ffn": {"ratio": 0.25},
                                                            "round_to": 64}}]
    with pytest.raises(RecipeError, match="ordering_experiment"):
        parse_recipe(_raw(stages))
    recipe = parse_recipe({**_raw(stages), "ordering_experiment": True})
    assert [k for k, _ in recipe.stage_list()] == ["quantize", "distill", "prune"]
