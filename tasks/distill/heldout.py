"""Held-out scores of KD: KL(teacher || student) and perplexities on training-side text.

The slice is held out from the training text (never an evaluation split), and it is scored at
T=1 in fp32 whatever the training settings, so the numbers compare across recipes.
"""

from __future__ import annotations

import math

import torch

from tasks.core.common import StageContext
from tasks.core.conventions import prefix_ids
from tasks.core.data_blocks import Blocks
from tasks.core.data_blocks import heldout_blocks as data_heldout
from tasks.core.recipe import DistillConfig
from tasks.distill.losses import forward_kl, next_token_ce
from tasks.distill.step import compute_context


def heldout_blocks(tokenizer, cfg: DistillConfig, ctx: StageContext, config=None) -> Blocks:
    """The KD validation slice, same block length and family prefix (BOS where the family
    expects it) as training: the held-out Wikipedia files for the bundled text, the held-out
    slice (fraction or files) of the recipe's own data."""
    return data_heldout(tokenizer, cfg.spec(), ctx.data, cfg.seq_len, cfg.eval_blocks,
                        ctx.seed, prefix=prefix_ids(tokenizer, config))


@torch.no_grad()  # not inference_mode: FSDP2 reuses the unsharded buffers in training later
def heldout_metrics(
    student, teacher, blocks: torch.Tensor, batch_size: int, precision: str = "fp32",
    chunk: int = 0, mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Token-mean KL(teacher || student) at T=1 and perplexities on held-out blocks.

    T=1 (not the training temperature) and fp32 by default (whatever the training precision) so
    the number means the same across recipes. `chunk` > 0 runs both LM heads and the scores on
    that many positions at a time from the final hidden states, so the [batch, seq, vocab]
    logits of the two models (and their log-softmaxes) never exist at once: the same numbers up
    to summation order, without the eval's full-vocabulary transients raising the stage's peak.
    `mask` (chat data: 1 on the tokens the loss trains on) scores only the predictions of those
    tokens, as training does; without it the code path is the one it always was.
    """
    if mask is not None:
        return _masked_scores(student, teacher, blocks, mask, batch_size, precision)
    was_training = student.training
    student.eval()
    kl_sum = ce_sum = t_ce_sum = 0.0
    kl_n = ce_n = 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        with compute_context(precision, ids.device.type):
            if chunk:
                kl, ce, t_ce = _chunked_scores(student, teacher, ids, chunk)
            else:
                s_logits = student(input_ids=ids, use_cache=False).logits
                t_logits = teacher(input_ids=ids, use_cache=False).logits
                n_targets = ids[:, 1:].numel()
                kl = float(forward_kl(s_logits, t_logits, 1.0).sum())
                ce = float(next_token_ce(s_logits, ids)) * n_targets
                t_ce = float(next_token_ce(t_logits, ids)) * n_targets
                del s_logits, t_logits
        kl_sum, ce_sum, t_ce_sum = kl_sum + kl, ce_sum + ce, t_ce_sum + t_ce
        kl_n += ids.numel()
        ce_n += ids[:, 1:].numel()
    student.train(was_training)
    return {
        "kl": kl_sum / kl_n,
        "ppl": math.exp(ce_sum / ce_n),
        "teacher_ppl": math.exp(t_ce_sum / ce_n),
        "tokens": kl_n,
    }


def _chunked_scores(student, teacher, ids: torch.Tensor, chunk: int) -> tuple[float, ...]:
    """(KL sum, student CE sum, teacher CE sum) of one batch, LM heads run `chunk` rows at once."""
    import torch.nn.functional as F

    from tasks.distill.sparse import next_token_targets

    def final_hidden(model):
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1])

    s_h, t_h = final_hidden(student), final_hidden(teacher)
    s_head = getattr(student, "module", student).get_output_embeddings()
    t_head = getattr(teacher, "module", teacher).get_output_embeddings()
    targets = next_token_targets(ids).reshape(-1)
    kl = ce = t_ce = 0.0
    for lo in range(0, s_h.shape[0], chunk):
        sl = slice(lo, lo + chunk)
        s_logits, t_logits = s_head(s_h[sl]).float(), t_head(t_h[sl]).float()
        kl += float(forward_kl(s_logits, t_logits, 1.0).sum())
        ce += float(F.cross_entropy(s_logits, targets[sl], ignore_index=-100, reduction="sum"))
        t_ce += float(F.cross_entropy(t_logits, targets[sl], ignore_index=-100, reduction="sum"))
    return kl, ce, t_ce


def _masked_scores(student, teacher, blocks: torch.Tensor, mask: torch.Tensor, batch_size: int,
                   precision: str) -> dict[str, float]:
    """`heldout_metrics` over the positions that predict a masked (trained-on) token."""
    was_training = student.training
    student.eval()
    kl_sum = ce_sum = t_ce_sum = 0.0
    n = 0
    for start in range(0, len(blocks), batch_size):
        ids, targets = blocks[start : start + batch_size], mask[start : start + batch_size]
        with compute_context(precision, ids.device.type):
            s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
            t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
        keep = targets[:, 1:].bool()
        s_sel, t_sel, labels = s_logits[keep].float(), t_logits[keep].float(), ids[:, 1:][keep]
        kl_sum += float(forward_kl(s_sel, t_sel, 1.0).sum())
        ce_sum += float(torch.nn.functional.cross_entropy(s_sel, labels, reduction="sum"))
        t_ce_sum += float(torch.nn.functional.cross_entropy(t_sel, labels, reduction="sum"))
        n += int(keep.sum())
    student.train(was_training)
    n = max(n, 1)
    return {"kl": kl_sum / n, "ppl": math.exp(ce_sum / n), "teacher_ppl": math.exp(t_ce_sum / n),
            "tokens": n}
