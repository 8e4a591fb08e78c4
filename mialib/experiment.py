"""Presets, the data and target preparation steps, and the headless notebook runner.

A preset is a flat YAML file of UPPER_CASE papermill parameters (``configs/<name>.yaml``). The same
file drives ``python -m mialib prepare`` and the notebooks, so configuration has one source.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import yaml

from . import data

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("01_data_split", "02_observation", "03_attack", "03_attack_biased", "04_robustness", "05_ablations")


def notebook_runs(params: dict) -> dict[str, tuple[str, dict]]:
    """Run name -> (source notebook, parameter overrides). ``03_attack_biased`` repeats the attack
    comparison on the biased split (non-members from a shifted source) and compares it with the fair run."""
    output_dir = params["OUTPUT_DIR"]
    return {
        "01_data_split": ("01_data_split", {}),
        "02_observation": ("02_observation", {}),
        "03_attack": ("03_attack", {}),
        "03_attack_biased": (
            "03_attack",
            {"NONMEMBER_STYLE": "shifted", "OUTPUT_DIR": f"{output_dir}/biased", "FAIR_RESULTS": f"{output_dir}/metrics.csv"},
        ),
        "04_robustness": ("04_robustness", {}),
        "05_ablations": ("05_ablations", {}),
    }


def load_preset(path: str | os.PathLike) -> dict:
    with open(path) as handle:
        params = yaml.safe_load(handle) or {}
    bad = [k for k in params if k != k.upper()]
    if bad:
        raise ValueError(f"preset keys must be UPPER_CASE papermill parameters: {bad}")
    return params


def resolve(path: str | os.PathLike) -> Path:
    """Paths in presets are relative to the repository root (notebooks run from notebooks/)."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def prepare_data(
    manifest: str,
    image_dir: str,
    n_public: int,
    n_members: int,
    n_nonmembers: int,
    seed: int = 0,
) -> pd.DataFrame:
    """The image set of a preset: the committed manifest (built if missing), cut to the preset's sizes,
    rendered and checked against its hashes. Returns the manifest rows with ``path`` and ``label``."""
    manifest_path = resolve(manifest)
    if manifest_path.exists():
        full = data.read_manifest(manifest_path)
    else:
        full = data.build_emoji_manifest(n_public, n_members, n_nonmembers, seed)
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        full.to_csv(manifest_path, index=False)
    chosen = data.subsample_manifest(full, n_public, n_members, n_nonmembers)
    return data.materialise_images(chosen, resolve(image_dir))


def tiny_config(params: dict):
    from .tiny import TinyConfig

    keys = {
        "IMAGE_SIZE": "image_size",
        "VAE_STEPS": "vae_steps",
        "UNET_STEPS": "unet_steps",
        "CHECKPOINTS": "checkpoints",
        "TRAIN_SEED": "seed",
        "TRAIN_BATCH_SIZE": "batch_size",
    }
    return TinyConfig(**{field: params[key] for key, field in keys.items() if key in params})


def prepare_target(params: dict, images: pd.DataFrame | None = None, progress: bool = True) -> Path:
    """Build the embedded tiny target if the preset asks for it and it is missing; return the model path."""
    model = params["MODEL"]
    if not params.get("BUILD_TINY_TARGET", False):
        return model
    from .tiny import build_tiny_target

    if images is None:
        images = prepare_data(**data_args(params))
    config = tiny_config(params)
    target_dir = resolve(model)
    if (target_dir / "model_index.json").exists():
        return build_tiny_target(target_dir, None, None, None, None, config, progress)
    public, _ = data.load_images(images[images["split"] == "public"], config.image_size)
    members_rows = images[images["split"] == "member"]
    members, kept = data.load_images(members_rows, config.image_size)
    if len(kept) != len(members_rows):
        raise data.DataError("a member image could not be read; the target would train on a different set")
    return build_tiny_target(
        target_dir, public, members, list(kept["caption"]), list(images["caption"]), config, progress
    )


def data_args(params: dict) -> dict:
    return dict(
        manifest=params["MANIFEST"],
        image_dir=params["IMAGE_DIR"],
        n_public=params["N_PUBLIC"],
        n_members=params["N_MEMBERS"],
        n_nonmembers=params["N_NONMEMBERS"],
        seed=params.get("SPLIT_SEED", 0),
    )


def run_notebooks(preset_path: str | os.PathLike, notebooks: tuple[str, ...] = NOTEBOOKS, kernel: str = "python3") -> Path:
    """Execute notebooks headlessly with papermill, each receiving the preset keys it declares.

    Executed copies go to ``<OUTPUT_DIR>/notebooks/``; the resolved parameters to
    ``<OUTPUT_DIR>/parameters.json``. A preset key that no notebook declares is an error (a typo would
    otherwise be ignored silently).
    """
    import papermill

    params = load_preset(preset_path)
    output_dir = resolve(params["OUTPUT_DIR"])
    (output_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    runs = notebook_runs(params)
    unknown = [name for name in notebooks if name not in runs]
    if unknown:
        raise ValueError(f"unknown notebook runs {unknown}; known: {list(runs)}")
    declared = {name: set(papermill.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"))) for name in {runs[n][0] for n in runs}}
    used = set().union(*declared.values())
    # Keys for the target build and the preset name are read by `prepare`, not by notebooks.
    unused = set(params) - used - {"PRESET", "VAE_STEPS", "UNET_STEPS", "TRAIN_SEED", "TRAIN_BATCH_SIZE", "BUILD_TINY_TARGET"}
    if unused:
        raise ValueError(f"preset keys that no notebook declares: {sorted(unused)}")
    (output_dir / "parameters.json").write_text(json.dumps(params, indent=2))
    timings = {}
    for name in notebooks:
        source, overrides = runs[name]
        values = {**params, **overrides}
        start = time.time()
        papermill.execute_notebook(
            str(ROOT / "notebooks" / f"{source}.ipynb"),
            str(output_dir / "notebooks" / f"{name}.ipynb"),
            parameters={k: v for k, v in values.items() if k in declared[source]},
            kernel_name=kernel,
            cwd=str(ROOT / "notebooks"),
            progress_bar=False,
            log_output=True,
        )
        timings[name] = round(time.time() - start, 1)
        print(f"{name}: {timings[name]} s", flush=True)
    (output_dir / "notebook_times.json").write_text(json.dumps(timings, indent=2))
    return output_dir
