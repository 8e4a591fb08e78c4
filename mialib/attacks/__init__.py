"""One file per attack, and the registry that lists them (:mod:`.registry`).

Every attack takes ``(target, images, captions, ids, **parameters, **settings)``, the shared settings
keyword-only (and ``cache=``, the trajectory cache, when the registry says it inverts), and returns an
``AttackOutput`` whose ``scores`` follow the method's convention "higher means member"; calibration may
reverse the structural family's direction, once, in :func:`mialib.metrics.choose_setting`. What a call
costs is counted by the run layer (:func:`mialib.runs.attack_values`), not by the attack. The inversion
they share, the prompt conditioning and the per-image seeds live below them (:mod:`mialib.inversion`,
:mod:`mialib.hashing`).
"""

from .backward import backward_attack
from .base import AttackOutput
from .clid import clid_attack, reduce_caption
from .curve import noise_curve_attack
from .latent import latent_attack
from .loss import loss_attack, loss_errors
from .pia import pia_attack
from .pixel import pixel_attack
from .registry import REGISTRY, AttackRequest, AttackSpec, get, parse_request
from .secmi import secmi_attack
from .structural import structural_attack
from .vae_control import vae_control

__all__ = [
    "REGISTRY",
    "AttackOutput",
    "AttackRequest",
    "AttackSpec",
    "backward_attack",
    "clid_attack",
    "get",
    "latent_attack",
    "loss_attack",
    "loss_errors",
    "noise_curve_attack",
    "parse_request",
    "pia_attack",
    "pixel_attack",
    "reduce_caption",
    "secmi_attack",
    "structural_attack",
    "vae_control",
]
