"""Stages never import each other; the format and the runtime stay free of torch."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

STAGES = {"trainer": "bf.trainer", "export": "bf.export", "runtime": "bf.runtime"}
SHARED = ["bf/format", "bf/errors.py", "bf/atomic.py"]


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


def _files(rel):
    p = REPO / rel
    return [p] if p.is_file() else sorted(p.rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(STAGES))
def test_stages_do_not_import_each_other(folder):
    others = [m for f, m in STAGES.items() if f != folder] + [f for f in STAGES if f != folder]
    files = _files(folder)
    assert files, f"{folder}/ has no Python files"
    for path in files:
        for mod in imported_modules(path):
            bad = [o for o in others if mod == o or mod.startswith(o + ".")]
            assert not bad, f"{path.relative_to(REPO)} imports {mod}: stages talk only through bf.format and the CLI"


def test_shared_modules_do_not_import_stages():
    for rel in [*SHARED, "bf/models"]:
        for path in _files(rel):
            for mod in imported_modules(path):
                assert not any(mod == m or mod.startswith(m + ".") for m in STAGES.values()), f"{path} imports {mod}"


def test_the_rule_catches_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from bf.trainer.quantizer import fake_quantize\n")
    assert "bf.trainer.quantizer" in imported_modules(bad)


def test_format_and_runtime_import_without_torch():
    code = (
        "import sys, bf.format, bf.runtime, bf.export, bf.cli; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
