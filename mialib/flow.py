"""Flow-matching models (Stable Diffusion 3 / 3.5, FLUX.1) seen through the attacks' DDIM interface.

A rectified-flow model is trained on the straight path ``x_s = (1 - s) x0 + s * noise`` (s the noise level,
``sigma`` in diffusers) and predicts the velocity ``v = noise - x0``, conditioned on the timestep ``1000 s``.
The same path is a variance-preserving diffusion once rescaled: with ``r(s) = sqrt((1 - s)^2 + s^2)``,

    z = x_s / r(s) = sqrt(a) x0 + sqrt(1 - a) noise,      a = (1 - s)^2 / r(s)^2,

and the velocity reads as the noise prediction ``eps = x_s + (1 - s) v``. One deterministic DDIM step between
two noise levels in these coordinates *is* one Euler step of the flow ODE, ``x_s' = x_s + (s' - s) v`` (both
are exact Euler steps of the same ODE in ``x_s / (1 - s)`` against ``s / (1 - s)``), so every attack here
(inversion, loss, SecMI, PIA, ...) runs on a flow model unchanged and means what it means on the flow:

- the attacks' integer timestep ``t`` (0 ... 999) indexes the model's own noise levels ``s(t)``: the
  scheduler's shift applied to ``t / 1000`` (a static ``shift`` as SD3's 3.0, or FLUX's resolution-dependent
  dynamic shifting, computed for the model's native image size); t = 0 is the clean latent (s = 0);
- the loss at t is the flow-matching loss at s(t): ``eps_hat - eps = (1 - s) (v_hat - v)``;
- :func:`ddim_equivalent` gives the ``DDIMScheduler`` whose ``alphas_cumprod`` are these ``a(s(t))``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

FLOW_PREDICTION = "flow_prediction"  # diffusers' name for a velocity-predicting model's prediction_type


def native_sequence_length(resolution: int, downscale: int, patch: int = 2) -> int:
    """Image tokens of a FLUX-style transformer at ``resolution`` px: (latent side / patch)^2."""
    side = resolution // downscale // patch
    return side * side


def noise_levels(flow_config: dict, image_seq_len: int | None = None) -> np.ndarray:
    """The model's noise level s(t) for t = 0 ... N - 1 (float64; s(0) = 0), from its flow scheduler config.

    Static shifting (SD3: ``shift``): s = shift u / (1 + (shift - 1) u), u = t / N. Dynamic shifting (FLUX:
    ``use_dynamic_shifting``): the scheduler's own ``time_shift`` with mu interpolated from the image's token
    count between ``base_image_seq_len`` / ``base_shift`` and ``max_image_seq_len`` / ``max_shift``, as the FLUX
    pipeline computes it. Sampling-only options (Karras or exponential spacing, ``shift_terminal``) are not
    part of what the model was trained on and are ignored.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(flow_config)
    config = scheduler.config
    n = int(config.num_train_timesteps)
    u = np.arange(1, n, dtype=np.float64) / n
    if config.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError("a dynamically shifted schedule needs the image's token count")
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        shifted = np.asarray(scheduler.time_shift(mu, 1.0, u), dtype=np.float64)
    else:
        shift = float(config.shift)
        shifted = shift * u / (1 + (shift - 1) * u)
    return np.concatenate([[0.0], shifted])


def alphas_from_noise_levels(levels: np.ndarray) -> np.ndarray:
    """a(s) = (1 - s)^2 / ((1 - s)^2 + s^2): the variance-preserving signal level of noise level s."""
    levels = np.asarray(levels, dtype=np.float64)
    return (1 - levels) ** 2 / ((1 - levels) ** 2 + levels**2)


def noise_level_from_alpha(alpha_prod: float) -> float:
    """The inverse of :func:`alphas_from_noise_levels`: s = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))."""
    return math.sqrt(1 - alpha_prod) / (math.sqrt(alpha_prod) + math.sqrt(1 - alpha_prod))


def ddim_equivalent(levels: np.ndarray):
    """A ``DDIMScheduler`` whose ``alphas_cumprod`` are a(s(t)) (betas from their ratios, so the config holds the
    schedule; the table itself is set from float64, not re-accumulated in float32) and whose
    ``prediction_type`` says the model predicts a velocity."""
    from diffusers import DDIMScheduler

    alphas = alphas_from_noise_levels(levels)
    betas = 1.0 - alphas / np.concatenate([[1.0], alphas[:-1]])
    scheduler = DDIMScheduler(
        num_train_timesteps=len(levels),
        trained_betas=betas.tolist(),
        prediction_type=FLOW_PREDICTION,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
    )
    scheduler.alphas_cumprod = torch.from_numpy(alphas).float()
    return scheduler


def to_flow(latents: torch.Tensor, level: float) -> torch.Tensor:
    """Variance-preserving latents -> the flow's x_s at noise level s: x_s = r(s) z."""
    return latents * math.sqrt((1 - level) ** 2 + level**2)


def velocity_to_epsilon(velocity: torch.Tensor, latents: torch.Tensor, level: float) -> torch.Tensor:
    """The velocity at noise level s read as the noise prediction: eps = x_s + (1 - s) v, x_s = r(s) z."""
    return to_flow(latents, level) + (1 - level) * velocity
