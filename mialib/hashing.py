"""Hashes and seeds: cache keys, pixel digests of image batches, and per-image seeds and noise.

The bottom of the package: it imports nothing of mialib, so the image sets, the caches, the transforms
and the attacks all take their keys and seeds from here without loading one another.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict

import torch


def digest(*parts) -> str:
    """A short stable hash of JSON-serialisable parts (cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def pixel_digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


_VOUCHED: OrderedDict = OrderedDict()  # id(batch) -> (weak reference, version, digests): the last few batches
_VOUCHED_LOCK = threading.Lock()  # the reader threads vouch while the caller looks up


def vouch_digests(images: torch.Tensor, digests: list[str]) -> None:
    """Record the ``pixel_digest`` of every image of a batch that is already known, so that the result
    store and the trajectory cache do not hash the same pixels again (the reader threads hash each batch
    while the model works; 3 MB per 512 px image). It holds for this very tensor object while it is not
    modified in place (its version counter); anything else is hashed."""
    if len(digests) != len(images):
        raise ValueError(f"{len(digests)} digests for {len(images)} images")
    with _VOUCHED_LOCK:
        _VOUCHED[id(images)] = (weakref.ref(images), images._version, list(digests))
        while len(_VOUCHED) > 16:
            _VOUCHED.popitem(last=False)


def pixel_digests(images: torch.Tensor) -> list[str]:
    """``pixel_digest`` of every image of a batch (one copy to the CPU for the batch, no per-image bytes),
    or what :func:`vouch_digests` recorded for this tensor."""
    with _VOUCHED_LOCK:
        known = _VOUCHED.get(id(images))
    if known is not None and known[0]() is images and known[1] == images._version:
        return list(known[2])
    array = images.detach().cpu().contiguous().numpy()
    return [hashlib.sha256(row).hexdigest() for row in array]


def image_seed(image_id: str, seed: int = 0) -> int:
    """A seed derived from the image id, so an image gets the same noise in every batch and run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[:8], "little") % (2**63)


def seeded_normal(shape: tuple[int, ...], ids: list[str], seed: int = 0) -> torch.Tensor:
    """Standard normal noise of ``shape`` per image (common random numbers across attacks and runs)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(i, seed))) for i in ids])
