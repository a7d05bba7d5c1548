"""Which layers and tiles the Hopper TMA kernel takes, and the views and boxes it reads (bf.runtime.tma_tiles)."""

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bf.runtime.fused_layout import fused_weight  # noqa: E402
from bf.runtime.tma_tiles import SHARED_BYTES, WgmmaConfig, block_k, nhwc_view, stages, tile_box, unsupported  # noqa: E402

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
    assert box[0] * box[1] * box[2] == block_m


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
    assert stages(WgmmaConfig(128, 128, 64, 8, 3), 128, 2) == 3  # 69,656 bytes a stage
    assert stages(WgmmaConfig(64, 256, 64, 4, 3), 128, 2) == 2  # 83,992: a third does not fit
    assert stages(WgmmaConfig(64, 256, 64, 4, 3), 128, 2) * (2 * 128 * 320 + 128 * 2 // 8 * 64 + 24) <= SHARED_BYTES
    assert stages(WgmmaConfig(64, 64, 64, 4, 6), 64, 2) == 6
