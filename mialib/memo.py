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

import errno
import os
import secrets
import sys
import threading
from collections import OrderedDict
from pathlib import Path

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

    Writes stay atomic (each writer renames a finished, uniquely named partial file into place:
    :func:`atomic_write`), so a killed run loses at most the writes still queued, which a rerun computes
    again. A write that failed (a full disk) stops the caller at its next :meth:`submit`; :meth:`flush`
    waits for the queue and raises the first error a write met.
    """

    def __init__(self):
        self._executor = None
        self._pending: list = []

    def submit(self, function, *args) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mialib-writer")
        if any(f.done() and f.exception() is not None for f in self._pending):
            self.flush()  # stop computing what cannot be stored: wait for the queue, raise the first error
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._executor.submit(function, *args))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        error = None
        for future in pending:
            try:
                future.result()
            except BaseException as caught:  # wait for every write, then raise the first error
                error = error or caught
        if error is not None:
            raise error


WRITER = Writer()


# --------------------------------------------------------------------------------------------------
# Atomic writes, and a full disk said in one sentence
# --------------------------------------------------------------------------------------------------
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class DiskFullError(OSError):
    """A write that met a full disk (or quota): its message is one sentence naming the folder, the space
    the write needed and the space free there. Nothing half-written is left behind."""


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def disk_full(error: OSError, path, needed: int | None = None) -> DiskFullError:
    """The :class:`DiskFullError` for ``error`` (ENOSPC / EDQUOT) met while writing ``path``."""
    import shutil

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        free = _human(shutil.disk_usage(folder).free)
    except OSError:
        free = "an unknown amount"
    what = "no space left on the disk" if error.errno == errno.ENOSPC else "the disk quota is exhausted"
    size = f"about {_human(needed)}" if needed else "more space"
    return DiskFullError(
        error.errno,
        f"{what} of {folder} while writing {path.name}: it needs {size} and {free} is free there; "
        "free some space or write to another folder",
    )


def partial_path(path) -> Path:
    """A unique name beside ``path`` for writing it (pid and a random part: concurrent writers never
    rename each other's file); it never matches the final file's suffix, so no reader takes it."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")


def atomic_write(path, write, needed: int | None = None) -> Path:
    """``write(partial)`` into a uniquely named partial file, then rename it onto ``path`` (atomic: a
    reader sees the old file or the whole new one). Any failure removes the partial file; a full disk
    raises :class:`DiskFullError` (``needed``: the size of what was being written, when known)."""
    path = Path(path)
    partial = partial_path(path)
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException as error:
        try:
            written = partial.stat().st_size
        except OSError:
            written = 0
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, DiskFullError) and error.errno in DISK_FULL:
            raise disk_full(error, path, max(needed or 0, written) or None) from None
        raise
    return path


def write_text(path, text: str) -> Path:
    """A text file written atomically (:func:`atomic_write`)."""
    data = text.encode()
    return atomic_write(path, lambda partial: Path(partial).write_bytes(data), len(data))


def set_aside(path, error: Exception) -> None:
    """A cache file that cannot be read (truncated by a copy or a full disk) or whose values do not match
    its checksum: renamed ``*.damaged`` (kept for inspection, never read again), reported on stderr; its
    results are then recomputed."""
    path = Path(path)
    damaged = path.with_name(path.name + ".damaged")
    path.replace(damaged)
    print(
        f"damaged cache file {path} ({type(error).__name__}: {str(error)[:200]}): set aside as {damaged.name}, "
        "recomputing",
        file=sys.stderr,
        flush=True,
    )


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
