"""Scale: scoring ten times the images keeps the peak memory flat (images stream batch by batch; the
in-process memory of images, latents and decodes that the notebooks use is off for `mialib score`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd

import helpers


def _score(model, data, out) -> tuple[float, float]:
    """(the attack's recorded peak MB, the process's peak RSS MB) of one `mialib score` process."""
    command = [sys.executable, "-m", "mialib", "score", "--model", str(model), "--data", f"imagefolder:{data}",
               "--attack", "structural", "--out", str(out), "--batch-size", "32", "--bootstrap", "10", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "MIALIB_MEMORY_MB"}  # the defaults, as a user runs it
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read()
    assert status == 0, stderr
    scores = pd.read_parquet(out / "scores.parquet")
    return float(scores["peak_memory_mb"].max()), usage.ru_maxrss / 1024


def test_scoring_2000_images_peaks_within_ten_percent_of_scoring_200(tmp_path):
    model = tmp_path / "model"
    helpers.save_tiny_pipeline(model)
    small = helpers.write_imagefolder(tmp_path / "200", n=200, size=32)
    large = helpers.write_imagefolder(tmp_path / "2000", n=2000, size=32)
    attack_small, process_small = _score(model, small, tmp_path / "out200")
    attack_large, process_large = _score(model, large, tmp_path / "out2000")
    print(f"peak MB: attack {attack_small:.0f} -> {attack_large:.0f}, process {process_small:.0f} -> {process_large:.0f}")
    assert attack_large <= 1.10 * attack_small
    assert process_large <= 1.10 * process_small
