"""Latent distance: how far the DDIM-inverted latent moved from the clean one, with no decoder.

The structural attack's inversion (Li et al., ACM MM 2024), scored in latent space instead of pixels:

    latent_mse = mean over latent elements of (z_t - z_0)^2,      score = -latent_mse

A member's noise predictions along the path are smaller (the model "explains" it), so its inverted
latent stays closer to where it started. The decoder and SSIM are skipped: on the embedded target this
kept signal that the decoded comparison throws away (05's T sweep).
Cost: t / stride U-Net evaluations per image at guidance 0 or 1, twice that otherwise.
"""

from __future__ import annotations

import torch

from .. import ddim
from ..inversion import inversion_trajectory, latent_mse, rms
from .base import AttackOutput


@torch.no_grad()
def latent_attack(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    t: int = 100,
    stride: int = 50,
    *,
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    seed: int = 0,
    cache=None,
) -> AttackOutput:
    """Score = -||z_t - z_0||^2 / d after deterministic DDIM inversion to t; extras {"latent_mse", "latent_rms"}
    (``latent_rms``: the clean latent's root mean square, for the registry's tolerance)."""
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
    distance = latent_mse(trajectory[t], trajectory[0])
    extras = {"latent_mse": distance, "latent_rms": rms(trajectory[0])}
    return AttackOutput(scores=-distance, extras=extras)
