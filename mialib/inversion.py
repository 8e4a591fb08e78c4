"""DDIM inversion of images, the engine the inverting attacks share (structural, pixel, latent, SecMI,
backward) and the trajectory cache stores: encode, condition on the prompts, invert along a path of
timesteps, decode an inverted latent (remembered in memory for cached trajectories), and the per-image
magnitudes the registry's tolerances use.

Below the trajectory cache (:mod:`mialib.trajectories` calls :func:`inversion_trajectory` for what it
does not hold; with a cache, :func:`inversion_trajectory` reads through the cache object it is handed)
and below the attacks; it imports only :mod:`mialib.ddim`, :mod:`mialib.hashing` and :mod:`mialib.memo`.
"""

from __future__ import annotations

import numpy as np
import torch

from . import ddim, memo
from .hashing import image_seed

# The caption controls: each image's own caption, the empty prompt, one neutral prompt for every image, or
# another image's caption (the run layer hands each image the caption of another: mialib.runs.prompted).
PROMPT_MODES = ("caption", "empty", "neutral", "other")
NEUTRAL_PROMPT = "an image"


def prompt_texts(captions: list[str], prompt: str) -> list[str]:
    """The texts a batch is conditioned on under ``prompt`` (:data:`PROMPT_MODES`): the captions as given
    for ``caption`` and ``other``, else the empty or the neutral prompt for every image."""
    if prompt not in PROMPT_MODES:
        raise ValueError(f"prompt must be one of {PROMPT_MODES}, not {prompt!r}")
    if prompt in ("caption", "other"):
        return list(captions)
    return [NEUTRAL_PROMPT if prompt == "neutral" else ""] * len(captions)


def condition(target, captions: list[str], *, prompt: str = "caption", guidance: float = 1.0):
    """Text conditioning for a batch: (cond, uncond); uncond is None when guidance is 1.

    ``prompt`` (:func:`prompt_texts`): ``"caption"`` each image's caption, ``"empty"`` the empty prompt,
    ``"neutral"`` :data:`NEUTRAL_PROMPT`, ``"other"`` the captions as given (the run layer gives each image
    another image's caption).
    """
    texts = prompt_texts(captions, prompt)
    cond = target.encode_prompts(texts)
    uncond = None if guidance == 1.0 else target.encode_prompts([""] * len(captions))
    return cond, uncond


def rms(x: torch.Tensor) -> np.ndarray:
    """Root mean square per image (float64): the magnitude of an operand, for the registry's tolerances."""
    return x.detach().to("cpu", torch.float64).pow(2).flatten(1).mean(dim=1).sqrt().numpy()


def latent_mse(z_t: torch.Tensor, clean: torch.Tensor) -> np.ndarray:
    """Mean squared distance per image between an inverted latent and the clean one (float64)."""
    return (
        (z_t.detach().to("cpu", torch.float64) - clean.detach().to("cpu", torch.float64))
        .pow(2)
        .flatten(1)
        .mean(dim=1)
        .numpy()
    )


def uniform_path(timesteps: list[int]) -> tuple[int, int] | None:
    """(total, stride) when ``timesteps`` is 0, stride, ..., total; None for any other path."""
    steps = [int(t) for t in timesteps]
    stride = steps[1] - steps[0] if len(steps) > 1 else 0
    if stride <= 0 or steps != ddim.path(steps[-1], stride):
        return None
    return steps[-1], stride


def decode_at(target, trajectory: dict, t: int) -> torch.Tensor:
    """``target.decode(trajectory[t])``, remembered in memory per image for cached trajectories (the
    structural, pixel and backward attacks and the studies decode the same latents many times)."""
    files = getattr(trajectory, "files", None)
    if not files:
        return target.decode(trajectory[t])
    keys = [(f, int(t)) for f in files]
    found = [memo.DECODED.get(k) for k in keys]
    missing = [i for i, d in enumerate(found) if d is None]
    if missing:
        decoded = target.decode(trajectory[t][missing])
        for position, i in enumerate(missing):
            found[i] = decoded[position : position + 1].detach().to("cpu", copy=True)
            memo.DECODED.put(keys[i], found[i])
    return torch.cat(found).to(trajectory[t].device)


@torch.no_grad()
def inversion_trajectory(
    target,
    images: torch.Tensor | None,
    captions: list[str],
    ids: list[str],
    timesteps: list[int],
    *,
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    seed: int = 0,
    start: torch.Tensor | None = None,
    cache=None,
) -> dict[int, torch.Tensor]:
    """Encode the images (unless ``start`` gives the latents at ``timesteps[0]``) and invert them with
    deterministic DDIM along ``timesteps``. Returns ``{t: z_t}``; ``timesteps[0]`` maps to the start, and a
    one-step path ``[0]`` is the clean latent alone.

    With a :class:`~mialib.trajectories.TrajectoryCache`, a path 0, stride, ..., T is read from (and
    written to) the cache, so every attack and study that inverts the same image shares one inversion.
    A trajectory can be extended exactly: inverting from its last latent with ``start`` continues the path.
    """
    settings = dict(guidance=guidance, prompt=prompt, encode_mode=encode_mode, schedule=schedule, seed=seed)
    steps = [int(t) for t in timesteps]
    if cache is not None and start is None and uniform_path(steps):
        total, stride = uniform_path(steps)
        return cache.trajectory(target, images, captions, ids, total, stride, settings)[0]
    if start is None:
        start = target.encode_images(images, mode=encode_mode, seeds=[image_seed(i, seed) for i in ids])
    start = start.to(target.device, target.dtype)
    if len(steps) == 1:
        return {steps[0]: start}
    cond, uncond = condition(target, captions, prompt=prompt, guidance=guidance)
    return ddim.invert(target, start, steps, cond, uncond, guidance=guidance, schedule=schedule)


@torch.no_grad()
def decoded_trajectory(
    target,
    image: torch.Tensor,
    caption: str,
    image_id: str,
    timesteps: list[int],
    stride: int,
    *,
    guidance: float = 1.0,
    prompt: str = "caption",
    encode_mode: str = "mode",
    schedule: str = "model",
    seed: int = 0,
    cache=None,
) -> dict[int, torch.Tensor]:
    """Decoded inverted latents of one image (3, h, w) at the requested timesteps (multiples of stride)."""
    trajectory = inversion_trajectory(
        target,
        image[None],
        [caption],
        [image_id],
        ddim.path(max(timesteps), stride),
        guidance=guidance,
        prompt=prompt,
        encode_mode=encode_mode,
        schedule=schedule,
        seed=seed,
        cache=cache,
    )
    return {t: decode_at(target, trajectory, t)[0] for t in timesteps}
