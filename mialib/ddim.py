"""Deterministic DDIM in latent space: the schedule, one explicit step, inversion and denoising.

Notation follows DDIM (Song et al. 2021, eq. 12 with sigma = 0) and diffusers' ``scheduling_ddim``:
``alpha_prod_t`` is the cumulative product of (1 - beta) at timestep t. Trajectories are dicts keyed by
the integer timestep, never by list position.
"""

from __future__ import annotations

import torch

SCHEDULES = ("model", "official_linear")


def alphas_cumprod(scheduler, schedule: str = "model") -> torch.Tensor:
    """The cumulative alpha products (float64, one per training timestep).

    ``"model"`` reads the model's own scheduler (correct). ``"official_linear"`` rebuilds betas linearly
    between ``beta_start`` and ``beta_end`` as the Structural MIA official code does, although Stable
    Diffusion trains with ``scaled_linear`` betas (abar_100: 0.867 rebuilt vs 0.894 for SD).
    """
    if schedule == "model":
        return scheduler.alphas_cumprod.to(torch.float64).clone()
    if schedule == "official_linear":
        config = scheduler.config
        betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)
    raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")


def ddim_step(sample: torch.Tensor, eps: torch.Tensor, alpha_prod_from: float, alpha_prod_to: float) -> torch.Tensor:
    """Move a latent from one timestep to another along the deterministic DDIM path.

    1. pred_original_sample = (z_from - sqrt(1 - a_from) * eps) / sqrt(a_from)     (DDIM eq. 12, "predicted x0")
    2. z_to = sqrt(a_to) * pred_original_sample + sqrt(1 - a_to) * eps              ("direction pointing to x_t")
    The same step serves inversion (a_to < a_from) and denoising (a_to > a_from).
    """
    a_from = torch.as_tensor(alpha_prod_from, dtype=torch.float64)
    a_to = torch.as_tensor(alpha_prod_to, dtype=torch.float64)
    pred_original_sample = (sample - (1 - a_from).sqrt().to(sample.dtype) * eps) / a_from.sqrt().to(sample.dtype)
    return a_to.sqrt().to(sample.dtype) * pred_original_sample + (1 - a_to).sqrt().to(sample.dtype) * eps


def check_timesteps(timesteps: list[int], num_train_timesteps: int, increasing: bool = True) -> list[int]:
    steps = [int(t) for t in timesteps]
    if len(steps) < 2:
        raise ValueError("a DDIM path needs at least two timesteps")
    if any(t < 0 or t >= num_train_timesteps for t in steps):
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps - 1}]: {steps}")
    pairs = zip(steps[:-1], steps[1:])
    if not all((b > a) if increasing else (b < a) for a, b in pairs):
        raise ValueError(f"timesteps must be strictly {'increasing' if increasing else 'decreasing'}: {steps}")
    return steps


def path(total: int, stride: int) -> list[int]:
    """0, stride, 2 * stride, ..., total (total must be a multiple of stride)."""
    if total % stride:
        raise ValueError(f"total timestep {total} is not a multiple of the stride {stride}")
    return list(range(0, total + 1, stride))


@torch.no_grad()
def invert(
    target,
    latents: torch.Tensor,
    timesteps: list[int],
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    guidance: float = 1.0,
    schedule: str = "model",
) -> dict[int, torch.Tensor]:
    """DDIM inversion from ``timesteps[0]`` (the clean latent, usually t = 0) upwards.

    The noise prediction is evaluated at the *source* timestep of each step (the paper's and the
    official code's choice; diffusers' ``DDIMInverseScheduler`` evaluates at the target instead).
    Costs ``len(timesteps) - 1`` U-Net evaluations per image at guidance 0 or 1, twice that otherwise.
    Returns ``{t: z_t}`` including the start.
    """
    steps = check_timesteps(timesteps, len(target.scheduler.alphas_cumprod), increasing=True)
    return _walk(target, latents, steps, cond, uncond, guidance=guidance, schedule=schedule)


@torch.no_grad()
def denoise(
    target,
    latents: torch.Tensor,
    timesteps: list[int],
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    guidance: float = 1.0,
    schedule: str = "model",
) -> dict[int, torch.Tensor]:
    """Deterministic DDIM sampling along decreasing ``timesteps`` (eps at the source timestep)."""
    steps = check_timesteps(timesteps, len(target.scheduler.alphas_cumprod), increasing=False)
    return _walk(target, latents, steps, cond, uncond, guidance=guidance, schedule=schedule)


def _walk(target, latents, steps, cond, uncond, *, guidance, schedule) -> dict[int, torch.Tensor]:
    """Deterministic DDIM steps along ``steps``, eps evaluated at each step's source timestep."""
    abar = alphas_cumprod(target.scheduler, schedule)
    trajectory = {steps[0]: latents}
    sample = latents
    for t_from, t_to in zip(steps[:-1], steps[1:]):
        eps = target.eps(sample, t_from, cond, uncond, guidance=guidance)
        sample = ddim_step(sample, eps, abar[t_from], abar[t_to]).contiguous()  # one memory format, cached or not
        trajectory[t_to] = sample
    return trajectory


@torch.no_grad()
def sample(
    target,
    captions: list[str],
    steps: int = 50,
    *,
    guidance: float = 1.0,
    seed: int = 0,
    schedule: str = "model",
    size: int | None = None,
) -> torch.Tensor:
    """Generate latents from seeded noise with deterministic DDIM (the scheduler's own timestep spacing).

    ``size`` is the latent grid (default: the U-Net's native one). The last step goes to alpha = 1 (the
    predicted clean latent), as ``set_alpha_to_one`` would.
    """
    scheduler = target.scheduler
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    channels, size = target.latent_channels, size or target.resolution // target.downscale
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((len(captions), channels, size, size), generator=generator).to(target.device, target.dtype)
    cond = target.encode_prompts(list(captions))
    uncond = None if guidance == 1.0 else target.encode_prompts([""] * len(captions))
    latents = denoise(target, latents, timesteps, cond, uncond, guidance=guidance, schedule=schedule)[timesteps[-1]]
    abar = alphas_cumprod(scheduler, schedule)
    eps = target.eps(latents, timesteps[-1], cond, uncond, guidance=guidance)
    return ddim_step(latents, eps, abar[timesteps[-1]], 1.0)
