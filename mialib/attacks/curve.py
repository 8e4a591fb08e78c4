"""The noise-level curve (after Sesmat et al., ICML 2026, "Where Rectified Flows Leak"): the one-step
reconstruction error of the clean latent at several noise levels, several noises each, a curve per image.

A member is reconstructed better than a non-member of the same difficulty, and on rectified flows most at mid
noise levels. For each level t_k (``points`` timesteps evenly spaced from ``t_min`` to ``t_max``, rounded) and
draw r, with seeded noise (id ``f"{i}@curve{t}r{r}"``, the same in every batch and run):

    z_t    = sqrt(a_t) z_0 + sqrt(1 - a_t) noise
    x0_hat = (z_t - sqrt(1 - a_t) eps_hat(z_t, t)) / sqrt(a_t)                      (one step to the clean latent)
    e_k    = mean over draws of mean (x0_hat - z_0)^2 = (1 - a_t) / a_t * mean (eps_hat - noise)^2

On a flow-matching model (:mod:`mialib.flow`), ``x0_hat - z_0 = -s (v_hat - v)``: the rectified flow's
reconstruction error at noise level s(t). Extras: the curve ``log_error_t<t>`` = log e_k, and ``mse_t<t>``
(the noise-prediction error, for the rounding tolerance). The score is the unfitted summary -mean_k log e_k;
``curve:calibrate=fit`` classifies the whole curve instead, with a logistic regression fitted on the
calibration split only (:func:`mialib.calibration.fitted_summary`). Cost: ``points * n_noise`` U-Net
evaluations per image (twice that with guidance other than 0 and 1).
"""

from __future__ import annotations

import numpy as np
import torch

from ..hashing import image_seed, seeded_normal
from ..inversion import condition
from .base import AttackOutput

FEATURE_PREFIX = "log_error_t"  # the extras that calibrate=fit classifies


def levels(t_min: int, t_max: int, points: int) -> list[int]:
    """``points`` timesteps evenly from ``t_min`` to ``t_max`` (rounded, distinct)."""
    steps = [int(round(t)) for t in np.linspace(int(t_min), int(t_max), int(points))]
    if len(set(steps)) != len(steps):
        raise ValueError(f"{points} levels between t={t_min} and t={t_max} are not distinct timesteps")
    return steps


@torch.no_grad()
def noise_curve_attack(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    t_min: int = 50,
    t_max: int = 950,
    points: int = 11,
    n_noise: int = 3,
    *,
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    seed: int = 0,
) -> AttackOutput:
    """Score = -mean over levels of the log one-step reconstruction error; extras: the curve and the errors."""
    n_noise = int(n_noise)
    if n_noise < 1:
        raise ValueError(f"n_noise must be at least 1, not {n_noise}")
    latents = target.encode_images(images, mode=encode_mode, seeds=[image_seed(i, seed) for i in ids])
    cond, uncond = condition(target, captions, prompt=prompt, guidance=guidance)
    abar = target.scheduler.alphas_cumprod.to(torch.float64)
    extras, logs = {}, []
    for t in levels(t_min, t_max, points):
        a_t = abar[t]
        mse = torch.zeros(len(images), dtype=torch.float64)
        for r in range(n_noise):
            noise = seeded_normal(tuple(latents.shape[1:]), [f"{i}@curve{t}r{r}" for i in ids], seed).to(latents)
            noisy = a_t.sqrt().to(latents.dtype) * latents + (1 - a_t).sqrt().to(latents.dtype) * noise
            predicted = target.eps(noisy, t, cond, uncond, guidance=guidance)
            mse += (predicted - noise).double().pow(2).flatten(1).mean(dim=1).cpu() / n_noise
        error = ((1 - a_t) / a_t).item() * mse.numpy()
        extras[f"mse_t{t}"] = mse.numpy()
        extras[f"{FEATURE_PREFIX}{t}"] = np.log(error)
        logs.append(np.log(error))
    return AttackOutput(scores=-np.mean(logs, axis=0), extras=extras)
