"""LoRA adapters on the torch backend (bf infer --lora): low-rank branches hooked beside the UNet's layers in whatever
form the weights take, equal to the same LoRA as branches around the decoded-weight layers (what bf export traces)."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from conftest import random_lora_file  # noqa: E402


def test_the_unet_runs_loras_beside_compiled_low_bit_layers(tiny_model, native_build, monkeypatch, tmp_path):
    """Two LoRAs at their scales (attention projections, both on to_q, and ResNet convolutions) on TorchUNet's
    compiled low-bit layers (the weights decoded inside the step, the LoRAs added to them there) and on its fp form
    (hooked branches): equal, step for step, to the decoded-weight UNet with the same LoRAs as export's branches;
    dynamo traces the step whole; the low-bit layers stay packed codes."""
    from test_compiled_weights import _tiny_unet

    from bf.lora_adapters import apply_loras
    from bf.runtime.backend_torch import TorchUNet
    from bf.runtime.compiled_weights import CompiledLowBitGroup

    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    decoded, packed = _tiny_unet(tiny_model, "cpu", channels_last=False)
    loras = [(random_lora_file(tmp_path / "a.safetensors", decoded), 0.7),
             (random_lora_file(tmp_path / "b.safetensors", decoded, seed=1, targets=("to_q", "0")), 1.5)]  # fmt: skip
    reference = copy.deepcopy(decoded)
    applied = apply_loras(reference, loras)
    from safetensors.torch import load_file

    assert [a["layers"] for a in applied] == [len(load_file(str(f))) // 2 for f, _ in loras] and min(a["layers"] for a in applied) > 8
    timesteps = torch.arange(900, -1, -100)
    opts = {"device": "cpu", "dtype": "float32", "channels_last": False, "cuda_graph": False}
    ref = TorchUNet(reference, timesteps, weights="fp", **opts)
    plain = TorchUNet(copy.deepcopy(decoded), timesteps, weights="fp", **opts)
    fp = TorchUNet(copy.deepcopy(decoded), timesteps, weights="fp", loras=loras, **opts)
    ours = TorchUNet(copy.deepcopy(decoded), timesteps, packed, weights="streamed", compile=True, loras=loras, **opts)
    assert any(isinstance(m, CompiledLowBitGroup) for m in ours.unet.modules())
    assert [a["layers"] for a in ours.lora.applied] == [a["layers"] for a in applied]
    # every branch is a change of its layer's weight, added where the step builds the weight; none is hooked; layers
    # of one shape and rank share one batched product
    runs = [run for m in ours.unet.modules() if isinstance(m, CompiledLowBitGroup) for run in m.lora_runs]
    assert sum(run[1] for run in runs) == len({h.layer for h in ours.lora.hooks}) and ours.lora.counts["hooked"] == 0
    assert max(run[1] for run in runs) >= 2
    sample, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, decoded.config.cross_attention_dim)
    with torch.inference_mode():
        for i in (0, 5):
            step = torch.tensor([i])
            want = ref.eager_step(sample, step, ctx)
            assert torch.equal(fp.eager_step(sample, step, ctx), want)
            # the low-bit layers' LoRAs are changes of their weights, built in the step: float32 rounding apart
            torch.testing.assert_close(ours.eager_step(sample, step, ctx), want, rtol=0, atol=2e-5 * want.abs().max().item())
            assert (want - plain.eager_step(sample, step, ctx)).abs().max() > 1e-2  # the LoRAs change the output
        # dynamo traces the step whole through the group ops (inductor's kernels: the GPU tests)
        traced = torch.compile(ours.eager_step, fullgraph=True, backend="eager")
        assert torch.equal(traced(sample, torch.tensor([3]), ctx), ours.eager_step(sample, torch.tensor([3]), ctx))
    # a LoRA'd layer left in full precision inside a block (as a kept-decoded one is): its branch stays a hook, on the
    # layer inside the compiled group
    fp_layer = next(n for n in packed if n.endswith("resnets.0.conv1"))
    partial = TorchUNet(copy.deepcopy(decoded), timesteps, {n: p for n, p in packed.items() if n != fp_layer}, weights="streamed",
                        compile=True, loras=loras, **opts)  # fmt: skip
    assert [h.layer for h in (partial.lora.hooks[i] for i in range(len(partial.lora.hooks))
                              if i not in partial.lora._in_weights)] == [fp_layer]  # fmt: skip
    assert partial.lora.counts["hooked"] == 1
    with torch.inference_mode():
        want = ref.eager_step(sample, torch.tensor([5]), ctx)
        got = partial.eager_step(sample, torch.tensor([5]), ctx)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())


def test_a_lora_that_does_not_fit_is_refused_before_the_weights_move(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from bf.errors import BfError
    from bf.runtime.backend_torch import TorchUNet

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    good = load_file(str(random_lora_file(tmp_path / "a.safetensors", unet)))
    key = next(k for k in good if k.endswith("to_q.lora_A.weight"))
    save_file({**good, key: good[key][:, :-1].contiguous()}, str(tmp_path / "rank.safetensors"))
    save_file({k.replace("down_blocks", "middle_blocks"): v for k, v in good.items()}, str(tmp_path / "other.safetensors"))
    for name, message in (("rank", "features, the layer"), ("other", "matches no layer of this UNet")):
        with pytest.raises(BfError, match=message):
            TorchUNet(unet, torch.arange(10), weights="fp", device="cpu", dtype="float32", cuda_graph=False,
                      loras=[(tmp_path / f"{name}.safetensors", 1.0)])  # fmt: skip


@pytest.mark.gpu
def test_bf_infer_lora_on_the_gpu_equals_the_export_that_holds_it(tmp_path, native_build, monkeypatch):
    """bf infer --backend torch --lora FILE:0.8 (streamed ring, CUDA graph; and compiled) on an export without the LoRA
    equals bf infer (ONNX Runtime) on the export that holds it (>= 35 dB), and differs from the model without it."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import numpy as np
    from conftest import run_bf
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from bf.format import Checkpoint
    from bf.models.shipped import shipped_bfq

    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    unet = UNet2DConditionModel.from_config(Checkpoint.load(shipped_bfq()).unet_config)  # the layers' names and shapes
    lora = random_lora_file(tmp_path / "style.safetensors", unet)
    for name, extra in (("with", ["--lora", f"{lora}:0.8"]), ("plain", [])):
        r = run_bf("export", "shipped-1.99bit", "--target", "onnx-std", "--steps", "3", *extra, "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
    args = ["--prompt", "a red circle above a blue square", "--seed", "7"]

    def image(*cmd) -> np.ndarray:
        out = tmp_path / f"{len(list(tmp_path.glob('*.png')))}.png"
        r = run_bf("infer", *cmd, *args, "--out", out)
        assert r.returncode == 0, r.stderr
        return np.asarray(Image.open(out)).astype(np.float32) / 255

    want = image(tmp_path / "with")
    for options in ([], ["--compile"]):
        ours = image(tmp_path / "plain", "--backend", "torch", "--lora", f"{lora}:0.8", *options)
        mse = float(((ours - want) ** 2).mean())
        assert mse == 0 or 10 * np.log10(1 / mse) >= 35, options
    assert np.abs(image(tmp_path / "plain", "--backend", "torch") - want).max() > 0.1
