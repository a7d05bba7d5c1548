"""bf eval: metrics on known inputs and the command end to end on a tiny model."""

import json
import math
import shutil

import numpy as np
import pytest

from bf.evaluate.metrics import accuracy, fidelity
from bf.shapes.render import render
from bf.shapes.scenes import eval_scenes
from tests.conftest import run_bf


def test_fidelity_known_values():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    lat = np.ones((2, 4, 2, 2), np.float32)
    same = fidelity(a, a, lat, lat)
    assert same == {"mse": 0.0, "psnr": math.inf, "latent_mse": 0.0}
    b = np.full_like(a, 51)  # 0.2 everywhere -> mse 0.04 -> psnr 13.979 dB
    f = fidelity(a, b, lat, lat + 0.5)
    assert f["mse"] == pytest.approx(0.04) and f["psnr"] == pytest.approx(10 * math.log10(25)) and f["latent_mse"] == pytest.approx(0.25)


def test_accuracy_on_ground_truth_and_on_blank_images():
    scenes = eval_scenes("single")[:6]
    images = np.stack([render(sc) for sc in scenes])
    assert accuracy(images, scenes)["overall"] == 1.0
    blank = np.full_like(images, 232)
    acc = accuracy(blank, scenes)
    assert acc["overall"] == 0.0 and acc["count"] == 0.0


EVAL = ("--cfg", "7.5", "--limit", "1", "--steps", "2", "--device", "cpu")


def test_eval_identical_models_and_outputs(tiny_model, tmp_path):
    out, grid = tmp_path / "e.json", tmp_path / "g.png"
    r = run_bf("eval", "--model", tiny_model, "--reference", tiny_model, *EVAL, "--json", out, "--grid", grid)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())["results"]
    assert {e["split"] for e in results} == {"single", "two", "heldout", "heldout-two"}
    for e in results:
        assert e["model"] == "tiny" and e["cfg"] == 7.5 and e["mse"] == 0.0 and e["latent_mse"] == 0.0 and e["psnr"] is None
        assert set(e["accuracy"]) >= {"count", "color", "shape", "overall"}
    from PIL import Image

    img = Image.open(grid)
    # one column (the model is the reference: generated once, shown once), a row per prompt of each split,
    # 64-pixel images enlarged to 128, a two-line header
    assert img.format == "PNG" and img.size == (200 + 132, 32 + 4 * 132)
    assert "generate: 4/4" in r.stderr  # 4 prompts, not 8
    assert "overall" in r.stdout and "heldout" in r.stdout


def test_grid_wraps_long_headers_and_labels_instead_of_cutting_them(tmp_path):
    from PIL import Image

    from bf.evaluate.image_grid import save_grid

    cells = [[np.zeros((64, 64, 3), np.uint8)] * 2]
    long = "reference:a-model-with-a-rather-long-name.bfq\ncfg 7.5"
    save_grid(tmp_path / "g.png", ["a red circle above a blue square " * 3], [long, "m\ncfg 7.5"], cells)
    # 128-pixel columns hold 21 characters: the 45-character name takes 3 lines, "cfg 7.5" a 4th
    assert Image.open(tmp_path / "g.png").size == (200 + 2 * 132, 4 * 12 + 8 + 132)


def test_eval_quantized_checkpoint_against_its_base(tiny_model, tmp_path):
    q = tmp_path / "q.bfq"
    assert run_bf("quantize", "--model", tiny_model, "--bits", "2", "--out", q).returncode == 0
    out = tmp_path / "e.json"
    r = run_bf("eval", "--model", q, "--model", tiny_model, "--reference", tiny_model, *EVAL, "--seeds", "2", "--json", out)
    assert r.returncode == 0, r.stderr
    payload = json.loads(out.read_text())
    for e in payload["results"]:
        if e["model"] != "tiny":  # the .bfq against its base model
            assert e["mse"] > 0 and 0 < e["psnr"] < 100 and e["latent_mse"] > 0
            assert e["psnr_ci95"][0] <= e["psnr"] <= e["psnr_ci95"][1]
            assert np.mean(e["mse_per_image"]) == pytest.approx(e["mse"]) and len(e["mse_per_image"]) == e["images"]
        per_image = e["overall_per_image"]
        assert len(per_image) == e["images"] == 2 and np.mean(per_image) == e["accuracy"]["overall"]
        assert 0 <= e["accuracy_ci95"][0] <= e["accuracy"]["overall"] <= e["accuracy_ci95"][1] <= 1
        assert "fd_rendered" not in e  # 2 images: too few for a distance (MIN_FD_IMAGES)
    # one difference per split: the FP model minus the quantized one, from the same images' verdicts
    diffs = payload["differences"]
    labels = list(dict.fromkeys(e["model"] for e in payload["results"]))  # in --model order: the .bfq, then the FP model
    assert len(labels) == 2 and sorted(d["split"] for d in diffs) == ["heldout", "heldout-two", "single", "two"]
    assert all((d["a"], d["b"]) == tuple(labels) for d in diffs)
    by = {(e["model"], e["split"]): np.mean(e["overall_per_image"]) for e in payload["results"]}
    for d in diffs:
        assert d["difference"] == pytest.approx(by[(labels[1], d["split"])] - by[(labels[0], d["split"])])
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    assert "paired on the same prompts and seeds" in r.stdout


def test_eval_bfq_base_model_resolution(tiny_model, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    q, qb = tmp_path / "q.bfq", tmp_path / "qb.bfq"
    assert run_bf("quantize", "--model", base, "--bits", "4", "--out", q).returncode == 0
    assert run_bf("quantize", "--model", base, "--bits", "4", "--bundle", "--out", qb).returncode == 0
    shutil.rmtree(base)
    r = run_bf("eval", "--model", q, *EVAL)
    assert r.returncode == 1 and "base model" in r.stderr and "--bundle" in r.stderr and "Traceback" not in r.stderr
    assert run_bf("eval", "--model", q, "--base-model", tiny_model, *EVAL).returncode == 0
    assert run_bf("eval", "--model", qb, *EVAL).returncode == 0  # the bundle is enough


def test_eval_prompt_file(tiny_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red circle on the left\na cat on a mat\n")
    out = tmp_path / "e.json"
    r = run_bf("eval", "--model", tiny_model, "--prompts", prompts, *EVAL, "--json", out)
    assert r.returncode == 0, r.stderr
    by_split = {e["split"]: e for e in json.loads(out.read_text())["results"]}
    assert set(by_split) == {"single", "other"} and by_split["other"]["accuracy"] == {}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    r = run_bf("eval", "--model", tiny_model, "--prompts", empty, *EVAL)
    assert r.returncode == 1 and "no prompts" in r.stderr


def test_shipped_model_is_complete_and_small():
    from bf.models.directory import ModelDir
    from bf.models.shipped import shipped_model_dir

    root = shipped_model_dir()
    ModelDir.open(root)
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) <= 25_000_000


def test_eval_reports_the_distance_to_rendered_ground_truth_from_30_images(tiny_model, tmp_path):
    from bf.shapes.scenes import caption

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(caption(sc) for sc in eval_scenes("single")) + "\n")
    out = tmp_path / "e.json"
    r = run_bf("eval", "--model", tiny_model, "--prompts", prompts, "--cfg", "7.5", "--steps", "2", "--device", "cpu", "--json", out)
    assert r.returncode == 0, r.stderr
    (e,) = json.loads(out.read_text())["results"]
    assert e["split"] == "single" and e["images"] == 30
    # a random model draws no shapes: far from the renderings, which a second clean draw is not
    assert 1 < e["fd_rendered_floor"] < 8 and e["fd_rendered"] > 10 * e["fd_rendered_floor"], (e["fd_rendered"], e["fd_rendered_floor"])


def test_images_per_split_gives_a_split_of_few_prompts_more_seeds(tiny_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red circle on the left\na red circle to the left of a blue square\na blue square above a red circle\n")
    out = tmp_path / "e.json"
    r = run_bf("eval", "--model", tiny_model, "--model", tiny_model, "--prompts", prompts, "--cfg", "7.5", "--steps", "2",
               "--device", "cpu", "--images-per-split", "5", "--json", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    payload = json.loads(out.read_text())
    # one prompt: 5 seeds; two prompts: ceil(5 / 2) = 3 seeds each
    for e in payload["results"]:
        want = {"single": 5, "two": 3}[e["split"]]
        assert e["seeds"] == want and e["images"] == len(e["overall_per_image"]) == want * (1 if e["split"] == "single" else 2)
        assert set(e["seconds"]) == {"generate", "metrics"} and e["seconds"]["metrics"] >= 0
    by = {(e["model"], e["split"]): np.mean(e["overall_per_image"]) for e in payload["results"]}
    assert len(payload["differences"]) == 2  # the same model twice: paired image by image, no difference
    for d in payload["differences"]:
        assert d["difference"] == by[(d["b"], d["split"])] - by[(d["a"], d["split"])] == 0
    assert payload["config"]["images_per_split"] == 5
