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
from ..inversion import decode_at, inversion_trajectory, latent_mse
from ..similarity import MS_SSIM_WEIGHTS, box_mean, ms_ssim, ms_ssim_scales, mse, ssim
from .base import AttackOutput

MEASURES = ("ssim", "ms_ssim")


def ssim_rounding(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win_size: int = 7) -> np.ndarray:
    """How far SSIM(x, y) moves, per image, when every local moment it subtracts is off by one part in one
    (relative): the registry's SSIM tolerance is this times float32 epsilon times its stated factor.

    The SSIM map is A B / (C E) with A = 2 ux uy + c1, B = 2 vxy + c2, C = ux^2 + uy^2 + c1 and
    E = vx + vy + c2, where the variances subtract products of pixels: vx = cov (uxx - ux^2). A relative
    rounding r of the five local means (ux, uy, uxx, uyy, uxy) moves the map by at most
        r * (4 + cov * (2 |uxy| + 4 |ux uy| + uxx + uyy + 2 ux^2 + 2 uy^2) / E)
    (|A| <= C and |B| <= E bound the luminance terms by 4 r; the rest is the variances' rounding over E).
    The value is that bracket averaged over the map: large where pixels of large magnitude sit in flat
    regions (E near c2), which is where float32 SSIM is least precise. Computed where and as SSIM's
    working precision computes (float32 on the decoded image's device: a magnitude needs no more).
    """
    x, y = x.detach().to(y.device, torch.float32), y.detach().to(y.device, torch.float32)
    n = len(x)
    ux, uy, uxx, uyy, uxy = box_mean(torch.cat([x, y, x * x, y * y, x * y]), win_size).split(n)
    cov = win_size**2 / (win_size**2 - 1)
    spread = cov * ((uxx - ux * ux) + (uyy - uy * uy)) + (0.03 * data_range) ** 2
    moments = 2 * uxy.abs() + 4 * (ux * uy).abs() + uxx + uyy + 2 * ux * ux + 2 * uy * uy
    return (4 + cov * moments / spread).flatten(1).mean(dim=1).to("cpu", torch.float64).numpy()


def ms_ssim_rounding(
    x: torch.Tensor, y: torch.Tensor, score, data_range: float = 2.0, kernel_size: int = 11
) -> np.ndarray:
    """:func:`ssim_rounding` for :func:`~mialib.similarity.ms_ssim` (same windows, scales and weights).

    MS-SSIM is a weighted geometric mean prod_k T_k^b_k of per-scale terms, each a mean of a map
    conditioned like SSIM's (the bracket of :func:`ssim_rounding`, with MS-SSIM's Gaussian moments and no
    covariance factor; the luminance at the coarsest scale adds 4). A relative rounding r moves each term
    by at most r * R_k and the score by at most r * score * sum_k b_k R_k / T_k. An image with a term
    clamped at 0 has no first-order bound (MS-SSIM is not Lipschitz there): its value is inf. Float32 on
    the decoded image's device, as :func:`ssim_rounding`.
    """
    x, y = x.detach().to(y.device, torch.float32), y.detach().to(y.device, torch.float32)
    n, c, h, w = x.shape
    scales = ms_ssim_scales(min(h, w), kernel_size)
    x, y = x.reshape(n * c, 1, h, w), y.reshape(n * c, 1, h, w)
    betas = np.asarray(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    sigma, taps = 1.5, int(3.5 * 1.5 + 0.5) * 2 + 1
    pad = taps // 2
    g = torch.exp(-((torch.arange(taps, dtype=torch.float32, device=x.device) - pad) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(images):
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
        return torch.nn.functional.conv2d(
            torch.nn.functional.conv2d(images, g.view(1, 1, 1, taps)), g.view(1, 1, taps, 1)
        )

    relative = np.zeros(n)
    for scale in range(scales):
        ux, uy, xx, yy, xy = blur(torch.cat([x, y, x * x, y * y, x * y])).split(n * c)
        spread = (xx - ux * ux).clamp(min=0) + (yy - uy * uy).clamp(min=0) + c2
        cs_map = (2 * (xy - ux * uy) + c2) / spread
        bracket = (2 * xy.abs() + 4 * (ux * uy).abs() + xx + yy + 2 * ux * ux + 2 * uy * uy) / spread
        if scale < scales - 1:
            term = cs_map[..., pad:-pad, pad:-pad].reshape(n, -1).mean(dim=1)
            bound = bracket[..., pad:-pad, pad:-pad].reshape(n, -1).mean(dim=1)
        else:
            luminance = (2 * ux * uy + c1) / (ux * ux + uy * uy + c1)
            term = (cs_map * luminance).reshape(n, -1).mean(dim=1)
            bound = (bracket + 4).reshape(n, -1).mean(dim=1)
        with np.errstate(divide="ignore"):
            relative += (
                betas[scale]
                * bound.to("cpu", torch.float64).numpy()
                / term.clamp(min=0).to("cpu", torch.float64).numpy()
            )  # inf where clamped
        x, y = torch.nn.functional.avg_pool2d(x, 2), torch.nn.functional.avg_pool2d(y, 2)
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(relative), np.inf, np.abs(np.asarray(score, dtype=np.float64)) * relative)


@torch.no_grad()
def structural_attack(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    t: int = 100,
    stride: int = 50,
    measure: str = "ssim",
    recon: bool = False,
    *,
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

    Extras: the score's measure, pixel ``mse`` of the same decoded image, ``latent_mse`` (inverted vs
    clean latent) and ``ssim_rounding`` / ``ms_ssim_rounding`` (the score's sensitivity to rounding, for the
    registry's tolerance). t = 0 is the plain VAE round trip (no U-Net).

    ``recon``: compare D(inverted latent) with the autoencoder's own reconstruction D(E(x)) instead of x
    (the VAE's error on the image, which the paper's score carries and which ranks images by how well the
    autoencoder reproduces them, cancels; the inversion's effect remains). Costs one more decode.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, not {measure!r}")
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
    decoded = decode_at(target, trajectory, t)
    against = decode_at(target, trajectory, 0).to(images) if recon else images
    score_fn = ssim if measure == "ssim" else ms_ssim
    similarity = score_fn(against, decoded, data_range=data_range, precision="working").numpy()
    rounding = (
        ssim_rounding(against, decoded, data_range)
        if measure == "ssim"
        else ms_ssim_rounding(against, decoded, similarity, data_range)
    )
    extras = {
        measure: similarity,
        "mse": mse(images, decoded).numpy(),
        "latent_mse": latent_mse(trajectory[t], trajectory[0]),
        f"{measure}_rounding": rounding,
    }
    return AttackOutput(scores=similarity, extras=extras)
