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
