"""The scripts of benchmarks/ and tools/ (and the test files the docs cite): every one the docs and results/ name exists,
and each script loads and answers --help."""

import importlib.util
import json
import re
import sys

import pytest

from tests.conftest import REPO

SCRIPT = re.compile(r"\b((?:benchmarks|tools|tests)/[\w/.-]+?\.(?:py|sh))\b")
DOCS = ["README.md", "BENCHMARKS.md", "docs", "plugins_trt/README.md", "bf/assets/README.md"]
PYTHON_SCRIPTS = sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "tools").glob("*.py")])


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def named_scripts() -> dict[str, set[str]]:
    """Script path -> the files (docs, results/*.json, the scripts themselves) that name it."""
    texts = {}
    for rel in DOCS:
        path = REPO / rel
        for f in [path] if path.is_file() else sorted(path.rglob("*.md")):
            texts[f.relative_to(REPO).as_posix()] = f.read_text()
    for f in sorted((REPO / "results").glob("*.json")):
        texts[f"results/{f.name}"] = "\n".join(_strings(json.loads(f.read_text())))
    for f in sorted([*(REPO / "benchmarks").iterdir(), *(REPO / "tools").iterdir()]):
        if f.suffix in (".py", ".sh"):
            texts[f.relative_to(REPO).as_posix()] = f.read_text()
    found: dict[str, set[str]] = {}
    for where, text in texts.items():
        for script in SCRIPT.findall(text):
            found.setdefault(script, set()).add(where)
    return found


def test_every_named_script_exists():
    found = named_scripts()
    assert "benchmarks/sd15_unet_step.py" in found and "tests/format/test_packing.py" in found  # the pattern finds what it should
    missing = {script: sorted(where) for script, where in found.items() if not (REPO / script).is_file()}
    assert missing == {}


def test_results_name_the_command_that_made_them():
    """A result JSON's command names a script by its path in this repository (or is a bf command)."""
    for f in sorted((REPO / "results").glob("*.json")):
        command = json.loads(f.read_text()).get("command")
        if isinstance(command, str) and not command.startswith("bf "):
            assert SCRIPT.search(command), f"{f.name}: {command[:80]}"


@pytest.mark.parametrize("path", PYTHON_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_loads_and_answers_help(path, monkeypatch, capsys):
    """Imported as ``python PATH`` would (its folder first on sys.path), then ``main`` with --help."""
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])  # what the script puts on it stays here
    name = f"_script_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        return  # a module the others import (tools/sd15_mix.py)
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
