"""Low-bit codes read directly by the matrix-product tiles (bf.runtime.fused_layout, bf.runtime.lowbit_gemm)."""

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from bf.runtime.fused_layout import code_bits, fusable, fused_weight, unpack_words  # noqa: E402


@pytest.mark.parametrize(("levels", "bits"), [(3, 2), (4, 2), (5, 4), (9, 4), (16, 4), (17, 8), (65, 8), (256, 8), (257, 0)])
def test_code_bits_is_the_smallest_power_of_two_field(levels, bits):
    assert code_bits(levels) == bits


@pytest.mark.parametrize("levels", [3, 5, 9, 17, 65, 256])
def test_fused_words_hold_every_code_in_kh_kw_in_order(levels):
    gen = torch.Generator().manual_seed(levels)
    conv = nn.Conv2d(32, 12, 3, padding=1)
    codes = torch.randint(0, levels, (12, 3, 3, 32), generator=gen).to(torch.uint8)
    codes[0, 0, 0, : 32 // code_bits(levels)] = levels - 1  # a word with its top bit set: negative as int32
    fw = fused_weight(codes, torch.rand(12), conv, levels)
    assert fw.words.dtype == torch.int32 and fw.words.shape == (9 * 32 * code_bits(levels) // 32, 12)
    # a top code with its field's high bit set lands in the word's sign bit: the words must still hold it
    assert bool((fw.words < 0).any()) == (levels - 1 >= 1 << (fw.code_bits - 1))
    assert torch.equal(unpack_words(fw.words, fw.code_bits), codes.reshape(12, -1).to(torch.int64))
    per_word, mask = 32 // fw.code_bits, (1 << fw.code_bits) - 1
    for o, kh, kw, i in [(0, 0, 0, 0), (3, 1, 2, 5), (11, 2, 2, 31), (7, 2, 0, 17)]:  # K runs (kh, kw, in)
        k = (kh * 3 + kw) * 32 + i
        word = int(fw.words[k // per_word, o]) & 0xFFFFFFFF
        assert (word >> (k % per_word * fw.code_bits)) & mask == codes[o, kh, kw, i]
    assert (fw.kernel, fw.stride, fw.padding, fw.in_channels, fw.out_channels, fw.half) == ((3, 3), 1, 1, 32, 12, levels // 2)
    # packed a few output channels at a time (a chunk of 1, 5 and 7 channels' codes): the same words
    for chunk in (1, 5 * 288, 7 * 288 + 100):
        assert torch.equal(fused_weight(codes, torch.rand(12), conv, levels, chunk_elements=chunk).words, fw.words), chunk


def test_fusable_names_what_the_kernel_cannot_run():
    assert fusable(nn.Conv2d(64, 64, 3, padding=1), 3) is None
    assert fusable(nn.Linear(768, 320), 5) is None
    assert "grouped" in fusable(nn.Conv2d(64, 64, 3, groups=2), 3)
    assert "not a multiple of 16" in fusable(nn.Conv2d(4, 64, 3), 3)  # conv_in: 4 channels, 16 ternary codes a word
    assert "more than 8 bits" in fusable(nn.Linear(64, 64), 257)
    assert "uneven" in fusable(nn.Conv2d(64, 64, (3, 3), stride=(1, 2)), 3)
    assert "LayerNorm" in fusable(nn.LayerNorm(64), 3)


def _reference(kind, x, codes, scale, bias, levels, stride, pad):
    w = (codes.double() - levels // 2) * scale.double().view(-1, *([1] * (codes.dim() - 1)))
    b = None if bias is None else bias.double()
    if kind == "linear":
        return nn.functional.linear(x.double(), w, b)
    return nn.functional.conv2d(x.double(), w.permute(0, 3, 1, 2), b, stride, pad)


CASES = [  # kind, in, out, kernel, stride, padding, levels, input spatial size
    ("conv", 320, 320, 3, 1, 1, 3, 16),
    ("conv", 640, 320, 3, 2, 1, 5, 15),
    ("conv", 64, 96, 1, 1, 0, 9, 8),
    ("conv", 96, 48, 3, 1, 1, 17, 8),
    ("linear", 768, 320, 1, 1, 0, 65, 0),
    ("linear", 320, 1280, 1, 1, 0, 3, 0),
    ("conv", 512, 256, 3, 1, 1, 3, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_fused_kernel_computes_the_decoded_layer_with_every_tile_configuration(case):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    from bf.runtime.compiled_fused import CANDIDATES
    from bf.runtime.lowbit_gemm import CONFIGS, TileConfig, lowbit_forward

    kind, cin, cout, k, stride, pad, levels, size = case
    gen = torch.Generator(device="cuda").manual_seed(cin + cout + levels)
    module = nn.Linear(cin, cout) if kind == "linear" else nn.Conv2d(cin, cout, k, stride, pad)
    shape = (cout, cin) if kind == "linear" else (cout, k, k, cin)
    codes = torch.randint(0, levels, shape, device="cuda", generator=gen).to(torch.uint8)
    scale = torch.rand(cout, device="cuda", generator=gen) * 0.05 + 0.01
    bias = torch.randn(cout, device="cuda", generator=gen).half()
    fw = fused_weight(codes, scale, module, levels)
    if kind == "linear":
        x = torch.randn(2, 77, cin, device="cuda", generator=gen).half()  # M = 154: not a multiple of any tile
    else:
        x = torch.randn(2, cin, size, size, device="cuda", generator=gen).half().contiguous(memory_format=torch.channels_last)
    ref = _reference(kind, x, codes, scale, bias, levels, stride, pad)
    configs = [
        *CONFIGS,
        dataclasses.replace(CONFIGS[1], gather=True),  # the per-code word loads
        dataclasses.replace(CONFIGS[4], magic=False),  # int-to-float conversions
        *(TileConfig(**c) for c in CANDIDATES),  # the compiled step's tiles: split-K sized to the GPU
        TileConfig(**CANDIDATES[0], magic=False),  # 128-wide K tiles with conversions
        TileConfig(128, 128, 64, 8, 3, splits=0, gather=True, magic=False),  # (gathered 128-wide K tiles need 256 KB of shared memory)
    ]
    for cfg in configs:
        y = lowbit_forward(x, fw, cfg, bias)
        assert y.shape == ref.shape and y.dtype == torch.float16
        assert kind == "linear" or y.is_contiguous(memory_format=torch.channels_last)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-3, f"{cfg.name}: relative error {err:.2e}"  # fp32 accumulation; the fp16 output rounds at ~3e-4


@pytest.mark.gpu
def test_the_fused_kernel_refuses_float32_and_wrong_channels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    from bf.errors import BfError
    from bf.runtime.lowbit_gemm import CONFIGS, lowbit_forward

    lin = nn.Linear(64, 32)
    fw = fused_weight(torch.zeros(32, 64, dtype=torch.uint8, device="cuda"), torch.ones(32, device="cuda"), lin, 3)
    with pytest.raises(BfError, match="float16 input"):
        lowbit_forward(torch.randn(4, 64, device="cuda"), fw, CONFIGS[0])
    with pytest.raises(BfError, match="takes 64 input channels, got 48"):
        lowbit_forward(torch.randn(4, 48, device="cuda").half(), fw, CONFIGS[0])
