"""The noise-level curve (`curve`) and its summary fitted on the calibration split (`curve:calibrate=fit`):
each level's one-step reconstruction error against a hand computation, the fitted summary against
scikit-learn fitted by hand on the calibration rows only, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import helpers
from mialib import calibration, runs
from mialib.attacks import REGISTRY, parse_request
from mialib.attacks.curve import levels, noise_curve_attack
from mialib.hashing import seeded_normal
from mialib.settings import Settings


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from mialib.target import load_target

    folder = tmp_path_factory.mktemp("curve_target")
    helpers.save_tiny_pipeline(folder)
    return load_target(folder)


def test_levels_are_even_and_distinct():
    assert levels(50, 950, 11) == [50, 140, 230, 320, 410, 500, 590, 680, 770, 860, 950]
    with pytest.raises(ValueError, match="not distinct"):
        levels(1, 3, 5)
    with pytest.raises(ValueError, match="5 levels do not fit between t_min=1 and t_max=3"):
        parse_request("curve:t_min=1,t_max=3,points=5")
    with pytest.raises(ValueError, match="t_min must be below t_max"):
        parse_request("curve:t_min=300,t_max=100")


@pytest.mark.numerics
def test_each_level_is_the_one_step_reconstruction_error_by_hand(target):
    """log e_k = log mean_r mean (x0_hat - z0)^2, x0_hat = (z_t - sqrt(1 - a) eps_hat) / sqrt(a), computed here
    in float64 from the same float32 noisy latents; the score is -mean_k log e_k."""
    images, ids, captions = helpers.make_images(3), ["a", "b", "c"], ["red apple", "grinning face", "man farmer"]
    output = noise_curve_attack(target, images, captions, ids, t_min=100, t_max=500, points=3, n_noise=2)
    z0 = target.encode_images(images)
    cond = target.encode_prompts(captions)
    abar = target.scheduler.alphas_cumprod.to(torch.float64)
    hand_logs, tolerances = [], []
    for t in (100, 300, 500):
        a = abar[t]
        error = torch.zeros(3, dtype=torch.float64)
        bound = torch.zeros(3, dtype=torch.float64)
        for r in range(2):
            noise = seeded_normal(tuple(z0.shape[1:]), [f"{i}@curve{t}r{r}" for i in ids], 0)
            noisy = a.sqrt().float() * z0 + (1 - a).sqrt().float() * noise  # the attack's float32 z_t
            eps = target.eps(noisy, t, cond).double()
            x0 = (noisy.double() - (1 - a).sqrt() * eps) / a.sqrt()
            error += (x0 - z0.double()).pow(2).flatten(1).mean(1) / 2
            # the float32 rounding of z_t, carried into x0_hat - z0 = -sqrt((1 - a) / a) (eps_hat - noise)
            bound = torch.maximum(bound, noisy.abs().flatten(1).max(1).values.double())
        hand = torch.log(error).numpy()
        # d log e = 2 d|x0_hat - z0| / |x0_hat - z0|: z_t's rounding (eps * |z_t|) against the error's root
        tolerance = 8 * np.finfo(np.float32).eps * (bound / (a.sqrt() * error.sqrt())).numpy()
        np.testing.assert_allclose(output.extras[f"log_error_t{t}"], hand, rtol=0, atol=tolerance.max())
        assert tolerance.max() < 1e-3 * np.ptp(hand)  # the tolerance is far below how the images differ
        hand_logs.append(hand)
        tolerances.append(tolerance.max())
    own = [output.extras[f"log_error_t{t}"] for t in (100, 300, 500)]
    np.testing.assert_array_equal(output.scores, -np.mean(own, axis=0))  # the score is the curve's mean
    np.testing.assert_allclose(output.scores, -np.mean(hand_logs, axis=0), rtol=0, atol=max(tolerances))
    spec = REGISTRY["curve"]
    params = spec.params({"t_min": 100, "t_max": 500, "points": 3, "n_noise": 2})
    assert spec.cost(params, Settings()) == 6 and target.unet_evals >= 6 * 3


def test_the_fitted_summary_is_fitted_on_the_calibration_rows_alone():
    """calibration.fitted_summary against scikit-learn by hand: the calibration rows cross-fitted by fold, the
    other rows from one fit on every calibration row; the test labels never enter (shuffling them changes
    nothing), and a curve that separates the classes at its middle is found."""
    rng = np.random.default_rng(0)
    n, k = 200, 5
    labels = np.arange(n) % 2
    features = rng.normal(size=(n, k))
    features[:, 2] -= 1.0 * labels  # members reconstruct better at the middle level only
    fit = np.arange(n) < 100
    folds = rng.integers(0, 5, size=n)
    summary = calibration.fitted_summary(features, labels, fit, folds)

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))

    test = ~fit
    np.testing.assert_allclose(
        summary[test], model().fit(features[fit], labels[fit]).decision_function(features[test]), rtol=0, atol=1e-9
    )
    for fold in range(5):
        held = fit & (folds == fold)
        inside = fit & (folds != fold)
        expected = model().fit(features[inside], labels[inside]).decision_function(features[held])
        np.testing.assert_allclose(summary[held], expected, rtol=0, atol=1e-9)
    shuffled = labels.copy()
    shuffled[test] = rng.permutation(shuffled[test])
    np.testing.assert_array_equal(calibration.fitted_summary(features, shuffled, fit, folds), summary)
    assert roc_auc_score(labels[test], summary[test]) > 0.7
    with pytest.raises(ValueError, match="calibrate=fit fits on the calibration split: 0 members and 100 non"):
        calibration.fitted_summary(features, np.zeros(n, dtype=int), fit, folds)


@pytest.mark.slow
def test_curve_and_its_fitted_summary_through_the_run_layer(target, tmp_path):
    """`curve` and `curve:calibrate=fit` on 48 images: the fitted rows keep the curve's own summary as raw_value,
    and their values are fitted_summary of the curve the run computed; a set with too few calibration images of
    a class is refused before any compute; the audit refuses the fit (it has no labels)."""
    from mialib import imagesets, studies

    folder = helpers.write_imagefolder(tmp_path / "set", n=48)
    imageset = imagesets.open_imageset(f"imagefolder:{folder}")
    requests = {"curve": "curve:points=4,n_noise=1", "curve_fit": "curve:points=4,n_noise=1,calibrate=fit"}
    table, results = runs.score(target, imageset, requests, Settings(), tmp_path / "cache", 16, 32, progress=False)
    fitted = table[table["run"] == "curve_fit"].set_index("id")
    plain = table[table["run"] == "curve"].set_index("id").loc[fitted.index]
    assert (fitted["calibrate"] == "fit").all()
    assert fitted["display"].iloc[0].endswith(", fitted on calibration")
    np.testing.assert_array_equal(fitted["raw_value"], plain["value"])
    values = results["curve_fit"].values.set_index("id").loc[fitted.index]
    curve = values[[c for c in values.columns if c.startswith("log_error_t")]]
    assert curve.shape[1] == 4
    records = imageset.records.set_index("id").loc[fitted.index]
    expected = calibration.fitted_summary(
        curve.to_numpy(),
        records["label"].to_numpy(),
        (records["subset"] == "calibration").to_numpy(),
        calibration.id_folds(fitted.index, 0),
    )
    np.testing.assert_allclose(fitted["value"], expected, rtol=0, atol=1e-12)

    small = imagesets.open_imageset(f"imagefolder:{helpers.write_imagefolder(tmp_path / 'small', n=16)}")
    with pytest.raises(ValueError, match="calibrate=fit fits on the calibration split; this set has 4 members and 4"):
        runs.score(target, small, {"f": "curve:calibrate=fit"}, Settings(), tmp_path / "cache2", 16, 32, progress=False)
    with pytest.raises(ValueError, match="f: calibrate=fit is fitted on a labelled split, which an audit does not"):
        studies.audit_requests({"f": "curve:calibrate=fit"})
    with pytest.raises(ValueError, match="loss: calibrate=fit classifies an attack's per-image curve, which loss does"):
        parse_request("loss:calibrate=fit")
