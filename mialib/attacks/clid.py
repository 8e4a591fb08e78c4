"""CLiD, conditional likelihood discrepancy (Zhai et al., NeurIPS 2024), simple threshold variant.

A text-to-image model that trained on (image, caption) overfits the *pair*: its full caption lowers the
denoising loss of a member more than it does for a non-member. At one timestep t, with the same seeded
noise for every condition of an image (common random numbers: the differences then carry no noise
variance of their own),

    z_t    = sqrt(alpha_prod_t) * z_0 + sqrt(1 - alpha_prod_t) * noise
    L_c    = mean over latent elements of (eps(z_t, t | c) - noise)^2,   averaged over n_noise draws
    score  = mean over c in {reduced, null} of (L_c - L_full)

with c_full the caption, c_null = "" and c_reduced = :func:`reduce_caption` (every other word dropped).
Each condition is a plain conditional prediction (guidance 1 with that prompt's embedding), never a
classifier-free mix. The paper uses several reductions, t around 450 and 3 draws (15 queries); this
variant keeps one reduction and the null caption. Noise for draw r of image i is
``seeded_normal`` with the id ``f"{i}@clid{t}r{r}"``, so an image gets the same noise in every batch and run.
Cost: 3 * n_noise U-Net evaluations per image.
"""

from __future__ import annotations

import torch

from .. import ddim
from ..hashing import image_seed, seeded_normal
from .base import AttackOutput

CONDITIONS = ("full", "reduced", "null")


def reduce_caption(caption: str) -> str:
    """Keep the 1st, 3rd, 5th, ... whitespace-separated word ("a red apple on a table" -> "a apple a").

    A caption of one word stays as it is (at least one word is kept); an empty caption stays empty.
    Runs of whitespace collapse to single spaces.
    """
    return " ".join(caption.split()[::2])


@torch.no_grad()
def clid_attack(
    target,
    images: torch.Tensor,
    captions: list[str],
    ids: list[str],
    t: int = 450,
    n_noise: int = 1,
    *,
    encode_mode: str = "mode",
    seed: int = 0,
) -> AttackOutput:
    """Score = mean of (L_reduced - L_full) and (L_null - L_full); extras: the three losses and both gaps."""
    t, n_noise = int(t), int(n_noise)
    abar = ddim.alphas_cumprod(target.scheduler, "model")
    if not 0 <= t < len(abar):
        raise ValueError(f"t must lie in [0, {len(abar) - 1}], not {t}")
    if n_noise < 1:
        raise ValueError(f"n_noise must be at least 1, not {n_noise}")
    latents = target.encode_images(images, mode=encode_mode, seeds=[image_seed(i, seed) for i in ids])
    embeddings = {
        "full": target.encode_prompts(list(captions)),
        "reduced": target.encode_prompts([reduce_caption(c) for c in captions]),
        "null": target.encode_prompts([""] * len(captions)),
    }
    alpha_prod_t = abar[t]
    losses = {name: torch.zeros(len(images), dtype=torch.float64) for name in CONDITIONS}
    for r in range(n_noise):
        # 1. one noise draw per image, shared by the three conditions
        noise = seeded_normal(tuple(latents.shape[1:]), [f"{i}@clid{t}r{r}" for i in ids], seed).to(latents)
        noisy = alpha_prod_t.sqrt().to(latents.dtype) * latents + (1 - alpha_prod_t).sqrt().to(latents.dtype) * noise
        # 2. the denoising loss under each condition (guidance 1: that prompt alone)
        for name in CONDITIONS:
            predicted = target.eps(noisy, t, embeddings[name], guidance=1.0)
            losses[name] += (predicted - noise).double().pow(2).flatten(1).mean(dim=1).cpu() / n_noise
    # 3. the discrepancies; a member's full caption helps more, so larger gaps mean member
    gap_reduced = (losses["reduced"] - losses["full"]).numpy()
    gap_null = (losses["null"] - losses["full"]).numpy()
    scores = 0.5 * (gap_reduced + gap_null)
    extras = {f"loss_{name}": losses[name].numpy() for name in CONDITIONS}
    extras.update(gap_reduced=gap_reduced, gap_null=gap_null)
    return AttackOutput(scores=scores, extras=extras)
