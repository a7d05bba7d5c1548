"""The runtime's NumPy samplers against diffusers' schedulers: same timesteps, latents within 1e-5 at every step."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from bf.models.architectures import ARCHITECTURES  # noqa: E402
from bf.models.diffusers_pipeline import make_scheduler as diffusers_scheduler  # noqa: E402
from bf.models.shipped import shipped_model_dir  # noqa: E402
from bf.runtime.schedulers import SCHEDULERS, make_scheduler  # noqa: E402


def configs():
    shipped = json.loads((shipped_model_dir() / "scheduler" / "scheduler_config.json").read_text())
    return {"shipped": shipped, "sd15": ARCHITECTURES["sd15"].scheduler, "sdxl": ARCHITECTURES["sdxl"].scheduler}


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_sampler_matches_diffusers_at_every_step(name, steps):
    for label, config in configs().items():
        if name == "euler" and config.get("timestep_spacing") != "leading":
            with pytest.raises(ValueError, match=r"euler with timestep_spacing 'linspace .* is not supported: its timesteps are fract"):
                make_scheduler(name, config, steps)
            continue
        ref = diffusers_scheduler(name, config)
        ref.set_timesteps(steps)
        ours = make_scheduler(name, config, steps)
        assert np.array_equal(ours.timesteps, ref.timesteps.numpy()), (label, name, steps)
        if name == "euler":  # sqrt(max sigma^2 + 1), from float32 sigmas a few ulps off torch's cumulative product
            assert abs(ours.init_noise_sigma - float(ref.init_noise_sigma)) <= 1e-6 * float(ref.init_noise_sigma)
        else:
            assert ours.init_noise_sigma == float(ref.init_noise_sigma)
        rng = np.random.default_rng(steps)
        x = (rng.standard_normal((2, 4, 8, 8)) * ours.init_noise_sigma).astype(np.float32)
        xt = torch.from_numpy(x.copy())
        for i, t in enumerate(ref.timesteps):
            scaled = ref.scale_model_input(xt, t).numpy()
            assert np.abs(ours.scale_model_input(x, i) - scaled).max() <= 1e-5 * max(1.0, np.abs(scaled).max())
            eps = (0.6 * scaled + 0.8 * rng.standard_normal(x.shape)).astype(np.float32)  # depends on the sample, like a UNet
            xt = ref.step(torch.from_numpy(eps), t, xt).prev_sample
            x = ours.step(eps, i, x)
            err = np.abs(x - xt.numpy()).max()
            assert err <= 1e-5 * max(1.0, np.abs(xt.numpy()).max()), (label, name, steps, i, err)


def test_bad_settings_are_refused():
    config = configs()["sd15"]
    with pytest.raises(ValueError, match="scheduler must be one of pndm, ddim, dpmpp2m, euler"):
        make_scheduler("lms", config, 10)
    with pytest.raises(ValueError, match="use_karras_sigmas is not supported"):
        make_scheduler("euler", {**configs()["sdxl"], "use_karras_sigmas": True}, 10)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        make_scheduler("pndm", config, 0)
    with pytest.raises(ValueError, match="prediction_type 'v_prediction' is not supported"):
        make_scheduler("ddim", {**config, "prediction_type": "v_prediction"}, 10)
    with pytest.raises(ValueError, match="timestep_spacing 'trailing' is not supported"):
        make_scheduler("dpmpp2m", {**config, "timestep_spacing": "trailing"}, 10)
