"""One file per attack. Every attack takes (target, images, captions, ids, settings...) and returns an
``AttackOutput`` whose ``scores`` follow the convention "higher means member"."""

from .base import AttackOutput, condition, image_seed
from .loss import loss_attack, loss_errors
from .structural import structural_attack, structural_curve
from .vae_control import vae_control

__all__ = [
    "AttackOutput",
    "condition",
    "image_seed",
    "loss_attack",
    "loss_errors",
    "structural_attack",
    "structural_curve",
    "vae_control",
]
