"""Pixel-level counterpart of structural membership inference (Li et al., ACM MM 2024).

The same deterministic DDIM inversion to t and the same decode as :mod:`.structural`, but the decoded
image is compared with the input pixel by pixel instead of by SSIM:

    mse  = mean over pixels of (x - D(z_t))^2,     psnr = 10 log10(data_range^2 / mse)
    score = -mse   or   psnr          (higher means member: the decoded image is closer)

-MSE and PSNR rank images identically (PSNR is a decreasing function of MSE); both are returned in
extras. Whether structure (SSIM) separates better than plain pixel error is what this control measures.
Cost: t / stride U-Net evaluations per image at guidance 0 or 1, twice that otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ddim
from ..inversion import decode_at, inversion_trajectory, latent_mse, rms
from ..similarity import mse
from .base import AttackOutput

METRICS = ("mse", "psnr")


@torch.no_grad()
def pixel_attack(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    t: int = 100,
    stride: int = 50,
    metric: str = "mse",
    *,
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    data_range: float = 2.0,
    seed: int = 0,
    cache=None,
) -> AttackOutput:
    """Score = -MSE or PSNR between x and D(DDIM-inverted latent at t); extras {"mse", "psnr", "latent_mse",
    "pixel_rms"} (``pixel_rms``: the input's root mean square, for the registry's tolerance)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
    t, stride = int(t), int(stride)
    trajectory = inversion_trajectory(
        target,
        images,
        captions,
        ids,
        ddim.path(t, stride),
        guidance=guidance,
        prompt=prompt,
        encode_mode=encode_mode,
        schedule=schedule,
        seed=seed,
        cache=cache,
    )
    error = mse(images, decode_at(target, trajectory, t)).numpy()
    peak = 10 * np.log10(data_range**2 / error)
    value = -error if metric == "mse" else peak
    extras = {
        "mse": error,
        "psnr": peak,
        "latent_mse": latent_mse(trajectory[t], trajectory[0]),
        "pixel_rms": rms(images),
    }
    return AttackOutput(scores=value, extras=extras)
