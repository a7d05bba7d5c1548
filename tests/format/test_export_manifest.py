"""The exported directory's manifest (docs/EXPORT.md): read with validation, one-line errors, nothing lost."""

import copy
import json

import pytest

from bf.errors import BfError
from bf.format.export_manifest import ExportManifest, manifest_json, read_manifest

GRAPH = {"file": "g.onnx", "files": {"g.onnx": {"bytes": 1, "sha256": "sha256:0"}}, "inputs": [], "outputs": []}
MINIMAL = {
    "format": "bf.export",
    "format_version": 1,
    "target": "onnx-qdq",
    "graph_form": "qdq",
    "precision": "fp32",
    "model": {"source": "/m.bfq", "sha256": "sha256:1", "quantized": True, "base_model_hash": "sha256:2"},
    "scheduler": {"name": "pndm", "steps": 2, "timesteps": [981, 961, 961]},
    "image": {"height": 128, "width": 96, "max_batch": 2, "latent_scale": 8, "native": 128},
    "latent_channels": 4,
    "hidden_size": 48,
    "max_tokens": 77,
    "graphs": {"text_encoder": GRAPH, "unet": GRAPH, "vae_decoder": GRAPH},
    "packed_unet_bytes": 123,
}


def test_a_manifest_reads_into_typed_fields_and_writes_back_unchanged(tmp_path):
    m = ExportManifest.from_json(copy.deepcopy(MINIMAL))
    assert (m.target, m.graph_form, m.precision, m.engines) == ("onnx-qdq", "qdq", "fp32", None)
    assert (m.model.source, m.model.quantized, m.model.sha256) == ("/m.bfq", True, "sha256:1")
    assert (m.scheduler.name, m.scheduler.steps, m.scheduler.timesteps) == ("pndm", 2, [981, 961, 961])
    assert (m.image.height, m.image.width, m.image.max_batch, m.image.latent_scale, m.image.native) == (128, 96, 2, 8, 128)
    assert (m.latent_channels, m.hidden_size, m.max_tokens) == (4, 48, 77)
    (tmp_path / "manifest.json").write_text(manifest_json(copy.deepcopy(MINIMAL)))
    assert read_manifest(tmp_path).to_json() == MINIMAL  # optional fields (packed_unet_bytes) kept


def test_older_manifests_name_their_graph_form_by_target():
    old = {k: v for k, v in MINIMAL.items() if k != "graph_form"}
    assert ExportManifest.from_json({**old, "target": "onnx-std"}).graph_form == "std"
    assert ExportManifest.from_json({**old, "target": "trt"}).graph_form == "custom"
    no_native = {**MINIMAL, "image": {k: v for k, v in MINIMAL["image"].items() if k != "native"}}
    assert ExportManifest.from_json(no_native).image.native is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 2}, r"format bf.export v2, this bf reads bf.export v1; export again with this bf"),
        ({"format": "other"}, r"format other v1, this bf reads bf.export v1"),
        ({"target": "tflite"}, r"target 'tflite' with graph form 'qdq' is not one bf knows"),
        ({"latent_channels": "4"}, r"latent_channels is missing or not an integer"),
        ({"hidden_size": True}, r"hidden_size is missing or not an integer"),
        ({"scheduler": {"name": "pndm", "steps": 2, "timesteps": []}}, r"scheduler.timesteps must be a non-empty list of integers"),
        ({"image": {"height": 128, "width": 96, "latent_scale": 8}}, r"image.max_batch is missing or not an integer"),
        ({"graphs": {"text_encoder": GRAPH, "unet": GRAPH}}, r"graphs.vae_decoder is missing or not an object"),
        ({"model": {"quantized": True}}, r"model.source is missing or not a string"),
    ],
)
def test_a_manifest_bf_would_not_understand_is_refused_in_one_line(change, message):
    with pytest.raises(BfError, match=message):
        ExportManifest.from_json({**copy.deepcopy(MINIMAL), **change}, "d/manifest.json")
    with pytest.raises(BfError, match=message):  # and the exporter never writes one
        manifest_json({**copy.deepcopy(MINIMAL), **change})


def test_reading_a_directory_without_a_readable_manifest(tmp_path):
    with pytest.raises(BfError, match=r"no manifest.json; is this a 'bf export' output directory\?"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_bytes(b"\xff{")
    with pytest.raises(BfError, match=r"manifest.json is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(BfError, match=r"format list, this bf reads bf.export v1"):
        read_manifest(tmp_path)


def test_an_sdxl_manifest_needs_its_pooled_size():
    graphs = {**MINIMAL["graphs"], "text_encoder_2": MINIMAL["graphs"]["text_encoder"]}
    m = ExportManifest.from_json({**MINIMAL, "graphs": graphs, "family": "sdxl", "pooled_size": 1280})
    assert (m.family, m.pooled_size, m.graph_names[1]) == ("sdxl", 1280, "text_encoder_2")
    for bad in (None, 0, "1280"):
        with pytest.raises(BfError, match=f"pooled_size must be a positive integer for an SDXL export, got {bad!r}"):
            ExportManifest.from_json({**MINIMAL, "graphs": graphs, "family": "sdxl", "pooled_size": bad})
    assert ExportManifest.from_json(MINIMAL).family == "sd15"  # a manifest from before SDXL
