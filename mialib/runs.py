"""Batched, cached, resumable scoring over an image set, and the per-image scores table.

Every batch result is written to ``<cache_dir>/<name>/<key>.parquet`` where the key hashes the model
fingerprint, the settings and the batch's image ids; an interrupted run resumes from the batches already
on disk, and a rerun with the same settings costs nothing.
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
from .attacks import loss_errors, structural_curve, vae_control

SCORE_COLUMNS = ["id", "label", "split", "subset", "attack", "setting", "score", "unet_evals", "seconds_per_image", "peak_memory_mb"]
COST_COLUMNS = ("unet_evals", "seconds_per_image", "peak_memory_mb")


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


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
        # The key covers the pixels too: the same ids with other images (a biased split) never share a cache.
        content = hashlib.sha256(batch.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        path = folder / f"{_key(fingerprint, settings, list(rows['id']), content)}.parquet"
        if path.exists():
            frames.append(pd.read_parquet(path))
            continue
        began = time.perf_counter()
        frame = compute(batch, rows)
        frame["seconds_per_image"] = (time.perf_counter() - began) / len(rows)
        frame["peak_memory_mb"] = peak_memory_mb("cuda" if torch.cuda.is_available() else "cpu")
        partial = path.with_suffix(".partial")
        frame.to_parquet(partial)
        partial.replace(path)  # atomic: a killed run never leaves a half-written batch behind
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def structural_curves(
    target, images: pd.DataFrame, tensors: torch.Tensor, timesteps: list[int], cache_dir, batch_size: int = 64, **settings
) -> pd.DataFrame:
    """SSIM / MSE after DDIM inversion at every t of one path, one row per image and t."""

    def compute(batch, rows):
        before = target.unet_evals
        curve = structural_curve(target, batch, list(rows["caption"]), list(rows["id"]), timesteps, **settings)
        total_evals = (target.unet_evals - before) // len(rows)
        per_step = total_evals / (len(timesteps) - 1)
        frames = []
        for t, values in curve.items():
            # Evaluations needed to reach t from the start of the path (stride fixed along the path).
            evals = int(round(per_step * timesteps.index(t)))
            frames.append(pd.DataFrame({"id": list(rows["id"]), "t": t, "ssim": values["ssim"], "mse": values["mse"], "unet_evals": evals}))
        return pd.concat(frames, ignore_index=True)

    return cached_batches("structural_curve", {"timesteps": timesteps, **settings}, target.fingerprint(), images, tensors, compute, cache_dir, batch_size)


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
