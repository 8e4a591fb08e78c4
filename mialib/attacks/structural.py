"""Structural membership inference (Li et al., ACM MM 2024, arXiv 2407.13252).

Encode the image, invert it with deterministic DDIM from t = 0 to a small T (paper: 0 -> 50 -> 100),
decode the inverted latent and compare it with the input by SSIM. The paper's claim: members keep
their structure better, so a higher SSIM means member. Cost: T / stride U-Net evaluations per image at
guidance 0 or 1 (2 for the paper's setting), twice that otherwise. Whether the claim holds on a given
model is measured, not assumed: ``direction=-1`` scores "lower SSIM means member".
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ddim
from ..similarity import ms_ssim, mse, ssim
from .base import AttackOutput, condition


@torch.no_grad()
def inversion_trajectory(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    timesteps: list[int],
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    seed: int = 0,
    start: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Encode the images (unless ``start`` gives the latents at ``timesteps[0]``) and invert them with
    deterministic DDIM along ``timesteps``. Returns ``{t: z_t}``; ``timesteps[0]`` maps to the start.

    A trajectory can be extended exactly: inverting from its last latent with ``start`` continues the path.
    """
    from .base import image_seed

    if start is None:
        start = target.encode_images(images, mode=encode_mode, seeds=[image_seed(i, seed) for i in ids])
    cond, uncond = condition(target, captions, prompt, guidance)
    return ddim.invert(target, start.to(target.device, target.dtype), timesteps, cond, uncond, guidance, schedule)


@torch.no_grad()
def trajectory_measures(
    target, images: torch.Tensor, trajectory: dict[int, torch.Tensor], clean: torch.Tensor, data_range: float = 2.0
) -> dict[int, dict[str, np.ndarray]]:
    """Similarity of each image to its decoded inverted latent at every t of a trajectory.

    ``ssim`` (skimage's), ``mse`` and ``ms_ssim`` compare pixels after decoding; ``latent_mse`` compares the
    inverted latent with the clean latent ``clean`` (the encoding, t = 0) without the decoder.
    """
    reference = images.to(torch.float64)
    clean = clean.detach().to("cpu", torch.float64)
    curve = {}
    for t, z_t in trajectory.items():
        decoded = target.decode(z_t)
        curve[t] = {
            "ssim": ssim(reference, decoded, data_range=data_range).numpy(),
            "mse": mse(reference, decoded).numpy(),
            "ms_ssim": ms_ssim(reference, decoded, data_range=data_range).numpy(),
            "latent_mse": (z_t.detach().to("cpu", torch.float64) - clean).pow(2).flatten(1).mean(dim=1).numpy(),
        }
    return curve


@torch.no_grad()
def structural_curve(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    timesteps: list[int],
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    data_range: float = 2.0,
    seed: int = 0,
) -> dict[int, dict[str, np.ndarray]]:
    """SSIM, MSE, MS-SSIM and latent MSE between each image and its decoded inverted latent at every
    timestep of one path.

    One inversion serves every t on the path: the prefix of a deterministic path is the shorter path.
    Returns ``{t: {"ssim": (n,), "mse": (n,), "ms_ssim": (n,), "latent_mse": (n,)}}``; t = timesteps[0]
    is the plain VAE round trip.
    """
    trajectory = inversion_trajectory(target, images, captions, ids, timesteps, guidance, prompt, encode_mode, schedule, seed)
    return trajectory_measures(target, images, trajectory, trajectory[timesteps[0]], data_range)


@torch.no_grad()
def structural_attack(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    t: int = 100,
    stride: int = 50,
    direction: int = 1,
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    data_range: float = 2.0,
    seed: int = 0,
) -> AttackOutput:
    """Score = direction * SSIM(x, D(DDIM-inverted latent at t)); paper setting t=100, stride=50, direction=+1."""
    before = target.unet_evals
    trajectory = inversion_trajectory(target, images, captions, ids, ddim.path(t, stride), guidance, prompt, encode_mode, schedule, seed)
    evals = (target.unet_evals - before) // len(images)
    similarity = ssim(images.to(torch.float64), target.decode(trajectory[t]), data_range=data_range).numpy()
    return AttackOutput(scores=direction * similarity, unet_evals=evals, extras={"ssim": similarity})


@torch.no_grad()
def decoded_trajectory(
    target,
    image: torch.Tensor,
    caption: str,
    image_id: str,
    timesteps: list[int],
    stride: int,
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Decoded inverted latents of one image (3, h, w) at the requested timesteps (multiples of stride)."""
    from .base import image_seed

    latents = target.encode_images(image[None], mode=encode_mode, seeds=[image_seed(image_id, seed)])
    cond, uncond = condition(target, [caption], prompt, guidance)
    trajectory = ddim.invert(target, latents, ddim.path(max(timesteps), stride), cond, uncond, guidance, schedule)
    return {t: target.decode(trajectory[t])[0] for t in timesteps}
