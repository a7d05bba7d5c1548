"""Which layers and tiles the Hopper TMA kernel takes, and the views and boxes it reads (bf.runtime.tma_tiles)."""

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bf.runtime.fused_layout import fused_weight  # noqa: E402
from bf.runtime.tma_tiles import CONFIGS, SHARED_BYTES, WgmmaConfig, block_k, nhwc_view, stages, tile_box, unsupported  # noqa: E402

TILE = WgmmaConfig(64, 128, 64, 4, 3)


def _fw(module, levels=3):
    n = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    shape = (n, module.in_features) if isinstance(module, nn.Linear) else (n, *module.kernel_size, module.in_channels)
    return fused_weight(torch.zeros(shape, dtype=torch.uint8), torch.ones(n), module, levels)


def test_unsupported_names_what_the_kernel_cannot_run_and_takes_the_rest():
    conv = _fw(nn.Conv2d(64, 64, 3, padding=1))
    assert unsupported((2, 64, 16, 16), conv, TILE) is None  # 8 rows of 16
    assert unsupported((2, 64, 8, 8), conv, TILE) is None  # two whole 8x8 images
    assert unsupported((2, 64, 1, 8), conv, TILE) is None  # 16 one-row images
    assert unsupported((2, 64, 16, 16), _fw(nn.Conv2d(64, 64, 5, padding=2)), TILE) is None
    assert unsupported((2, 64, 16, 16), _fw(nn.Conv2d(64, 64, 1)), TILE) is None
    assert unsupported((2, 77, 64), _fw(nn.Linear(64, 32)), TILE) is None
    assert "strided" in unsupported((2, 64, 16, 16), _fw(nn.Conv2d(64, 64, 3, 2, 1)), TILE)
    assert "size-changing" in unsupported((2, 64, 16, 16), _fw(nn.Conv2d(64, 64, 3)), TILE)  # no padding
    assert "strided or padded 1x1" in unsupported((2, 64, 16, 16), _fw(nn.Conv2d(64, 64, 1, 2)), TILE)
    assert "whole rows of width 24" in unsupported((2, 64, 24, 24), conv, TILE)
    assert "whole rows of one 12x16 image" in unsupported((2, 64, 12, 16), conv, TILE)  # 8 rows do not divide 12
    assert "whole rows of width 512" in unsupported((1, 64, 1, 512), conv, WgmmaConfig(64, 256, 64, 4, 3))
    assert "multiple of 16 bytes" in unsupported((2, 77, 36), _fw(nn.Linear(36, 32), 65), TILE)  # 8-bit codes: 4 a word
    assert "output channels" in unsupported((2, 77, 64), _fw(nn.Linear(64, 30)), TILE)
    assert "warp-group" in unsupported((2, 77, 64), _fw(nn.Linear(64, 32)), WgmmaConfig(64, 128, 64, 8, 3))  # 8 warps x 16 rows
    assert "whole words" in unsupported((2, 77, 72), _fw(nn.Linear(80, 32)), TILE)  # 72 channels: 4.5 words of 16
    assert "warp-group" in unsupported((2, 77, 64), _fw(nn.Linear(64, 32)), WgmmaConfig(64, 128, 64, 2, 3))  # half a group
    assert "cannot split 64" in unsupported((2, 77, 64), _fw(nn.Linear(64, 32)), WgmmaConfig(64, 128, 64, 4, 3, decode_warps=6))


@pytest.mark.parametrize(
    ("shape", "block_m", "box"),
    [
        ((2, 16, 16, 64), 128, [1, 8, 16]),  # whole rows of one image
        ((2, 64, 64, 64), 128, [1, 2, 64]),
        ((2, 8, 8, 64), 128, [2, 8, 8]),  # whole images
        ((2, 8, 8, 64), 64, [1, 8, 8]),
        ((2, 1, 8, 64), 128, [16, 1, 8]),  # one-row images: still whole images, not one long row
        ((1, 1, 154, 64), 128, [1, 1, 128]),  # a linear layer's rows
    ],
)
def test_the_box_is_whole_rows_or_whole_images_of_block_m_pixels(shape, block_m, box):
    assert tile_box(torch.empty(shape), block_m) == box


def _pixels(box, start, b, h, w):
    """The (image, row, column) of each of the box's pixels at its first tap's origin (the kernel's mapping), inside
    the input."""
    img0, row0, col0 = start // (h * w), start // w % h, start % w
    return [(img0 + i, row0 + r, col0 + c) for i in range(box[0]) for r in range(box[1]) for c in range(box[2])
            if img0 + i < b and row0 + r < h and col0 + c < w]  # fmt: skip


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_every_accepted_convolution_tile_covers_its_own_pixels_in_order(cfg):
    # The kernel writes the tile's block_m outputs at pixels pixel0 .. pixel0 + block_m - 1 (NHWC order), from the
    # box at (image, row, column) of pixel0: the box must hold exactly those pixels, in that order, and no others.
    conv = _fw(nn.Conv2d(64, 64, 3, padding=1))
    accepted = 0
    for b, h, w in [(2, 8, 8), (2, 16, 16), (1, 16, 16), (2, 32, 32), (2, 64, 64), (3, 4, 4), (2, 1, 8), (2, 1, 1),
                    (1, 1, 8), (2, 12, 12), (2, 24, 24), (2, 12, 16), (4, 2, 32)]:  # fmt: skip
        if unsupported((b, 64, h, w), conv, cfg):
            continue
        accepted += 1
        box = tile_box(torch.empty(b, h, w, 64), cfg.block_m)
        m = b * h * w
        for start in range(0, m, cfg.block_m):
            want = [(p // (h * w), p // w % h, p % w) for p in range(start, min(m, start + cfg.block_m))]
            assert _pixels(box, start, b, h, w) == want, (b, h, w, start, box)
    assert accepted >= 6


def test_the_input_view_is_dense_nhwc_even_along_size_one_dimensions():
    conv = _fw(nn.Conv2d(64, 64, 3, padding=1))
    x = torch.randn(2, 64, 1, 1)  # NCHW-contiguous, which PyTorch also calls channels-last: strides (64, 1, 1, 1)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.stride() == (64, 1, 1, 1)
    view, m, out_shape = nhwc_view(x, conv)
    assert view.stride() == (64, 64, 64, 1) and m == 2 and out_shape == (2, 64, 1, 1)
    assert torch.equal(view, x.permute(0, 2, 3, 1))

    x = torch.randn(2, 64, 6, 5).contiguous(memory_format=torch.channels_last)
    view, m, _ = nhwc_view(x, conv)
    assert view.shape == (2, 6, 5, 64) and m == 60 and torch.equal(view, x.permute(0, 2, 3, 1))
    view, m, out_shape = nhwc_view(torch.randn(2, 64, 6, 5), conv)  # NCHW input: made channels-last first
    assert view.stride() == (6 * 5 * 64, 5 * 64, 64, 1) and out_shape == (2, 64, 6, 5)

    pointwise = _fw(nn.Conv2d(64, 32, 1))
    view, m, out_shape = nhwc_view(x, pointwise)  # one row of all 60 pixels
    assert view.shape == (1, 1, 60, 64) and out_shape == (2, 32, 6, 5)
    assert torch.equal(view[0, 0], x.permute(0, 2, 3, 1).reshape(60, 64))

    lin = _fw(nn.Linear(64, 32))
    buf = torch.randn(2 * 77 * 64 + 1)
    x = buf[1:].view(2, 77, 64)  # starts 4 bytes into its buffer: TMA wants 16-byte aligned rows
    view, m, out_shape = nhwc_view(x, lin)
    assert view.data_ptr() % 16 == 0 and view.shape == (1, 1, 154, 64) and m == 154 and out_shape == (2, 77, 32)
    assert torch.equal(view[0, 0], x.reshape(154, 64))


def test_k_tiles_give_the_words_tile_eight_rows_and_stages_fit_in_shared_memory():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    assert [block_k(TILE, _fw(conv, levels)) for levels in (3, 5, 65)] == [128, 64, 64]  # 2-, 4- and 8-bit codes
    # per stage: the input box and the FP16 weight tile (2 bytes a code), the words, three barriers
    assert SHARED_BYTES == 231424  # 227 KiB less 1 KiB of margin
    assert stages(WgmmaConfig(128, 128, 64, 8, 3), 128, 2) == 3  # 69,656 bytes a stage: 208,968
    assert stages(WgmmaConfig(64, 256, 64, 4, 3), 128, 2) == 2  # 83,992: a third (251,976) does not fit
    assert stages(WgmmaConfig(64, 256, 64, 4, 3), 64, 4) == 3  # 4-bit codes, K tiles of 64: 42,008
    assert stages(WgmmaConfig(64, 64, 64, 4, 6), 64, 2) == 6


def test_a_tma_tile_runs_on_the_triton_kernel_where_it_cannot_take_the_input(monkeypatch):
    # the compiled layer keeps the tile chosen at one input shape; another shape it cannot take (a 12-pixel-wide
    # latent) runs on the Triton kernel's first tile instead of failing inside the step
    import sys
    import types

    from bf.runtime import compiled_fused

    calls = []
    gemm = types.ModuleType("bf.runtime.lowbit_gemm")
    gemm.TileConfig = lambda **kw: ("tile", tuple(sorted(kw.items())))
    gemm.lowbit_forward = lambda x, fw, cfg, bias: calls.append(("triton", cfg)) or x
    wgmma = types.ModuleType("bf.runtime.lowbit_wgmma")
    wgmma.wgmma_forward = lambda x, fw, cfg, bias: calls.append(("tma", cfg)) or x
    monkeypatch.setitem(sys.modules, "bf.runtime.lowbit_gemm", gemm)
    monkeypatch.setitem(sys.modules, "bf.runtime.lowbit_wgmma", wgmma)
    conv = _fw(nn.Conv2d(64, 64, 3, padding=1))
    compiled_fused._forward(torch.empty(2, 64, 16, 16), conv, TILE, None)
    compiled_fused._forward(torch.empty(2, 64, 12, 12), conv, TILE, None)
    assert calls == [("tma", TILE), ("triton", gemm.TileConfig(**compiled_fused.CANDIDATES[0]))]


def test_tma_tiles_are_offered_only_on_sm90_with_triton_3_6(monkeypatch):
    from bf.runtime import compiled_fused

    conv = _fw(nn.Conv2d(64, 64, 3, padding=1))
    x = torch.empty(2, 64, 12, 16)  # 8 rows do not divide 12: the 128-pixel tiles are out, the 64-pixel ones take it
    for capability, gluon, offered in [((9, 0), True, True), ((8, 0), True, False), ((10, 0), True, False), ((9, 0), False, False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(compiled_fused, "_gluon_for_hopper", lambda g=gluon: g)
        tiles = compiled_fused._wgmma_configs(x, conv)
        assert bool(tiles) == offered
        if offered:
            assert tiles == [c for c in CONFIGS if c.block_m == 64]
