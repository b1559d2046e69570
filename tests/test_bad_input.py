"""No traceback from bad input, ever: generated recipes, bytes and command lines through the CLI.

Property-based (hypothesis, derandomized so CI sees the same inputs every time): the shipped
recipes mutated in every way a hand-edited YAML file goes wrong, byte-level garbage, and bad
arguments to every command. Each input goes through the real command in-process (typer's
CliRunner) and must end in exit 0 (or 1 for `--strict` warnings) or exit 2 with exactly one
`error: ...` line, never an exception. Commands that start heavy work only get inputs that
must be refused before it starts (a model path that does not exist, an out-of-range option, a
recipe that fails validation), so nothing here loads a model.
"""

from __future__ import annotations

import functools
import json
import string
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import typer.testing
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkdq.cli import app
from tasks.core.recipe import MAX_RECIPE_BYTES, RECIPES_DIR

SHIPPED = {path.stem: yaml.safe_load(path.read_text())
           for path in sorted(RECIPES_DIR.glob("*.yaml"))}
SHIPPED_TEXT = {path.stem: path.read_text() for path in sorted(RECIPES_DIR.glob("*.yaml"))}
COMMANDS = ("recipes", "validate", "run", "serve", "stop", "quantize", "export-gguf", "eval",
            "compare", "report", "prune-scan", "generate", "export", "sweep", "search")
MISSING = "/nonexistent-pkdq-fuzz"  # never created: every model/recipe path under it is absent

# Inputs run per test and tracebacks seen (the assertions stop at the first one, so the
# summary test reads "N inputs, 0 tracebacks" whenever the suite passes).
GENERATED: Counter[str] = Counter()
TRACEBACKS: Counter[str] = Counter()

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much,
                                       HealthCheck.large_base_example])


@pytest.fixture(scope="module", autouse=True)
def _command_tree_built_once():
    """CliRunner rebuilds the click command tree from the typer app on every call (~25 ms, more
    than a validation); the tree is the same for every input, so build it once here."""
    original = typer.testing._get_command
    typer.testing._get_command = functools.lru_cache(maxsize=None)(original)
    yield
    typer.testing._get_command = original


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


runner = typer.testing.CliRunner()


def check(test: str, args: list[str], allowed: frozenset[int] = frozenset({0, 2})) -> Any:
    """Run `pkdq ARGS`; assert no exception escaped, an allowed exit code, and that a refusal
    is one `error:` line (the whole output) while success prints no error line."""
    GENERATED[test] += 1
    result = runner.invoke(app, args)
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    if escaped or "Traceback" in result.output:
        TRACEBACKS[test] += 1
        import traceback

        detail = "".join(traceback.format_exception(*result.exc_info)) if escaped else ""
        pytest.fail(f"pkdq {_shown(args)} raised:\n{detail}{result.output[-3000:]}")
    assert result.exit_code in allowed, (_shown(args), result.exit_code, result.output[-2000:])
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    if result.exit_code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), (_shown(args), result.output)
    else:
        assert not errors, (_shown(args), result.output)
    return result


def _shown(args: list[str]) -> str:
    return " ".join(a if len(a) < 200 else a[:200] + "..." for a in args)


# ------------------------------------------------------------------------------------------
# Recipe mutations
# ------------------------------------------------------------------------------------------

EXTREME_NUMBERS = [0, -1, 1, 2, 3, 5, 7, 16, 63, 1000, 2**31 - 1, 2**31, 2**32, 2**63, 2**64,
                   10**11, 10**11 + 1, 10**22, -10**22, 10**400, 0.0, -0.0, 0.5, 0.999, 1.0,
                   1.5, 1e-300, 5e-324, 1e308, -1e308, float("inf"), float("-inf"),
                   float("nan")]
WEIRD_STRINGS = ["", " ", "\t", "null", "~", "yes", "no", "0x1F", "1e3", "1_000", "-", "..",
                 "../../etc/passwd", "/", "/dev/null", "/etc", "\x00", "é", "\u202e", "\ud7ff",
                 "smollm2-135m", "gemma3-270m", "smollm2-136m", f"{MISSING}/model",
                 "~nouser-pkdq/x", "~", "org/name", "a" * 300, "x/" * 2000, "x" * 100_000,
                 "wikipedia", "c4", "mixed", "arc_easy", "mmlu", "gptq", "P-KD-Q",
                 # data sources (issue 19): kinds, path prefixes, globs that match nothing
                 "text", "jsonl", "chat", "hf", "parquet", "${data}/", "${data}/nope.txt",
                 "${repo}/recipes/*.yaml", "${data}/wikitext/*.raw", "**/*.none", "${x}/y"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(EXTREME_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(WEIRD_STRINGS),
    st.text(max_size=40), st.binary(max_size=16), st.dates(),
)
keys = st.one_of(st.text(max_size=12), st.integers(-3, 3), st.sampled_from(
    ["prune", "distill", "quantize", "ffn", "heads", "depth", "hidden", "ratio", "size",
     "tokens", "samples", "seq_len", "model", "name", "stages", "evaluate", "resources",
     "data", "kind", "paths", "field", "heldout", "heldout_paths", "loss_on", "repeat",
     "contamination", "allow_overlap"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(keys, inner, max_size=4), max_leaves=10)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into the document (dict keys and list indices), the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += _paths(value, (*prefix, i))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _nested(depth: int, leaf: Any, as_dict: bool) -> Any:
    for _ in range(depth):
        leaf = {"a": leaf} if as_dict else [leaf]
    return leaf


@st.composite
def mutated_recipes(draw) -> Any:
    """A shipped recipe with 1-4 mutations: a value replaced (wrong type, extreme number, weird
    string, deep nesting, huge string, None, a list for a dict...), a key deleted or unknown, a
    value wrapped in a list or a mapping, a number scaled far out of range."""
    doc = json.loads(json.dumps(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))]))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(doc)))
        target = _get(doc, path)
        op = draw(st.sampled_from(["replace", "replace", "number", "delete", "unknown_key",
                                   "wrap", "nest", "stage"]))
        if op == "replace":
            doc = _set(doc, path, draw(values))
        elif op == "number" and isinstance(target, int | float) and not isinstance(target, bool):
            factor = draw(st.sampled_from([-1, 0, 10, 1000, 10**9, 10**15, 10**20, 0.5, 1e-9]))
            doc = _set(doc, path, target * factor if draw(st.booleans()) else
                       draw(st.sampled_from(EXTREME_NUMBERS)))
        elif op == "delete" and path:
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
        elif op == "unknown_key" and isinstance(target, dict):
            target[draw(keys)] = draw(values)
        elif op == "wrap":
            doc = _set(doc, path, [target] if draw(st.booleans()) else {draw(keys): target})
        elif op == "nest":
            doc = _set(doc, path, _nested(draw(st.integers(2, 120)), target, draw(st.booleans())))
        elif op == "stage" and isinstance(doc, dict) and isinstance(doc.get("stages"), list):
            stage = draw(st.sampled_from([{"prune": {"heads": {"size": draw(st.integers(-2, 9))},
                                                     "round_to": 64}},
                                          {"prune": {"depth": {"remove": draw(st.integers(
                                              -1, 40))}}},
                                          {"distill": {"tokens": draw(st.sampled_from(
                                              EXTREME_NUMBERS))}},
                                          {"quantize": draw(values)}, {"shrink": {}}, None]))
            doc["stages"].insert(draw(st.integers(0, len(doc["stages"]))), stage)
    return doc


def _dump(doc: Any) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, RecursionError, ValueError):
        return repr(doc)  # not YAML at all: the loader must say so in one line


@settings(FUZZ, max_examples=1100)
@given(doc=mutated_recipes(), strict=st.booleans())
def test_mutated_recipes_never_raise(work, doc, strict):
    path = work / "mutated.yaml"
    path.write_text(_dump(doc), encoding="utf-8")
    args = ["validate", str(path)] + (["--strict"] if strict else [])
    check("recipes", args, frozenset({0, 1, 2}) if strict else frozenset({0, 2}))


# ------------------------------------------------------------------------------------------
# Files that are not recipes at all
# ------------------------------------------------------------------------------------------


@st.composite
def garbage_files(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "text", "edited", "latin1", "utf16", "deep", "empty",
                                 "control", "huge"]))
    if kind == "bytes":
        return draw(st.binary(max_size=2000))
    if kind == "text":
        return draw(st.text(max_size=400)).encode("utf-8", errors="surrogatepass")
    name = draw(st.sampled_from(sorted(SHIPPED_TEXT)))
    text = SHIPPED_TEXT[name]
    if kind == "edited":  # a shipped recipe with characters inserted, deleted or swapped
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(text)))
            junk = draw(st.sampled_from(["\t", ":", "- ", "[", "{", "}", "]", "'", '"', "&a",
                                        "*a", "!!python/object:os.system", "\n  ", "#", "%"]))
            text = text[:i] + junk + text[i + draw(st.integers(0, 3)):]
        return text.encode("utf-8")
    if kind == "latin1":
        return (text + "description: café crème\n").encode("latin-1")
    if kind == "utf16":
        return text.encode("utf-16")
    if kind == "deep":
        depth = draw(st.sampled_from([50, 999, 1001, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}")]))
        return (f"name: deep\nstages: {opener * depth}{closer * depth}\n").encode()
    if kind == "control":
        return b"name: x\x00y\nmodel: \x1b[31m\x07\n"
    if kind == "huge":
        return b"name: x\ndescription: " + b"y" * (MAX_RECIPE_BYTES + 1) + b"\n"
    return b""


@settings(FUZZ, max_examples=250)
@given(data=garbage_files(), suffix=st.sampled_from([".yaml", ".yml", ""]))
def test_garbage_files_never_raise(work, data, suffix):
    path = work / f"garbage{suffix}"
    path.write_bytes(data)
    check("files", ["validate", str(path)])


@pytest.mark.parametrize("arg", [
    "", ".", "/", "/dev/null", "/etc", "/proc/self/mem", f"{MISSING}/r.yaml", f"{MISSING}/r",
    "no-such-recipe", "../tests/recipes/bad-order", "recipes/../../etc/passwd", "a\x00b.yaml",
    "a" * 300, "a" * 300 + ".yaml", "x/" * 3000, "~nouser-pkdq/r.yaml", "-", "--", "-x",
])
def test_recipe_arguments_that_are_no_recipe_file(arg):
    assert check("files", ["validate", arg]).exit_code == 2


def test_a_folder_is_no_recipe_file(work):
    (work / "folder.yaml").mkdir(exist_ok=True)
    result = check("files", ["validate", str(work / "folder.yaml")])
    assert result.exit_code == 2 and "a folder, not a recipe file" in result.output


# ------------------------------------------------------------------------------------------
# Every command's arguments
# ------------------------------------------------------------------------------------------

junk = st.one_of(st.text(max_size=20), st.sampled_from(WEIRD_STRINGS),
                 st.integers().map(str), st.floats().map(str),
                 st.sampled_from(["-1", "0", "1e99", "nan", "inf", "-inf", "abc", "4.5", "", "--"]))
missing_model = st.text(string.ascii_letters + string.digits + "._-/ ", max_size=30).map(
    lambda tail: f"{MISSING}/{tail}")


def options(draw, spec: dict[str, Any], poison: dict[str, Any] | None = None) -> list[str]:
    """Some of the options in `spec` (name -> strategy of values, None for a flag), in random
    order, then `poison` (an option that must be refused) when given. Pairs stay together and
    the poison comes last, so no value can swallow it."""
    chosen = draw(st.lists(st.sampled_from(sorted(spec)), unique=True, max_size=len(spec)))
    args: list[str] = []
    for name in chosen:
        args += [name] if spec[name] is None else [name, draw(spec[name])]
    if poison:
        name = draw(st.sampled_from(sorted(poison)))
        args += [name, draw(poison[name])]
    if draw(st.integers(0, 9)) == 0:
        args.append(draw(st.sampled_from(["--no-such-option", "extra-argument", "-z"])))
    return args


def bad_recipe(work: Path):
    """A recipe argument that validation refuses: missing, garbage, or a broken recipe file
    (5 of a local model's 3 KV groups: refused with or without --pool, wheel or no wheel)."""
    model = work / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152}))
    broken = work / "broken.yaml"
    broken.write_text(f"name: b\nmodel: {model}\n"
                      "stages: [{prune: {heads: {size: 5}, round_to: 64}}]\n")
    return st.sampled_from([f"{MISSING}/r.yaml", "no-such-recipe", str(broken),
                            str(Path(__file__).parent / "recipes" / "bad-order.yaml"),
                            str(Path(__file__).parent / "recipes" / "unknown-key.yaml")])


INT = st.one_of(st.integers(-10**20, 10**20).map(str), junk)
FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str), junk)


@st.composite
def command_lines(draw, work: Path) -> list[str]:
    """argv for one command, refused before any work starts."""
    command = draw(st.sampled_from(COMMANDS))
    o = functools.partial(options, draw)
    if command == "recipes":
        return ["recipes", draw(junk)]
    if command == "validate":
        return ["validate", *o({"--strict": None}), draw(bad_recipe(work))]
    if command in ("run", "compare"):
        spec = {"--runs-dir": junk, "--run-id": junk}
        if command == "run":
            spec |= {"--pool": junk, "--api-url": junk, "--wait": None, "--no-wait": None}
            return ["run", draw(bad_recipe(work)), *o(spec)]
        spec |= {"--orders": junk, "--concurrency": INT}
        if draw(st.booleans()):  # a valid recipe, but orders that name an unknown stage
            return ["compare", "smollm2-ffn25-orders", *o(spec),
                    "--orders", draw(junk).replace(",", "") + "-X,P-KD-Q"]
        return ["compare", draw(bad_recipe(work)), *o(spec)]
    if command == "serve":  # always one option out of range: no server may start
        spec = {"--pool": junk, "--home": junk, "--ui": None, "--no-ui": None}
        poison = {"--port": st.sampled_from(["0", "-1", "65536", "99999999999", "abc", "4.5",
                                             "nan"]),
                  "--limit": st.sampled_from(["0", "-3", "65", "x"]),
                  "--query-seconds": st.sampled_from(["0", "-1", "nan", "inf", "3601", "x"])}
        return ["serve", *o(spec, poison)]
    if command == "stop":  # a bad port, or a home that holds no server record: nothing is stopped
        if draw(st.booleans()):
            return ["stop", "--port", draw(st.sampled_from(["0", "-1", "65536", "x", ""])),
                    *o({"--home": junk})]
        return ["stop", "--home", str(work / "no-server-here"), *o({"--port": INT})]
    if command == "quantize":
        spec = {"--method": junk, "--bits": INT, "--group": INT, "--desc-act": None,
                "--damp": FLOAT, "--samples": INT, "--seq-len": INT, "--out": junk,
                "--threads": INT, "--seed": INT, "--gguf": junk}
        return ["quantize", draw(missing_model), *o(spec)]
    if command == "export-gguf":
        spec = {"--qtype": junk, "--reference": junk, "--no-verify": None, "--metrics": junk,
                "--threads": INT}
        return ["export-gguf", draw(missing_model), draw(junk) or "x.gguf", *o(spec)]
    if command == "eval":
        spec = {"--tasks": junk, "--samples": INT, "--out": junk, "--backend": junk,
                "--dtype": junk, "--batch-size": INT, "--wikitext-tokens": INT,
                "--wikitext-pages": INT, "--no-speed": None, "--threads": INT, "--seed": INT}
        return ["eval", draw(missing_model), *o(spec)]
    if command == "export":
        spec = {"--to": junk, "--format": junk, "--overwrite": None, "--threads": INT}
        return ["export", draw(missing_model), *o(spec)]
    if command in ("sweep", "search"):
        spec = {"--runs-dir": junk, "--run-id": junk, "--concurrency": INT}
        if command == "search":  # a bad recipe, or a good one without a prune target
            return ["search", draw(st.sampled_from([draw(bad_recipe(work)),
                                                    "smollm2-ffn25-kd-w4"])), *o(spec)]
        spec |= {"--select": junk, "--fraction": FLOAT}
        # a key no recipe has, so even a valid recipe is refused before anything runs
        grid = f"no_such_key.{draw(junk)}={draw(junk)}"
        return ["sweep", draw(st.sampled_from([draw(bad_recipe(work)),
                                               "smollm2-ffn25-kd-w4"])), "--grid", grid,
                *o(spec)]
    if command == "generate":
        spec = {"--max-new-tokens": INT, "--no-chat": None, "--threads": INT}
        return ["generate", draw(missing_model), draw(junk) or "hi", *o(spec)]
    if command == "report":
        folder = work / f"run-{draw(st.integers(0, 3))}"
        folder.mkdir(exist_ok=True)
        for name in ("run.json", "compare.json"):
            (folder / name).unlink(missing_ok=True)
        record = draw(st.sampled_from(["run.json", "compare.json", None]))
        if record:
            body = draw(st.one_of(st.binary(max_size=200),
                                  values.map(lambda v: json.dumps(v, default=str).encode())))
            (folder / record).write_bytes(body)
        return ["report", draw(st.sampled_from([str(folder), f"{MISSING}/run"]))]
    spec = {"--out": junk, "--samples": INT, "--seq-len": INT, "--source": junk,
            "--ppl-skip": None, "--threads": INT}
    return ["prune-scan", draw(missing_model), *o(spec)]


@settings(FUZZ, max_examples=450)
@given(data=st.data())
def test_command_lines_never_raise(work, data):
    args = data.draw(command_lines(work))
    result = check("commands", args)
    # refused; `pkdq recipes --` lists the recipes and `--help` anywhere prints help: exit 0
    assert result.exit_code == 2 or args[0] == "recipes" or "--help" in args, \
        (_shown(args), result.output)


def test_every_command_is_fuzzed():
    registered = {cmd.name for cmd in app.registered_commands}
    assert registered == set(COMMANDS), registered ^ set(COMMANDS)


def test_summary_generated_inputs_and_no_tracebacks(capsys):
    """The count behind "N generated inputs, 0 tracebacks" (only when the fuzz tests ran)."""
    if not GENERATED["recipes"]:
        pytest.skip("run with the fuzz tests above")
    total = sum(GENERATED.values())
    with capsys.disabled():
        print(f"\nbad input: {total} generated inputs ({dict(GENERATED)}), "
              f"{sum(TRACEBACKS.values())} tracebacks")
    assert GENERATED["recipes"] >= 1000 and not TRACEBACKS
