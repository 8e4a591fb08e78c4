"""PIA, proximal initialization attack (Kong et al., ICLR 2024, arXiv 2305.18355).

Take the model's own noise prediction on the clean latent as the "proximal initial" noise, noise the
latent to t with it deterministically, and ask the model for the noise again:

    eps_0 = eps(z_0, 0)
    z_t   = sqrt(alpha_prod_t) * z_0 + sqrt(1 - alpha_prod_t) * eps_0
    score = -mean over latent elements of |eps_0 - eps(z_t, t)|^p          (p = 4: the paper's ||.||_4^4)

A member's predictions are more self-consistent, so the distance is smaller. The paper sums over the
elements; the mean here ranks images identically. t defaults to 200 and is a parameter, to be
chosen on a calibration split like every other setting here.

What the official Stable Diffusion code computes (github.com/kong13661/PIA, ``stable_diffusion/stable_attack.py``
and ``components.py``), and how to reproduce each choice here:

- it rescales the latent: the attacker is built with ``normalize = lambda x: x * 2 - 1`` (meant for
  pixels in [0, 1]) and applies it to the VAE latent, which is already scaled, so every prediction is
  made on ``2 z_0 - 1`` instead of z_0. This is its largest deviation from the paper; the parameter
  ``official_rescale=True`` applies the same ``2 z_0 - 1`` (default False: the paper's z_0);
- it rebuilds linear betas (``np.linspace(0.00085, 0.012, 1000)``), although Stable Diffusion trains
  with scaled_linear ones: the setting ``schedule=official_linear``;
- its pipeline wrapper applies classifier-free guidance 7.5 with the empty prompt: ``guidance=7.5``;
- it encodes a posterior *sample* times a hard-coded 0.18215: ``encode_mode=sample`` (the VAE's own
  scaling factor is used here, which is 0.18215 for Stable Diffusion);
- it scores every t = k, 2k, ..., attack_num * k and reports each one's AUC: a calibration grid here.

Numerics: the registry's tolerance scales with the two predictions it subtracts (extra ``eps_norm``).
Cost: 2 U-Net evaluations per image at guidance 0 or 1, 4 otherwise.
"""

from __future__ import annotations

import torch

from .. import ddim
from ..hashing import image_seed
from ..inversion import condition
from .base import AttackOutput


@torch.no_grad()
def pia_attack(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    t: int = 200,
    p: float = 4,
    official_rescale: bool = False,
    *,
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    seed: int = 0,
) -> AttackOutput:
    """Score = -mean |eps(z_0, 0) - eps(z_t, t)|^p with z_t built from eps(z_0, 0).

    ``official_rescale``: replace z_0 by ``2 z_0 - 1`` first, as the official code does (see the module
    docstring). Extras: ``distance`` and ``eps_norm`` = (mean |eps_0|^p)^(1/p) + (mean |eps_t|^p)^(1/p).
    """
    t = int(t)
    abar = ddim.alphas_cumprod(target.scheduler, schedule)
    if not 0 < t < len(abar):
        raise ValueError(f"t must lie in [1, {len(abar) - 1}], not {t}")
    if p <= 0:
        raise ValueError(f"p must be positive, not {p}")
    if not isinstance(official_rescale, bool):
        raise ValueError(f"official_rescale must be true or false, not {official_rescale!r}")
    latents = target.encode_images(images, mode=encode_mode, seeds=[image_seed(i, seed) for i in ids])
    if official_rescale:
        latents = 2 * latents - 1  # the official code's normalize(x) = x * 2 - 1, applied to the latent
    cond, uncond = condition(target, captions, prompt=prompt, guidance=guidance)
    # 1. proximal initial noise: the prediction at t = 0 on the clean latent
    eps_0 = target.eps(latents, 0, cond, uncond, guidance=guidance)
    # 2. deterministic forward noising with that noise
    alpha_prod_t = abar[t]
    noisy = alpha_prod_t.sqrt().to(latents.dtype) * latents + (1 - alpha_prod_t).sqrt().to(latents.dtype) * eps_0
    # 3. the prediction at t, compared with eps_0 in l_p^p per element
    eps_t = target.eps(noisy, t, cond, uncond, guidance=guidance)
    distance = (eps_0 - eps_t).double().abs().pow(p).flatten(1).mean(dim=1).cpu().numpy()
    norms = [e.double().abs().pow(p).flatten(1).mean(dim=1).pow(1 / p).cpu().numpy() for e in (eps_0, eps_t)]
    return AttackOutput(scores=-distance, extras={"distance": distance, "eps_norm": norms[0] + norms[1]})
