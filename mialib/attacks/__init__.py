"""One file per attack. Every attack takes (target, images, captions, ids, settings...) and returns an
``AttackOutput`` whose ``scores`` follow the convention "higher means member"."""

from .backward import backward_attack
from .base import AttackOutput, condition, image_seed
from .clid import clid_attack, reduce_caption
from .loss import loss_attack, loss_errors
from .pia import pia_attack
from .pixel import pixel_attack
from .secmi import secmi_attack
from .structural import inversion_trajectory, structural_attack, structural_curve, trajectory_measures
from .vae_control import vae_control

__all__ = [
    "AttackOutput",
    "backward_attack",
    "clid_attack",
    "condition",
    "image_seed",
    "inversion_trajectory",
    "loss_attack",
    "loss_errors",
    "pia_attack",
    "pixel_attack",
    "reduce_caption",
    "secmi_attack",
    "structural_attack",
    "structural_curve",
    "trajectory_measures",
    "vae_control",
]
