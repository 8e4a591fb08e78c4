"""Session fixtures: a smoke-size copy of the pipeline (data, tiny target, executed notebooks) in a
temporary folder, built once per test session from configs/smoke.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest-xdist workers on the machine's 2 cores: one thread each (the notebooks' kernels
# and the subprocesses inherit it), as two threads each would oversubscribe the cores. Set before torch loads.
# Tests are sent to the workers module by module (--dist loadscope), so a module's session and module fixtures
# (test_notebooks.py's executed notebooks, test_regimes.py's targets) are built on one worker only; the smoke
# target, which several modules use, is built once for both (smoke_preset). (--dist loadgroup would group by
# mark, but its xdist_group marks have no effect with pytest 9.2, whose nodes no longer read ``_nodeid``.)
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
# On a user's imagefolder: the data split (its skips), the comparison (and the biased split's refusal), and
# 04 and 05, whose clean rows must reproduce that 03. 02 and 06 run the same code on any labelled set and
# are executed on the emoji set only, to keep `make test` within 15 minutes (each notebook costs 14 s to start).
IMAGEFOLDER_NOTEBOOKS = ("01_data_split", "03_attack", "03_attack_biased", "04_robustness", "05_ablations")


def pytest_configure(config):
    # `make test` runs these once more with ATEN_CPU_CAPABILITY=default (other float32 kernels): every
    # comparison across batch sizes, batch composition, the cache, and against skimage / hand-computed DDIM
    config.addinivalue_line(
        "markers", "numerics: numerically sensitive comparisons, rerun under ATEN_CPU_CAPABILITY=default"
    )
    # `make test-fast` (pytest -m "not slow") leaves these out; `make test` runs them. Marked automatically below.
    config.addinivalue_line(
        "markers", "slow: trains the smoke target, executes notebooks, or takes over ~2 s; skipped by `make test-fast`"
    )


# Session and module fixtures that train the smoke target or execute notebooks with papermill (a minute or
# more each on 2 cores): every test that requests one, directly or through another fixture, is slow.
SLOW_FIXTURES = {"smoke_target_dir", "smoke_outputs", "imagefolder_outputs", "regimes_run"}
# Whole modules: test_scale scores 100 and 1,000 images to compare peak memory; test_model_families builds
# the tiny SD 1.x / 2.x / XL / sample-prediction zoo and scores each in three file forms (4-6 s a test);
# test_lora builds a pipeline and a LoRA and scores with it (5-10 s a test).
SLOW_MODULES = {"test_scale.py", "test_model_families.py", "test_lora.py"}
# Single tests over ~2 s in `make test`'s --durations (a parameter id names one case only).
SLOW_TESTS = {
    # 29 s: 4 subprocess runs, torchrun
    "test_experiment.py::test_a_killed_run_resumes_and_two_processes_give_the_one_process_tables",
    "test_faults.py::test_a_second_run_on_the_same_out_is_refused_at_once",  # 17 s: a full run in a subprocess
    # 12 s: builds the target twice
    "test_target.py::test_two_builds_of_the_embedded_target_give_bit_identical_weights",
    # 11 s: rescoring in a subprocess
    "test_tolerances.py::test_default_cpu_capability_moves_scores_within_the_tolerance",
    "test_imagesets_remote.py::test_laion_mi_download_end_to_end",  # 8 s: img2dataset subprocesses
    "test_target.py::test_fingerprint_is_the_same_in_processes_with_different_hash_seeds",  # 7 s: fresh processes
    "test_similarity.py::test_ms_ssim_matches_torchmetrics[256]",  # 7 s: MS-SSIM at 256 px
    "test_runs.py::test_batch_size_changes_scores_only_within_the_stated_tolerance",  # 4 s: every attack twice
    # 9 s: every attack at two batch compositions (the fixture's setup)
    "test_tolerances.py::test_batch_composition_moves_scores_within_the_tolerance",
    "test_calibration.py::test_reference_calibration_uses_the_same_noise_per_image",  # 5 s: every attack, 2 models
    "test_calibration.py::test_quantile_thresholds_hold_the_false_positive_rate",  # 3 s a case: Monte Carlo
    "test_calibration.py::test_mialib_audit_takes_reference_calibrated_features",  # 15 s: five audits
    # 2-3 s a case, 12 cases: every attack under every control
    "test_caption_controls.py::test_every_attack_scores_the_control_as_its_function_on_those_texts",
    # 4.5 s: a score run, an audit and an interrupted audit
    "test_faults.py::test_an_audit_and_a_score_run_never_share_a_folder_and_an_interrupted_audit_leaves_nothing_stale",
    "test_faults.py::test_another_run_into_an_existing_out_is_refused_and_report_checks_the_tables",  # 2 s: 3 runs
    "test_experiment.py::test_score_on_a_users_imagefolder_equals_the_attack_functions",  # 4 s: every attack
    "test_experiment.py::test_the_command_line_and_the_notebooks_write_the_same_run",  # 2.5 s: two runs
    "test_blind.py::test_image_only_baseline_detects_a_shifted_split_and_not_a_fair_one",  # 3 s: two fits
    "test_regimes.py::test_extra_nonmembers_join_the_test_split_from_outside_the_split",  # 3 s: opens the set twice
    "test_audit.py::test_power_near_one_for_a_clear_shift_and_combined_features_beat_single_and_noise",  # 2.5 s
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        if (
            SLOW_FIXTURES.intersection(item.fixturenames)
            or module in SLOW_MODULES
            or f"{module}::{item.name}" in SLOW_TESTS
            or f"{module}::{item.originalname}" in SLOW_TESTS
        ):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smoke_preset(tmp_path_factory) -> Path:
    """configs/smoke.yaml with the target and outputs redirected to a fresh temporary folder. Under
    pytest-xdist the target's folder is one for all workers (the run's shared temporary root), built by the
    first worker that needs it while the others wait on a file lock (:func:`smoke_target_dir`)."""
    folder = tmp_path_factory.mktemp("smoke")
    shared = tmp_path_factory.getbasetemp().parent if WORKER else folder
    params = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    params["MODEL"] = str(shared / "smoke-target")
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
    """Trains the smoke target once (about a minute on 2 cores), once for all xdist workers."""
    from filelock import FileLock

    from mialib import experiment

    with FileLock(f"{smoke_params['MODEL']}.lock"):
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
        rows.append(
            {
                "file_name": name,
                "id": record.id,
                "caption": record.caption,
                "label": record.label,
                "subset": record.subset,
            }
        )
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def imagefolder_outputs(smoke_outputs, smoke_params, user_imagefolder, tmp_path_factory) -> Path:
    """The notebooks of ``IMAGEFOLDER_NOTEBOOKS`` executed on the user's imagefolder with the smoke target
    (after the emoji run, whose trajectory cache it shares: per-image keys hold ids, captions and pixels, so
    only identical inputs hit)."""
    from mialib import experiment

    folder = tmp_path_factory.mktemp("imagefolder_run")
    params = dict(
        smoke_params,
        DATA=f"imagefolder:{user_imagefolder}",
        OUTPUT_DIR=str(folder / "outputs"),
        CACHE_DIR=str(smoke_outputs / "cache"),
        BUILD_TINY_TARGET=False,
    )
    path = folder / "preset.yaml"
    path.write_text(yaml.safe_dump(params))
    return experiment.run_notebooks(path, IMAGEFOLDER_NOTEBOOKS)
