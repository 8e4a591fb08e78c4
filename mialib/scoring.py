"""The one scoring path of the command line and the notebooks: open a target for an image set, score the
requested attacks and write a run's tables.

``mialib score`` (:mod:`mialib.cli`) and every notebook (:func:`mialib.experiment.setup` and
:func:`mialib.studies.compare`) call these, so a run scored either way prints the same target line, writes
the same truncated-captions table and the same ``scores.parquet`` / ``chosen_settings.json`` /
``metrics.csv`` / ``metrics.json``, each written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import metrics, runs
from .memo import atomic_write, write_text
from .settings import Settings
from .target import Target, load_target

# What :func:`write_scores` writes, in the order it writes them.
SCORE_OUTPUTS = ("scores.parquet", "chosen_settings.json", "metrics.csv", "metrics.json")


def check_size(target: Target, size: int) -> None:
    """The attack size must be a multiple of the VAE's downscale factor (times a flow transformer's patch size);
    another size than the model's native one is allowed (a study) but said."""
    if size % target.size_factor:
        what = "the VAE's downscale factor" if target.size_factor == target.downscale else "the latent patch size"
        raise ValueError(f"image size {size} px is not a multiple of {what} {target.size_factor}")
    if size != target.resolution:
        print(f"note: the image size {size} px differs from the model's native {target.resolution} px", flush=True)


def truncated_captions(target: Target, records: pd.DataFrame) -> pd.DataFrame:
    """The captions longer than the text encoder's window (cut there when encoded): ``id, tokens, limit``."""
    truncated = target.truncated_captions(list(records["caption"]))
    ids = records["id"].to_numpy()
    return pd.DataFrame(
        {
            "id": [ids[i] for i, _ in truncated],
            "tokens": [n for _, n in truncated],
            "limit": target.tokenizer.model_max_length,
        },
        columns=["id", "tokens", "limit"],
    )


def target_line(target: Target, dtype: str, size: int) -> str:
    """One line saying what was loaded: family, prediction type, precision, native and attack size."""
    vae = str(target.vae.dtype).split(".")[-1]
    return (
        f"{target.name}: {target.family}, predicts {target.prediction_type}, {dtype} (VAE {vae}), "
        f"native {target.resolution} px, attacked at {size} px"
    )


@dataclass
class OpenedTarget:
    target: Target
    size: int  # the attack size: the one asked for, else the model's native size
    truncated: pd.DataFrame  # truncated_captions(target, records)


def open_target(
    model: str | os.PathLike,
    records: pd.DataFrame,
    *,
    size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    variant: str | None = None,
    config: str | os.PathLike | None = None,
    tables: Path | None = None,
    loras=(),
) -> OpenedTarget:
    """Load ``model`` for the images ``records`` (an image set's records), check the attack size (``size``,
    else the native one) and print the target line. With ``tables``, the captions that the text encoder
    cuts are written there as ``captions_truncated.csv`` (and said). ``loras``: LoRA adapters fused into the
    model (``FILE[:SCALE]``, :func:`mialib.target.apply_loras`)."""
    target = load_target(model, device=device, dtype=dtype, variant=variant, config=config, loras=loras)
    size = int(size or target.resolution)
    check_size(target, size)
    truncated = truncated_captions(target, records)
    if tables is not None and len(truncated):
        write_table(Path(tables) / "captions_truncated.csv", truncated)
        print(
            f"{len(truncated)} captions are longer than the text encoder's {target.tokenizer.model_max_length} tokens "
            f"and are cut there (captions_truncated.csv)",
            flush=True,
        )
    print(target_line(target, dtype, size), flush=True)
    return OpenedTarget(target, size, truncated)


def write_table(path: Path, frame: pd.DataFrame, kind: str | None = None) -> Path:
    """A table written atomically, as parquet or csv (by ``kind``, else by the file's suffix)."""
    kind = kind or ("parquet" if Path(path).suffix == ".parquet" else "csv")
    needed = int(frame.memory_usage(deep=True).sum())
    if kind == "parquet":
        return atomic_write(path, lambda partial: frame.to_parquet(partial), needed)
    return atomic_write(path, lambda partial: frame.to_csv(partial, index=False), needed)


@dataclass
class ScoredRun:
    scores: pd.DataFrame  # runs.SCORE_COLUMNS, every image of every run
    results: dict  # run id -> runs.RequestResult
    metrics: pd.DataFrame  # metrics.metric_table(scores): test metrics with intervals, per run


def write_scores(out: Path, scores: pd.DataFrame, results: dict, n_bootstrap: int, seed: int) -> pd.DataFrame:
    """A run's tables (:data:`SCORE_OUTPUTS`) in ``out``: the scores, the settings each run chose (replayable
    by another notebook), and the test metrics with bootstrap intervals, which it returns."""
    out = Path(out)
    write_table(out / "scores.parquet", scores)
    write_text(
        out / "chosen_settings.json",
        json.dumps({run: r.chosen_record() for run, r in results.items()}, indent=2, default=int),
    )
    table = metrics.metric_table(scores, n_bootstrap, seed)
    write_table(out / "metrics.csv", table)
    write_text(out / "metrics.json", table.to_json(orient="records", indent=2))
    return table


def score_run(
    target: Target,
    imageset,
    requests: dict,
    settings: Settings,
    out: Path,
    *,
    cache: Path,
    batch_size: int,
    size: int,
    n_bootstrap: int,
    progress: bool = True,
    references: tuple = (),
) -> ScoredRun:
    """Score every request (run id -> request) over ``imageset`` (:func:`mialib.runs.score`: per-image
    results cached under ``cache``; ``references``: the reference models of ``calibrate=reference``) and
    write the run's tables into ``out`` (:func:`write_scores`)."""
    scores, results = runs.score(
        target, imageset, requests, settings, cache, batch_size, size, progress, references=tuple(references)
    )
    return ScoredRun(scores, results, write_scores(out, scores, results, n_bootstrap, settings.seed))
