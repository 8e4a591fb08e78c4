"""VAE-only control: SSIM(x, D(E(x))), no U-Net (0 evaluations per image).

It never looks at the diffusion model, only at the autoencoder, which did not train on the attacked
images. If it separates members from non-members, the split differs in image statistics, not in
membership: Li et al. report a mean SSIM gap of about 0.23 between members and non-members already near
t = 0, on members from LAION against non-members from COCO (docs/method.md, "Controls that never run the U-Net").
"""

from __future__ import annotations

import torch

from ..hashing import image_seed
from ..similarity import ssim
from .base import AttackOutput
from .structural import ssim_rounding


@torch.no_grad()
def vae_control(
    target, images, captions, ids, *, encode_mode: str = "mode", data_range: float = 2.0, seed: int = 0
) -> AttackOutput:
    latents = target.encode_images(images, mode=encode_mode, seeds=[image_seed(i, seed) for i in ids])
    decoded = target.decode(latents)
    similarity = ssim(images, decoded, data_range=data_range, precision="working").numpy()
    return AttackOutput(
        scores=similarity, extras={"ssim": similarity, "ssim_rounding": ssim_rounding(images, decoded, data_range)}
    )
