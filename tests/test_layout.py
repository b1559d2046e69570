"""The house's rules, checked on every run of the suite (see tasks/README.md).

- import-linter contracts (pyproject.toml): layers, no cycles, nothing in tasks imports the CLI;
- code outside a stage package uses only the names its `__init__` exports;
- `pkdq --help` imports no torch;
- the built wheel carries every package, the lm-eval task YAMLs and the named recipes, and works
  when installed away from this checkout;
- the recipe a run freezes in run.json is the recipe it was started with.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tasks.core.common import REPO_ROOT
from tasks.core.recipe import list_recipes, load_recipe
from tasks.pipeline import frozen_recipe, plan

STAGE_PACKAGES = ("tasks.prune", "tasks.distill", "tasks.quantize", "tasks.evaluate",
                  "tasks.report", "tasks.compare")


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)


def _production_files() -> list[Path]:
    return [p for folder in ("tasks", "flows", "pkdq") for p in (REPO_ROOT / folder).rglob("*.py")]


def test_outside_code_uses_only_each_package_public_names():
    public = {name: set(importlib.import_module(name).__all__) for name in STAGE_PACKAGES}
    breaches = []
    for path in _production_files():
        here = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom | ast.Import):
                continue
            targets = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                       else [a.name for a in getattr(node, "names", [])])
            for target in targets:
                for package in STAGE_PACKAGES:
                    inside = here == package + ".__init__" or here.startswith(package + ".")
                    if inside:
                        continue
                    if target.startswith(package + "."):
                        breaches.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports "
                                        f"{target} (use `from {package} import ...`)")
                    elif target == package and isinstance(node, ast.ImportFrom):
                        unknown = {a.name for a in node.names} - public[package]
                        if unknown:
                            breaches.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: "
                                            f"{sorted(unknown)} not exported by {package}")
    assert not breaches, "\n".join(breaches)


def test_every_exported_name_resolves():
    for package in STAGE_PACKAGES:
        module = importlib.import_module(package)
        submodules = {p.stem for p in Path(module.__file__).parent.glob("*.py")}
        modules = set(getattr(module, "_MODULES", ()))
        for name in module.__all__:
            # a function named like a submodule would be shadowed by the submodule as soon
            # as anything imports that submodule (Python sets it on the package)
            assert name in modules or name not in submodules, f"{package}.{name}: clash"
            assert getattr(module, name) is not None, f"{package}.{name}"
        with pytest.raises(AttributeError):
            module.no_such_name  # noqa: B018 - the face must not invent names


def test_cli_help_does_not_import_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom pkdq.cli import app\n"
            "result = CliRunner().invoke(app, ['--help'])\nassert result.exit_code == 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_wheel_ships_packages_task_yamls_and_recipes(tmp_path):
    # Build from a copy of the tracked files: setuptools writes build/ beside its source.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        if (REPO_ROOT / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, source / rel)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("pkdq-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in (source / "tasks" / "evaluate" / "lm_eval_tasks").glob("*.yaml"):
        assert f"tasks/evaluate/lm_eval_tasks/{yaml.name}" in names
    for recipe in (source / "recipes").glob("*.yaml"):
        assert f"recipes/{recipe.name}" in names
    for init in source.glob("tasks/**/__init__.py"):
        assert init.relative_to(source).as_posix() in names
    assert not any(n.startswith("tests/") or n.endswith(".log") for n in names)

    # Installed away from the checkout (no repo on sys.path): recipes and task YAMLs resolve,
    # and the version comes from the wheel's metadata.
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                              "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    code = (
        "import sys, pkdq\n"
        "from tasks.core.recipe import list_recipes, load_recipe\n"
        "from tasks.evaluate.lm_eval_tasks import TASKS_DIR\n"
        "assert 'smollm2-ffn25-kd-w4' in dict(list_recipes())\n"
        "load_recipe('smollm2-ffn25-kd-w4')\n"
        "assert (TASKS_DIR / 'arc_easy.yaml').is_file(), TASKS_DIR\n"
        f"assert str(TASKS_DIR).startswith({str(target)!r}), TASKS_DIR\n"
        "print(pkdq.__version__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**env, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == importlib.import_module("pkdq").__version__


@pytest.mark.parametrize("name", [name for name, _ in list_recipes()])
def test_frozen_recipe_is_the_recipe_the_run_started_with(name, tmp_path):
    recipe = load_recipe(name)
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"recipe": recipe.model_dump(mode="json")}))
    assert frozen_recipe(run_file) == recipe


def test_plan_names_each_distill_stage_teacher():
    recipe = load_recipe("smollm2-ffn25-kd-w4")
    stages = {s.kind: s for s in plan(recipe)}
    assert stages["distill"].teacher == 0  # the model before pruning: the base model
    assert stages["prune"].teacher is None and stages["quantize"].teacher is None
