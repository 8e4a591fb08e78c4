"""Batched image similarities; SSIM matches ``skimage.metrics.structural_similarity`` exactly.

skimage's defaults: a 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance (N / (N - 1)),
the SSIM map averaged over the region that the window covers fully (a border of 3 pixels is
dropped), and for colour images the mean over channels. A 7x7 average pool without padding
computes exactly that region, so this runs in float64 on whole batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win_size: int = 7) -> torch.Tensor:
    """SSIM per image for batches (n, c, h, w); returns a float64 tensor of shape (n,).

    ``data_range`` defaults to 2 (images in [-1, 1]); the paper's official code passes 1.0.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (n, c, h, w) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"images of {tuple(x.shape[-2:])} are smaller than the {win_size}x{win_size} window")
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.float64)
    n, c, h, w = x.shape
    x = x.reshape(n * c, 1, h, w)
    y = y.reshape(n * c, 1, h, w)
    cov_norm = win_size**2 / (win_size**2 - 1)

    def mean(image):
        return F.avg_pool2d(image, win_size, stride=1)

    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return ssim_map.reshape(n, c, -1).mean(dim=(1, 2))


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image (float64, shape (n,))."""
    diff = x.detach().to("cpu", torch.float64) - y.detach().to("cpu", torch.float64)
    return diff.pow(2).flatten(1).mean(dim=1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB (matches ``skimage.metrics.peak_signal_noise_ratio``)."""
    return 10 * torch.log10(data_range**2 / mse(x, y))
