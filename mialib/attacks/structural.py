"""Structural membership inference (Li et al., ACM MM 2024, arXiv 2407.13252).

Encode the image, invert it with deterministic DDIM from t = 0 to a small T (paper: 0 -> 50 -> 100),
decode the inverted latent and compare it with the input by SSIM. The paper's claim: members keep
their structure better, so a higher SSIM means member. Cost: T / stride U-Net evaluations per image at
guidance 0 or 1 (2 for the paper's setting), twice that otherwise. Whether the claim holds on a given
model is measured on calibration data, not assumed (``metrics.choose_setting`` may reverse it).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ddim
from ..similarity import ms_ssim, mse, ssim
from ..trajectories import decode_at
from .base import AttackOutput, condition


MEASURES = ("ssim", "ms_ssim")


@torch.no_grad()
def inversion_trajectory(
    target,
    images: torch.Tensor | None,
    captions: list[str],
    ids: list[str],
    timesteps: list[int],
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    seed: int = 0,
    start: torch.Tensor | None = None,
    cache=None,
) -> dict[int, torch.Tensor]:
    """Encode the images (unless ``start`` gives the latents at ``timesteps[0]``) and invert them with
    deterministic DDIM along ``timesteps``. Returns ``{t: z_t}``; ``timesteps[0]`` maps to the start, and a
    one-step path ``[0]`` is the clean latent alone.

    With a :class:`~mialib.trajectories.TrajectoryCache`, a path 0, stride, ..., T is read from (and
    written to) the cache, so every attack and study that inverts the same image shares one inversion.
    A trajectory can be extended exactly: inverting from its last latent with ``start`` continues the path.
    """
    from ..trajectories import uniform_path
    from .base import image_seed

    settings = dict(guidance=guidance, prompt=prompt, encode_mode=encode_mode, schedule=schedule, seed=seed)
    steps = [int(t) for t in timesteps]
    if cache is not None and start is None and uniform_path(steps):
        total, stride = uniform_path(steps)
        return cache.trajectory(target, images, captions, ids, total, stride, settings)[0]
    if start is None:
        start = target.encode_images(images, mode=encode_mode, seeds=[image_seed(i, seed) for i in ids])
    start = start.to(target.device, target.dtype)
    if len(steps) == 1:
        return {steps[0]: start}
    cond, uncond = condition(target, captions, prompt, guidance)
    return ddim.invert(target, start, steps, cond, uncond, guidance, schedule)


def latent_mse(z_t: torch.Tensor, clean: torch.Tensor) -> np.ndarray:
    """Mean squared distance per image between an inverted latent and the clean one (float64)."""
    return (z_t.detach().to("cpu", torch.float64) - clean.detach().to("cpu", torch.float64)).pow(2).flatten(1).mean(dim=1).numpy()


@torch.no_grad()
def structural_attack(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    t: int = 100,
    stride: int = 50,
    measure: str = "ssim",
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    data_range: float = 2.0,
    seed: int = 0,
    cache=None,
) -> AttackOutput:
    """Score = SSIM (or MS-SSIM) between x and D(DDIM-inverted latent at t): higher means member, the
    paper's direction (whether it holds is for calibration to measure). Paper setting t=100, stride=50.

    Extras: the score's measure, pixel ``mse`` of the same decoded image and ``latent_mse`` (inverted vs
    clean latent). t = 0 is the plain VAE round trip (no U-Net).
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, not {measure!r}")
    t, stride = int(t), int(stride)
    before = target.unet_evals
    trajectory = inversion_trajectory(target, images, captions, ids, ddim.path(t, stride), guidance, prompt, encode_mode, schedule, seed, cache=cache)
    evals = (target.unet_evals - before) // len(images)
    decoded = decode_at(target, trajectory, t)
    score_fn = ssim if measure == "ssim" else ms_ssim
    similarity = score_fn(images, decoded, data_range=data_range, precision="working").numpy()
    extras = {measure: similarity, "mse": mse(images, decoded).numpy(), "latent_mse": latent_mse(trajectory[t], trajectory[0])}
    return AttackOutput(scores=similarity, unet_evals=evals, extras=extras)


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
    cache=None,
) -> dict[int, torch.Tensor]:
    """Decoded inverted latents of one image (3, h, w) at the requested timesteps (multiples of stride)."""
    trajectory = inversion_trajectory(
        target, image[None], [caption], [image_id], ddim.path(max(timesteps), stride), guidance, prompt, encode_mode, schedule, seed, cache=cache
    )
    return {t: decode_at(target, trajectory, t)[0] for t in timesteps}
