"""What every attack returns. The prompt conditioning is :func:`mialib.inversion.condition` and the
per-image seeds and noise are :mod:`mialib.hashing`'s (below the attacks: the transforms and the
trajectory cache use them too)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class AttackOutput:
    """Scores for a batch (higher means member) and the cost of computing them."""

    scores: np.ndarray  # (n,)
    unet_evals: int  # U-Net evaluations per image
    extras: dict = field(default_factory=dict)  # per-image intermediate values, name -> (n,) array
