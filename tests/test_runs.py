"""mialib.runs: the batch cache and the inversion-trajectory cache that the notebooks' studies share."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import helpers
from mialib import ddim, runs
from mialib.attacks import structural_attack, structural_curve
from mialib.target import load_target

IDS = ["1F34E", "1F600", "1F468-200D-1F33E"]
CAPTIONS = ["red apple", "grinning face", "man farmer"]
SETTINGS = dict(guidance=1.0, prompt="caption", encode_mode="mode", schedule="model", seed=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_runs")
    helpers.save_tiny_pipeline(folder)
    return load_target(folder)


@pytest.fixture(scope="module")
def images():
    return helpers.make_images(3, seed=1)


@pytest.fixture
def frame():
    return pd.DataFrame({"id": IDS, "caption": CAPTIONS})


def _curves(target, frame, images, cache, total, stride=50, batch_size=2, **overrides):
    return runs.structural_curves(target, frame, images, ddim.path(total, stride), cache, batch_size, **{**SETTINGS, **overrides})


def test_cached_curves_equal_the_uncached_computation(target, frame, images, tmp_path):
    curves = _curves(target, frame, images, tmp_path, 150)
    expected = structural_curve(target, images, CAPTIONS, IDS, [0, 50, 100, 150])
    for t in (0, 50, 100, 150):
        part = curves[curves["t"] == t].set_index("id").loc[IDS]
        for measure in ("ssim", "mse", "ms_ssim", "latent_mse"):
            np.testing.assert_allclose(part[measure], expected[t][measure], rtol=0, atol=1e-6)
        assert (part["unet_evals"] == t // 50).all()  # one evaluation per stride-50 step from t = 0
    assert (curves[curves["t"] == 0]["latent_mse"] == 0).all()
    # the structural attack at the paper setting reads the same number off the path
    paper = structural_attack(target, images, CAPTIONS, IDS, t=100, stride=50)
    np.testing.assert_allclose(curves[curves["t"] == 100].set_index("id").loc[IDS]["ssim"], paper.scores, atol=1e-6)


def test_a_shorter_path_and_other_measures_reuse_the_trajectory(target, frame, images, tmp_path):
    long = _curves(target, frame, images, tmp_path, 200)
    files = sorted((tmp_path / "trajectory").glob("*.safetensors"))
    assert len(files) == 3  # one per image
    before = target.unet_evals
    short = _curves(target, frame, images, tmp_path, 100)
    other_range = _curves(target, frame, images, tmp_path, 100, data_range=1.0)
    rebatched = _curves(target, frame.iloc[::-1], images.flip(0), tmp_path, 200, batch_size=1)
    assert target.unet_evals == before  # no inversion ran: every call read the cached per-image trajectories
    # (decoding in batches of another size moves float32 results by ~1e-8)
    np.testing.assert_allclose(rebatched.set_index(["id", "t"]).loc[long.set_index(["id", "t"]).index, "ssim"], long["ssim"], atol=1e-6)
    merged = short.merge(long, on=["id", "t"], suffixes=("", "_long"))
    assert len(merged) == len(short) == 3 * 3
    np.testing.assert_array_equal(merged["ssim"], merged["ssim_long"])
    np.testing.assert_array_equal(merged["unet_evals"], merged["unet_evals_long"])
    assert not np.allclose(other_range["ssim"], short["ssim"])  # the data range changes SSIM, not the path
    np.testing.assert_array_equal(other_range["latent_mse"], short["latent_mse"])


def test_a_longer_path_extends_the_cached_one(target, frame, images, tmp_path):
    _curves(target, frame, images, tmp_path / "a", 100)
    before = target.unet_evals
    extended = _curves(target, frame, images, tmp_path / "a", 250)
    assert target.unet_evals - before == 3 * 3  # only 100 -> 150 -> 200 -> 250, for three images
    fresh = _curves(target, frame, images, tmp_path / "b", 250)
    merged = extended.merge(fresh, on=["id", "t"], suffixes=("", "_fresh"))
    assert len(merged) == 3 * 6
    for measure in ("ssim", "mse", "latent_mse"):
        np.testing.assert_allclose(merged[measure], merged[f"{measure}_fresh"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(merged["unet_evals"], merged["unet_evals_fresh"])
    assert (extended["seconds_per_image"] >= 0).all()
    assert extended.groupby("id")["seconds_per_image"].is_monotonic_increasing.all()


def test_captions_pixels_and_settings_key_the_caches(target, frame, images, tmp_path):
    base = _curves(target, frame, images, tmp_path, 100).set_index(["id", "t"])
    unrelated = frame.assign(caption=np.roll(frame["caption"].to_numpy(), 1))
    before = target.unet_evals
    other_caption = _curves(target, unrelated, images, tmp_path, 100).set_index(["id", "t"])
    assert target.unet_evals - before == 3 * 2  # inverted again: the caption is part of the key
    assert not np.allclose(other_caption.loc[(slice(None), 100), "ssim"], base.loc[(slice(None), 100), "ssim"])
    shifted = _curves(target, frame, images.flip(-1), tmp_path, 100).set_index(["id", "t"])
    assert not np.allclose(shifted["mse"], base["mse"])
    guided = _curves(target, frame, images, tmp_path, 100, guidance=3.0).set_index(["id", "t"])
    assert (guided.loc[(slice(None), 100), "unet_evals"] == 4).all()
    assert len(list((tmp_path / "trajectory").glob("*.safetensors"))) == 4 * 3


def test_attack_scores_cache_keys_on_captions(target, frame, images, tmp_path):
    first = runs.attack_scores(target, structural_attack, frame, images, tmp_path, 3, t=100, stride=50)
    unrelated = frame.assign(caption=np.roll(frame["caption"].to_numpy(), 1))
    second = runs.attack_scores(target, structural_attack, unrelated, images, tmp_path, 3, t=100, stride=50)
    expected = structural_attack(target, images, list(unrelated["caption"]), IDS, t=100, stride=50).scores
    np.testing.assert_allclose(second["score"], expected, atol=1e-6)
    assert not np.allclose(first["score"], second["score"])


def test_an_interrupted_write_is_never_read(target, frame, images, tmp_path):
    _curves(target, frame, images, tmp_path, 100, batch_size=3)
    cached = sorted((tmp_path / "trajectory").glob("*.safetensors"))[0]
    assert not list(tmp_path.rglob("*.partial"))
    cached.with_suffix(".partial").write_bytes(b"half a file")  # what a kill during a write leaves
    before = target.unet_evals
    _curves(target, frame, images, tmp_path, 150, batch_size=3)
    assert target.unet_evals - before == 3  # resumed from the complete file, the stray partial ignored


def test_partly_cached_batches_invert_only_what_is_missing(target, frame, images, tmp_path):
    _curves(target, frame.iloc[:2], images[:2], tmp_path, 100, batch_size=2)
    before = target.unet_evals
    both = _curves(target, frame, images, tmp_path, 150, batch_size=3)
    assert target.unet_evals - before == 2 * 1 + 1 * 3  # two images extended by one step, one inverted from 0
    expected = structural_curve(target, images, CAPTIONS, IDS, [0, 50, 100, 150])
    part = both[both["t"] == 150].set_index("id").loc[IDS]
    np.testing.assert_allclose(part["ssim"], expected[150]["ssim"], rtol=0, atol=1e-6)
    assert (part["unet_evals"] == 3).all()


def test_measuring_only_some_timesteps_reads_the_same_numbers(target, frame, images, tmp_path):
    full = _curves(target, frame, images, tmp_path, 200)
    before = target.unet_evals
    end = _curves(target, frame, images, tmp_path, 200, at=[200, 100])
    assert target.unet_evals == before
    assert sorted(end["t"].unique()) == [100, 200]
    merged = end.merge(full, on=["id", "t"], suffixes=("", "_full"))
    assert len(merged) == len(end) == 6
    for measure in ("ssim", "ms_ssim", "mse", "latent_mse", "unet_evals"):
        np.testing.assert_allclose(merged[measure], merged[f"{measure}_full"], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="not on the path"):
        _curves(target, frame, images, tmp_path, 200, at=[125])


def test_only_uniform_paths_from_zero_are_cached(target, frame, images, tmp_path):
    with pytest.raises(ValueError, match="expected a path"):
        runs.structural_curves(target, frame, images, [0, 50, 150], tmp_path, 3, **SETTINGS)
    with pytest.raises(ValueError, match="expected a path"):
        runs.structural_curves(target, frame, images, [50, 100], tmp_path, 3, **SETTINGS)
    with pytest.raises(ValueError, match="not inversion settings"):
        runs.trajectory_batch(target, images, frame, 100, 50, tmp_path, {"t": 3})
