"""Named, parameterised distortions of query images (robustness study, paper section 4.4).

Every distortion maps a preprocessed batch (n, 3, h, w) in [-1, 1] to a batch of the same shape, with
randomness drawn from a per-image seed (the image id), so a distorted set is reproducible and the same
image gets the same distortion in every run. The paper's four: salt-and-pepper on 10 % of pixels,
rotation by 10 degrees, saturation and brightness each scaled by a factor in [0.5, 1.5] with
probability 0.5. Added here: JPEG quality, Gaussian blur, Gaussian noise, resized crop, down-up scaling.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from .hashing import image_seed

# The paper's four distortions at the strengths of its Tables 7-8.
PAPER_DISTORTIONS = {"salt_pepper": 0.10, "rotation": 10.0, "saturation": 0.5, "brightness": 0.5}


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = ((image.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def salt_pepper(image: torch.Tensor, amount: float, rng: np.random.Generator) -> torch.Tensor:
    """Set a fraction ``amount`` of pixels (all channels) to black or white, half each."""
    out = image.clone()
    h, w = image.shape[-2:]
    hit = rng.random((h, w)) < amount
    white = rng.random((h, w)) < 0.5
    out[:, torch.from_numpy(hit & white)] = 1.0
    out[:, torch.from_numpy(hit & ~white)] = -1.0
    return out


def rotation(image: torch.Tensor, degrees: float, rng: np.random.Generator) -> torch.Tensor:
    """Rotate by ``degrees`` counter-clockwise about the centre, bilinear, corners filled black."""
    return _from_pil(_to_pil(image).rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)))


def _enhance(
    kind, image: torch.Tensor, factor: float, rng: np.random.Generator, probability: float = 0.5
) -> torch.Tensor:
    scale = rng.uniform(1 - factor, 1 + factor)
    if rng.random() >= probability:
        return image.clone()
    return _from_pil(kind(_to_pil(image)).enhance(scale))


def saturation(image: torch.Tensor, factor: float, rng: np.random.Generator) -> torch.Tensor:
    """With probability 0.5, scale colour saturation by a factor drawn from [1 - factor, 1 + factor]."""
    return _enhance(ImageEnhance.Color, image, factor, rng)


def brightness(image: torch.Tensor, factor: float, rng: np.random.Generator) -> torch.Tensor:
    """With probability 0.5, scale brightness by a factor drawn from [1 - factor, 1 + factor]."""
    return _enhance(ImageEnhance.Brightness, image, factor, rng)


def jpeg(image: torch.Tensor, quality: float, rng: np.random.Generator) -> torch.Tensor:
    """JPEG round trip at the given quality (1-95)."""
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return _from_pil(Image.open(buffer))


def gaussian_blur(image: torch.Tensor, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` pixels."""
    return _from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


def gaussian_noise(image: torch.Tensor, std: float, rng: np.random.Generator) -> torch.Tensor:
    """Add N(0, std^2) noise in [-1, 1] units, then clip to the range."""
    noise = torch.from_numpy(rng.normal(0.0, std, size=tuple(image.shape)).astype(np.float32))
    return (image + noise).clamp(-1, 1)


def resized_crop(image: torch.Tensor, scale: float, rng: np.random.Generator) -> torch.Tensor:
    """Crop a random square covering ``scale`` of the area, resize back (bicubic)."""
    h, w = image.shape[-2:]
    side = max(1, int(round(min(h, w) * np.sqrt(scale))))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = _to_pil(image).crop((left, top, left + side, top + side))
    return _from_pil(crop.resize((w, h), Image.Resampling.BICUBIC))


def down_up(image: torch.Tensor, factor: float, rng: np.random.Generator) -> torch.Tensor:
    """Downscale by ``factor`` and back up (bicubic both ways)."""
    h, w = image.shape[-2:]
    small = _to_pil(image).resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BICUBIC)
    return _from_pil(small.resize((w, h), Image.Resampling.BICUBIC))


DISTORTIONS: dict[str, Callable] = {
    "salt_pepper": salt_pepper,
    "rotation": rotation,
    "saturation": saturation,
    "brightness": brightness,
    "jpeg": jpeg,
    "gaussian_blur": gaussian_blur,
    "gaussian_noise": gaussian_noise,
    "resized_crop": resized_crop,
    "down_up": down_up,
}


def distort(images: torch.Tensor, ids: list[str], name: str, strength: float, seed: int = 0) -> torch.Tensor:
    """Apply the distortion ``name`` at ``strength`` to every image, seeded by image id."""
    if name not in DISTORTIONS:
        raise ValueError(f"unknown distortion {name!r}; known: {sorted(DISTORTIONS)}")
    if len(ids) != len(images):
        raise ValueError("one id per image is needed")
    function = DISTORTIONS[name]
    out = [
        function(image, strength, np.random.default_rng(image_seed(f"{i}:{name}:{strength}", seed)))
        for image, i in zip(images, ids)
    ]
    return torch.stack(out)


def distortion(name: str, strength: float, seed: int = 0) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """The distortion as a batch transform ``(images, ids) -> images`` (for ``ImageSet.map``)."""
    if name not in DISTORTIONS:
        raise ValueError(f"unknown distortion {name!r}; known: {sorted(DISTORTIONS)}")
    return lambda images, ids: distort(images, ids, name, strength, seed)
