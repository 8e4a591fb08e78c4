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

    images = experiment.prepare_data(**experiment.data_args(smoke_params))
    return Path(experiment.prepare_target(smoke_params, images, progress=False))


@pytest.fixture(scope="session")
def smoke_outputs(smoke_preset, smoke_target_dir) -> Path:
    """Executes every notebook with papermill at smoke size; returns the output folder."""
    from mialib import experiment

    return experiment.run_notebooks(smoke_preset)
