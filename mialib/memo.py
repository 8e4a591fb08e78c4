"""A bounded in-process memory of tensors, least recently used first out.

Notebooks and studies score the same images many times in one process (a grid over t, the structural
and pixel attacks at one t, a T sweep read with two measures). What the disk caches hold is kept here
too, up to a byte budget split evenly between the three memories below, so those repeats skip reading
files, decoding images and running the VAE decoder again. The entries are copies on the CPU.

The budget is 0 (off) by default, so ``mialib score`` keeps memory flat in the set's size; the
notebooks' :func:`mialib.experiment.setup` turns on :data:`STUDY_MB`. ``MIALIB_MEMORY_MB`` sets it for
both. A set larger than the budget streams as it does without it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch


def _size(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 64


class Memo:
    """``get(key)`` / ``put(key, value)`` with a byte budget (tensors, and dicts or lists of them)."""

    def __init__(self, share: float = 1.0, budget_mb: float | None = None):
        self.share = share
        total = float(os.environ.get("MIALIB_MEMORY_MB", 0)) if budget_mb is None else budget_mb
        self.budget = int(total * share * 2**20)
        self.entries: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self._lock = threading.Lock()  # the background writer puts what it wrote

    def get(self, key):
        with self._lock:
            value = self.entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return value[0]

    def put(self, key, value) -> None:
        size = _size(value)
        if size > self.budget:
            return
        with self._lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self.entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.budget:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.bytes = 0


# One memory per kind of entry, shared by every cache object of the process.
LATENTS = Memo(1 / 3)  # trajectory files: {t: latent} by (file, mtime, size)
DECODED = Memo(1 / 3)  # VAE decodes of cached latents by (trajectory file, t)
PIXELS = Memo(1 / 3)  # preprocessed images by (file location, sha256, size)


class Writer:
    """Cache files written in one background thread while the caller computes the next batch.

    Writes stay atomic (each writer renames a finished ``.partial`` file into place), so a killed run
    loses at most the writes still queued, which a rerun computes again. :meth:`flush` waits for the
    queue and raises the first error a write met.
    """

    def __init__(self):
        self._executor = None
        self._pending: list = []

    def submit(self, function, *args) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mialib-writer")
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        self._pending.append(self._executor.submit(function, *args))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()


WRITER = Writer()


STUDY_MB = 512  # the notebooks' budget (unless MIALIB_MEMORY_MB says otherwise)


def configure(total_mb: float) -> None:
    """Set the budget of the three memories (MB in all; 0 turns them off)."""
    for memory in (LATENTS, DECODED, PIXELS):
        memory.budget = int(total_mb * memory.share * 2**20)
        if memory.budget == 0:
            memory.clear()


def clear() -> None:
    """Forget everything remembered (a cold start, as a new process has)."""
    WRITER.flush()
    for memory in (LATENTS, DECODED, PIXELS):
        memory.clear()
