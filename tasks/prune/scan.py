"""`pkdq prune-scan`: show every importance score of a model so a user can choose prune targets.

One calibration pass gives block influence per layer, the activation score of every query head
and KV group, of every FFN neuron and hidden channel (optionally also the perplexity rise of
skipping each layer). Written as JSON (all numbers) and a PNG (matplotlib Agg), and summarised on
the terminal.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tasks.core.common import StageContext, data_dir, write_json_atomic
from tasks.core.dims import Dims
from tasks.core.recipe import DepthTarget, PruneConfig, TextSample
from tasks.prune.importance import activation_scores, skip_layer_ppl_increase
from tasks.prune.stage import calibration_blocks
from tasks.prune.units import Anatomy, count_params

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(spec).name or spec).strip("-") or "model"


def scan(model, tokenizer, calibration: TextSample, *, ppl_skip: bool = False, seed: int = 0,
         data: Path | None = None, skip_samples: int = 8) -> dict[str, Any]:
    """All importance scores of a live model, as plain lists (JSON-ready).

    The layer-skip sweep costs one pass per layer, so it uses the first `skip_samples` blocks.
    """
    anatomy = Anatomy.of(model)
    cfg = PruneConfig(depth=DepthTarget(remove=1), calibration=calibration)
    ctx = StageContext(out_dir=Path("."), seed=seed, data=data or data_dir())
    blocks = calibration_blocks(tokenizer, cfg, ctx, model.config)
    acts = activation_scores(anatomy, blocks, stage="prune-scan")
    ffn = torch.stack(acts.ffn)
    result: dict[str, Any] = {
        "dims": Dims.from_config(model.config).to_json(),
        "params": count_params(model),
        "calibration": calibration.model_dump(),
        "block_influence": acts.block_influence.tolist(),
        "query_heads": [s.tolist() for s in acts.query_heads],
        "kv_groups": [s.tolist() for s in acts.kv_groups(anatomy.q_per_group)],
        "ffn": [s.tolist() for s in acts.ffn],
        "ffn_quantiles": {str(q): float(torch.quantile(ffn.flatten(), q)) for q in QUANTILES},
        "hidden": acts.hidden.tolist(),
    }
    if ppl_skip:
        result["ppl_skip"] = skip_layer_ppl_increase(anatomy, blocks[:skip_samples],
                                                     stage="prune-scan").tolist()
    return result


def summary(result: dict[str, Any]) -> str:
    """Terminal text: what to cut first on each axis."""
    dims = result["dims"]
    bi = torch.tensor(result["block_influence"])
    order = torch.argsort(bi).tolist()
    lines = [
        f"model: {dims['layers']} layers, hidden {dims['hidden']}, FFN {dims['ffn']}, "
        f"{dims['heads']} query / {dims['kv_heads']} KV heads of {dims['head_dim']}, "
        f"{result['params'] / 1e6:.1f}M params",
        "layers by block influence (least important first): "
        + ", ".join(f"{i} ({bi[i]:.3f})" for i in order),
    ]
    if "ppl_skip" in result:
        skip = torch.tensor(result["ppl_skip"])
        lines.append("layers by perplexity rise when skipped: "
                     + ", ".join(f"{i} (+{skip[i]:.1f})" for i in torch.argsort(skip).tolist()))
    lines.append("KV group scores per layer (activation, sum of its query heads):")
    for i, groups in enumerate(result["kv_groups"]):
        heads = " ".join(f"{h:.2f}" for h in result["query_heads"][i])
        lines.append(f"  layer {i:2d}: groups [{' '.join(f'{g:.2f}' for g in groups)}]"
                     f"  query heads [{heads}]")
    quant = result["ffn_quantiles"]
    lines.append("FFN neuron scores, quantiles: "
                 + ", ".join(f"{float(q):.0%} {v:.3g}" for q, v in quant.items()))
    hidden = torch.tensor(result["hidden"]).sort().values
    lines.append(f"hidden channel scores: min {hidden[0]:.3g}, median "
                 f"{hidden[len(hidden) // 2]:.3g}, max {hidden[-1]:.3g}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path, title: str) -> Path:
    """Four panels: layer importance, head heatmap, FFN histogram, sorted hidden channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"prune-scan: {title}")

    ax = axes[0][0]
    bi = result["block_influence"]
    ax.bar(range(len(bi)), bi, color="tab:blue", label="block influence 1 - cos(in, out)")
    ax.set_xlabel("layer")
    ax.set_ylabel("block influence")
    if "ppl_skip" in result:
        twin = ax.twinx()
        twin.plot(range(len(bi)), result["ppl_skip"], "o-", color="tab:red",
                  label="perplexity rise when skipped")
        twin.set_yscale("symlog")
        twin.set_ylabel("perplexity rise")
        twin.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper center", fontsize=8)
    ax.set_title("layer importance (low = remove first)")

    ax = axes[0][1]
    heads = torch.tensor(result["query_heads"])
    image = ax.imshow(heads.T.numpy(), aspect="auto", cmap="viridis", origin="lower")
    q = result["dims"]["heads"] // result["dims"]["kv_heads"]
    for boundary in range(q, heads.shape[1], q):
        ax.axhline(boundary - 0.5, color="white", linewidth=1.5)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"query head (white lines: KV groups of {q})")
    ax.set_title("attention head importance (activation)")
    fig.colorbar(image, ax=ax)

    ax = axes[1][0]
    ffn = torch.tensor(result["ffn"]).flatten()
    ax.hist(ffn.clamp_min(1e-12).log10().numpy(), bins=80, color="tab:green")
    ax.set_xlabel("log10 activation score")
    ax.set_ylabel("neurons (all layers)")
    ax.set_title(f"FFN neuron importance ({len(ffn)} neurons)")

    ax = axes[1][1]
    hidden = torch.tensor(result["hidden"]).sort(descending=True).values
    ax.plot(hidden.numpy(), color="tab:purple")
    ax.set_yscale("log")
    ax.set_xlabel("hidden channel (sorted)")
    ax.set_ylabel("activation score")
    ax.set_title("hidden width importance (norm outputs, summed)")

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def prune_scan(spec: str, out_dir: Path | None = None, samples: int = 32, seq_len: int = 256,
               source: str = "wikipedia", ppl_skip: bool = False, seed: int = 0,
               threads: int = 1) -> dict[str, Path]:
    """Resolve a model offline, scan it, write scan.json + scan.png; returns the paths."""
    from tasks.core.model_store import load_model, resolve_model

    torch.set_num_threads(threads)
    ref = resolve_model(spec)
    model, tokenizer = load_model(ref)
    result = scan(model, tokenizer, TextSample(source=source, samples=samples, seq_len=seq_len),
                  ppl_skip=ppl_skip, seed=seed)
    result["model"] = {"spec": spec, **ref.to_json()}
    out_dir = Path(out_dir or Path("runs") / "prune-scan" / _slug(spec))
    write_json_atomic(out_dir / "scan.json", result)
    png = plot(result, out_dir / "scan.png", _slug(spec))
    (out_dir / "scan.txt").write_text(summary(result) + "\n")
    return {"json": out_dir / "scan.json", "png": png, "text": out_dir / "scan.txt"}
