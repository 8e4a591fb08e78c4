"""Session fixtures: a smoke-size copy of the pipeline (data, tiny target, executed notebooks) in a
temporary folder, built once per test session from configs/smoke.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
# On a user's imagefolder: the data split (its skips), the comparison (and the biased split's refusal), and
# 04 and 05, whose clean rows must reproduce that 03. 02 and 06 run the same code on any labelled set and
# are executed on the emoji set only, to keep `make test` within 15 minutes (each notebook costs 14 s to start).
IMAGEFOLDER_NOTEBOOKS = ("01_data_split", "03_attack", "03_attack_biased", "04_robustness", "05_ablations")


def pytest_configure(config):
    # `make test` runs these once more with ATEN_CPU_CAPABILITY=default (other float32 kernels): every
    # comparison across batch sizes, batch composition, the cache, and against skimage / hand-computed DDIM
    config.addinivalue_line("markers", "numerics: numerically sensitive comparisons, rerun under ATEN_CPU_CAPABILITY=default")


@pytest.fixture(scope="session")
def smoke_preset(tmp_path_factory) -> Path:
    """configs/smoke.yaml with the target and outputs redirected to a fresh temporary folder."""
    folder = tmp_path_factory.mktemp("smoke")
    params = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    params["MODEL"] = str(folder / "target")
    params["OUTPUT_DIR"] = str(folder / "outputs")
    path = folder / "smoke.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="session")
def smoke_params(smoke_preset) -> dict:
    from mialib import experiment

    return experiment.load_preset(smoke_preset)


@pytest.fixture(scope="session")
def smoke_target_dir(smoke_params) -> Path:
    """Trains the smoke target once (about a minute on 2 cores)."""
    from mialib import experiment

    return Path(experiment.prepare_target(smoke_params, progress=False))


@pytest.fixture(scope="session")
def smoke_outputs(smoke_preset, smoke_target_dir) -> Path:
    """Executes every notebook with papermill at smoke size; returns the output folder."""
    from mialib import experiment

    return experiment.run_notebooks(smoke_preset)


@pytest.fixture(scope="session")
def user_imagefolder(smoke_params, tmp_path_factory) -> Path:
    """The smoke run's attacked images as a user would bring them: a Hugging Face imagefolder with
    members/ and nonmembers/ and a metadata.csv (file_name, id, caption, label, subset), rows reversed."""
    import shutil

    import pandas as pd

    from mialib import experiment

    records = experiment.open_data(smoke_params).records
    folder = tmp_path_factory.mktemp("user") / "my_set"
    rows = []
    for record in records.iloc[::-1].itertuples(index=False):
        name = f"{'members' if record.label == 1 else 'nonmembers'}/{record.id}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(record.location, folder / name)
        rows.append({"file_name": name, "id": record.id, "caption": record.caption, "label": record.label, "subset": record.subset})
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def imagefolder_outputs(smoke_outputs, smoke_params, user_imagefolder, tmp_path_factory) -> Path:
    """The notebooks of ``IMAGEFOLDER_NOTEBOOKS`` executed on the user's imagefolder with the smoke target
    (after the emoji run, whose trajectory cache it shares: per-image keys hold ids, captions and pixels, so
    only identical inputs hit)."""
    from mialib import experiment

    folder = tmp_path_factory.mktemp("imagefolder_run")
    params = dict(smoke_params, DATA=f"imagefolder:{user_imagefolder}", OUTPUT_DIR=str(folder / "outputs"),
                  CACHE_DIR=str(smoke_outputs / "cache"), BUILD_TINY_TARGET=False)
    path = folder / "preset.yaml"
    path.write_text(yaml.safe_dump(params))
    return experiment.run_notebooks(path, IMAGEFOLDER_NOTEBOOKS)
