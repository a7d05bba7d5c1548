"""The samplers of the deployment runtime in NumPy: PNDM (SD-v1.5's default, PLMS only, as
diffusers runs it with ``skip_prk_steps``), DDIM (eta 0), DPM-Solver++ 2M and Euler (SDXL's default,
diffusers' EulerDiscreteScheduler without churn).

Each follows diffusers' implementation (0.31-0.42) step for step, from the exported
``scheduler/scheduler_config.json``, in float32: fed the same model outputs, the latents agree
with diffusers' within 1e-5 at every step (tests/runtime/test_runtime_schedulers.py). The runtime drives
the UNet by step index, so ``step`` takes the index of the call; ``timesteps`` are the values the
exported time-feature table was built for. The UNet is fed ``scale_model_input(latents, index)``
(the latents themselves but for Euler, whose latents carry the noise scale sigma).
"""

from __future__ import annotations

import numpy as np

from bf.scheduler_names import SCHEDULERS

F32 = np.float32


def alphas_cumprod(config: dict) -> np.ndarray:
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=F32)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=F32) ** 2
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=F32)
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not supported (scaled_linear or linear)")
    return np.cumprod(F32(1.0) - betas, dtype=F32)


def _leading(config: dict, n_train: int, steps: int) -> tuple[int, np.ndarray]:
    """diffusers' "leading" spacing: the step ratio and the timesteps in increasing order."""
    ratio = n_train // steps
    return ratio, (np.arange(0, steps) * ratio).round().astype(np.int64) + int(config.get("steps_offset", 0))


def _alpha_prev(ac: np.ndarray, prev: int, final: np.float32) -> np.float32:
    """alphas_cumprod at the previous timestep; before the first one, the final alpha."""
    return ac[prev] if prev >= 0 else final


def _check_config(config: dict, spacing: str) -> None:
    kind = config.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise ValueError(f"prediction_type {kind!r} is not supported: the runtime's samplers take epsilon predictions")
    if config.get("timestep_spacing", spacing) != spacing:
        raise ValueError(f"timestep_spacing {config['timestep_spacing']!r} is not supported here ({spacing!r} is)")


class _Unscaled:
    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample


class PNDM(_Unscaled):
    """Pseudo linear multistep (PLMS) with diffusers' warm-up: the second step repeats a timestep."""

    def __init__(self, config: dict, steps: int):
        _check_config(config, "leading")
        self.ac = alphas_cumprod(config)
        self.n_train = len(self.ac)
        self.final = F32(1.0) if config.get("set_alpha_to_one", False) else self.ac[0]
        self.ratio, base = _leading(config, self.n_train, steps)
        self.timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        self.init_noise_sigma = 1.0
        self.ets: list[np.ndarray] = []
        self.cur_sample = None

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        timestep = int(self.timesteps[index])
        prev = timestep - self.ratio
        if index != 1:
            self.ets = [*self.ets[-3:], model_output]
        else:  # the repeated timestep: a second evaluation at the first one
            prev, timestep = timestep, timestep + self.ratio
        ets = self.ets
        if len(ets) == 1 and index == 0:
            out, self.cur_sample = model_output, sample
        elif len(ets) == 1 and index == 1:
            out, sample, self.cur_sample = (model_output + ets[-1]) / F32(2), self.cur_sample, None
        elif len(ets) == 2:
            out = (F32(3) * ets[-1] - ets[-2]) / F32(2)
        elif len(ets) == 3:
            out = (F32(23) * ets[-1] - F32(16) * ets[-2] + F32(5) * ets[-3]) / F32(12)
        else:
            out = F32(1 / 24) * (F32(55) * ets[-1] - F32(59) * ets[-2] + F32(37) * ets[-3] - F32(9) * ets[-4])
        a_t = self.ac[timestep]
        a_prev = _alpha_prev(self.ac, prev, self.final)
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        sample_coeff = (a_prev / a_t) ** F32(0.5)
        denom = a_t * b_prev ** F32(0.5) + (a_t * b_t * a_prev) ** F32(0.5)
        return (sample_coeff * sample - (a_prev - a_t) * out / denom).astype(F32)


class DDIM(_Unscaled):
    """Deterministic DDIM (eta 0), without clipping or thresholding."""

    def __init__(self, config: dict, steps: int):
        _check_config(config, "leading")
        if config.get("clip_sample", False) or config.get("thresholding", False):
            raise ValueError("DDIM with clip_sample or thresholding is not supported")
        self.ac = alphas_cumprod(config)
        self.final = F32(1.0) if config.get("set_alpha_to_one", True) else self.ac[0]
        self.ratio, base = _leading(config, len(self.ac), steps)
        self.timesteps = base[::-1].copy()
        self.init_noise_sigma = 1.0

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        timestep = int(self.timesteps[index])
        prev = timestep - self.ratio
        a_t = self.ac[timestep]
        a_prev = _alpha_prev(self.ac, prev, self.final)
        x0 = (sample - (F32(1) - a_t) ** F32(0.5) * model_output) / a_t ** F32(0.5)
        return (a_prev ** F32(0.5) * x0 + (F32(1) - a_prev) ** F32(0.5) * model_output).astype(F32)


class DPMSolverPP2M(_Unscaled):
    """DPM-Solver++ (2M, midpoint), linspace (or leading) timesteps, final sigma 0, first order on the last step."""

    def __init__(self, config: dict, steps: int):
        spacing = config.get("timestep_spacing", "linspace")
        _check_config(config, spacing if spacing == "leading" else "linspace")  # leading: SDXL's config
        ac = alphas_cumprod(config)
        n = len(ac)
        if spacing == "leading":  # diffusers spaces steps + 1 points and drops the last
            self.timesteps = _leading(config, n, steps + 1)[1][::-1][:-1].copy()
        else:
            self.timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        sigmas = (((F32(1) - ac) / ac) ** F32(0.5)).astype(F32)
        sigmas = np.interp(self.timesteps, np.arange(0, n), sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.init_noise_sigma = 1.0
        self.prev_x0 = None

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha = F32(1) / (sigma**2 + F32(1)) ** F32(0.5)
        return alpha, sigma * alpha

    def _lambda(self, i: int) -> tuple[np.float32, np.float32, np.float32]:
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        with np.errstate(divide="ignore"):  # sigma 0 at the end: lambda = inf, as in torch
            return alpha, sigma, np.log(alpha) - np.log(sigma)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        alpha_s, sigma_s, lambda_s = self._lambda(index)
        x0 = (sample - sigma_s * model_output) / alpha_s
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        h = lambda_t - lambda_s
        phi = alpha_t * (np.exp(-h) - F32(1))
        last = index == len(self.timesteps) - 1  # final sigma 0: diffusers always steps first order here
        if self.prev_x0 is None or last:
            x = (sigma_t / sigma_s) * sample - phi * x0
        else:
            _, _, lambda_s1 = self._lambda(index - 1)
            r0 = (lambda_s - lambda_s1) / h
            d1 = (F32(1) / r0) * (x0 - self.prev_x0)
            x = (sigma_t / sigma_s) * sample - phi * x0 - F32(0.5) * phi * d1
        self.prev_x0 = x0
        return np.asarray(x, dtype=F32)


class EulerDiscrete:
    """Euler steps in sigma (diffusers' EulerDiscreteScheduler with s_churn 0: no noise is added), leading
    timesteps, linear sigma interpolation, final sigma 0; the model sees the latents divided by sqrt(sigma^2 + 1)."""

    def __init__(self, config: dict, steps: int):
        if config.get("timestep_spacing", "linspace") != "leading":  # diffusers' default for Euler is linspace
            raise ValueError(
                f"euler with timestep_spacing {config.get('timestep_spacing', 'linspace (the default)')!r} is not supported: its "
                "timesteps are fractional and the time table holds whole ones; use it with 'leading' (SDXL's scheduler config)"
            )
        _check_config(config, "leading")
        for key, default in (("interpolation_type", "linear"), ("final_sigmas_type", "zero"), ("timestep_type", "discrete")):
            if config.get(key, default) != default:
                raise ValueError(f"{key} {config[key]!r} is not supported here ({default!r} is)")
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if config.get(key):
                raise ValueError(f"{key} is not supported here")
        ac = alphas_cumprod(config)
        _, base = _leading(config, len(ac), steps)
        self.timesteps = base[::-1].copy()
        sigmas = ((F32(1) - ac) / ac) ** F32(0.5)
        self.sigmas = np.concatenate([np.interp(self.timesteps, np.arange(0, len(ac)), sigmas), [0.0]]).astype(F32)
        self.init_noise_sigma = float((self.sigmas.max() ** F32(2) + F32(1)) ** F32(0.5))

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return (sample / (self.sigmas[index] ** F32(2) + F32(1)) ** F32(0.5)).astype(F32)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        sigma = self.sigmas[index]
        x0 = sample - sigma * model_output
        derivative = (sample - x0) / sigma
        return (sample + derivative * (self.sigmas[index + 1] - sigma)).astype(F32)


def make_scheduler(name: str, config: dict, steps: int):
    """A fresh sampler (they keep state between steps) for ``steps`` inference steps."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    classes = {"pndm": PNDM, "ddim": DDIM, "dpmpp2m": DPMSolverPP2M, "euler": EulerDiscrete}
    if name not in classes:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    return classes[name](config, steps)
