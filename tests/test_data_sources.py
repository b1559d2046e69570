"""Users' own data (issue 19): every source kind, held-out slices, token accounting, chat masks,
KD on assistant tokens only, the contamination check, and each bad input as one line (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.core.contamination import overlap_report, refusal
from tasks.core.recipe import DataSpec, parse_recipe
from tasks.core.text_sources import DataError, load_corpus, split_heldout

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PKDQ_DATA_DIR") or REPO.parent / "shared" / "data")
PARAS = [f"Paragraph {i} about topic {i * 7} has several words in it, number {i}."
         for i in range(40)]
CHATS = [{"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"It is {2 * i}."},
                       {"role": "user", "content": "Thanks!"},
                       {"role": "assistant", "content": "You are welcome."}]}
         for i in range(30)]


def _write_sources(root: Path) -> dict[str, DataSpec]:
    """One small file per kind, all holding PARAS (chat: CHATS)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("\n\n".join(PARAS[:20]) + "\n")
    (root / "b.txt").write_text("\n \n".join(PARAS[20:]) + "\n")
    (root / "d.jsonl").write_text("".join(json.dumps({"body": p}) + "\n" for p in PARAS))
    (root / "d.csv").write_text("id,body\n" + "".join(f'{i},"{p}"\n' for i, p in
                                                      enumerate(PARAS)))
    pq.write_table(pa.table({"body": PARAS}), root / "d.parquet")
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": PARAS})}) \
        .save_to_disk(str(root / "hf"))
    return {
        "text": DataSpec(kind="text", paths=[str(root / "*.txt")]),
        "jsonl": DataSpec(kind="jsonl", paths=[str(root / "d.jsonl")], field="body"),
        "csv": DataSpec(kind="csv", paths=[str(root / "d.csv")], field="body"),
        "parquet": DataSpec(kind="parquet", paths=[str(root / "d.parquet")], field="body"),
        "hf": DataSpec(kind="hf", path=str(root / "hf"), column="body"),
        "chat": DataSpec(kind="chat", paths=[str(root / "chat.jsonl")]),
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, DataSpec]:
    return _write_sources(tmp_path_factory.mktemp("sources"))


@pytest.mark.parametrize("kind", ["text", "jsonl", "csv", "parquet", "hf"])
def test_each_text_kind_loads_the_same_documents(sources, kind):
    corpus = load_corpus(sources[kind], DATA)
    assert sorted(corpus.docs + corpus.heldout_docs) == sorted(PARAS)
    assert len(corpus.heldout_docs) == 2  # 5% of 40
    assert not set(corpus.docs) & set(corpus.heldout_docs)
    assert len(corpus.fingerprint) == 16


def test_fingerprint_follows_content_not_mtime(tmp_path):
    file = tmp_path / "x.txt"
    file.write_text("\n\n".join(PARAS))
    spec = DataSpec(kind="text", paths=[str(file)])
    first = load_corpus(spec, DATA).fingerprint
    os.utime(file, (1, 1))
    assert load_corpus(spec, DATA).fingerprint == first
    file.write_text("\n\n".join(PARAS).replace("topic 7", "topic 8"))
    assert load_corpus(spec, DATA).fingerprint != first


def test_chat_loads_conversations_and_heldout_is_disjoint(sources):
    corpus = load_corpus(sources["chat"], DATA)
    assert corpus.size + len(corpus.heldout_chats) == len(CHATS)
    assert len(corpus.heldout_chats) == 2
    assert not {json.dumps(c) for c in corpus.chats} & {json.dumps(c) for c in
                                                        corpus.heldout_chats}


def test_heldout_file_replaces_the_fraction(tmp_path):
    (tmp_path / "train.txt").write_text("\n\n".join(PARAS[:30]))
    (tmp_path / "held.txt").write_text("\n\n".join(PARAS[30:]))
    corpus = load_corpus(DataSpec(kind="text", paths=[str(tmp_path / "train.txt")],
                                  heldout_paths=[str(tmp_path / "held.txt")]), DATA)
    assert corpus.docs == PARAS[:30] and corpus.heldout_docs == PARAS[30:]


def test_heldout_split_is_content_keyed():
    train, held = split_heldout(PARAS, 0.1)
    train2, held2 = split_heldout(list(reversed(PARAS)), 0.1)
    assert sorted(held) == sorted(held2) and len(held) == 4 and not set(train) & set(held)


def test_data_dir_prefix_resolves(tmp_path):
    spec = DataSpec(kind="text", paths=["${data}/wikitext/wiki.valid.raw"])
    assert load_corpus(spec, DATA).files == [str(DATA / "wikitext" / "wiki.valid.raw")]


@pytest.fixture(scope="module")
def tokenizer(smollm2_ref):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_ref.path))


def test_packed_token_accounting(sources, tokenizer):
    from tasks.core.data_blocks import training_blocks

    spec = sources["jsonl"]
    corpus = load_corpus(spec, DATA)
    available = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1
                    for d in corpus.docs)
    blocks = training_blocks(tokenizer, spec, DATA, 16, 4, seed=0)
    assert blocks.ids.shape == (4, 16) and blocks.mask is None
    assert blocks.stats["documents"] == 38 and blocks.stats["tokens_available"] == available
    assert blocks.stats["tokens_used"] == 64
    assert blocks.stats["epochs"] == round(64 / available, 4)
    with pytest.raises(DataError, match="data.repeat: true"):
        training_blocks(tokenizer, spec, DATA, 64, 100, seed=0)
    again = training_blocks(tokenizer, spec.model_copy(update={"repeat": True}), DATA, 64, 100,
                            seed=0)
    assert again.ids.shape == (100, 64) and again.stats["epochs"] > 1


def test_chat_mask_covers_exactly_the_assistant_turns(tokenizer):
    from tasks.core.data_blocks import render_chat

    messages = CHATS[3]["messages"]
    ids, mask = render_chat(tokenizer, messages)
    assert ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    picked = [i for i, m in zip(ids, mask, strict=True) if m]
    expected = "".join(f"{t['content']}<|im_end|>\n" for t in messages
                       if t["role"] == "assistant")
    assert tokenizer.decode(picked) == expected
    assert "What is" not in tokenizer.decode(picked)
    ids_all, mask_all = render_chat(tokenizer, messages, "all")
    assert ids_all == ids and all(mask_all)


def test_chat_rows_pad_and_account(sources, tokenizer):
    from tasks.core.data_blocks import training_blocks

    blocks = training_blocks(tokenizer, sources["chat"], DATA, 128, 10, seed=0, masked=True)
    assert blocks.ids.shape == blocks.mask.shape == (10, 128)
    stats = blocks.stats
    assert stats["conversations"] == 28 and stats["rows"] == 10
    assert stats["loss_tokens"] == int(blocks.mask.sum()) < stats["tokens_used"]
    assert stats["padding_tokens"] == 10 * 128 - stats["tokens_used"]
    with pytest.raises(DataError, match="28 conversations, 40 rows needed"):
        training_blocks(tokenizer, sources["chat"], DATA, 128, 40, seed=0, masked=True)


def test_kd_with_targets_ignores_non_target_teacher_logits():
    import torch

    from tasks.distill.losses import kd_loss

    torch.manual_seed(0)
    student = torch.randn(2, 8, 50, requires_grad=True)
    teacher = torch.randn(2, 8, 50)
    ids = torch.randint(0, 50, (2, 8))
    targets = torch.zeros(2, 8, dtype=torch.long)
    targets[:, 4:7] = 1  # tokens 4..6 are the assistant's: predicted at positions 3..5
    base = kd_loss(student, teacher, ids, targets=targets)
    perturbed = teacher.clone()
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[:, 3:6] = True
    perturbed[~keep] += 5 * torch.randn_like(perturbed[~keep])
    again = kd_loss(student, perturbed, ids, targets=targets)
    assert torch.equal(base.loss, again.loss)
    moved = teacher.clone()
    moved[:, 4] += 5 * torch.randn(2, 50)
    assert not torch.equal(base.loss, kd_loss(student, moved, ids, targets=targets).loss)
    base.loss.backward()
    assert student.grad[~keep].abs().sum() == 0 and student.grad[keep].abs().sum() > 0
    plain = kd_loss(student, teacher, ids)
    assert torch.equal(plain.loss, kd_loss(student, teacher, ids, mask=None).loss)


def test_distill_on_chat_trains_on_assistant_tokens(tiny_llama_ref, sources, tmp_path):
    """Tiny end-to-end: KD on chat data, masked rows, held-out on the chat slice."""
    from tasks.core.common import StageContext
    from tasks.core.recipe import DistillConfig
    from tasks.distill.stage import distill_stage

    cfg = DistillConfig(tokens=64 * 2 * 4, seq_len=64, batch_size=2, lr=1e-3, eval_blocks=2,
                        data=sources["chat"])
    assert cfg.masked()
    ctx = StageContext(out_dir=tmp_path / "kd", seed=3, teacher=tiny_llama_ref, data=DATA)
    metrics = distill_stage(tiny_llama_ref, cfg, ctx).metrics
    data = metrics["data"]
    assert data["kind"] == "chat" and data["rows"] == 8 and data["loss_on"] == "assistant"
    assert 0 < data["loss_tokens"] < data["tokens_used"]
    assert metrics["heldout_tokens"] == data["heldout"]["loss_tokens"] > 0
    assert metrics["steps"] == 4 and metrics["heldout_kl_before"] < 1e-6  # student == teacher


def test_contamination_finds_a_planted_overlap():
    eval_sets = {"bench": ["the quick brown fox jumps over the lazy dog near the river bank "
                           "on a sunny day", "an unrelated short item"]}
    clean = overlap_report(["completely different words here " * 10], eval_sets)
    assert clean["sets"]["bench"]["overlapping_documents"] == 0
    assert refusal(clean, 0.0, "x") is None
    planted = ["Some text. The quick brown fox jumps over the lazy dog near the river bank on "
               "a sunny day, it said."]
    report = overlap_report(planted, eval_sets)
    row = report["sets"]["bench"]
    assert row["overlapping_documents"] == 1 and row["fraction"] == 0.5
    assert row["shared_ngrams"] == 5  # 17 words: 5 windows of 13 and row["examples"][0]["doc"] == 0
    assert report["training_documents_overlapping"] == 1
    assert "1 of 2 bench documents" in refusal(report, 0.1, "stages[0]")
    assert refusal(report, 0.5, "stages[0]") is None


# --------------------------------------------------------------------------- recipes, CLI


def _recipe(tmp_path: Path, name: str, data: dict, model: str = "smollm2-135m",
            **top) -> Path:
    raw = {"name": name, "model": model, "data": data,
           "stages": [{"prune": {"ffn": {"ratio": 0.25}, "round_to": 64,
                                 "calibration": {"samples": 4, "seq_len": 64}}},
                      {"distill": {"tokens": 512, "seq_len": 64, "batch_size": 2}}],
           "evaluate": {"tasks": ["arc_easy"]}, **top}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _validate(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pkdq", "validate", str(path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_top_level_data_reaches_every_stage_and_stage_keys_of_builtin_stay():
    raw = {"name": "x", "data": {"kind": "text", "paths": ["${data}/wikitext/wiki.valid.raw"]},
           "stages": [{"prune": {"ffn": {"ratio": 0.25}, "round_to": 64}},
                      {"distill": {"tokens": 512}},
                      {"quantize": {"calibration": {"source": "c4"}}}]}
    recipe = parse_recipe(raw)
    (_, prune), (_, distill), (_, quant) = recipe.stage_list()
    assert prune.calibration.data.kind == "text" and distill.data.kind == "text"
    assert quant.calibration.data is None and quant.calibration.source == "c4"  # stage wins
    again = parse_recipe(recipe.model_dump(mode="json"))
    assert again == recipe
    plain = parse_recipe({"name": "y", "stages": [{"prune": {"ffn": {"ratio": 0.25}}},
                                                   {"distill": {"source": "wikipedia"}}]})
    assert "data" not in plain.stage_list()[1][1].model_dump()
    assert "data" not in plain.stage_list()[0][1].calibration.model_dump()
    builtin = parse_recipe({**raw, "data": {"kind": "builtin", "source": "c4"}})
    assert builtin.stage_list()[1][1].model_dump() == \
        parse_recipe({"name": "z", "stages": [{"prune": {"ffn": {"ratio": 0.25}}},
                                              {"distill": {"tokens": 512, "source": "c4"}}]}
                     ).stage_list()[1][1].model_dump()


def test_training_on_the_test_split_refuses_in_one_line(tmp_path):
    path = _recipe(tmp_path, "on-test", {"kind": "text",
                                         "paths": ["${data}/wikitext/wiki.test.raw"]})
    result = _validate(path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "62 of 62 wikitext documents" in lines[0] and "allow_overlap" in lines[0]
    allowed = _recipe(tmp_path, "on-test-allowed", {"kind": "text", "paths": [
        "${data}/wikitext/wiki.test.raw"]}, contamination={"allow_overlap": True})
    result = _validate(allowed)
    assert result.returncode == 0, result.stderr
    assert "wikitext 62/62" in result.stderr


@pytest.fixture(scope="module")
def no_template_model(tiny_llama_ref, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(tiny_llama_ref.path, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _bad_inputs(root: Path, no_template: Path) -> list[tuple[dict, dict, str]]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.txt").write_text("\n\n \n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "rows.jsonl").write_text('{"body": "text"}\n')
    (root / "noassist.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}]}) + "\n")
    (root / "small.txt").write_text("just a few words\n\nand a few more\n")
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return [
        ({"kind": "text", "paths": [str(root / "missing.txt")]}, {}, "file not found"),
        ({"kind": "text", "paths": [str(root / "nope-*.txt")]}, {}, "matches no file"),
        ({"kind": "text", "paths": [str(root / "empty.txt")]}, {}, "no documents"),
        ({"kind": "text", "paths": [str(root / "latin1.txt")]}, {}, "not UTF-8"),
        ({"kind": "jsonl", "paths": [str(root / "rows.jsonl")]}, {}, "no field 'text'"),
        ({"kind": "chat", "paths": [str(root / "noassist.jsonl")]}, {}, "no assistant turns"),
        ({"kind": "text", "paths": [str(root / "small.txt")]}, {}, "data.repeat: true"),
        ({"kind": "chat", "paths": [str(root / "chat.jsonl")]}, {"model": str(no_template)},
         "no chat template"),
        ({"kind": "hf", "path": str(root / "no-such-dataset")}, {}, "folder not found"),
    ]


def test_bad_data_is_one_line_and_exit_2(tmp_path, no_template_model):
    for i, (data, top, expected) in enumerate(_bad_inputs(tmp_path / "files",
                                                           no_template_model)):
        path = _recipe(tmp_path, f"bad-{i}", data, **top)
        result = _validate(path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (data, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert expected in lines[0] and "Traceback" not in result.stderr, lines[0]


def test_q8_layers_need_the_calibration_data_held_out_slice(tmp_path):
    """`gguf_q8_layers` scores layers on the calibration data's held-out slice: a user's
    calibration text without one is refused by `pkdq validate` in one line (exit 2), before
    GPTQ runs; the same recipe without the option validates."""
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Note {i}: the harbour map was redrawn in {1800 + i}. " * 8
                                  for i in range(200)))
    quantize = {"method": "rtn", "group_size": 32, "gguf": "q4_0",
                "calibration": {"samples": 4, "seq_len": 64,
                                "data": {"kind": "text", "paths": [str(text)], "heldout": 0.0}}}
    for name, extra, code in (("plain", {}, 0), ("mixed", {"gguf_q8_layers": {"count": 1}}, 2)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "stages": [{"quantize": quantize | extra}],
                                        "evaluate": {"tasks": ["arc_easy"]}}))
        result = _validate(path)
        assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "stages[0].quantize.calibration.data" in lines[0], lines[0]
    assert "held-out slice is empty" in lines[0], lines[0]


def test_stage_on_user_text_records_data_contamination_and_keys(tiny_llama_ref, tmp_path):
    """A prune unit on a user's text: the data's fingerprint is in the key (a changed file runs
    again, a touched one is reused), the metrics carry the accounting and the overlap, and the
    report shows them."""
    from tasks.pipeline import run_unit
    from tasks.report.data_section import data_markdown

    text = tmp_path / "domain.txt"
    text.write_text("\n\n".join(PARAS * 3))
    raw = {"name": "user-text", "model": str(tiny_llama_ref.path), "seed": 1,
           "data": {"kind": "text", "paths": [str(text)], "repeat": True},
           "stages": [{"prune": {"ffn": {"ratio": 0.5}, "calibration": {"samples": 2,
                                                                         "seq_len": 32}}}],
           "evaluate": {"tasks": ["arc_easy"]}}
    recipe = parse_recipe(raw)
    config = recipe.stage_list()[0][1]
    folder = tmp_path / "01-prune"
    record, reused = run_unit(folder, "01-prune", "prune", config, recipe, tiny_llama_ref, None)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert not reused and metrics["data"]["kind"] == "text"
    assert metrics["data"]["documents"] == 114 and metrics["data"]["tokens_used"] == 64
    sets = metrics["contamination"]["sets"]
    assert set(sets) == {"wikitext", "arc_easy"} and sets["arc_easy"]["documents"] == 2376
    assert sets["wikitext"]["overlapping_documents"] == 0
    os.utime(text, (5, 5))
    assert run_unit(folder, "01-prune", "prune", config, recipe, tiny_llama_ref, None)[1]
    text.write_text("\n\n".join(PARAS * 3) + "\n\nOne more paragraph of domain text.")
    again, reused = run_unit(folder, "01-prune", "prune", config, recipe, tiny_llama_ref, None)
    assert not reused and again["key"] != record["key"]
    report = "\n".join(data_markdown({"stages": [{"stage": "01-prune", "metrics": metrics}]}))
    assert "## Training data and contamination" in report and "wikitext 0/62" in report


def test_a_field_the_kind_does_not_read_is_refused():
    from tasks.core.recipe import RecipeError

    with pytest.raises(RecipeError, match="field is not used by kind text"):
        parse_recipe({"name": "x", "data": {"kind": "text", "paths": ["a"], "field": "body"},
                      "stages": [{"prune": {"ffn": {"ratio": 0.25}}}]})
    stage_builtin = parse_recipe({
        "name": "x", "data": {"kind": "text", "paths": ["a"]},
        "stages": [{"prune": {"ffn": {"ratio": 0.25},
                              "calibration": {"data": {"kind": "builtin", "source": "c4"}}}}]})
    calibration = stage_builtin.stage_list()[0][1].calibration
    assert calibration.data is None and calibration.source == "c4"  # the stage's own data wins


def test_chat_on_all_tokens_packs_training_and_heldout(sources, tokenizer):
    from tasks.core.data_blocks import heldout_blocks, training_blocks

    spec = sources["chat"].model_copy(update={"loss_on": "all"})
    train = training_blocks(tokenizer, spec, DATA, 32, 4, seed=0, masked=False)
    held = heldout_blocks(tokenizer, spec, DATA, 32, 2, seed=0)
    assert train.mask is None and held.mask is None and train.stats["documents"] == 28
    from tasks.core.data import token_blocks
    from tasks.core.data_blocks import chat_texts

    corpus = load_corpus(spec, DATA)
    import torch

    assert torch.equal(train.ids, token_blocks(tokenizer, chat_texts(tokenizer, corpus.chats),
                                               32, 4, seed=0))
    assert torch.equal(held.ids, token_blocks(tokenizer, chat_texts(
        tokenizer, corpus.heldout_chats), 32, held.ids.shape[0], seed=0))
