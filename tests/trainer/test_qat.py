"""QAT pieces: Beta timestep sampling, fake-quant parity with PTQ and with the packed export, the loss terms."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from bf.format import Grid, candidate_layers  # noqa: E402
from bf.models.architectures import TINY_UNET  # noqa: E402
from bf.trainer.ptq import PTQConfig, quantize_weight  # noqa: E402
from bf.trainer.qat import (  # noqa: E402
    SCALE_FLOOR,
    LossConfig,
    attach_fake_quant,
    block_names,
    capture_blocks,
    drop_text,
    export_layers,
    hold_scales,
    sample_timesteps,
    scale_health,
    stage1_loss,
    stage2_loss,
)


def _unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**TINY_UNET).eval()


def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = TINY_UNET["sample_size"]
    zt = torch.randn(batch, 4, size, size, generator=g)
    cond = torch.randn(batch, 77, TINY_UNET["cross_attention_dim"], generator=g)
    return zt, torch.tensor([999, 500][:batch]), cond


def _plan(unet, bits=2):
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    return {name: Grid(bits) for name in candidate_layers(shapes)}


def test_beta_timesteps_favour_the_noisy_end():
    t = sample_timesteps(200_000, "beta", generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.long
    assert float(t.float().mean()) == pytest.approx(0.75 * 999, abs=2)  # Beta(3,1) mean 3/4
    assert float((t >= 900).float().mean()) == pytest.approx(1 - 0.9**3, abs=0.005)  # P(x >= .9) = 1 - .9^3
    u = sample_timesteps(200_000, "uniform", generator=torch.Generator().manual_seed(0))
    assert float(u.float().mean()) == pytest.approx(499.5, abs=3)
    with pytest.raises(ValueError, match="timestep sampling"):
        sample_timesteps(4, "cosine")


def test_fake_quant_at_init_equals_ptq_and_export_round_trips():
    unet = _unet()
    ptq_unet = copy.deepcopy(unet)
    plan = _plan(unet)
    with torch.no_grad():
        for name, grid in plan.items():
            layer = quantize_weight(name, ptq_unet.get_submodule(name).weight, grid, PTQConfig("alt"))
            ptq_unet.get_submodule(name).weight.copy_(torch.from_numpy(layer.dequantize()))
    quants = attach_fake_quant(unet, plan, "alt")
    zt, t, cond = _inputs()
    with torch.no_grad():
        a, b = unet(zt, t, cond).sample, ptq_unet(zt, t, cond).sample
    assert float((a - b).abs().max()) <= 1e-5
    # the packed export holds exactly the weights the forward used
    layers = export_layers(unet, quants)
    for name in plan:
        np.testing.assert_array_equal(layers[name].dequantize(), unet.get_submodule(name).weight.detach().numpy())
    # and the model is really quantized: 5 levels per row at 2 bits
    w = unet.get_submodule(next(iter(plan))).weight.detach()
    assert max(len(torch.unique(row)) for row in w.reshape(w.shape[0], -1)) <= 5
    # a scale stepped below its floor (a fraction of its initial value) is put back on it: positive by construction
    before = {name: fq.scale.detach().clone() for name, fq in quants.items()}
    with torch.no_grad():
        for fq in quants.values():
            fq.scale[::2] *= -1
    flipped = sum(len(fq.scale[::2]) for fq in quants.values())
    assert scale_health(quants) == (flipped, flipped)  # unpackable until held
    hold_scales(quants)
    for name, fq in quants.items():
        torch.testing.assert_close(fq.scale[::2], before[name][::2] * SCALE_FLOOR, rtol=1e-6, atol=0)
        assert torch.equal(fq.scale[1::2], before[name][1::2])
    held = export_layers(unet, quants)
    for name in plan:
        assert (held[name].scale > 0).all()
        np.testing.assert_array_equal(held[name].dequantize(), unet.get_submodule(name).weight.detach().numpy())
    # a diverged scale is a one-line error for the CLI, not a traceback
    from bf.errors import BfError

    with torch.no_grad():
        next(iter(quants.values())).scale[0] = float("nan")
    with pytest.raises(BfError, match=r"1 learned scale\(s\) are not positive and finite; retrain"):
        export_layers(unet, quants)


def test_stage1_is_zero_for_an_identical_student_and_has_the_feature_term():
    teacher = _unet()
    zt, t, cond = _inputs()
    loss, parts = stage1_loss(copy.deepcopy(teacher), teacher, zt, t, cond, LossConfig())
    assert float(loss.detach()) == 0.0 and parts["feature"] == 0.0
    student = copy.deepcopy(teacher)
    attach_fake_quant(student, _plan(student, bits=1), "alt")
    loss, parts = stage1_loss(student, teacher, zt, t, cond, LossConfig(feature_weight=0.01))
    with torch.no_grad(), capture_blocks(teacher) as tf, capture_blocks(student) as sf:
        et, es = teacher(zt, t, cond).sample, student(zt, t, cond).sample
    assert set(tf) == set(block_names(teacher)) and len(tf) == 8
    noise = float(((es - et) ** 2).mean())
    feat = float(np.mean([float(((sf[k] - tf[k]) ** 2).mean()) for k in tf]))
    assert parts["noise"] == pytest.approx(noise, rel=1e-5) and parts["feature"] == pytest.approx(feat, rel=1e-5)
    assert float(loss) == pytest.approx(noise + 0.01 * feat, rel=1e-5) and feat > 0
    off, parts_off = stage1_loss(student, teacher, zt, t, cond, LossConfig(feature_weight=0.0))
    assert float(off) == pytest.approx(noise, rel=1e-5) and parts_off["feature"] == 0.0


def test_gradients_reach_latent_weights_and_scales_and_the_teacher_stays_frozen():
    teacher = _unet()
    student = copy.deepcopy(teacher)
    quants = attach_fake_quant(student, _plan(student), "alt")
    zt, t, cond = _inputs()
    loss, _ = stage1_loss(student, teacher, zt, t, cond, LossConfig())
    loss.backward()
    name, fq = next(iter(quants.items()))
    assert fq.scale.grad is not None and float(fq.scale.grad.abs().sum()) > 0
    assert float(student.get_submodule(name).parametrizations.weight.original.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    noise = torch.randn_like(zt)
    _, parts = stage2_loss(student, zt, t, cond, noise)
    with torch.no_grad():
        ref = float(((student(zt, t, cond).sample - noise) ** 2).mean())
    assert parts["noise"] == pytest.approx(ref, rel=1e-5)


def test_text_dropping():
    cond, empty = torch.ones(1000, 3, 2), torch.zeros(1, 3, 2)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(drop_text(cond, empty, 0.0, g), cond)
    assert torch.equal(drop_text(cond, empty, 1.0, g), torch.zeros_like(cond))
    dropped = (drop_text(cond, empty, 0.1, g).sum((1, 2)) == 0).float().mean()
    assert float(dropped) == pytest.approx(0.1, abs=0.03)


@pytest.mark.gpu
def test_fused_fake_quant_matches_the_reference_on_a_gpu(monkeypatch):
    """One-pass Triton fake quant: forward bit-identical to FakeQuantize, gradients equal up to summation order."""
    from bf.trainer import fused_fake_quant
    from bf.trainer.quantizer import fake_quantize, lsq_grad_scale, minmax_scale

    if not torch.cuda.is_available() or fused_fake_quant.triton is None:
        pytest.skip("needs a CUDA GPU and Triton")
    torch.manual_seed(0)
    for shape, grid in [((320, 320, 3, 3), Grid(1)), ((1280, 11520), Grid(2)), ((7, 5), Grid(3, "plain")), ((33, 1001), Grid(4))]:
        w = torch.randn(shape, device="cuda")
        s = minmax_scale(w, grid) * 0.7  # some weights fall outside the clip range
        gscale = lsq_grad_scale(w, grid)
        g = torch.randn(shape, device="cuda")
        outs = {}
        for fused in (True, False):
            monkeypatch.setenv("BF_FUSED_FAKE_QUANT", "1" if fused else "0")
            wi, si = w.clone().requires_grad_(), s.clone().requires_grad_()
            y = fake_quantize(wi, si, grid, gscale)
            y.backward(g)
            outs[fused] = (y.detach(), wi.grad, si.grad)
        assert torch.equal(outs[True][0], outs[False][0]), shape
        assert torch.equal(outs[True][1], outs[False][1]), shape
        torch.testing.assert_close(outs[True][2], outs[False][2], rtol=1e-4, atol=1e-6)
        # Under bf16 autocast the fused op writes bf16 itself: the reference's value cast once, same gradients.
        monkeypatch.setenv("BF_FUSED_FAKE_QUANT", "1")
        wi, si = w.clone().requires_grad_(), s.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fake_quantize(wi, si, grid, gscale)
        assert y.dtype == torch.bfloat16 and torch.equal(y, outs[False][0].to(torch.bfloat16))
        y.backward(g.to(torch.bfloat16))
        assert torch.equal(wi.grad, torch.where(outs[False][1] != 0, g.to(torch.bfloat16).float(), 0.0))
