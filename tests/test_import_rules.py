"""Stages never import each other; the format and the runtime stay free of torch."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

STAGES = {"trainer": "bf.trainer", "export": "bf.export", "runtime": "bf.runtime"}
SHARED = ["bf/format", "bf/errors.py", "bf/atomic.py", "bf/module_paths.py"]


def imported_modules(path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports would hide a cross-stage import
                raise AssertionError(f"{path}: use absolute imports (from bf.… import …)")
            mods.add(node.module or "")
    return mods


def _files(rel, root=REPO):
    p = root / rel
    return [p] if p.is_file() else sorted(p.rglob("*.py"))


def violations(root, folder) -> list[str]:
    """Imports in ``root/folder`` of another stage (as bf.<stage> or by its folder name)."""
    others = [m for f, m in STAGES.items() if f != folder] + [f for f in STAGES if f != folder]
    found = []
    for path in _files(folder, root):
        for mod in sorted(imported_modules(path)):
            if any(mod == o or mod.startswith(o + ".") for o in others):
                found.append(f"{path.relative_to(root)} imports {mod}")
    return found


@pytest.mark.parametrize("folder", sorted(STAGES))
def test_stages_do_not_import_each_other(folder):
    assert _files(folder), f"{folder}/ has no Python files"
    assert violations(REPO, folder) == [], "stages talk only through bf.format and the CLI"


def test_shared_modules_do_not_import_stages():
    for rel in [*SHARED, "bf/models"]:
        for path in _files(rel):
            for mod in imported_modules(path):
                assert not any(mod == m or mod.startswith(m + ".") for m in STAGES.values()), f"{path} imports {mod}"


def test_the_rule_catches_a_violation(tmp_path):
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "ok.py").write_text("import numpy\nfrom bf.format import Grid\n")
    (tmp_path / "trainer" / "x.py").write_text("import os\nfrom bf.export import build\n")
    assert violations(tmp_path, "trainer") == ["trainer/x.py imports bf.export"]
    (tmp_path / "trainer" / "x.py").write_text("import bf.runtime.engine\n")
    assert violations(tmp_path, "trainer") == ["trainer/x.py imports bf.runtime.engine"]
    assert violations(tmp_path, "export") == []  # trainer/ is not export's folder


def test_format_and_runtime_import_without_torch():
    code = (
        "import sys, bf.format, bf.runtime, bf.export, bf.cli; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_package_folder_is_in_the_distribution():
    """pyproject.toml lists bf's packages by hand (the stage folders live outside bf/): a new folder must be added there."""
    import tomllib

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    dirs = {"bf": REPO / "bf", **{name: REPO / folder for name, folder in tool["package-dir"].items()}}
    found = set()
    for name, root in dirs.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            hidden = any(part.startswith((".", "__")) for part in rel)
            if not hidden and not (name == "bf" and rel and rel[0] in ("trainer", "export", "runtime")):
                found.add(".".join((name, *rel)))
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
