"""Batched image similarities; SSIM matches ``skimage.metrics.structural_similarity`` exactly.

Multi-scale SSIM (Wang et al. 2003) matches ``torchmetrics``' implementation, with as many scales as
the image size allows (see ``ms_ssim``).

skimage's defaults: a 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance (N / (N - 1)),
the SSIM map averaged over the region that the window covers fully (a border of 3 pixels is
dropped), and for colour images the mean over channels. A 7x7 box mean without padding computes
exactly that region, so this runs on whole batches. On a CPU, up to ``BOX_MATMUL_MAX_SIDE`` px, it is
two products with a banded matrix of ones (rows, then columns), about 7 times faster than the average
pool it replaces there (and 3 times in float64), with the same sums: each output adds the same 7 x 7
values, the band's zeros add nothing. Larger images, and GPUs (where a user's TF32 setting for matrix
products would round them), use ``avg_pool2d``.

Precision: ``precision="reference"`` (the default) computes in float64 on the CPU, the form the tests
compare with skimage and torchmetrics; ``precision="working"`` computes in float32 on the device of the
decoded image (the model's), which the attacks use so that a GPU run never waits on the CPU. The two
agree within 1e-5 (tested). Both return float64 CPU tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRECISIONS = ("reference", "working")
BOX_MATMUL_MAX_SIDE = 256  # up to here the banded products beat avg_pool2d on a CPU in float32 and float64


def _band(n: int, window: int, like: torch.Tensor) -> torch.Tensor:
    """(n, n - window + 1) matrix with ones where ``j <= i < j + window``: ``x @ band`` sums each run of
    ``window`` consecutive values along x's last axis."""
    i = torch.arange(n, device=like.device).view(-1, 1)
    j = torch.arange(n - window + 1, device=like.device).view(1, -1)
    return ((i >= j) & (i < j + window)).to(like.dtype)


def box_mean(images: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over every ``window`` x ``window`` square that fits inside the image (no padding), per channel:
    what ``F.avg_pool2d(images, window, stride=1)`` computes."""
    h, w = images.shape[-2:]
    if images.device.type != "cpu" or max(h, w) > BOX_MATMUL_MAX_SIDE:
        return F.avg_pool2d(images, window, stride=1)
    sums = _band(h, window, images).T @ (images @ _band(w, window, images))
    return sums / (window * window)


def _pair(x: torch.Tensor, y: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images where and in what dtype ``precision`` says (see the module docstring)."""
    if precision == "reference":
        return x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
    if precision == "working":
        return x.detach().to(y.device, torch.float32), y.detach().to(y.device, torch.float32)
    raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")


def _full_float32():
    """cuDNN may run float32 convolutions in TF32 (10-bit mantissa) on recent GPUs, which would put the
    blurred moments off by about 1e-3; the similarity convolutions ask for full float32."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    )


def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win_size: int = 7, precision: str = "reference"
) -> torch.Tensor:
    """SSIM per image for batches (n, c, h, w); returns a float64 CPU tensor of shape (n,).

    ``data_range`` defaults to 2 (images in [-1, 1]); the paper's official code passes 1.0.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (n, c, h, w) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"images of {tuple(x.shape[-2:])} are smaller than the {win_size}x{win_size} window")
    x, y = _pair(x, y, precision)
    n, c, h, w = x.shape
    cov_norm = win_size**2 / (win_size**2 - 1)
    # the five local means in one pass (every channel on its own)
    ux, uy, uxx, uyy, uxy = box_mean(torch.cat([x, y, x * x, y * y, x * y]), win_size).split(n)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return ssim_map.reshape(n, c, -1).mean(dim=(1, 2)).to("cpu", torch.float64)


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image (float64 on the CPU, shape (n,); some devices have no float64)."""
    diff = x.detach().to("cpu", torch.float64) - y.detach().to("cpu", torch.float64)
    return diff.pow(2).flatten(1).mean(dim=1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB (matches ``skimage.metrics.peak_signal_noise_ratio``)."""
    return 10 * torch.log10(data_range**2 / mse(x, y))


# Wang, Simoncelli and Bovik (2003): the exponents of the five scales, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_scales(size: int, kernel_size: int = 11) -> int:
    """The most scales (at most five) that torchmetrics accepts for square images of ``size`` pixels."""
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        divisor = max(1, scales - 1) ** 2
        if size >= 2**scales and size // divisor > kernel_size - 1:
            return scales
    raise ValueError(f"images of {size} px are too small for multi-scale SSIM with a {kernel_size}-pixel window")


def ms_ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, kernel_size: int = 11, precision: str = "reference"
) -> torch.Tensor:
    """Multi-scale SSIM per image (float64 CPU tensor, shape (n,)), computed exactly as ``torchmetrics`` computes it.

    Wang et al. (2003): contrast-structure terms at the finer scales, full SSIM at the coarsest, 2 x 2
    average pooling between scales. The standard window: a Gaussian of sigma 1.5 over 11 x 11 pixels on
    reflect-padded images (the padding kept out of the contrast-structure means, as torchmetrics does).
    The number of scales is the largest that fits the image (5 at 256 px and above, 2 at the tiny
    target's 32 px; ``ms_ssim_scales``), with Wang et al.'s weights of those scales renormalised to sum
    to one. Negative terms are clamped at 0 (torchmetrics' ``normalize="relu"``), so the value lies in
    [0, 1]. Images are not clamped to the data range.

    Written here rather than calling ``torchmetrics.functional.multiscale_structural_similarity_index_measure``
    because that is about 60 times slower on CPU in float64 (3.3 s against 0.05 s for SSIM on 64 images
    of 32 px, one thread), and every decoded inversion step is measured; the tests compare the two.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (n, c, h, w) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    scales = ms_ssim_scales(min(x.shape[-2:]), kernel_size)
    n, c, h, w = x.shape
    x, y = _pair(x, y, precision)
    x, y = x.reshape(n * c, 1, h, w), y.reshape(n * c, 1, h, w)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    betas = weights / weights.sum()
    sigma, taps = 1.5, int(3.5 * 1.5 + 0.5) * 2 + 1  # torchmetrics' Gaussian: 11 taps for sigma 1.5
    pad = taps // 2
    g = torch.exp(-((torch.arange(taps, dtype=x.dtype, device=x.device) - pad) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2

    def blur(images):  # separable Gaussian on reflect-padded images: output has the input's size
        images = F.pad(images, (pad, pad, pad, pad), mode="reflect")
        with _full_float32():
            return F.conv2d(F.conv2d(images, g.view(1, 1, 1, taps)), g.view(1, 1, taps, 1))

    terms = []
    for scale in range(scales):
        ux, uy, xx, yy, xy = blur(torch.cat([x, y, x * x, y * y, x * y])).split(n * c)
        vx = (xx - ux * ux).clamp(min=0)
        vy = (yy - uy * uy).clamp(min=0)
        cs_map = (2 * (xy - ux * uy) + c2) / (vx + vy + c2)
        if scale < scales - 1:
            term = cs_map[..., pad:-pad, pad:-pad].reshape(n, -1).mean(dim=1)
        else:
            luminance = (2 * ux * uy + c1) / (ux * ux + uy * uy + c1)
            term = (cs_map * luminance).reshape(n, -1).mean(dim=1)
        terms.append(term.clamp(min=0))
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(terms) ** betas.view(-1, 1), dim=0).to("cpu", torch.float64)
