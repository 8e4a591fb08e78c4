"""Scale: scoring ten times the images keeps the peak memory flat (images stream batch by batch; the
in-process memory of images, latents and decodes that the notebooks use is off for `mialib score`).
`make benchmark` measures the same at 200 and 2,000 images in fresh processes."""

from __future__ import annotations

import pandas as pd
import pytest

import helpers
from mialib import cli, memo


def _score(model, data, out) -> float:
    """The structural attack's peak MB (reset when the attack starts) in one `mialib score` run."""
    cli.main(
        [
            "score",
            "--model",
            str(model),
            "--data",
            f"imagefolder:{data}",
            "--attack",
            "structural",
            "--out",
            str(out),
            "--batch-size",
            "32",
            "--bootstrap",
            "10",
            "--quiet",
        ]
    )
    return float(pd.read_parquet(out / "scores.parquet")["peak_memory_mb"].max())


@pytest.fixture
def memory_off():
    """The in-process memory as a fresh `mialib score` process has it: off (an earlier test in this process may
    have run a notebook's setup, which turns it on); restored afterwards."""
    budgets = [m.budget for m in (memo.LATENTS, memo.DECODED, memo.PIXELS)]
    memo.configure(0)
    yield
    for m, budget in zip((memo.LATENTS, memo.DECODED, memo.PIXELS), budgets):
        m.budget = budget


def test_scoring_ten_times_the_images_peaks_within_ten_percent(tmp_path, capsys, memory_off):
    model = tmp_path / "model"
    helpers.save_tiny_pipeline(model)
    small = helpers.write_imagefolder(tmp_path / "small", n=100, size=32)
    large = helpers.write_imagefolder(tmp_path / "large", n=1000, size=32)
    peak_small = _score(model, small, tmp_path / "out_small")
    peak_large = _score(model, large, tmp_path / "out_large")
    with capsys.disabled():
        print(f"\npeak MB of the structural attack: {peak_small:.0f} (100 images) -> {peak_large:.0f} (1,000 images)")
    assert peak_large <= 1.10 * peak_small
    assert memo.PIXELS.budget == 0  # `mialib score` leaves the memory off
