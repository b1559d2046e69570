"""Greedy generations for fixed prompts: what the scores mean, in words a person can read.

Every stage answers the same eight prompts (a mix: facts, an instruction, code, arithmetic, a
short chat) greedily with a fixed token budget, so the report can put the baseline's answer and
each stage's side by side. Greedy and one prompt at a time (no padding): the output is a pure
function of the weights, and `pkdq generate` prints exactly what this stores.
"""

from __future__ import annotations

import time
from typing import Any

GENERATIONS_JSON = "generations.json"

# (id, prompt). Short prompts with short checkable answers: a pruned model that lost a fact, an
# instruction format or arithmetic shows it within 48 tokens.
PROMPTS: tuple[tuple[str, str], ...] = (
    ("fact-capital", "What is the capital of France?"),
    ("fact-science", "Why is the sky blue? Answer in one sentence."),
    ("instruction-list", "List three fruits that are red."),
    ("instruction-rewrite", "Rewrite this sentence in the past tense: I walk to school."),
    ("code-python", "Write a Python function that returns the square of a number."),
    ("math-add", "What is 17 + 25?"),
    ("math-word", "Tom has 3 apples and buys 4 more. How many apples does he have now?"),
    ("chat-hello", "Hi! Can you recommend a good book for a long train ride?"),
)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, prompt: str, chat: bool | None = None) -> list[int]:
    """Token ids the model continues: the chat template's user turn + assistant header when the
    tokenizer has one (instruct models answer there), else the raw prompt."""
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if use_chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers: a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def generate_greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 48,
                    chat: bool | None = None) -> dict[str, Any]:
    """One greedy answer: {"text", "new_tokens", "chat"}; stops at EOS or the budget."""
    import torch

    use_chat = has_chat_template(tokenizer) if chat is None else chat
    ids = torch.tensor([prompt_ids(tokenizer, prompt, use_chat)], device=model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    new = out[0, ids.shape[1]:].tolist()
    return {"text": tokenizer.decode(new, skip_special_tokens=True).strip(),
            "new_tokens": len(new), "chat": use_chat}


def generate_all(model: Any, tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    """Every prompt of `PROMPTS`, greedily: the generations.json of one stage."""
    start = time.perf_counter()
    items = []
    for pid, prompt in PROMPTS:
        items.append({"id": pid, "prompt": prompt,
                      **generate_greedy(model, tokenizer, prompt, max_new_tokens)})
    return {"max_new_tokens": max_new_tokens, "greedy": True, "prompts": items,
            "wall_s": time.perf_counter() - start}
