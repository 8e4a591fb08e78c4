"""Tiny seeded Stable-Diffusion-shaped pipeline for the unit tests (CPU, a few seconds to build).

Imported by the test modules (not a conftest: conftest.py belongs to the notebook smoke tests).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CAPTIONS = ["red apple", "grinning face", "man farmer"]
MAX_TOKENS = 16
# vae_channels=(8, 16) cannot be built: tiny.build_components uses norm_num_groups=16, and GroupNorm
# needs channels divisible by the group count ("num_channels (8) must be divisible by num_groups (16)").
VAE_CHANNELS = (16, 32)
UNET_CHANNELS = (16, 32)
IMAGE_SIZE = 32
# Deliberately not Stable Diffusion's 0.18215, so a hard-coded constant anywhere would show up.
SCALING_FACTOR = 0.7


def tiny_config():
    from mialib.tiny import TinyConfig

    return TinyConfig(
        image_size=IMAGE_SIZE,
        vae_channels=VAE_CHANNELS,
        unet_channels=UNET_CHANNELS,
        text_dim=32,
        max_tokens=MAX_TOKENS,
    )


def build_tiny_pipeline():
    """An untrained, seeded StableDiffusionPipeline built from mialib.tiny components."""
    from diffusers import StableDiffusionPipeline

    from mialib.tiny import build_components, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(CAPTIONS, MAX_TOKENS)
    components = build_components(tiny_config(), tokenizer)
    components["vae"].register_to_config(scaling_factor=SCALING_FACTOR)
    for name in ("vae", "unet", "text_encoder"):
        components[name].eval().requires_grad_(False)
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def save_tiny_pipeline(folder: Path):
    """Build the tiny pipeline, save it (safetensors) to ``folder`` and return the in-memory pipeline."""
    pipeline = build_tiny_pipeline()
    pipeline.save_pretrained(folder, safe_serialization=True)
    return pipeline


def save_tiny_lora(pipeline, folder: Path, rank: int = 4, alpha: int = 8, seed: int = 0) -> Path:
    """A LoRA of ``pipeline``'s U-Net (SD3 / FLUX: transformer) attention projections with random (nonzero)
    weights, made with peft and saved with the pipeline class's own ``save_lora_weights`` (safetensors, its rank
    and alpha in the metadata), as diffusers' training scripts save them (:func:`mialib.tiny.save_lora`);
    returns the file. ``pipeline`` is left without the adapter."""
    import copy

    from mialib.tiny import add_lora, save_lora

    component = "transformer" if getattr(pipeline, "transformer", None) is not None else "unet"
    model = copy.deepcopy(getattr(pipeline, component))
    torch.manual_seed(seed)
    add_lora(model, rank, alpha, init=False)
    return save_lora(model, folder, type(pipeline))


def make_images(n: int = 2, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    """Structured images in [-1, 1]: a smooth gradient, a bright disc and a little seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for i in range(n):
        centre = 0.5 * (torch.rand(2, generator=generator) - 0.5)
        disc = ((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 < 0.3).float()
        channels = [
            torch.tanh(1.5 * (xs * (c + 1) - ys * (i + 1)) + disc - 0.5)
            + 0.1 * torch.randn(size, size, generator=generator)
            for c in range(3)
        ]
        images.append(torch.stack(channels).clamp(-1, 1))
    return torch.stack(images)


def reference_image_seed(image_id: str, seed: int = 0) -> int:
    """The per-image seed as specified in attacks/base.py, re-implemented here with hashlib."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def reference_text_embeddings(pipeline, captions: list[str]) -> torch.Tensor:
    tokens = pipeline.tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        return pipeline.text_encoder(tokens.input_ids)[0]


class UNetCallCounter:
    """Forward hook on a U-Net: counts images per call and records timesteps and text embeddings."""

    def __init__(self, unet):
        self.images = 0
        self.calls = []  # (timestep tensor, encoder_hidden_states)
        self.handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        self.images += sample.shape[0]
        self.calls.append((torch.as_tensor(timestep).clone(), hidden.detach().clone()))

    def remove(self):
        self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class one_thread:
    """Run torch on one CPU thread and restore the previous count afterwards.

    The tiny models gain nothing from threads, and on a busy 2-core machine (another job training)
    two OpenMP threads made one U-Net call 100x slower (2 s instead of 20 ms).
    """

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


def write_imagefolder(
    folder: Path, n: int = 8, size: int = IMAGE_SIZE, seed: int = 0, subsets: bool = True, captions=None
):
    """An imagefolder (metadata.csv) of ``n`` structured PNG images, alternating members and non-members,
    and (with ``subsets``) calibration / test in both classes. Returns the folder."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = make_images(n, size, seed)
    names = [
        "red apple",
        "grinning face",
        "man farmer",
        "cat face",
        "blue car",
        "green tree",
        "old house",
        "small boat",
    ]
    rows = ["file_name,caption,label" + (",subset" if subsets else "")]
    for i in range(n):
        array = ((images[i].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"img{i:03d}.png")
        caption = captions[i] if captions is not None else f"{names[i % len(names)]} {i}"
        subset = "calibration" if (i // 2) % 2 == 0 else "test"
        rows.append(f"img{i:03d}.png,{caption},{1 - i % 2}" + (f",{subset}" if subsets else ""))
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder
