"""The TMA low-bit kernel for Hopper GPUs (bf.runtime.lowbit_wgmma) against the decoded layer in float64."""

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bf.runtime.fused_layout import fused_weight  # noqa: E402


def _hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA low-bit kernel is built for Hopper (sm_90)")
    pytest.importorskip("triton.experimental.gluon")


def _reference(kind, x, codes, scale, bias, levels, pad):
    w = (codes.double() - levels // 2) * scale.double().view(-1, *([1] * (codes.dim() - 1)))
    b = None if bias is None else bias.double()
    if kind == "linear":
        return nn.functional.linear(x.double(), w, b)
    return nn.functional.conv2d(x.double(), w.permute(0, 3, 1, 2), b, 1, pad)


CASES = [  # kind, in, out, kernel, levels, input spatial size (linear: rows), bias
    ("conv", 320, 320, 3, 3, 16, True),  # a 128-pixel tile is 8 rows; 320 channels: 5 K tiles a tap
    ("conv", 1280, 1280, 3, 3, 8, True),  # a 128-pixel tile is two whole images
    ("conv", 96, 48, 3, 17, 32, False),  # 8-bit codes, a half-filled K tile, 48 of 128 output rows
    ("conv", 64, 96, 1, 9, 8, True),  # 1x1: one row of pixels; 4-bit codes
    ("conv", 256, 200, 5, 5, 16, True),  # a 5x5 kernel, padding 2
    ("conv", 64, 64, 3, 3, 1, True),  # 1x1 images: PyTorch's strides along the size-1 dimensions are not NHWC's
    ("conv", 64, 64, 3, 3, (1, 8), True),  # one row an image: a tile is whole images of it
    ("linear", 768, 320, 1, 65, 77, True),  # M = 154: not a multiple of any tile
    ("linear", 1280, 10240, 1, 3, 256, False),  # M = 512
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_tma_kernel_computes_the_decoded_layer_with_every_tile_it_takes(case):
    _hopper()
    from bf.runtime.lowbit_wgmma import wgmma_forward
    from bf.runtime.tma_tiles import CONFIGS, unsupported

    kind, cin, cout, k, levels, size, has_bias = case
    gen = torch.Generator(device="cuda").manual_seed(cin + cout + levels)
    module = nn.Linear(cin, cout) if kind == "linear" else nn.Conv2d(cin, cout, k, 1, k // 2)
    shape = (cout, cin) if kind == "linear" else (cout, k, k, cin)
    codes = torch.randint(0, levels, shape, device="cuda", generator=gen).to(torch.uint8)
    scale = torch.rand(cout, device="cuda", generator=gen) * 0.05 + 0.01
    bias = torch.randn(cout, device="cuda", generator=gen).half() if has_bias else None
    fw = fused_weight(codes, scale, module, levels)
    if kind == "linear":
        x = torch.randn(2, size, cin, device="cuda", generator=gen).half()
    else:
        h, w = size if isinstance(size, tuple) else (size, size)
        x = torch.randn(2, cin, h, w, device="cuda", generator=gen).half().contiguous(memory_format=torch.channels_last)
    ref = _reference(kind, x, codes, scale, bias, levels, k // 2)
    configs = [*CONFIGS, *(dataclasses.replace(c, splits=s) for c in CONFIGS[:2] for s in (1, 3))]
    ran = 0
    for cfg in configs:
        if unsupported(tuple(x.shape), fw, cfg):
            continue
        y = wgmma_forward(x, fw, cfg, bias)
        assert y.shape == ref.shape and y.dtype == torch.float16
        assert kind == "linear" or y.is_contiguous(memory_format=torch.channels_last)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-3, f"{cfg.name}: relative error {err:.2e}"  # fp32 accumulation; the fp16 output rounds at ~3e-4
        ran += 1
    assert ran >= 4, f"only {ran} tile configurations take this layer"


@pytest.mark.gpu
def test_the_tma_kernel_refuses_what_it_cannot_run_in_one_line():
    _hopper()
    from bf.errors import BfError
    from bf.runtime.lowbit_wgmma import wgmma_forward
    from bf.runtime.tma_tiles import CONFIGS

    def fw(module):
        n = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        shape = (n, module.in_features) if isinstance(module, nn.Linear) else (n, *module.kernel_size, module.in_channels)
        return fused_weight(torch.zeros(shape, dtype=torch.uint8, device="cuda"), torch.ones(n, device="cuda"), module, 3)

    with pytest.raises(BfError, match="cannot run this layer: a strided"):
        wgmma_forward(torch.randn(2, 64, 16, 16, device="cuda").half(), fw(nn.Conv2d(64, 64, 3, 2, 1)), CONFIGS[0])
    lin = fw(nn.Linear(64, 32))
    with pytest.raises(BfError, match="float16 input"):
        wgmma_forward(torch.randn(4, 64, device="cuda"), lin, CONFIGS[0])
    with pytest.raises(BfError, match="takes 64 input channels, got 48"):
        wgmma_forward(torch.randn(4, 48, device="cuda").half(), lin, CONFIGS[0])
