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


def _tiny_streamed(native_build, monkeypatch, channels_last: bool, slots: int = 2, group: bool = True):
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
    streamed = stream_weights(streamed, streamed, layers, channels_last=channels_last, slots=slots, decoder=lib, group=group).cuda().half()
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
