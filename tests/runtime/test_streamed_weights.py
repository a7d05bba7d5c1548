"""Weights decoded layer by layer into a ring of reused buffers (bf.runtime.streamed_weights)."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bf.format import Grid, QuantizedLayer  # noqa: E402
from bf.runtime.streamed_weights import channels_last_codes  # noqa: E402


@pytest.mark.parametrize(("shape", "grid"), [((8, 5, 3, 3), Grid(1)), ((7, 16, 3, 3), Grid(2)), ((6, 3, 3, 3), Grid(3, "plain")),
                                             ((5, 9, 1, 1), Grid(4)), ((4, 33, 3, 3), Grid(6))])  # fmt: skip
def test_channels_last_codes_decode_to_the_transposed_weight(shape, grid):
    rng = np.random.default_rng(sum(shape))
    layer = QuantizedLayer.from_levels("conv", rng.integers(grid.qmin, grid.qmax + 1, shape), rng.random(shape[0]) + 0.1, grid)
    moved = QuantizedLayer("conv", (shape[0], *shape[2:], shape[1]), grid, channels_last_codes(layer), layer.scale)
    assert np.array_equal(moved.dequantize(), layer.dequantize().transpose(0, 2, 3, 1))


def test_channels_last_codes_refuse_a_linear_weight():
    layer = QuantizedLayer.from_levels("fc", np.zeros((4, 8), dtype=np.int32), np.ones(4), Grid(2))
    with pytest.raises(ValueError, match="4-d conv"):
        channels_last_codes(layer)


def _tiny_streamed(native_build, monkeypatch, channels_last: bool, slots: int = 2, group: bool = True, fused: str = "off", keep: int = 0):
    """A tiny conv/linear stack: streamed copy and the same weights decoded once, both fp16 on the GPU."""
    from torch import nn

    from bf.decode_kernels import load
    from bf.runtime.streamed_weights import stream_weights

    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 8, 3, padding=1, bias=False)
            self.fc = nn.Linear(8, 6)

        twice = False  # run b twice: a forward off the learned order

        def forward(self, x):
            x = torch.relu(self.a(x))
            x = torch.relu(self.b(self.b(x)) if self.twice else self.b(x))
            return self.fc(self.c(x).mean((2, 3)))

    rng = np.random.default_rng(0)
    layers = {}
    for name, grid in (("a", Grid(2)), ("b", Grid(1)), ("c", Grid(3)), ("fc", Grid(4, "plain"))):
        shape = tuple(getattr(Net(), name).weight.shape)
        layers[name] = QuantizedLayer.from_levels(name, rng.integers(grid.qmin, grid.qmax + 1, shape), rng.random(shape[0]) * 0.2, grid)
    base = Net()
    for name, layer in layers.items():
        getattr(base, name).weight.data = torch.from_numpy(layer.dequantize())
    decoded, streamed = copy.deepcopy(base).cuda().half(), copy.deepcopy(base)
    lib = load(native_build / "libbf_decode.so")
    streamed = stream_weights(streamed, streamed, layers, channels_last=channels_last, slots=slots, decoder=lib, group=group,
                              fused=fused, keep_decoded_bytes=keep).cuda().half()  # fmt: skip
    ring = streamed.ring
    if channels_last:
        streamed = streamed.to(memory_format=torch.channels_last)
    return decoded, streamed, ring


@pytest.mark.gpu
@pytest.mark.parametrize(("channels_last", "group"), [(False, True), (True, True), (True, False)])
def test_streamed_weights_compute_what_decoded_weights_do_eager_and_graphed(native_build, monkeypatch, channels_last, group):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bf.runtime.torch_graph import GraphedCall

    decoded, streamed, ring = _tiny_streamed(native_build, monkeypatch, channels_last, group=group)
    x = torch.randn(3, 4, 12, 12, device="cuda").half()
    with torch.inference_mode():
        ref = decoded(x).float()
        first = streamed(x).float()  # learns the order (decoding on the compute stream)
        assert ring.order == [0, 1, 2, 3]
        assert ring.groups == ([[0, 1], [2], [3]] if group else [[0], [1], [2], [3]])  # a and b share a slot: 640 + 256 <= 1152
        second = streamed(x).float()  # prefetched on the side stream, 2 slots for 4 layers: every slot reused
        graphed = GraphedCall(streamed)
        replayed = [graphed(x).float().clone() for _ in range(3)]
    tol = {"atol": 2e-3, "rtol": 2e-3}  # channels-last convolutions may take other cuDNN kernels than NCHW ones
    for out in (first, second, *replayed):
        torch.testing.assert_close(out, ref, **tol)
    assert ring.buffer_bytes == 2 * (8 * 16 * 3 * 3) * 2  # two fp16 slots the size of the largest weight (c)


@pytest.mark.gpu
def test_a_forward_off_the_learned_order_is_refused(native_build, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bf.errors import BfError

    _, streamed, _ = _tiny_streamed(native_build, monkeypatch, False)
    x = torch.randn(1, 4, 8, 8, device="cuda").half()
    with torch.inference_mode():
        streamed(x)
        streamed.module.twice = True
        with pytest.raises(BfError, match="layer 1 ran at position 2, off the learned order"):
            streamed(x)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_fused_layers_leave_the_ring_and_compute_what_decoded_weights_do(native_build, monkeypatch, mode):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    from bf.runtime.torch_graph import GraphedCall

    decoded, streamed, ring = _tiny_streamed(native_build, monkeypatch, True, fused=mode)
    layers = {name: getattr(streamed.module, name) for name in ("a", "b", "c", "fc")}
    assert layers["a"].fused is None  # 4 input channels: not a whole word of 5-level codes (8 a word)
    assert all(layers[n].fused is not None for n in ("b", "c", "fc"))
    x = torch.randn(3, 4, 12, 12, device="cuda").half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = decoded(x).float()
        first = streamed(x).float()  # each fusable layer picks its kernel, then the ring learns the rest
        fused = [n for n, m in layers.items() if m.config is not None]
        if mode == "on":
            assert fused == ["b", "c", "fc"] and ring.order == [0]
            assert ring.buffer_bytes == 2 * 640 * 2  # shrunk from c's 1152 values to a's 576 (aligned to 640)
        assert all(layers[n].timings for n in ("b", "c", "fc"))
        for n in ("b", "c", "fc") if mode == "auto" else ():  # auto keeps the fastest, decode + cuDNN included
            timings = layers[n].timings
            assert min(timings, key=timings.get) == (layers[n].config.name if n in fused else "decode+op")
        assert ring.order == [i for i, n in enumerate(layers) if n not in fused]
        assert all((ring.weights[i] is None) == (n in fused) for i, n in enumerate(layers))
        graphed = GraphedCall(streamed)
        replayed = [graphed(x).float().clone() for _ in range(3)]
    for out in (first, *replayed):
        torch.testing.assert_close(out, ref, atol=3e-3, rtol=3e-3)  # the fused layers scale after accumulating


@pytest.mark.gpu
def test_weights_kept_decoded_leave_the_ring_largest_first(native_build, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bf.runtime.torch_graph import GraphedCall

    # largest first within 1500 fp16 values: c (1152), then not a (576), then b (256) and fc (48)
    decoded, streamed, ring = _tiny_streamed(native_build, monkeypatch, True, keep=1500 * 2)
    kept = [n for n in ("a", "b", "c", "fc") if getattr(streamed.module, n).decoded is not None]
    assert kept == ["b", "c", "fc"]
    assert ring.weights[0] is not None and ring.weights[1:] == [None, None, None]
    x = torch.randn(3, 4, 12, 12, device="cuda").half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = decoded(x).float()
        first = streamed(x).float()
        assert ring.order == [0]
        assert ring.buffer_bytes == 2 * 640 * 2  # slots the size of the largest weight left to stream (a: 576, aligned to 640)
        replayed = GraphedCall(streamed)(x).float()
    for out in (first, replayed):
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    assert streamed.weight_bytes == ring.weights[0].codes.numel() + 16 * 4 + (256 + 1152 + 48) * 2  # a's codes and scales, the rest fp16


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_ring_adds_a_loras_change_after_each_decode(native_build, channels_last):
    """On the CPU, with the ring's CUDA parts set aside (no streams): a group decoded into its slot, and a layer decoded
    alone in the first forward, carry ``weight + up @ down`` for the layers given a LoRA's change, in their stored
    layout (a convolution channels-last), and the plain weight for the others."""
    from bf.decode_kernels import load
    from bf.runtime.streamed_weights import WeightRing, packed_weight

    lib = load(native_build / "libbf_decode.so")

    class CpuDecode:  # the library's float32 decode, called as the ring calls the CUDA one
        def decode_cuda(self, codes, scale, spec, out):
            out.copy_(torch.from_numpy(lib.decode_cpu(codes.numpy(), scale.numpy(), spec)))

        def decode_cuda_batch(self, items, outs, max_blocks):
            for (codes, scale, spec), out in zip(items, outs, strict=True):
                self.decode_cuda(codes, scale, spec, out)

    rng = np.random.default_rng(2)
    shapes = [(8, 4, 3, 3), (6, 8), (6, 8)]
    layers = [QuantizedLayer.from_levels(f"l{i}", rng.integers(-1, 2, s), rng.random(s[0]) + 0.1, Grid(2)) for i, s in enumerate(shapes)]
    weights = [packed_weight(layer, "cpu", channels_last) for layer in layers]
    ring = WeightRing.__new__(WeightRing)
    ring.weights, ring.lib, ring.slots, ring.group, ring.max_blocks, ring.dtype = weights, CpuDecode(), 2, True, 0, torch.float32
    ring.capacity = 4096
    ring.buffers = [torch.zeros(ring.capacity) for _ in range(2)]
    ring.order = [0, 1, 2]
    ring.groups, ring.group_of, ring.offset_of = [[0, 1, 2]], [0, 0, 0], [0, 384, 512]
    g = torch.Generator().manual_seed(0)
    down_conv = torch.randn(2, 4, 3, 3, generator=g)
    stored_down = down_conv.permute(0, 2, 3, 1) if channels_last else down_conv
    ring.deltas = {
        0: (torch.randn(8, 2, generator=g), stored_down.reshape(2, -1)),
        2: (torch.randn(6, 3, generator=g), torch.randn(3, 8, generator=g)),
    }
    ring._decode_group(0)
    for k, w in enumerate(weights):
        got = w.view(ring._view(k))  # the module-shaped weight
        want = torch.from_numpy(layers[k].dequantize())
        if k in ring.deltas:
            up, down = ring.deltas[k]
            change = up @ (down_conv.reshape(2, -1) if k == 0 else down)
            want = want + change.view(want.shape)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    alone = ring.decode_alone(2)
    torch.testing.assert_close(alone, torch.from_numpy(layers[2].dequantize()) + ring.deltas[2][0] @ ring.deltas[2][1], rtol=0, atol=1e-5)
