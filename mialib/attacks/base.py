"""What every attack returns: its scores and per-image extras, nothing about what computing them cost.

The cost is the run layer's to count (:func:`mialib.runs.attack_values` reads ``target.unet_evals``
around each call: the ``unet_evals_run`` column) and the registry's to state
(:attr:`~mialib.attacks.registry.AttackSpec.cost`: the ``unet_evals`` column). The prompt conditioning
is :func:`mialib.inversion.condition` and the per-image seeds and noise are :mod:`mialib.hashing`'s
(below the attacks: the transforms and the trajectory cache use them too)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class AttackOutput:
    """Scores for a batch (higher means member) and the per-image values they were computed from."""

    scores: np.ndarray  # (n,)
    extras: dict = field(default_factory=dict)  # per-image intermediate values, name -> (n,) array
