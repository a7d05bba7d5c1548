"""Tracing the three components to ONNX (TorchScript-based exporter: it is the one that turns an
autograd Function's ``symbolic`` into a custom-domain node), and the graphs' input/output contract."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from bf.export.torch_modules import LowBitWeight
from bf.format.dequant_op import DOMAIN, OP_VERSION

OPSET = 18
IR_VERSION = 8  # the newest IR version every runtime we target reads (ONNX Runtime 1.30 reads up to 13, TensorRT 10 up to 10)
EXTERNAL_DATA_OVER = 1_800_000_000  # protobuf caps a file at 2 GiB


@dataclass(frozen=True)
class GraphSpec:
    """One component's graph: file, input and output names and dynamic axes."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


TEXT_ENCODER = GraphSpec("text_encoder", ("input_ids",), ("hidden_states",), {"input_ids": {0: "batch"}, "hidden_states": {0: "batch"}})
UNET = GraphSpec(
    "unet",
    ("sample", "step", "encoder_hidden_states"),
    ("noise_pred",),
    {
        "sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
        "encoder_hidden_states": {0: "batch"},
        "noise_pred": {0: "batch", 2: "latent_height", 3: "latent_width"},
    },
)
VAE_DECODER = GraphSpec(
    "vae_decoder",
    ("latent",),
    ("image",),
    {"latent": {0: "batch", 2: "latent_height", 3: "latent_width"}, "image": {0: "batch", 2: "height", 3: "width"}},
)
GRAPHS = (TEXT_ENCODER, UNET, VAE_DECODER)

# SDXL: the second text encoder gives its pooled projection too; the UNet takes it and the micro-conditioning
TEXT_ENCODER_2 = GraphSpec(
    "text_encoder_2",
    ("input_ids",),
    ("hidden_states", "text_embeds"),
    {"input_ids": {0: "batch"}, "hidden_states": {0: "batch"}, "text_embeds": {0: "batch"}},
)
UNET_XL = GraphSpec(
    "unet",
    (*UNET.inputs, "text_embeds", "time_ids"),
    UNET.outputs,
    {**UNET.dynamic, "text_embeds": {0: "batch"}, "time_ids": {0: "batch"}},
)
XL_GRAPHS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET_XL, VAE_DECODER)


def graph_specs(family: str) -> tuple[GraphSpec, ...]:
    return XL_GRAPHS if family == "sdxl" else GRAPHS


def trace_to_onnx(module: torch.nn.Module, args: tuple, spec: GraphSpec) -> onnx.ModelProto:
    """The traced graph, in memory (the caller decides where and how it is written).

    Traced into a scratch file, not a buffer: a full-size FP UNet is over protobuf's 2 GiB, which
    the exporter can only write with its weights as external data beside a file."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bf-trace-") as scratch:
        path = Path(scratch) / spec.file
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                module.eval(),
                args,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic,
                custom_opsets={DOMAIN: OP_VERSION} if any(isinstance(m, LowBitWeight) for m in module.modules()) else None,
                do_constant_folding=True,
            )
        model = onnx.load(str(path))  # with its external data, if the exporter wrote any
    model.ir_version = IR_VERSION
    return model


def save_graph(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``model`` (with its weights in ``<file>.data`` when too big for one protobuf); the files written."""
    if model.ByteSize() > EXTERNAL_DATA_OVER:
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        return [path, data]
    onnx.save_model(model, path)
    return [path]


FP16_MIN_ELEMENTS = 16  # smaller tensors are not worth a Cast node


def store_exact_fp16(model: onnx.ModelProto, keep: set[str] = frozenset()) -> int:
    """Store float32 initializers whose every value is a float16 number as float16 followed by a
    Cast to float32 (lossless: biases and norms of a .bfq, weights of an fp16 base model).

    The graph's types are unchanged; runtimes fold the Cast when they load it. Returns the bytes saved."""
    import numpy as np
    from onnx import helper, numpy_helper

    consumers = {i for n in model.graph.node for i in n.input}
    saved, casts, kept = 0, [], []
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in keep or init.name not in consumers:
            kept.append(init)
            continue
        a = numpy_helper.to_array(init)
        h = a.astype(np.float16)
        if a.size < FP16_MIN_ELEMENTS or not np.array_equal(h.astype(np.float32), a, equal_nan=True):
            kept.append(init)
            continue
        kept.append(numpy_helper.from_array(h, init.name + "__fp16"))
        casts.append(helper.make_node("Cast", [init.name + "__fp16"], [init.name], name=init.name + "__cast", to=onnx.TensorProto.FLOAT))
        saved += a.nbytes - h.nbytes
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return saved
