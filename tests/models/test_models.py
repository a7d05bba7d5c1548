import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from bf.errors import BfError
from bf.models.directory import ModelDir
from tests.conftest import REPO


def test_random_model_is_a_diffusers_pipeline(tiny_model):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True, safety_checker=None)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.skip_prk_steps and pipe.scheduler.config.steps_offset == 1
    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)


def test_tokenizer_is_clip_bpe(tiny_model):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    assert len(tok) == 49408
    # ids of CLIP's vocabulary (openai/clip-vit-large-patch14)
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("x", padding="max_length")["input_ids"].__len__() == 77


def test_random_model_is_deterministic(tiny_model, tmp_path):
    from bf.models.architectures import ARCHITECTURES
    from bf.models.random_model import write_random_model

    again = tmp_path / "again"
    write_random_model(ARCHITECTURES["sd15-tiny"], again, seed=0, log=lambda m: None)
    a = ModelDir.open(tiny_model).read_weights("unet")
    b = ModelDir.open(again).read_weights("unet")
    assert all((a[k] == b[k]).all() for k in a)
    other = tmp_path / "other"
    write_random_model(ARCHITECTURES["sd15-tiny"], other, seed=1, log=lambda m: None)
    c = ModelDir.open(other).read_weights("unet")
    assert not (a["conv_in.weight"] == c["conv_in.weight"]).all()


def test_sd15_architecture_is_exact():
    import torch
    from diffusers import UNet2DConditionModel

    from bf.models.architectures import SD15_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    time_params = sum(p.numel() for n, p in unet.named_parameters() if n.startswith("time_embedding.") or ".time_emb_proj." in n)
    assert round(time_params / 1e6, 1) == 27.9  # docs/RECIPE.md section 4


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_incomplete_directory_lists_everything_missing(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path / "m")
    shutil.rmtree(d / "vae")
    (d / "unet" / "config.json").unlink()
    (d / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(BfError) as e:
        ModelDir.open(d)
    msg = str(e.value)
    assert "not a complete diffusers" in msg
    for piece in ("unet/config.json", "tokenizer/merges.txt", "vae/"):
        assert piece in msg
    assert "\n" not in msg


def test_pickle_weights_are_refused_with_a_hint(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path / "m")
    w = d / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(d / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(BfError, match="pickle weights are never loaded"):
        ModelDir.open(d)


def test_not_a_directory(tmp_path):
    with pytest.raises(BfError, match="no such model directory"):
        ModelDir.open(tmp_path / "missing")


def test_sharded_and_fp16_variant_weights_are_found(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path / "m")
    unet = d / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    md = ModelDir.open(d)
    assert md.weight_files("unet")[0].name == "diffusion_pytorch_model.fp16.safetensors"
    (unet / "diffusion_pytorch_model.fp16.safetensors").rename(unet / "shard-1.safetensors")
    keys = list(ModelDir.open(tiny_model).read_weights("unet"))
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "shard-1.safetensors" for k in keys}})
    )
    assert len(ModelDir.open(d).read_weights("unet")) == len(keys)


def test_corrupt_weights_file(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path / "m")
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(BfError, match="not a readable safetensors file"):
        ModelDir.open(d).read_weights("unet")


def test_content_hash_changes_with_base_files(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path / "m")
    h = ModelDir.open(d).content_hash()
    assert h == ModelDir.open(tiny_model).content_hash() and h.startswith("sha256:")
    cfg = d / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace("0.012", "0.013"))
    assert ModelDir.open(d).content_hash() != h


def test_content_hash_follows_the_format_doc(tiny_model):
    """docs/FORMAT.md section 2: model_index.json and the four components, in order of relative path."""
    root = tiny_model
    files = [root / "model_index.json"] + [p for c in ("text_encoder", "tokenizer", "vae", "scheduler") for p in (root / c).rglob("*")]
    h = hashlib.sha256()
    for rel in sorted(p.relative_to(root).as_posix() for p in files if p.is_file()):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    assert ModelDir.open(root).content_hash() == "sha256:" + h.hexdigest()


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b"{broken", b"[1, 2]"], ids=["binary", "bad-json", "list"])
def test_unreadable_config_is_one_line(tiny_model, tmp_path, content):
    d = _copy(tiny_model, tmp_path / "m")
    (d / "unet" / "config.json").write_bytes(content)
    with pytest.raises(BfError, match=r"unet/config\.json: unreadable config") as e:
        ModelDir.open(d).config("unet")
    assert "\n" not in str(e.value)


def _sharded(tiny_model, tmp_path):
    d = _copy(tiny_model, tmp_path / "m")
    unet = d / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "shard-1.safetensors")
    return d, unet / "diffusion_pytorch_model.safetensors.index.json"


@pytest.mark.parametrize(
    "index",
    [
        b"\xff\xfe\x00binary",
        b"[1, 2]",
        b'{"weight_map": [1]}',
        b'{"weight_map": {"w": 3}}',
        b'{"metadata": {}}',
    ],
    ids=["binary", "list", "map-is-list", "shard-not-str", "no-map"],
)
def test_malformed_shard_index_is_one_line(tiny_model, tmp_path, index):
    d, path = _sharded(tiny_model, tmp_path)
    path.write_bytes(index)
    with pytest.raises(BfError, match="unreadable shard index") as e:
        ModelDir.open(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("shard", ["../../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_shard_names_stay_inside_the_component(tiny_model, tmp_path, shard):
    d, path = _sharded(tiny_model, tmp_path)
    path.write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors", "b": shard}}))
    with pytest.raises(BfError, match="not a file name inside unet/"):
        ModelDir.open(d).read_weights("unet")


def spec_model_hash(root: Path) -> tuple[list[str], str]:
    """base_model.hash from docs/FORMAT.md section 2's words, with os.walk (not bf's pathlib globbing):
    the hashed paths in order, and the hash."""
    files = {"model_index.json": root / "model_index.json"}
    for comp in ("text_encoder", "tokenizer", "vae", "scheduler"):
        for top, dirs, names in os.walk(root / comp):  # a linked directory is listed in dirs, never entered
            for name in dirs + names:
                p = Path(top, name)
                if p.is_file():  # a regular file, or a link to one
                    files[p.relative_to(root).as_posix()] = p
    order = sorted(files, key=lambda rel: rel.encode("utf-8"))  # UTF-8 byte order
    h = hashlib.sha256()
    for rel in order:
        h.update(rel.encode("utf-8") + b"\0" + files[rel].read_bytes())
    return order, "sha256:" + h.hexdigest()


def test_base_model_hash_recomputed_from_the_spec(tmp_path):
    root = tmp_path / "m"
    content = {
        "model_index.json": b"{}",
        "training.json": b"not hashed: not model_index.json nor under a component",
        "unet/config.json": b"not hashed",
        "text_encoder/config.json": b'{"a": 1}',
        "text_encoder/model.safetensors": bytes(range(256)),
        "tokenizer/vocab.json": b"{}",
        "tokenizer/.hidden": b"hidden files count",
        "tokenizer/a.json": b"before a/: '.' < '/'",
        "tokenizer/a/b.txt": b"nested",
        "tokenizer/z.txt": b"z",
        "tokenizer/\u00e9.txt": b"after z: U+00E9 > 'z'",
        "tokenizer/\ue000": b"before the emoji by code point (after it in UTF-16 order)",
        "tokenizer/\U0001f600": b"astral",
        "scheduler/scheduler_config.json": b"{}",
        "outside.json": b"reached through a link",
    }
    for rel, data in content.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "scheduler" / "empty").mkdir()
    (root / "vae").mkdir()
    (root / "vae" / "linked.json").symlink_to("../outside.json")  # a link to a file: hashed with the target's bytes
    (root / "vae" / "linkdir").symlink_to("../unet")  # a link to a directory: not entered
    (root / "vae" / "broken").symlink_to("nowhere")
    order, spec_hash = spec_model_hash(root)
    assert order == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/.hidden",
        "tokenizer/a.json",
        "tokenizer/a/b.txt",
        "tokenizer/vocab.json",
        "tokenizer/z.txt",
        "tokenizer/\u00e9.txt",
        "tokenizer/\ue000",
        "tokenizer/\U0001f600",
        "vae/linked.json",
    ]
    assert ModelDir(root).content_hash() == spec_hash
    (root / "tokenizer" / "a.json").write_bytes(b"edited")
    assert ModelDir(root).content_hash() == spec_model_hash(root)[1] != spec_hash


def test_shipped_base_model_hash_recomputed_from_the_spec():
    from bf.format import read_header

    recorded = read_header(REPO / "bf" / "assets" / "shapes-sd-1.99bit.bfq")["base_model"]["hash"]
    assert spec_model_hash(REPO / "bf" / "assets" / "shapes-sd")[1] == recorded


def test_file_names_that_are_not_utf8_are_one_line_errors(tmp_path):
    root = tmp_path / "m"
    (root / "vae").mkdir(parents=True)
    (root / "model_index.json").write_bytes(b"{}")
    with open(os.path.join(os.fsencode(root / "vae"), b"\xff.json"), "wb") as f:
        f.write(b"{}")
    with pytest.raises(BfError, match=r"file name 'vae/\\udcff\.json' is not UTF-8; rename the file") as e:
        ModelDir(root).content_hash()
    assert "\n" not in str(e.value)
