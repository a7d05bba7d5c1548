"""Time-feature caching: the UNet driven by step index equals the original at those timesteps."""

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from bf.models.architectures import SD15_SCHEDULER, TINY_UNET  # noqa: E402
from bf.models.time_cache import cache_time_features, resblock_time_projections, sampler_timesteps, time_feature_table  # noqa: E402


def _unet(seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make the time path matter
        for p in unet.time_embedding.parameters():
            p.mul_(3.0)
    return unet


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "dpmpp2m"])
def test_cached_unet_equals_original_at_every_sampler_step(scheduler):
    unet = _unet()
    ts = sampler_timesteps(scheduler, SD15_SCHEDULER, 50)
    assert len(ts) == (51 if scheduler == "pndm" else 50)  # PNDM (skip-PRK) calls the UNet once more
    torch.manual_seed(1)
    size = TINY_UNET["sample_size"]
    x = torch.randn(2, 4, size, size)
    enc = torch.randn(2, 77, TINY_UNET["cross_attention_dim"])
    with torch.no_grad():
        ref = [unet(x, t, enc).sample for t in ts.tolist()]
        cached = cache_time_features(unet, ts)
        worst = max(float((cached(x, k, enc) - r).abs().max()) for k, r in enumerate(ref))
        # per-sample indices in one batch
        both = cached(x, torch.tensor([3, 40]), enc)
    assert worst <= 1e-5
    assert torch.allclose(both[0], ref[3][0], atol=1e-5) and torch.allclose(both[1], ref[40][1], atol=1e-5)
    # sensitivity: a neighbouring step is visibly different, so the check above can fail
    assert float((ref[10] - ref[11]).abs().max()) > 1e-3


def test_time_layers_are_gone_and_the_table_has_the_paper_shape():
    unet = _unet()
    ts = sampler_timesteps("pndm", SD15_SCHEDULER, 50)
    n_proj = len(resblock_time_projections(unet))
    table = time_feature_table(unet, ts)
    assert len(table) == n_proj and all(v.shape[0] == len(ts) for v in table.values())
    cached = cache_time_features(unet, ts)
    names = [n for n, _ in cached.named_parameters()]
    assert not [n for n in names if "time_emb" in n]  # time_embedding.* and *.time_emb_proj.* removed
    assert sum(v.numel() for v in table.values()) == sum(b.numel() for n, b in cached.named_buffers() if n.endswith(".table"))


def test_fp16_table_stays_close():
    unet = _unet()
    ts = sampler_timesteps("ddim", SD15_SCHEDULER, 10)
    size = TINY_UNET["sample_size"]
    x, enc = torch.randn(1, 4, size, size), torch.randn(1, 77, TINY_UNET["cross_attention_dim"])
    with torch.no_grad():
        ref = unet(x, int(ts[4]), enc).sample
        out = cache_time_features(unet, ts, dtype=torch.float16)(x, 4, enc)
    err = float((out - ref).abs().max())
    assert 0 < err < 1e-2


def _sdxl_unet(seed=0):
    from bf.models.architectures import TINY_SDXL_UNET

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**TINY_SDXL_UNET).eval()
    with torch.no_grad():
        for p in [*unet.time_embedding.parameters(), *unet.add_embedding.parameters()]:
            p.mul_(3.0)
    return unet


def test_sdxl_caches_the_time_embedding_alone_and_equals_the_original():
    """With the added embedding the table holds the time embedding (one row per step); the pooled prompt and the
    micro-conditioning still change the output, and the cached UNet equals the original at every Euler step."""
    from bf.models.added_condition import pack
    from bf.models.architectures import SDXL_SCHEDULER, TINY_SDXL_UNET

    unet = _sdxl_unet()
    ts = sampler_timesteps("euler", SDXL_SCHEDULER, 20)
    size, pooled = TINY_SDXL_UNET["sample_size"], TINY_SDXL_UNET["projection_class_embeddings_input_dim"] - 6 * 8
    torch.manual_seed(1)
    x, enc = torch.randn(2, 4, size, size), torch.randn(2, 77, TINY_SDXL_UNET["cross_attention_dim"])
    text_embeds, time_ids = torch.randn(2, pooled), torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 96, 8, 0, 64, 64]])
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    with torch.no_grad():
        ref = [unet(x, t, enc, added_cond_kwargs=added).sample for t in ts.tolist()]
        other_size = unet(x, int(ts[5]), enc, added_cond_kwargs={**added, "time_ids": time_ids.flip(0)}).sample
        table = time_feature_table(unet, ts)
        cached = cache_time_features(unet, ts)
        worst = max(float((cached(x, k, enc, text_embeds, time_ids) - r).abs().max()) for k, r in enumerate(ref))
        packed = float((cached(x, 0, pack(enc, text_embeds, time_ids)) - ref[0]).abs().max())  # what the trainer and torch backend feed
        with pytest.raises(ValueError, match="an SDXL UNet takes text_embeds and time_ids"):
            cached(x, 0, enc, text_embeds)
    assert list(table) == ["time_embedding"] and table["time_embedding"].shape == (len(ts), unet.time_embedding.table.shape[1])
    assert worst <= 1e-5 and packed <= 1e-5
    assert float((ref[5] - other_size).abs().max()) > 1e-3  # the micro-conditioning reaches the output
    assert float((ref[10] - ref[11]).abs().max()) > 1e-3
    names = [n for n, _ in cached.named_parameters()]
    assert not [n for n in names if n.startswith("unet.time_embedding.")]
    assert [n for n in names if ".time_emb_proj." in n] and [n for n in names if n.startswith("unet.add_embedding.")]
