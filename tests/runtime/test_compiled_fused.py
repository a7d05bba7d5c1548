"""Quantized layers run by the fused kernel inside a compiled model (bf.runtime.compiled_fused)."""

import copy
import math
import re

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bf.format import Grid  # noqa: E402
from tests.conftest import conv_linear_stack, forced_fused  # noqa: E402


@pytest.mark.parametrize(
    ("layer", "x_shape", "out_shape"),
    [
        (nn.Conv2d(64, 32, 3, padding=1), (2, 64, 8, 8), (2, 32, 8, 8)),
        (nn.Conv2d(64, 32, 3, stride=2, padding=1), (2, 64, 15, 15), (2, 32, 8, 8)),
        (nn.Conv2d(64, 32, 1), (1, 64, 5, 7), (1, 32, 5, 7)),
        (nn.Linear(64, 48), (2, 77, 64), (2, 77, 48)),
    ],
)
def test_the_fake_op_gives_the_kernels_output_shape_and_layout(layer, x_shape, out_shape):
    """What the compiler plans with: the shape the kernel returns, channels-last for a convolution."""
    from bf.runtime.compiled_fused import _layer_id
    from bf.runtime.fused_layout import fused_weight

    w = layer.weight
    stored = (w.shape[0], *w.shape[2:], w.shape[1]) if w.dim() == 4 else tuple(w.shape)  # conv rows in (kh, kw, in) order
    fw = fused_weight(torch.zeros(stored, dtype=torch.uint8), torch.ones(w.shape[0]), layer, 3)
    layer_id = _layer_id(fw, ("a tile",))
    meta = torch.empty(x_shape, device="meta", dtype=torch.float16)
    y = torch.ops.bf.lowbit_fused_layer(meta, fw.words.to("meta"), fw.scale.to("meta"), None, layer_id)
    assert tuple(y.shape) == out_shape and y.dtype == torch.float16
    assert len(out_shape) == 3 or y.is_contiguous(memory_format=torch.channels_last)
    assert _layer_id(fw, ("a tile",)) == layer_id  # one id per geometry and tile, however often it is asked


@pytest.mark.parametrize(
    ("layer", "x_shape"),
    [(nn.Conv2d(64, 32, 3, stride=2, padding=1), (2, 64, 9, 9)), (nn.Conv2d(64, 32, 1), (1, 64, 5, 7)), (nn.Linear(64, 48), (154, 64))],
)
def test_the_op_passes_torchs_custom_op_checks(layer, x_shape):
    """torch.library.opcheck on the CPU path: the fake implementation's shapes and strides equal the real output's,
    and the op traces and dispatches as registered."""
    from bf.runtime.compiled_fused import _layer_id
    from bf.runtime.fused_layout import fused_weight

    w = layer.weight
    stored = (w.shape[0], *w.shape[2:], w.shape[1]) if w.dim() == 4 else tuple(w.shape)
    gen = torch.Generator().manual_seed(1)
    fw = fused_weight(torch.randint(0, 5, stored, generator=gen).to(torch.uint8), torch.rand(w.shape[0], generator=gen), layer, 5)
    x = torch.randn(x_shape, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    for bias in (None, torch.randn(w.shape[0], generator=gen)):
        torch.library.opcheck(torch.ops.bf.lowbit_fused_layer, (x, fw.words, fw.scale, bias, _layer_id(fw, ("a tile",))))


def _stack_layers():
    """A conv/linear stack at a small latent (weights outweigh compute) on its decoded weights, and its quantized layers."""
    return conv_linear_stack((256, 512, 256, 128), (Grid(1), Grid(2), Grid(4)), 0.02)


def _stack(device: str):
    """The stack, and its layers packed channels-last for ``device``."""
    from bf.runtime.streamed_weights import packed_weight

    decoded, layers = _stack_layers()
    return decoded, {name: packed_weight(layer, device, True) for name, layer in layers.items()}


@pytest.mark.gpu
def test_fused_layers_compile_into_the_step_and_equal_the_decoded_weights(native_build):
    """On the GPU: the layers choose_fused picks (every one, forced) run the kernel inside a compiled, CUDA-graphed
    step whose other layers decode as usual, within fp32-accumulation rounding of the decoded model."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    from bf.decode_kernels import load
    from bf.runtime import compiled_fused
    from bf.runtime.compiled_fused import FusedLowBitLayer, choose_fused, fused_bytes, install_fused
    from bf.runtime.compiled_weights import compile_weights, decode_launches
    from bf.runtime.lowbit_gemm import TileConfig
    from bf.runtime.streamed_weights import fused_codes
    from bf.runtime.tma_tiles import WgmmaConfig
    from bf.runtime.torch_graph import GraphedCall

    lib = load(native_build / "libbf_decode.so")
    decoded, packed = _stack("cuda")
    decoded = decoded.cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(2, 256, 8, 8, device="cuda").half().contiguous(memory_format=torch.channels_last)
    logged = []
    chosen = choose_fused(decoded, packed, lambda: decoded(x), lib, log=logged.append)
    assert len(logged) == 4 and "GB/s" in logged[0]  # the decode's rate, then one line per class of layer
    assert all("us + its decode in the step" in m for m in logged[1:])
    assert all(("): fused" in m) == (n in chosen) for n, m in zip(("a", "b", "fc"), logged[1:], strict=True))  # the forward's order
    for m in logged[1:]:  # each verdict is the logged arithmetic: fused where the kernel beats the op plus its decode
        op, decode, fused = (float(v) for v in re.search(r"op ([\d.]+) us \+ its decode in the step ([\d.]+) us, fused ([\d.]+|inf) us",
                                                          m).groups())  # fmt: skip
        if abs(fused - (op + decode)) > 0.15:  # (the log rounds to 0.1 us)
            assert ("): fused" in m) == (fused < op + decode), m
    assert all(isinstance(cfg, (TileConfig, WgmmaConfig)) and fw.words.is_cuda for fw, cfg in chosen.values())
    # every layer fused, whatever this GPU timed: the path under test
    cfg = TileConfig(**compiled_fused.CANDIDATES[0])
    forced = {n: (fused_codes(getattr(decoded, n), p, lib), cfg) for n, p in packed.items() if n != "fc"}
    model = copy.deepcopy(decoded)
    assert install_fused(model, forced) == 2
    compile_weights(model, {"fc": packed["fc"]}, torch.float16, decoder=lib)
    assert isinstance(model.a, FusedLowBitLayer) and decode_launches(model) == 1
    assert fused_bytes(model) == sum(fw.words.nbytes + fw.scale.nbytes for fw, _ in forced.values())
    with torch.inference_mode():
        ref = decoded(x).float()
        torch._dynamo.reset()
        step = GraphedCall(torch.compile(model, fullgraph=True))
        for _ in range(3):
            got = step(x).float()
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < 2e-3, f"relative error {err:.2e}"
        torch._dynamo.reset()


def test_fused_layers_trace_whole_beside_decoded_groups_and_equal_the_decoded_model(native_build):
    """On the CPU (the op's reference path): a model whose 3x3 convolution and linear layer are fused and whose 1x1
    convolution decodes in the step traces without a graph break through both ops, and equals the decoded-weight model."""
    from bf.decode_kernels import load
    from bf.errors import BfError
    from bf.runtime.compiled_fused import FusedLowBitLayer, fused_bytes, install_fused
    from bf.runtime.compiled_weights import compile_weights, decode_launches
    from bf.runtime.streamed_weights import packed_weight

    decoded, layers = _stack_layers()
    packed = {n: packed_weight(layer, "cpu", True) for n, layer in layers.items()}
    model = copy.deepcopy(decoded)
    chosen = forced_fused(decoded, layers, ["a", "fc"])
    assert install_fused(model, chosen) == 2
    compile_weights(model, {"b": packed["b"]}, torch.float32, decoder=load(native_build / "libbf_decode.so"))
    assert isinstance(model.a, FusedLowBitLayer) and isinstance(model.fc, FusedLowBitLayer) and decode_launches(model) == 1
    assert fused_bytes(model) == sum(fw.words.nbytes + fw.scale.nbytes for fw, _ in chosen.values())
    decoded, model = decoded.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 256, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = decoded(x)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        traced = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(traced(x), ref, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
    # an NCHW input reaches the fused convolutions channels-last, the layout the kernel reads without a copy
    from bf.runtime import compiled_fused

    seen = []
    reference = compiled_fused._reference

    def watched(x, fw, bias):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.dim())
        return reference(x, fw, bias)

    compiled_fused._reference = watched
    try:
        with torch.inference_mode():
            torch.testing.assert_close(model(x.contiguous()), ref, rtol=1e-5, atol=1e-5)
            assert seen == [True, 2]
            seen.clear()
            torch._dynamo.reset()
            traced = torch.compile(model, backend="aot_eager", fullgraph=True)  # the compiled graph asks for the layout too
            torch.testing.assert_close(traced(x.contiguous()), ref, rtol=1e-5, atol=1e-5)
            assert seen == [True, 2]
            torch._dynamo.reset()
    finally:
        compiled_fused._reference = reference
    with pytest.raises(BfError, match="is a FusedLowBitLayer, not a Conv2d"):
        install_fused(model, {"a": chosen["a"]})
    with pytest.raises(BfError, match="the model has no layer 'c'"):
        install_fused(model, {"c": chosen["a"]})


@pytest.mark.parametrize("x_shape", [(2, 77, 64), (2, 3, 5, 64), (64,)])
def test_a_fused_linear_layer_takes_any_leading_dimensions(x_shape):
    """A linear layer's input of any rank (4-D ones included, which the op would read as a convolution's) gives
    F.linear's output on the weight its codes make."""
    from bf.runtime.compiled_fused import FusedLowBitLayer
    from bf.runtime.fused_layout import fused_weight

    gen = torch.Generator().manual_seed(2)
    layer = nn.Linear(64, 24)
    codes = torch.randint(0, 9, (24, 64), generator=gen).to(torch.uint8)
    scale = torch.rand(24, generator=gen)
    fused = FusedLowBitLayer(layer, fused_weight(codes, scale, layer, 9), ("a tile",))
    x = torch.randn(x_shape, generator=gen)
    with torch.inference_mode():
        y = fused(x)
    ref = nn.functional.linear(x, (codes.float() - 4) * scale[:, None], layer.bias.detach())
    assert y.shape == (*x_shape[:-1], 24)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [({"against": "fp32"}, "must be one of 'stream', 'decode', 'fp16'"),
                                                 ({"margin": 0.0}, "positive factor"),
                                                 ({"margin": float("nan")}, "positive factor")])  # fmt: skip
def test_choose_fused_refuses_a_bad_baseline_or_margin_before_any_work(kwargs, message):
    from bf.errors import BfError
    from bf.runtime.compiled_fused import choose_fused

    ran = []
    with pytest.raises(BfError, match=message):
        choose_fused(nn.Linear(4, 4), {}, lambda: ran.append(1), decoder=None, **kwargs)
    assert ran == []  # refused before the forward that finds the layers' inputs


def test_the_decode_rate_is_the_slope_over_distinct_weights_of_one_packing(monkeypatch):
    """decode_ms_per_byte times the largest weight of the most common packing alone and with the next largest that fit
    the budget in one launch, and divides the difference by the added FP16 bytes; one weight alone is decoded twice;
    a slope timing noise makes non-positive falls back to the launch's average."""
    from types import SimpleNamespace

    from bf.runtime import compiled_fused, torch_graph

    def weight(rows, cols, bits):
        return SimpleNamespace(codes=torch.zeros(1, dtype=torch.uint8), scale=torch.ones(rows), numel=rows * cols,
                               spec=SimpleNamespace(shape=(rows, cols), grid=Grid(bits)))  # fmt: skip

    decoded: list[list] = []
    decoder = SimpleNamespace(decode_cuda_batch=lambda batch, outs: decoded.append([tuple(o.shape) for o in outs]))
    fixed, per_byte = 0.004, 1e-9  # ms a launch, ms a byte

    def graph_time_ms(call):
        call()
        return fixed + per_byte * sum(2 * r * c for r, c in decoded[-1])

    monkeypatch.setattr(torch_graph, "graph_time_ms", graph_time_ms)
    weights = [weight(64, 64, 1), weight(128, 64, 1), weight(256, 64, 1), weight(512, 64, 2), weight(32, 64, 1)]
    # 1-bit is the common packing; of it 256x64 (32 KB) and 128x64 (16 KB) fit a 50 KB budget, 64x64 and 32x64 not
    assert compiled_fused.decode_ms_per_byte(weights, decoder, budget=50 * 1024) == pytest.approx(per_byte)
    assert decoded[-2:] == [[(256, 64)], [(256, 64), (128, 64)]]
    assert compiled_fused.decode_ms_per_byte(weights, decoder, budget=10**9, most=3) == pytest.approx(per_byte)
    assert decoded[-1] == [(256, 64), (128, 64), (64, 64)]
    assert compiled_fused.decode_ms_per_byte(weights[:1], decoder) == pytest.approx(per_byte)  # alone: twice
    assert decoded[-1] == [(64, 64), (64, 64)]
    monkeypatch.setattr(torch_graph, "graph_time_ms", lambda call: (call(), fixed)[1])  # no slope: the average
    assert compiled_fused.decode_ms_per_byte(weights, decoder) == pytest.approx(fixed / (2 * 64 * (256 + 128 + 64 + 32)))
    assert math.isnan(compiled_fused.decode_ms_per_byte([], decoder))
