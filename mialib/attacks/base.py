"""What every attack shares: its output, the prompt conditioning and per-image seeds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

PROMPT_MODES = ("caption", "empty")


@dataclass
class AttackOutput:
    """Scores for a batch (higher means member) and the cost of computing them."""

    scores: np.ndarray  # (n,)
    unet_evals: int  # U-Net evaluations per image
    extras: dict = field(default_factory=dict)  # per-image intermediate values, name -> (n,) array


def condition(target, captions: list[str], prompt: str = "caption", guidance: float = 1.0):
    """Text conditioning for a batch: (cond, uncond); uncond is None when guidance is 1.

    ``prompt="caption"`` uses each image's caption, ``"empty"`` the empty prompt for every image.
    """
    if prompt not in PROMPT_MODES:
        raise ValueError(f"prompt must be one of {PROMPT_MODES}, not {prompt!r}")
    texts = list(captions) if prompt == "caption" else [""] * len(captions)
    cond = target.encode_prompts(texts)
    uncond = None if guidance == 1.0 else target.encode_prompts([""] * len(captions))
    return cond, uncond


def image_seed(image_id: str, seed: int = 0) -> int:
    """A seed derived from the image id, so an image gets the same noise in every batch and run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[:8], "little") % (2**63)


def seeded_normal(shape: tuple[int, ...], ids: list[str], seed: int = 0) -> torch.Tensor:
    """Standard normal noise of ``shape`` per image (common random numbers across attacks and runs)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(i, seed))) for i in ids])
