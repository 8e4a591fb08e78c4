"""mialib.robustness: the attack suite at fixed settings, scored through the shared caches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import helpers
from mialib import robustness, transforms
from mialib.attacks import loss_attack, pixel_attack, structural_attack
from mialib.target import load_target

IDS = ["1F34E", "1F600", "1F468-200D-1F33E", "1F431"]
CAPTIONS = ["red apple", "grinning face", "man farmer", "cat face"]
COMMON = dict(guidance=1.0, prompt="caption", encode_mode="mode", schedule="model", data_range=2.0, seed=0)
CHOSEN = dict(structural_t=300, structural_direction=-1, loss_t=100, secmi_t=100, secmi_interval=10, pia_t=200, pia_p=4, clid_t=200, clid_n_noise=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_robustness")
    helpers.save_tiny_pipeline(folder)
    return load_target(folder)


@pytest.fixture(scope="module")
def images():
    return helpers.make_images(4, seed=2)


@pytest.fixture(scope="module")
def frame():
    return pd.DataFrame({"id": IDS, "caption": CAPTIONS, "label": [1, 0, 1, 0]})


def test_suite_scores_equal_the_attacks_run_directly(target, frame, images, tmp_path):
    suite = robustness.suite(CHOSEN, 100, 50, 50, COMMON)
    scores = robustness.score_suite(target, frame, images, suite, tmp_path, batch_size=3)
    assert list(scores["attack"].unique()) == list(suite)
    assert scores.groupby("attack").size().eq(len(IDS)).all() and scores["score"].notna().all()

    def by_id(name):
        return scores[scores["attack"] == name].set_index("id").loc[IDS]

    no_range = {k: v for k, v in COMMON.items() if k != "data_range"}
    expected = {
        "structural (paper)": structural_attack(target, images, CAPTIONS, IDS, t=100, stride=50, **COMMON),
        "structural (calibrated)": structural_attack(target, images, CAPTIONS, IDS, t=300, stride=50, direction=-1, **COMMON),
        "pixel MSE (paper setting)": pixel_attack(target, images, CAPTIONS, IDS, t=100, stride=50, **COMMON),
        "loss": loss_attack(target, images, CAPTIONS, IDS, t=100, **{k: v for k, v in no_range.items() if k != "schedule"}),
    }
    for name, output in expected.items():
        np.testing.assert_allclose(by_id(name)["score"], output.scores, rtol=0, atol=1e-6, err_msg=name)
        assert (by_id(name)["unet_evals"] == output.unet_evals).all(), name
    assert (by_id("structural (calibrated)")["unet_evals"] == 6).all()
    assert (by_id("VAE-only control")["unet_evals"] == 0).all()


def test_path_attacks_share_one_inversion_and_distortions_do_not_reuse_it(target, frame, images, tmp_path):
    suite = robustness.suite(CHOSEN, 100, 50, 50, COMMON)
    paths = {name: attack for name, attack in suite.items() if isinstance(attack, robustness.PathScore)}
    assert set(paths) == {"structural (paper)", "structural (calibrated)", "pixel MSE (paper setting)"}
    before = target.unet_evals
    clean = robustness.score_suite(target, frame, images, paths, tmp_path, batch_size=4)
    # 0 -> 300 once per image: the paper path and the pixel attack read its prefix
    assert target.unet_evals - before == 6 * len(IDS)
    before = target.unet_evals
    again = robustness.score_suite(target, frame, images, paths, tmp_path, batch_size=2)
    assert target.unet_evals == before
    np.testing.assert_allclose(again["score"], clean["score"], atol=1e-6)
    noisy = transforms.distort(images, IDS, "gaussian_noise", 0.1, seed=0)
    distorted = robustness.score_suite(target, frame, noisy, paths, tmp_path, batch_size=4)
    assert target.unet_evals - before == 6 * len(IDS)
    assert not np.allclose(distorted["score"], clean["score"])
