"""Naive loss attack (Matsumoto et al. 2023; the baseline of Dubinski et al., WACV 2024).

Noise the clean latent to timestep t with seeded Gaussian noise (the same noise for an image in every
run), predict the noise, and score = -||eps_pred - eps||^2 (a lower training loss means member).
Cost: one U-Net evaluation per image and timestep at guidance 0 or 1.
"""

from __future__ import annotations

import numpy as np
import torch

from ..hashing import image_seed, seeded_normal
from ..inversion import condition
from .base import AttackOutput


@torch.no_grad()
def loss_errors(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    timesteps: list[int],
    *,
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Mean squared noise-prediction error per image at each timestep: ``{t: (n,)}``."""
    latents = target.encode_images(images, mode=encode_mode, seeds=[image_seed(i, seed) for i in ids])
    cond, uncond = condition(target, captions, prompt=prompt, guidance=guidance)
    abar = target.scheduler.alphas_cumprod.to(torch.float64)
    errors = {}
    for t in timesteps:
        noise = seeded_normal(tuple(latents.shape[1:]), [f"{i}@t{t}" for i in ids], seed).to(latents)
        a_t = abar[int(t)]
        noisy = a_t.sqrt().to(latents.dtype) * latents + (1 - a_t).sqrt().to(latents.dtype) * noise
        predicted = target.eps(noisy, int(t), cond, uncond, guidance=guidance)
        errors[int(t)] = (predicted - noise).double().pow(2).flatten(1).mean(dim=1).cpu().numpy()
    return errors


def loss_attack(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    t: int = 100,
    *,
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    seed: int = 0,
) -> AttackOutput:
    """Score = -noise-prediction MSE at timestep t; extras {"mse": (n,)}."""
    error = loss_errors(
        target, images, captions, ids, [t], guidance=guidance, prompt=prompt, encode_mode=encode_mode, seed=seed
    )[int(t)]
    return AttackOutput(scores=-error, extras={"mse": error})
