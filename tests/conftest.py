import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random sd15-tiny model directory, built once per test session."""
    from bf.models.architectures import ARCHITECTURES
    from bf.models.random_model import write_random_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    write_random_model(ARCHITECTURES["sd15-tiny"], out, seed=0, log=lambda m: None)
    return out


def run_bf(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed CLI in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "bf.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)
