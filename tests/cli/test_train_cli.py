"""bf train end to end as a user runs it: the defaults on the shipped model give a .bfq, and a run killed
with SIGKILL at several points and resumed gives the uninterrupted run's weights bit for bit."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from bf.format import Checkpoint
from tests.conftest import REPO, run_bf


@pytest.mark.slow
def test_train_at_its_defaults_on_the_shipped_model_gives_a_1_99_bit_bfq(tmp_path):
    """Batch 64, lr 1e-4, the committed 1.99-bit recipe; steps and images shortened for CI."""
    out = tmp_path / "m.bfq"
    args = ["train", "--recipe", REPO / "results" / "shapes_recipe_1.99.json", "--images", "128", "--stage1-steps", "2",
            "--stage2-steps", "1", "--out", out]  # fmt: skip
    r = run_bf(*args)
    assert r.returncode == 0, r.stderr
    ckpt = Checkpoint.load(out)
    training = ckpt.recipe["training"]
    assert (training["batch_size"], training["lr"], training["scales_at_floor"]) == (64, 1e-4, 0)
    assert ckpt.recipe["avg_bits"] == pytest.approx(1.99, abs=5e-4) and len(ckpt.layers) == 257
    assert all((layer.scale > 0).all() for layer in ckpt.layers.values())
    assert "render: 128/128" in r.stderr and "encode: 128/128" in r.stderr  # progress in a log, not only on a terminal
    assert (tmp_path / "m.bfq.work" / "log.csv").read_text().count("\n") == 1 + 3


def _weights(path):
    ckpt = Checkpoint.load(path)
    layers = {k: (v.codes.tobytes(), v.scale.tobytes()) for k, v in ckpt.layers.items()}
    return layers, {k: np.asarray(v).tobytes() for k, v in ckpt.tensors.items()}


def _rows(work):
    try:
        return (work / "log.csv").read_text().count("\n") - 1
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_gives_the_uninterrupted_weights(tiny_model, tmp_path):
    common = ["--model", tiny_model, "--images", "16", "--uniform-bits", "2", "--stage1-steps", "6", "--stage2-steps", "4",
              "--batch-size", "8", "--checkpoint-every", "1"]  # fmt: skip
    assert run_bf("train", *common, "--out", tmp_path / "full.bfq").returncode == 0
    out, work = tmp_path / "killed.bfq", tmp_path / "killed.bfq.work"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    kills = []
    for target in (2, 6, 8):  # logged steps before the kill: in Stage I, at the end of Stage I, in Stage II
        resume = ["--resume"] if (work / "state.safetensors").exists() else []
        cmd = [sys.executable, "-m", "bf.cli", "train", *map(str, common), "--out", str(out), *resume]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        while p.poll() is None and _rows(work) < target:
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        err = p.communicate()[1].decode()
        assert p.returncode == -signal.SIGKILL, f"finished before the kill at {target}: {err[-2000:]}"
        kills.append(_rows(work))
        assert not out.exists()
    assert kills == sorted(kills) and kills[-1] < 10
    r = run_bf("train", *common, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert _weights(out) == _weights(tmp_path / "full.bfq")
    # every step once in the log, and no temporary file survived the kills
    steps = [line.split(",")[:2] for line in (work / "log.csv").read_text().splitlines()[1:]]
    assert steps == [[str(s), str(i)] for s, n in ((1, 6), (2, 4)) for i in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.bfq", "full.bfq.work", "killed.bfq", "killed.bfq.work"]
    assert not [p.name for p in work.iterdir() if ".tmp" in p.name or p.name.startswith(".")]
