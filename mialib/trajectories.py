"""The on-disk cache of DDIM inversion trajectories, one file per image, shared by every attack that inverts.

An image's path 0, stride, 2 * stride, ..., T is stored in ``<folder>/<key>.safetensors`` where the key
hashes the model fingerprint, the inversion settings, the stride and the image (id, caption, pixels),
not the total timestep: any attack or study that needs the path at that stride reads the one file, a
shorter path is its prefix, and a longer one extends it from its last latent instead of starting again
(the walk is deterministic, so it is the same path). Writes are atomic: a killed run never leaves a
truncated file behind. Each file's metadata holds the sha256 of its latents and costs, checked when it is
read: a damaged file is set aside, reported and recomputed.

Latents are stored in the model's dtype (float16 models take half the disk: 32 KiB per latent at
512 px). Files are written by a background thread (:data:`mialib.memo.WRITER`) and remembered in memory
(:mod:`mialib.memo`), so a grid over t or a second measure of the same path reads no file and decodes
no latent twice in one process. ``MIALIB_TRAJECTORY_CACHE_GB`` (``mialib score --trajectory-cache-gb``)
caps the folder: past the cap the least recently written trajectories are removed, reported, and
recomputed if a later study needs them. The measures a study computes from a path are its own choice
(``structural:measure=ssim`` or ``ms_ssim``; -MSE and latent MSE come with either at no extra decode).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import ddim, memo
from .hashing import digest, pixel_digests
from .inversion import inversion_trajectory
from .memo import set_aside

INVERSION_SETTINGS = ("guidance", "prompt", "encode_mode", "schedule", "seed")
_QUEUED: dict[str, dict] = {}  # trajectories handed to the background writer and not yet on disk
_FOLDER_BYTES: dict[str, int] = {}  # bytes of trajectory files per folder, counted once per process


def cap_bytes() -> int | None:
    """The trajectory cache's size cap: ``MIALIB_TRAJECTORY_CACHE_GB`` (``mialib score --trajectory-cache-gb``);
    unset or 0 means no cap."""
    value = float(os.environ.get("MIALIB_TRAJECTORY_CACHE_GB", 0) or 0)
    return int(value * 2**30) if value > 0 else None


def _account(folder: Path, change: int) -> None:
    """Count a write and, over the cap, remove the least recently written trajectories (they are
    recomputed if a later study needs them) down to 90 % of the cap, with one line on stderr."""
    key = str(folder)
    if key not in _FOLDER_BYTES:
        _FOLDER_BYTES[key] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    else:
        _FOLDER_BYTES[key] += change
    cap = cap_bytes()
    if cap is None or _FOLDER_BYTES[key] <= cap:
        return
    import sys

    files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime_ns)
    removed = 0
    for file in files:
        if _FOLDER_BYTES[key] <= 0.9 * cap:
            break
        size = file.stat().st_size
        file.unlink(missing_ok=True)
        _FOLDER_BYTES[key] -= size
        removed += 1
    print(
        f"trajectory cache {folder} reached its cap of {cap / 2**30:g} GB: removed the {removed} least recently "
        "written trajectories (recomputed if needed)",
        file=sys.stderr,
        flush=True,
    )


def latents_digest(latents: dict, seconds: str, evals: str) -> str:
    """sha256 of a trajectory file's tensors (names, dtypes, shapes, bytes) and its cost metadata: stored in
    the file's metadata and checked when it is read."""
    hashed = hashlib.sha256()
    for name in sorted(latents):
        tensor = latents[name].detach().cpu().contiguous()
        hashed.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        hashed.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    hashed.update(seconds.encode())
    hashed.update(evals.encode())
    return hashed.hexdigest()


class Trajectory(dict):
    """``{t: z_t}`` of a batch, with ``files``: the cache file of each image (None when not cached), so
    that what is computed from a cached latent (its VAE decode) can be remembered by file and t."""

    files: list[str] | None = None


class TrajectoryCache:
    """Per-image inversion trajectories in ``folder`` (see the module docstring)."""

    def __init__(self, folder, fingerprint: str | None = None):
        self.folder = Path(folder)
        self.fingerprint = fingerprint  # the model's, when the caller already has it (else asked per batch)

    @staticmethod
    def flush() -> None:
        """Wait until every trajectory handed to the background writer is on disk."""
        memo.WRITER.flush()

    def _load(self, path: Path, total: int, target) -> dict | None:
        from safetensors import safe_open

        remembered = _QUEUED.get(str(path))
        if remembered is None:
            try:
                stat = path.stat()
            except FileNotFoundError:
                return None
            remembered = memo.LATENTS.get((str(path), stat.st_mtime_ns, stat.st_size))
        if remembered is not None:
            steps = [t for t in sorted(remembered["seconds"]) if t <= total]
            return {
                "latents": {t: remembered["latents"][t].to(target.device, target.dtype) for t in steps},
                "seconds": dict(remembered["seconds"]),
                "evals": dict(remembered["evals"]),
            }
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata()
                seconds = {int(k): v for k, v in json.loads(meta["seconds"]).items()}
                evals = {int(k): v for k, v in json.loads(meta["evals"]).items()}
                everything = {t: handle.get_tensor(f"t={t}") for t in sorted(seconds)}
                names = set(handle.keys())
            if "sha256" in meta:  # files written before digests were stored are read as they are
                stored = {f"t={t}": z for t, z in everything.items()}
                if set(stored) != names or latents_digest(stored, meta["seconds"], meta["evals"]) != meta["sha256"]:
                    raise ValueError("its latents do not match the checksum stored with them")
        except Exception as error:  # a truncated or corrupted file (SafetensorError, JSON, missing keys, checksum)
            set_aside(path, error)
            return None
        memo.LATENTS.put(
            (str(path), stat.st_mtime_ns, stat.st_size), {"latents": everything, "seconds": seconds, "evals": evals}
        )
        steps = [t for t in sorted(seconds) if t <= total]
        return {
            "latents": {t: everything[t].to(target.device, target.dtype) for t in steps},
            "seconds": seconds,
            "evals": evals,
        }

    @staticmethod
    def _save(path: Path, state: dict, image_id: str, fresh: dict | None = None):
        """Queue a trajectory for writing; ``fresh`` holds CPU copies of newly computed latents. Returns the
        write, which the caller hands to the background writer (one task per batch: :meth:`_write_all`)."""
        from safetensors.torch import save_file

        fresh = fresh or {}
        latents = {
            f"t={t}": fresh[t] if t in fresh else z.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
            for t, z in state["latents"].items()
        }
        metadata = {"id": image_id, "seconds": json.dumps(state["seconds"]), "evals": json.dumps(state["evals"])}
        remembered = {
            "latents": {int(k[2:]): v for k, v in latents.items()},
            "seconds": dict(state["seconds"]),
            "evals": dict(state["evals"]),
        }

        def write():
            try:
                before = path.stat().st_size
            except FileNotFoundError:
                before = 0
            stamped = {**metadata, "sha256": latents_digest(latents, metadata["seconds"], metadata["evals"])}
            needed = sum(z.nelement() * z.element_size() for z in latents.values())
            # atomic: an interrupted write never leaves a truncated trajectory; a full disk says so in one sentence
            try:
                memo.atomic_write(path, lambda partial: save_file(latents, str(partial), metadata=stamped), needed)
            except BaseException:
                if _QUEUED.get(str(path)) is remembered:
                    del _QUEUED[str(path)]  # never read what was not stored
                raise
            stat = path.stat()
            _account(path.parent, stat.st_size - before)
            memo.LATENTS.put((str(path), stat.st_mtime_ns, stat.st_size), remembered)
            if _QUEUED.get(str(path)) is remembered:
                del _QUEUED[str(path)]

        _QUEUED[str(path)] = remembered  # readable at once, before the background write lands
        return write

    @staticmethod
    def _write_all(writes: list) -> None:
        for write in writes:
            write()

    def trajectory(
        self, target, images: torch.Tensor, captions: list[str], ids: list[str], total: int, stride: int, settings: dict
    ):
        """The inversion trajectories of a batch along ``path(total, stride)``, from the cache where they are.

        Images whose path is not cached (or is cached only up to a smaller t) are inverted (or extended)
        together. Returns ``(trajectory, seconds, evals)``: ``{t: z_t (n, ...)}`` and, per t, the wall
        seconds and U-Net evaluations per image that reaching t cost when it was computed, ``(n,)`` arrays.
        """
        unknown = set(settings) - set(INVERSION_SETTINGS)
        if unknown:
            raise ValueError(f"not inversion settings: {sorted(unknown)}")
        self.folder.mkdir(parents=True, exist_ok=True)
        fingerprint = self.fingerprint or target.fingerprint()
        ids, captions = list(ids), list(captions)
        paths = [
            self.folder / f"{digest(fingerprint, settings, stride, image_id, caption, pixels)}.safetensors"
            for image_id, caption, pixels in zip(ids, captions, pixel_digests(images))
        ]
        states = [self._load(path, total, target) for path in paths]
        reached = [max(s["latents"]) if s else None for s in states]
        # Images that need work, grouped by where their cached path ends (None: not cached), run together.
        for start_t in sorted({r for r in reached if r is None or r < total}, key=lambda r: -1 if r is None else r):
            index = [i for i, r in enumerate(reached) if r == start_t]
            sub_ids, sub_captions = [ids[i] for i in index], [captions[i] for i in index]
            before, began = target.unet_evals, time.perf_counter()
            if start_t is None:
                steps = ddim.path(total, stride)
                new = inversion_trajectory(
                    target, images[index].to(target.device), sub_captions, sub_ids, steps, **settings
                )
            else:
                steps = list(range(start_t, total + 1, stride))
                start = torch.cat([states[i]["latents"][start_t] for i in index])
                new = inversion_trajectory(target, None, sub_captions, sub_ids, steps, **settings, start=start)
            elapsed = (time.perf_counter() - began) / len(index)
            per_step = (target.unet_evals - before) / len(index) / max(len(steps) - 1, 1)
            # one contiguous CPU copy per step for the whole batch; each image's file holds its rows
            copies = {t: new[t].detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for t in steps}
            writes = []
            for position, i in enumerate(index):
                state = states[i] or {"latents": {}, "seconds": {}, "evals": {}}
                base_seconds, base_evals = state["seconds"].get(steps[0], 0.0), state["evals"].get(steps[0], 0)
                for k, t in enumerate(steps):
                    state["latents"][t] = new[t][position : position + 1]
                    state["seconds"].setdefault(t, base_seconds + elapsed * k / max(len(steps) - 1, 1))
                    state["evals"].setdefault(t, int(round(base_evals + per_step * k)))
                writes.append(
                    self._save(paths[i], state, ids[i], {t: copies[t][position : position + 1] for t in steps})
                )
                states[i] = state
            memo.WRITER.submit(self._write_all, writes)  # the batch's files in one background task, in order
        steps = ddim.path(total, stride)
        # contiguous (not channels-last): fresh and cached latents then decode with the same rounding
        trajectory = Trajectory({t: torch.cat([s["latents"][t] for s in states]).contiguous() for t in steps})
        trajectory.files = [str(p) for p in paths]
        seconds = {t: np.array([s["seconds"][t] for s in states]) for t in steps}
        evals = {t: np.array([s["evals"][t] for s in states]) for t in steps}
        return trajectory, seconds, evals
