"""The low-bit layers of a model loaded through diffusers' ``bitsfusion`` backend (bf.diffusers), made to run like the
torch backend's compiled step: each UNet block's weights decoded by one launch of the custom op inside the model
(bf.runtime.compiled_weights), so that ``torch.compile`` fuses the work around them and CUDA graphs replay them.

    import bf.diffusers
    from bf.runtime.diffusers_layers import compile_low_bit_layers
    pipe = DiffusionPipeline.from_pretrained(DIR, dtype=torch.float16).to("cuda")
    compile_low_bit_layers(pipe.unet)
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")  # optional: fused kernels, CUDA graphs

Load LoRAs first (``pipe.load_lora_weights``): each stays a branch beside its layer (peft keeps the layer as its
``base_layer``), and ``set_adapters`` works after. Unloading them or loading others needs the model loaded again:
each block now sits inside its decode group, under names peft does not expect. Call it once the model is on the
device it runs on: the codes are the decode groups' plain attributes, which ``.to()`` does not move. The packed
codes stay on that device; no decoded copy is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from bf.format import QuantizedLayer
from bf.module_paths import parent_and_attribute


def compile_low_bit_layers(unet: nn.Module, decoder=None, by_block: bool = True) -> int:
    """Every bitsfusion layer (bf.diffusers.LowBitLayer) of ``unet`` decoded inside the model by the compiled-weights
    custom ops, in place; returns how many. ``by_block``: one decode launch per UNet block (else one per layer);
    ``decoder``: the decode library (bf.decode_kernels.load() when None)."""
    from bf.diffusers.layers import LowBitLayer
    from bf.runtime.compiled_weights import compile_weights
    from bf.runtime.streamed_weights import packed_weight

    low = {name: m for name, m in unet.named_modules() if isinstance(m, LowBitLayer)}
    if not low:
        return 0
    packed = {}
    for name, m in low.items():
        layer = QuantizedLayer(name, m.shape, m.grid, m.codes.cpu().numpy(), m.scale.cpu().numpy())
        packed[name] = packed_weight(layer, str(m.codes.device), channels_last=False)
        parent, child = parent_and_attribute(unet, name)
        setattr(parent, child, _plain_layer(m))
    floats = [p for p in unet.parameters() if p.is_floating_point() and not p.is_meta]
    dtype, device = (floats[0].dtype, floats[0].device) if floats else (torch.float32, next(iter(low.values())).codes.device)
    compile_weights(unet, packed, dtype, decoder=decoder, by_block=by_block)
    # the placeholder weights in the model's dtype and on its device: diffusers reads both off the first parameter
    for p in unet.parameters():
        if p.numel() == 0:
            p.data = torch.empty(0, dtype=dtype, device=device)
    return len(packed)


def _plain_layer(m: nn.Module) -> nn.Module:
    """The nn.Linear / nn.Conv2d a low-bit layer stands for, its weight on the meta device (compile_weights replaces it
    with a placeholder; the op decodes the real one), its bias kept."""
    bias = m.bias is not None
    if isinstance(m, nn.Conv2d):
        plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, bias,
                          m.padding_mode, device="meta")  # fmt: skip
    else:
        plain = nn.Linear(m.in_features, m.out_features, bias, device="meta")
    if bias:
        plain.bias = nn.Parameter(m.bias.detach(), requires_grad=False)
    return plain
