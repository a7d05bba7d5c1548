"""bf.runtime.diffusers_layers: a bitsfusion UNet loaded by diffusers, its low-bit layers turned into the compiled
step's decode ops (one launch per block), gives the same outputs, with and without a LoRA (loaded before), and traces
whole."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("accelerate")


def test_compiled_low_bit_layers_equal_the_layers_they_replace(diffusers_dir, native_build, monkeypatch, tmp_path):
    pytest.importorskip("peft")
    from conftest import random_lora_file
    from diffusers import UNet2DConditionModel

    from bf.diffusers import LowBitLayer
    from bf.runtime.compiled_weights import CompiledLowBitGroup, decode_launches
    from bf.runtime.diffusers_layers import compile_low_bit_layers

    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet").eval()
    n_low = sum(isinstance(m, LowBitLayer) for m in unet.modules())
    sample, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        want = unet(sample, t, ctx).sample
        assert compile_low_bit_layers(unet) == n_low > 100
        assert not any(isinstance(m, LowBitLayer) for m in unet.modules()) and any(
            isinstance(m, CompiledLowBitGroup) for m in unet.modules()
        )
        assert 0 < decode_launches(unet) < n_low  # grouped by block
        assert unet.device.type == "cpu" and unet.dtype == torch.float32  # what diffusers reads off the first parameter
        assert torch.equal(unet(sample, t, ctx).sample, want)
        traced = torch.compile(unet, fullgraph=True, backend="eager")
        assert torch.equal(traced(sample, t, ctx).sample, want)
    # a LoRA loaded before runs beside the compiled layers (peft keeps each as its base_layer): as on diffusers' layers
    ref = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet").eval()
    lora = random_lora_file(tmp_path / "a.safetensors", ref, targets=("to_q", "to_v", "conv1"))
    ours = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet").eval()
    for m in (ref, ours):
        m.load_lora_adapter(str(lora), prefix="unet", adapter_name="a")
    assert compile_low_bit_layers(ours) == n_low
    with torch.no_grad():
        with_lora = ref(sample, t, ctx).sample
        assert (with_lora - want).abs().max() > 1e-3 and torch.equal(ours(sample, t, ctx).sample, with_lora)
        ours.set_adapters(["a"], [0.5])
        ref.set_adapters(["a"], [0.5])
        assert torch.equal(ours(sample, t, ctx).sample, ref(sample, t, ctx).sample)
