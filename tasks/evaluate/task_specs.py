"""Any evaluation task: pkdq's offline built-ins, lm-eval registry tasks, the team's own task
YAMLs (`evaluate.include_path`) and JSONL sets (`{name, jsonl, kind}`), all run through lm-eval.

Torch-free: `check_eval_tasks` runs in `pkdq validate` and answers in one line (unknown task
name, a YAML that does not parse, a JSONL line without its fields, a registry dataset that is not
in the local HF cache) before any model loads. JSONL sets become lm-eval task YAMLs written on the
fly (`write_jsonl_tasks`), so doc-id sampling, per-doc paired differences and retention are the
same code for every kind of task.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from tasks.core.common import write_text_atomic
from tasks.core.recipe import BUILTIN_TASKS, EvalConfig, JsonlTask
from tasks.evaluate.lm_eval_tasks import TASKS_DIR
from tasks.evaluate.lm_eval_tasks.utils import missing_eval_data

MC_PROMPT = "Question: {{question}}\nAnswer:"  # the stock ARC prompt: JSONL ARC == arc_easy


class _TagTolerantLoader(yaml.SafeLoader):
    """lm-eval YAMLs use `!function module.name`; reading names needs no import of it."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: suffix)


# --------------------------------------------------------------------------- JSONL sets


def _jsonl_rows(task: JsonlTask) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(normalised rows, None) or (None, one-line problem naming the file and line)."""
    try:
        return _read_jsonl(task)
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, a path with a NUL in it
        return None, (f"evaluate.tasks '{task.name}': {task.jsonl!r} cannot be read "
                      f"({type(exc).__name__})")


def _read_jsonl(task: JsonlTask) -> tuple[list[dict[str, Any]] | None, str | None]:
    from tasks.core.common import data_dir
    from tasks.core.text_sources import resolve_path

    path = Path(resolve_path(task.jsonl, data_dir()))  # ${data}/, ${repo}/, ~ as for data:
    where = f"evaluate.tasks '{task.name}': {path}"
    if not path.is_file():
        return None, f"{where} is not a file"
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                return None, f"{where} line {number} is not JSON ({exc.msg})"
            row, problem = _normalise(doc, task.kind)
            if problem:
                return None, f"{where} line {number}: {problem}"
            rows.append(row)
    if not rows:
        return None, f"{where} has no lines"
    return rows, None


def _normalise(doc: Any, kind: str) -> tuple[dict[str, Any], str | None]:
    if not isinstance(doc, dict):
        return {}, "each line must be a JSON object"
    if kind == "generation":
        if not isinstance(doc.get("prompt"), str) or not isinstance(doc.get("reference"), str):
            return {}, "generation lines need string fields 'prompt' and 'reference'"
        return {"prompt": doc["prompt"], "reference": doc["reference"]}, None
    question, choices, answer = doc.get("question"), doc.get("choices"), doc.get("answer")
    if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2 \
            or not all(isinstance(c, str) for c in choices):
        return {}, ("multiple_choice lines need 'question' (string), 'choices' (2+ strings) "
                    "and 'answer'")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) \
            or not 0 <= answer < len(choices):
        return {}, f"'answer' must be a choice index 0..{len(choices) - 1} or one of the choices"
    return {"question": question, "choices": choices, "answer": answer}, None


def _jsonl_yaml(task: JsonlTask, data_file: Path) -> dict[str, Any]:
    common = {"task": task.name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
              "metadata": {"version": 1.0, "source": str(task.jsonl)}}
    if task.kind == "multiple_choice":
        return {**common, "output_type": "multiple_choice", "doc_to_text": MC_PROMPT,
                "doc_to_target": "{{answer}}", "doc_to_choice": "{{choices}}",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
    return {**common, "output_type": "generate_until", "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{reference}}",
            "generation_kwargs": {"until": list(task.until), "do_sample": False,
                                  "max_gen_toks": task.max_gen_toks},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True, "ignore_case": False,
                             "ignore_punctuation": False}]}


def write_jsonl_tasks(tasks: list[JsonlTask], root: Path) -> Path | None:
    """lm-eval task YAMLs (+ normalised JSONL) for the recipe's JSONL sets, under a folder keyed
    by their content, so an edited file is a new task folder; None when there are none."""
    if not tasks:
        return None
    parts: list[tuple[JsonlTask, list[dict[str, Any]]]] = []
    digest = hashlib.sha256()
    for task in tasks:
        rows, problem = _jsonl_rows(task)
        if problem:
            raise ValueError(problem)
        parts.append((task, rows))
        digest.update(json.dumps([task.model_dump(), rows], sort_keys=True).encode())
    folder = Path(root) / digest.hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for task, rows in parts:
        data_file = folder / f"{task.name}.jsonl"
        # shared by content: another run (or test worker) may be writing the same files now
        write_text_atomic(data_file, "".join(json.dumps(r) + "\n" for r in rows))
        write_text_atomic(folder / f"{task.name}.yaml",
                          yaml.safe_dump(_jsonl_yaml(task, data_file)))
    return folder


def jsonl_cache_root() -> Path:
    from tasks.core.common import cache_dir

    return cache_dir() / "jsonl_tasks"


# --------------------------------------------------------------------------- task YAML folders


def yaml_task_names(folder: Path) -> tuple[dict[str, Path], str | None]:
    """{task name: YAML file} under a folder of lm-eval task YAMLs, or a one-line problem."""
    try:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            return {}, f"evaluate.include_path: {folder} is not a folder"
        files = sorted(folder.rglob("*.yaml"))
    except (OSError, ValueError) as exc:
        return {}, f"evaluate.include_path: {str(folder)!r} cannot be read ({type(exc).__name__})"
    names: dict[str, Path] = {}
    for path in files:
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_TagTolerantLoader)
        except (OSError, UnicodeDecodeError) as exc:
            return {}, f"evaluate.include_path: {path} cannot be read ({type(exc).__name__})"
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark else ""
            return {}, (f"evaluate.include_path: {path}{at} is not valid YAML "
                        f"({getattr(exc, 'problem', None) or type(exc).__name__})")
        if isinstance(doc, dict):
            for key in ("task", "group"):
                if isinstance(doc.get(key), str):
                    names[doc[key]] = path
    return names, None


_TASK_LINE = re.compile(r"^(task|group|dataset_path|include):\s*['\"]?([^'\"#\s]+)", re.M)


@functools.lru_cache(maxsize=1)
def registry_tasks() -> dict[str, Path]:
    """{task or group name: YAML} of lm-eval's own registry, read with a regex (no lm-eval
    import, no torch, well under a second): enough to say whether a name exists."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return {}
    root = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    out: dict[str, Path] = {}
    for path in root.rglob("*.yaml"):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for key, value in _TASK_LINE.findall(text):
            if key in ("task", "group"):
                out.setdefault(value, path)
    return out


def _dataset_path(yaml_file: Path, depth: int = 0) -> str | None:
    """The HF dataset a registry YAML reads (following one `include:` level)."""
    found = dict((k, v) for k, v in _TASK_LINE.findall(yaml_file.read_text(encoding="utf-8")))
    if "dataset_path" in found:
        return found["dataset_path"]
    if "include" in found and depth < 3:
        included = yaml_file.parent / found["include"]
        if included.is_file():
            return _dataset_path(included, depth + 1)
    return None


def _folder_dataset(folder: Path) -> str | None:
    """A group's dataset: the first `dataset_path` among the YAMLs beside its file (lm-eval
    groups such as mmlu keep it in a shared template there)."""
    for path in sorted(folder.glob("*yaml")):
        found = dict(_TASK_LINE.findall(path.read_text(encoding="utf-8")))
        if "dataset_path" in found:
            return found["dataset_path"]
    return None


def hf_dataset_cached(dataset: str) -> bool:
    """Is this HF dataset in the local caches `datasets` reads offline?"""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    ds = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    flat = dataset.replace("/", "___")
    return ((hub / f"datasets--{dataset.replace('/', '--')}").is_dir()
            or any(ds.glob(f"{flat}*")) or Path(dataset).expanduser().exists())


# --------------------------------------------------------------------------- checks


def check_eval_tasks(cfg: EvalConfig, data: Path | None = None) -> str | None:
    """What would stop this evaluation, in one line; None when every task can run offline."""
    builtin = [t for t in cfg.task_names() if t in BUILTIN_TASKS]
    problem = missing_eval_data(builtin, data)
    if problem:
        return problem
    for task in cfg.jsonl_tasks():
        _, problem = _jsonl_rows(task)
        if problem:
            return problem
    included: dict[str, Path] = {}
    if cfg.include_path:
        included, problem = yaml_task_names(Path(cfg.include_path))
        if problem:
            return problem
    jsonl = {t.name for t in cfg.jsonl_tasks()}
    for name in cfg.task_names():
        if name in BUILTIN_TASKS or name in jsonl or name in included:
            continue
        source = registry_tasks().get(name)
        if source is None:
            return (f"evaluate.tasks: unknown task '{name}': not built in "
                    f"({', '.join(BUILTIN_TASKS)}), not a JSONL task, not in include_path"
                    f"{' ' + cfg.include_path if cfg.include_path else ''}, and not an lm-eval "
                    "task name")
        dataset = _dataset_path(source) or _folder_dataset(source.parent)
        if dataset and not hf_dataset_cached(dataset):
            return (f"evaluate.tasks: lm-eval task '{name}' reads the HF dataset '{dataset}', "
                    "which is not in the local HF cache: fetch it once where there is internet "
                    f"(datasets.load_dataset('{dataset}')) and copy ~/.cache/huggingface here, "
                    "or give the items as a JSONL task")
    return None


def include_paths(cfg: EvalConfig, jsonl_folder: Path | None) -> list[str]:
    """lm-eval include paths: pkdq's offline tasks, the team's YAMLs, the JSONL tasks."""
    paths = [str(TASKS_DIR)]
    if cfg.include_path:
        paths.append(str(Path(cfg.include_path).expanduser()))
    if jsonl_folder is not None:
        paths.append(str(jsonl_folder))
    return paths


def needs_registry(cfg: EvalConfig) -> bool:
    """Whether some task comes from lm-eval's own registry (indexing it costs seconds)."""
    local = set(BUILTIN_TASKS) | {t.name for t in cfg.jsonl_tasks()}
    if cfg.include_path:
        local |= set(yaml_task_names(Path(cfg.include_path))[0])
    return any(name not in local for name in cfg.task_names())
