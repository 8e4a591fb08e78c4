"""Distortions of the robustness study, checked against PIL / numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from mialib import transforms


def _image(seed: int = 0, size: int = 32) -> torch.Tensor:
    """A smooth colour image on the uint8 grid (exactly representable after a PIL round trip)."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 255
    array = np.round(rgb).astype(np.uint8)
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def test_round_trip_is_exact_on_the_uint8_grid():
    image = _image()
    assert torch.equal(transforms._from_pil(transforms._to_pil(image)), image)


def test_salt_and_pepper_hits_the_requested_fraction_with_black_and_white():
    image = torch.zeros(3, 64, 64)
    out = transforms.salt_pepper(image, 0.1, np.random.default_rng(0))
    changed = (out != image).any(dim=0)
    assert changed.float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert set(out[:, changed].unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(out[:, ~changed], image[:, ~changed])


def test_rotation_equals_pil_rotate():
    image = _image()
    expected = (
        np.asarray(_pil(image).rotate(10, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)), dtype=np.float32)
        / 127.5
        - 1
    )
    out = transforms.rotation(image, 10, np.random.default_rng(0))
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert not torch.equal(out, image)


def test_brightness_draws_factor_then_applies_with_probability_half():
    image = _image()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        scale, apply = rng.uniform(0.5, 1.5), rng.random() < 0.5
        out = transforms.brightness(image, 0.5, np.random.default_rng(seed))
        if apply:
            expected = np.asarray(ImageEnhance.Brightness(_pil(image)).enhance(scale), dtype=np.float32) / 127.5 - 1
            np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-6)
        else:
            assert torch.equal(out, image)


def test_saturation_leaves_grey_images_unchanged():
    grey = torch.full((3, 16, 16), 0.2)
    grey = transforms._from_pil(transforms._to_pil(grey))
    for seed in range(4):
        assert torch.allclose(transforms.saturation(grey, 0.5, np.random.default_rng(seed)), grey, atol=1 / 127.5)


def test_jpeg_error_grows_as_quality_falls():
    image = _image()
    errors = [(transforms.jpeg(image, q, None) - image).abs().mean().item() for q in (95, 50, 10)]
    assert errors[0] < errors[1] < errors[2]


def test_gaussian_noise_has_the_requested_standard_deviation():
    image = torch.zeros(3, 128, 128)
    out = transforms.gaussian_noise(image, 0.1, np.random.default_rng(0))
    assert out.std().item() == pytest.approx(0.1, rel=0.03)


def test_identity_strengths_are_near_identity():
    image = _image()
    rng = np.random.default_rng(0)
    assert torch.allclose(transforms.down_up(image, 1.0, rng), image, atol=1e-6)
    assert torch.allclose(transforms.resized_crop(image, 1.0, rng), image, atol=1e-6)
    assert torch.allclose(transforms.gaussian_blur(image, 0.0, rng), image, atol=1e-6)


def test_distort_is_seeded_by_image_id():
    images = torch.stack([_image(), _image()])
    first = transforms.distort(images, ["a", "b"], "salt_pepper", 0.1)
    again = transforms.distort(images, ["a", "b"], "salt_pepper", 0.1)
    assert torch.equal(first, again)
    assert not torch.equal(first[0], first[1])  # same pixels, different ids, different noise
    with pytest.raises(ValueError):
        transforms.distort(images, ["a", "b"], "unknown", 1.0)
