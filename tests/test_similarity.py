"""mialib.similarity against scikit-image and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mialib.similarity import BOX_MATMUL_MAX_SIDE, MS_SSIM_WEIGHTS, box_mean, ms_ssim, ms_ssim_scales, mse, psnr, ssim


def _random_pair(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, shape)
    y = np.clip(x + rng.normal(0, 0.3, shape), -1, 1)
    return x, y


def _structured_pair(shape):
    """Two images with different content: a gradient with a square vs. a checkerboard with a disc."""
    c, h, w = shape
    ys, xs = np.mgrid[0:h, 0:w]
    x = np.stack([(xs / (w - 1)) * 2 - 1 + 0.2 * k for k in range(c)])
    x[:, h // 4 : h // 2, w // 4 : w // 2] = -0.8
    checker = np.where((ys // 3 + xs // 3) % 2 == 0, 0.7, -0.7).astype(np.float64)
    disc = ((ys - h / 2) ** 2 + (xs - w / 3) ** 2) < (min(h, w) / 4) ** 2
    y = np.stack([np.where(disc, 0.9 - 0.3 * k, checker) for k in range(c)])
    return np.clip(x, -1, 1), y


def _skimage_ssim(x, y, data_range):
    return np.array([structural_similarity(a, b, channel_axis=0, data_range=data_range) for a, b in zip(x, y)])


@pytest.mark.parametrize("data_range", [2.0, 1.0])
@pytest.mark.parametrize("shape", [(3, 7, 7), (3, 16, 16), (3, 13, 29), (1, 32, 24), (3, 64, 64)])
def test_ssim_equals_skimage_on_random_images(shape, data_range):
    pairs = [_random_pair(shape, seed) for seed in range(3)]
    x = np.stack([p[0] for p in pairs])
    y = np.stack([p[1] for p in pairs])
    got = ssim(torch.from_numpy(x), torch.from_numpy(y), data_range=data_range)
    assert got.dtype == torch.float64 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), _skimage_ssim(x, y, data_range), rtol=0, atol=1e-10)


@pytest.mark.parametrize("data_range", [2.0, 1.0])
@pytest.mark.parametrize("shape", [(3, 12, 12), (3, 20, 33), (1, 40, 40)])
def test_ssim_equals_skimage_on_images_of_different_content(shape, data_range):
    x, y = _structured_pair(shape)
    expected = structural_similarity(x, y, channel_axis=0, data_range=data_range)
    assert expected < 0.5  # the two pictures really are different
    got = ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None], data_range=data_range)
    np.testing.assert_allclose(got.numpy(), [expected], rtol=0, atol=1e-10)
    # and the same picture against itself is exactly 1
    same = ssim(torch.from_numpy(x)[None], torch.from_numpy(x)[None], data_range=data_range)
    np.testing.assert_allclose(same.numpy(), [1.0], rtol=0, atol=1e-12)


def test_ssim_of_float32_batch_matches_skimage_on_float64_copy():
    x, y = _structured_pair((3, 32, 32))
    xs = torch.from_numpy(np.stack([x, y])).float()
    ys = torch.from_numpy(np.stack([y, x[:, ::-1].copy()])).float()
    expected = _skimage_ssim(xs.double().numpy(), ys.double().numpy(), 2.0)
    np.testing.assert_allclose(ssim(xs, ys).numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape", [(7, 7), (32, 32), (13, 29), (BOX_MATMUL_MAX_SIDE, 40), (BOX_MATMUL_MAX_SIDE + 1, 20)]
)
def test_box_mean_equals_the_average_pool_it_replaces(shape, dtype):
    """The banded products (up to BOX_MATMUL_MAX_SIDE px) and the average pool (beyond) are one filter."""
    x = torch.from_numpy(np.random.default_rng(sum(shape)).uniform(-1, 1, (5, 3, *shape))).to(dtype)
    expected = torch.nn.functional.avg_pool2d(x.double(), 7, stride=1)
    got = box_mean(x, 7)
    assert got.dtype == dtype and got.shape == expected.shape
    np.testing.assert_allclose(
        got.double().numpy(), expected.numpy(), rtol=0, atol=1e-15 if dtype == torch.float64 else 2e-7
    )


@pytest.mark.parametrize("precision", ["reference", "working"])
def test_ssim_of_an_image_does_not_depend_on_its_batch(precision):
    """Scores are keyed per image, so an image's SSIM must be the same bits in a batch of 1, 8 or 64."""
    x = torch.from_numpy(np.random.default_rng(5).uniform(-1, 1, (64, 3, 32, 32))).float()
    y = torch.clamp(x + 0.1 * torch.from_numpy(np.random.default_rng(6).normal(size=x.shape)).float(), -1, 1)
    whole = ssim(x, y, precision=precision)
    for size in (1, 8):
        parts = torch.cat([ssim(x[i : i + size], y[i : i + size], precision=precision) for i in range(0, 64, size)])
        assert torch.equal(parts, whole)


def test_ssim_rejects_images_smaller_than_the_window():
    x = torch.zeros(1, 3, 6, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(x, x)
    with pytest.raises(ValueError):  # skimage refuses the same input
        structural_similarity(x[0].numpy(), x[0].numpy(), channel_axis=0, data_range=2.0)


def test_ssim_rejects_mismatched_or_unbatched_shapes():
    with pytest.raises(ValueError):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


@pytest.mark.parametrize("data_range", [2.0, 1.0])
def test_psnr_equals_skimage(data_range):
    x, y = _random_pair((4, 3, 16, 20), 7)
    x2, y2 = _structured_pair((3, 16, 20))
    x = np.concatenate([x, x2[None]])
    y = np.concatenate([y, y2[None]])
    expected = [peak_signal_noise_ratio(a, b, data_range=data_range) for a, b in zip(x, y)]
    got = psnr(torch.from_numpy(x), torch.from_numpy(y), data_range=data_range)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_mse_equals_numpy():
    x, y = _random_pair((5, 3, 9, 11), 3)
    expected = ((x - y) ** 2).reshape(5, -1).mean(axis=1)
    got = mse(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert got.dtype == torch.float64
    # float32 inputs are widened before subtracting: compare with numpy on the float32 values
    x32, y32 = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(got.numpy(), ((x32 - y32) ** 2).reshape(5, -1).mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # a hand-computed case: one pixel off by 0.5 out of 4 values
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]])
    assert mse(a, b).item() == pytest.approx(0.0625)


# --------------------------------------------------------------------------------------------------
# Multi-scale SSIM: against torchmetrics and against Wang et al.'s definition written out with scipy.
def _reference_ms_ssim(x, y, data_range=2.0, sigma=1.5, taps=11):
    """MS-SSIM by its definition: contrast-structure terms at the finer scales, full SSIM at the coarsest,
    2x2 average pooling between scales, an 11-tap Gaussian window over reflect-padded images (the padding
    kept out of the contrast-structure mean), negative terms clamped at 0, renormalised Wang weights."""
    g = np.exp(-((np.arange(taps) - taps // 2) ** 2) / (2 * sigma**2))
    window = np.outer(g, g) / g.sum() ** 2
    pad = taps // 2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scales = ms_ssim_scales(x.shape[-1])
    beta = np.array(MS_SSIM_WEIGHTS[:scales]) / np.sum(MS_SSIM_WEIGHTS[:scales])
    values = []
    for a, b in zip(x, y):
        terms = []
        for scale in range(scales):
            cs_means, ssim_means = [], []
            for ca, cb in zip(a, b):

                def blur(image):
                    return convolve2d(np.pad(image, pad, mode="reflect"), window, mode="valid")

                ux, uy = blur(ca), blur(cb)
                vx, vy = np.maximum(blur(ca * ca) - ux**2, 0), np.maximum(blur(cb * cb) - uy**2, 0)
                vxy = blur(ca * cb) - ux * uy
                cs = (2 * vxy + c2) / (vx + vy + c2)
                luminance = (2 * ux * uy + c1) / (ux**2 + uy**2 + c1)
                cs_means.append(cs[pad:-pad, pad:-pad].mean())
                ssim_means.append((cs * luminance).mean())
            terms.append(np.mean(ssim_means) if scale == scales - 1 else np.mean(cs_means))
            c, h, w = a.shape
            a = a.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
            b = b.reshape(c, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
        values.append(np.prod(np.maximum(terms, 0) ** beta))
    return np.array(values)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_ms_ssim_matches_its_definition(size):
    x, y = _random_pair((3, 3, size, size), seed=size)
    ours = ms_ssim(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(ours, _reference_ms_ssim(x, y), atol=1e-6)
    assert np.all((ours > 0) & (ours < 1))


@pytest.mark.parametrize("size", [16, 32, 64, 256])
def test_ms_ssim_matches_torchmetrics(size):
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    x, y = _random_pair((4, 3, size, size), seed=size + 1)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    weights = np.array(MS_SSIM_WEIGHTS[: ms_ssim_scales(size)])
    expected = multiscale_structural_similarity_index_measure(
        x, y, data_range=2.0, betas=tuple(weights / weights.sum()), normalize="relu", reduction="none"
    )
    np.testing.assert_allclose(ms_ssim(x, y).numpy(), expected.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(
        ms_ssim(x, y, data_range=1.0).numpy(),
        multiscale_structural_similarity_index_measure(
            x, y, data_range=1.0, betas=tuple(weights / weights.sum()), normalize="relu", reduction="none"
        ).numpy(),
        rtol=0,
        atol=1e-7,
    )


def test_ms_ssim_scales_follow_the_image_size():
    assert [ms_ssim_scales(s) for s in (16, 32, 64, 128, 512)] == [2, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_scales(8)


def test_ms_ssim_identity_symmetry_and_order():
    x, y = _random_pair((2, 3, 32, 32), seed=1)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    np.testing.assert_allclose(ms_ssim(x, x).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(ms_ssim(x, y).numpy(), ms_ssim(y, x).numpy(), atol=1e-12)
    worse = torch.clamp(x + 0.6 * torch.from_numpy(np.random.default_rng(2).normal(size=x.shape)), -1, 1)
    assert torch.all(ms_ssim(x, worse) < ms_ssim(x, y))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CI has no GPU; a GPU machine runs both


@pytest.mark.parametrize(
    "device, size", [(d, s) for d in DEVICES for s in (32, 64, 256, 512) if s < 512 or d == "cuda"]
)  # 512 px: on a GPU only (10 s on this CPU)
def test_the_working_precision_agrees_with_the_float64_reference_within_1e5(size, device):
    """The attacks compute SSIM and MS-SSIM in float32 on the decoded image's device; the float64 CPU path
    (equal to skimage / torchmetrics above) is the reference. Near-identical pairs (a decoder's
    reconstruction) and unrelated ones, flat regions included; on a GPU as well where one is present."""
    rng = np.random.default_rng(size)
    x = rng.uniform(-1, 1, (4, 3, size, size))
    x[:, :, : size // 4] = 0.25  # a flat band: variances near zero, where cancellation would show
    near = np.clip(x + rng.normal(0, 0.02, x.shape), -1, 1)
    far = rng.uniform(-1, 1, x.shape)
    for y in (near, far):
        xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
        for function in (ssim, ms_ssim):
            reference = function(xt, yt, precision="reference")
            working = function(xt.to(device), yt.to(device), precision="working")
            assert working.dtype == torch.float64 and working.device.type == "cpu"
            np.testing.assert_allclose(working.numpy(), reference.numpy(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="precision"):
        ssim(xt, yt, precision="half")
