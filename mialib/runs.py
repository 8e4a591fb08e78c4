"""Batched, cached, resumable scoring over an image set, and the per-image scores table.

Every batch result is written to ``<cache_dir>/<name>/<key>.parquet`` where the key hashes the model
fingerprint, the settings, the batch's image ids, captions and pixels; an interrupted run resumes from
the batches already on disk, and a rerun with the same settings costs nothing.

DDIM inversion trajectories are cached too (``<cache_dir>/trajectory/<key>.safetensors``, keyed by
model, image, caption and inversion settings, not by the total timestep): every study that needs an
image's path at a stride reads the one file, a shorter path is its prefix, and a longer one extends it
from its last latent instead of starting again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import ddim
from .attacks import inversion_trajectory, loss_errors, trajectory_measures, vae_control

SCORE_COLUMNS = ["id", "label", "split", "subset", "attack", "setting", "score", "unet_evals", "seconds_per_image", "peak_memory_mb"]
COST_COLUMNS = ("unet_evals", "seconds_per_image", "peak_memory_mb")


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _batch_identity(rows: pd.DataFrame, batch: torch.Tensor) -> list:
    """What a batch's cached result depends on besides the settings: ids, captions and the pixels (the same
    ids with other images, e.g. a biased split or a distortion, or with other captions never share a cache)."""
    content = hashlib.sha256(batch.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    captions = list(rows["caption"]) if "caption" in rows else None
    return [list(rows["id"]), captions, content]


def cached_batches(
    name: str,
    settings: dict,
    fingerprint: str,
    images: pd.DataFrame,
    tensors: torch.Tensor,
    compute: Callable[[torch.Tensor, pd.DataFrame], pd.DataFrame],
    cache_dir: str | os.PathLike,
    batch_size: int,
) -> pd.DataFrame:
    """Run ``compute(batch_tensor, batch_rows)`` over batches, caching each batch's rows on disk."""
    folder = Path(cache_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=name, total=len(starts)):
        rows = images.iloc[start : start + batch_size]
        batch = tensors[start : start + batch_size]
        path = folder / f"{_key(fingerprint, settings, *_batch_identity(rows, batch))}.parquet"
        if path.exists():
            frames.append(pd.read_parquet(path))
            continue
        began = time.perf_counter()
        frame = compute(batch, rows)
        if "seconds_per_image" not in frame:  # a computation that reuses cached work reports its own cost
            frame["seconds_per_image"] = (time.perf_counter() - began) / len(rows)
        frame["peak_memory_mb"] = peak_memory_mb("cuda" if torch.cuda.is_available() else "cpu")
        partial = path.with_suffix(".partial")
        frame.to_parquet(partial)
        partial.replace(path)  # atomic: a killed run never leaves a half-written batch behind
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


INVERSION_SETTINGS = ("guidance", "prompt", "encode_mode", "schedule", "seed")


def _uniform_path(timesteps: list[int]) -> tuple[int, int]:
    """(total, stride) of a path 0, stride, ..., total; other paths are not cached as trajectories."""
    steps = [int(t) for t in timesteps]
    stride = steps[1] - steps[0] if len(steps) > 1 else 0
    if stride <= 0 or steps != ddim.path(steps[-1], stride):
        raise ValueError(f"expected a path 0, stride, 2 * stride, ..., T; got {steps}")
    return steps[-1], stride


def _image_digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _load_trajectory(path: Path, total: int, target) -> dict | None:
    """A cached per-image trajectory up to ``total``: ``{"latents": {t: z}, "seconds": {t: s}, "evals": {t: n}}``."""
    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        seconds = {int(k): v for k, v in json.loads(meta["seconds"]).items()}
        evals = {int(k): v for k, v in json.loads(meta["evals"]).items()}
        steps = [t for t in sorted(seconds) if t <= total]
        latents = {t: handle.get_tensor(f"t={t}").to(target.device, target.dtype) for t in steps}
    return {"latents": latents, "seconds": seconds, "evals": evals}


def _save_trajectory(path: Path, state: dict, image_id: str) -> None:
    from safetensors.torch import save_file

    latents = {f"t={t}": z.detach().cpu().contiguous() for t, z in state["latents"].items()}
    metadata = {"id": image_id, "seconds": json.dumps(state["seconds"]), "evals": json.dumps(state["evals"])}
    partial = path.with_suffix(".partial")
    save_file(latents, str(partial), metadata=metadata)
    partial.replace(path)  # atomic: an interrupted write never leaves a truncated trajectory


def trajectory_batch(target, batch: torch.Tensor, rows: pd.DataFrame, total: int, stride: int, folder, settings: dict):
    """The inversion trajectories of a batch along ``path(total, stride)``, from the cache where they are.

    Each image's trajectory is one file keyed by the model, the inversion settings, the stride and the
    image (id, caption, pixels), so any study that batches the image differently finds it too. A cached
    shorter path is extended from its last latent (the walk is deterministic: the same path), a longer
    one is read up to ``total``. Returns ``(trajectory, seconds, evals)``: ``{t: z_t (n, ...)}`` and, per
    t, the wall seconds and U-Net evaluations per image that reaching t cost when it was computed, each
    an ``(n,)`` array.
    """
    from .attacks import inversion_trajectory

    unknown = set(settings) - set(INVERSION_SETTINGS)
    if unknown:
        raise ValueError(f"not inversion settings: {sorted(unknown)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = target.fingerprint()
    ids, captions = list(rows["id"]), list(rows["caption"])
    paths = [
        folder / f"{_key(fingerprint, settings, stride, image_id, caption, _image_digest(image))}.safetensors"
        for image_id, caption, image in zip(ids, captions, batch)
    ]
    states = [_load_trajectory(path, total, target) for path in paths]
    reached = [max(s["latents"]) if s else None for s in states]
    # Images that need work, grouped by where their cached path ends (None: not cached), run together.
    for start_t in sorted({r for r in reached if r is None or r < total}, key=lambda r: -1 if r is None else r):
        index = [i for i, r in enumerate(reached) if r == start_t]
        sub_ids, sub_captions = [ids[i] for i in index], [captions[i] for i in index]
        before, began = target.unet_evals, time.perf_counter()
        if start_t is None:
            steps = ddim.path(total, stride)
            images = batch[index].to(target.device)
            new = inversion_trajectory(target, images, sub_captions, sub_ids, steps, **settings)
        else:
            steps = list(range(start_t, total + 1, stride))
            start = torch.cat([states[i]["latents"][start_t] for i in index])
            new = inversion_trajectory(target, None, sub_captions, sub_ids, steps, **settings, start=start)
        elapsed = (time.perf_counter() - began) / len(index)
        per_step = (target.unet_evals - before) / len(index) / (len(steps) - 1)
        for position, i in enumerate(index):
            state = states[i] or {"latents": {}, "seconds": {}, "evals": {}}
            base_seconds, base_evals = state["seconds"].get(steps[0], 0.0), state["evals"].get(steps[0], 0)
            for k, t in enumerate(steps):
                state["latents"][t] = new[t][position : position + 1]
                state["seconds"].setdefault(t, base_seconds + elapsed * k / (len(steps) - 1))
                state["evals"].setdefault(t, int(round(base_evals + per_step * k)))
            _save_trajectory(paths[i], state, ids[i])
            states[i] = state
    steps = ddim.path(total, stride)
    trajectory = {t: torch.cat([s["latents"][t] for s in states]) for t in steps}
    seconds = {t: np.array([s["seconds"][t] for s in states]) for t in steps}
    evals = {t: np.array([s["evals"][t] for s in states]) for t in steps}
    return trajectory, seconds, evals


def structural_curves(
    target, images: pd.DataFrame, tensors: torch.Tensor, timesteps: list[int], cache_dir, batch_size: int = 64,
    data_range: float = 2.0, at: list[int] | None = None, **settings
) -> pd.DataFrame:
    """SSIM, MSE, MS-SSIM and latent MSE after DDIM inversion at every t of one path (or only at the
    timesteps ``at``), one row per image and t, with what reaching t cost (U-Net evaluations and seconds
    per image).

    The inversion comes from the trajectory cache; only the decoding and the measures are computed here.
    """
    total, stride = _uniform_path(timesteps)
    measured = sorted(int(t) for t in at) if at is not None else list(timesteps)
    if not measured or not set(measured) <= set(timesteps):
        raise ValueError(f"timesteps to measure {measured} are not on the path {list(timesteps)}")
    folder = Path(cache_dir) / "trajectory"

    def compute(batch, rows):
        trajectory, seconds, evals = trajectory_batch(target, batch, rows, total, stride, folder, settings)
        began = time.perf_counter()
        kept = {t: trajectory[t] for t in measured}
        curve = trajectory_measures(target, batch, kept, trajectory[0], data_range)
        measuring = (time.perf_counter() - began) / len(rows) / len(curve)
        frames = [
            pd.DataFrame({"id": list(rows["id"]), "t": t, **values, "unet_evals": evals[t], "seconds_per_image": seconds[t] + measuring})
            for t, values in curve.items()
        ]
        return pd.concat(frames, ignore_index=True)

    options = {"timesteps": list(timesteps), "data_range": data_range, **settings}
    if at is not None:
        options["at"] = measured
    return cached_batches("structural_curve", options, target.fingerprint(), images, tensors, compute, cache_dir, batch_size)


def loss_curves(target, images, tensors, timesteps: list[int], cache_dir, batch_size: int = 64, **settings) -> pd.DataFrame:
    """Noise-prediction MSE at each t, one row per image and t."""

    def compute(batch, rows):
        before = target.unet_evals
        errors = loss_errors(target, batch, list(rows["caption"]), list(rows["id"]), timesteps, **settings)
        evals = (target.unet_evals - before) // len(rows) // len(timesteps)
        return pd.concat(
            [pd.DataFrame({"id": list(rows["id"]), "t": t, "mse": e, "unet_evals": evals}) for t, e in errors.items()],
            ignore_index=True,
        )

    return cached_batches("loss_curve", {"timesteps": timesteps, **settings}, target.fingerprint(), images, tensors, compute, cache_dir, batch_size)


def vae_scores(target, images, tensors, cache_dir, batch_size: int = 64, **settings) -> pd.DataFrame:
    """SSIM(x, D(E(x))) per image."""

    def compute(batch, rows):
        out = vae_control(target, batch, list(rows["caption"]), list(rows["id"]), **settings)
        return pd.DataFrame({"id": list(rows["id"]), "ssim": out.scores, "unet_evals": out.unet_evals})

    return cached_batches("vae_control", settings, target.fingerprint(), images, tensors, compute, cache_dir, batch_size)


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on GPU, the process's peak RSS on CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attack_scores(target, attack: Callable, images, tensors, cache_dir, batch_size: int = 64, name: str | None = None, **settings) -> pd.DataFrame:
    """Run any attack of the common signature over an image set: ``id, score, unet_evals, peak_memory_mb``
    and the attack's per-image extras, cached per batch like every other computation here."""
    name = name or attack.__name__

    def compute(batch, rows):
        out = attack(target, batch.to(target.device), list(rows["caption"]), list(rows["id"]), **settings)
        frame = pd.DataFrame({"id": list(rows["id"]), "score": out.scores, "unet_evals": out.unet_evals})
        for key, values in out.extras.items():
            frame[key] = values
        return frame

    return cached_batches(name, settings, target.fingerprint(), images, tensors, compute, cache_dir, batch_size)


def score_rows(images: pd.DataFrame, values: pd.DataFrame, column: str, attack: str, setting: str, direction: int = 1) -> pd.DataFrame:
    """Scores-table rows for one attack and setting: ``score = direction * values[column]`` per image.

    Cost columns the values lack (a model-free baseline has no U-Net cost) are recorded as NaN."""
    values = values.assign(**{c: np.nan for c in COST_COLUMNS if c not in values.columns})
    merged = images[["id", "label", "split", "subset"]].merge(values, on="id", how="left", validate="one_to_one")
    missing = merged["id"][merged[column].isna()]
    if len(missing):
        raise ValueError(f"{attack} has no {column} for {len(missing)} images, e.g. {list(missing)[:5]}")
    merged["attack"] = attack
    merged["setting"] = setting
    merged["score"] = direction * merged[column].astype(np.float64)
    return merged[SCORE_COLUMNS]
