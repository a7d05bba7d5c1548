"""Training an SDXL UNet: the trainer's one conditioning tensor carries the pooled prompt and micro-conditioning, and
the UNet fed it equals the UNet fed what StableDiffusionXLPipeline computes."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from conftest import run_bf  # noqa: E402


def test_packed_conditioning_equals_the_pipelines(tiny_sdxl_model):
    from bf.models.diffusers_pipeline import load_model
    from bf.trainer.frozen import XLTextEncoder, conditioning_for

    pipe = load_model(tiny_sdxl_model).pipe
    unet = pipe.unet
    enc = conditioning_for(pipe.components, [unet], "cpu", 64)
    assert isinstance(enc, XLTextEncoder)
    captions = ["a red circle above a blue square", ""]
    packed = enc(captions)
    hidden, _, pooled, _ = pipe.encode_prompt(captions[0], do_classifier_free_guidance=True, negative_prompt=None)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        ref = unet(x, t, hidden, added_cond_kwargs=added).sample
        ours = unet(x, t, packed[:1]).sample  # unpacked by the hook
        zero_added = {"text_embeds": torch.zeros_like(pooled), "time_ids": added["time_ids"]}
        empty_ref = unet(x, t, torch.zeros_like(hidden), added_cond_kwargs=zero_added).sample
        empty = unet(x, t, packed[1:]).sample
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float((empty - empty_ref).abs().max()) <= 1e-5  # the empty caption: zeros, as SDXL's pipeline feeds it
    assert float((ours - empty).abs().max()) > 1e-3
    # a pipeline's own calls (added_cond_kwargs given) are untouched by the hook
    image = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_bf_train_runs_on_sdxl(tiny_sdxl_model, tmp_path):
    """Stage I and II on an SDXL UNet: its time projections and added embedding are trained quantized layers."""
    from bf.format import Checkpoint

    r = run_bf("train", "--model", tiny_sdxl_model, "--images", "16", "--uniform-bits", "2", "--stage1-steps", "4",
               "--stage2-steps", "2", "--batch-size", "8", "--out", tmp_path / "xl.bfq")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ckpt = Checkpoint.load(tmp_path / "xl.bfq")
    assert "add_embedding.linear_1" in ckpt.layers and "up_blocks.0.resnets.0.time_emb_proj" in ckpt.layers
    assert ckpt.unet_config["addition_embed_type"] == "text_time"
    rows = (tmp_path / "xl.bfq.work" / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6
