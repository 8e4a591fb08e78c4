"""Per-example calibration: separate membership from how hard an image is.

An attack's raw score ranks images by how well the model reproduces them, and a simple image (flat, few
edges, well reconstructed by the autoencoder) is reproduced well whether or not it was trained on. Two
ways to take that out, each wrapping any registered attack (``structural:calibrate=difficulty``,
``loss:calibrate=reference``; :class:`mialib.attacks.registry.AttackRequest`):

- ``difficulty`` (Bertran et al., NeurIPS 2023: per-example thresholds from image features, no reference
  model): a linear regression of the raw score on image-only features, fitted on the *calibration
  non-members only*, predicts the score a non-member of that difficulty gets. The calibrated score is the
  raw score minus that prediction. The prediction is the least-squares mean: unique and continuous in the
  features, so float32 noise in a feature (another batch size, another CPU) moves it by as little. A
  linear *quantile* regression (scikit-learn's ``QuantileRegressor``, :func:`difficulty_predictions` with
  ``quantile``) gives the per-image threshold of a false-positive rate itself (at ``1 - alpha``); its
  linear-programming solution is not unique when ``quantile * n`` is an integer (the median of an even
  number of images), and the solver's choice among the optima then jumps with the last digits of the
  features, which is why the calibrated score does not use it. The calibration non-members' own
  predictions are cross-fitted (each from a fit without it), so every row's prediction comes from a fit
  that never saw it; thresholds are then chosen on calibration and applied to test like any score, and the
  test FPR they realise is reported.
- ``reference`` (Carlini et al., S&P 2022, LiRA offline; the base model of a fine-tune): the same attack,
  with the same seeds and noise per image, on reference models that did not train on the attacked images.
  With one reference the calibrated score is the difference target - reference (a reference equal to the
  target gives exactly 0). With several it is (target - mean of the references) / sigma, sigma the
  references' spread pooled over all images (LiRA's fixed variance, the choice its authors recommend
  with few reference models): monotone in the offline likelihood ratio.

The image-only features (:data:`FEATURES`) are the compressed size (PNG bits per pixel), the total
variation and, computed by the run layer with the target's own autoencoder, the VAE-only reconstruction
SSIM and MSE; more can be registered in :data:`FEATURES`. This module is statistics on arrays: the run
layer (:mod:`mialib.runs`) scores the references and the features and calls it.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.linear_model import LinearRegression, QuantileRegressor
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .hashing import image_seed

MIN_NONMEMBERS = 10  # fewer calibration non-members cannot fit a regression on three or four features
FOLDS = 5


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (n, c, h, w) -> uint8 (n, h, w, c), as a PNG stores them."""
    scaled = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def compressed_bits(pixels: torch.Tensor) -> np.ndarray:
    """PNG size (deflate at level 9) in bits per pixel of each image: how much there is to describe."""
    images = _uint8(pixels)
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
            buffer, format="PNG", compress_level=9
        )
        sizes.append(8 * buffer.tell() / (image.shape[0] * image.shape[1]))
    return np.asarray(sizes, dtype=np.float64)


def total_variation(pixels: torch.Tensor) -> np.ndarray:
    """Mean absolute difference of horizontally and vertically neighbouring pixels ([-1, 1] scale)."""
    x = pixels.detach().double().cpu()
    across = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(dim=1)
    down = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(dim=1)
    return (across + down).numpy() / 2


# name -> pixels (n, c, h, w) in [-1, 1] -> (n,): the features that need only the image. The run layer adds
# the target autoencoder's reconstruction ("vae_ssim", "vae_mse": the vae_control attack's values).
FEATURES = {"compressed_bits": compressed_bits, "total_variation": total_variation}


def _regression(quantile: float | None):
    if quantile is None:
        return make_pipeline(StandardScaler(), LinearRegression())
    return make_pipeline(StandardScaler(), QuantileRegressor(quantile=quantile, alpha=0.0, solver="highs"))


def difficulty_predictions(
    scores, features, fit: np.ndarray, quantile: float | None = None, seed: int = 0, folds=None
) -> np.ndarray:
    """Per image, a non-member's expected score at its features (least squares; with ``quantile``, that
    quantile, by linear quantile regression), fitted on the rows where ``fit`` is true (the calibration
    non-members). Those rows' own predictions are cross-fitted: no prediction comes from a fit that saw its
    image. ``folds`` gives each row its fold (the run layer derives it from the image id, so the folds do
    not depend on the order the rows come in); without it, :data:`FOLDS` folds shuffled with ``seed``."""
    scores = np.asarray(scores, dtype=np.float64)
    features = np.asarray(features, dtype=np.float64)
    fit = np.asarray(fit, dtype=bool)
    if features.ndim != 2 or len(features) != len(scores) or len(fit) != len(scores):
        raise ValueError(
            f"features must be (n, k) and fit (n,) for n = {len(scores)} scores, got {features.shape} and {fit.shape}"
        )
    if not np.isfinite(features).all():
        raise ValueError("a difficulty feature is NaN or infinite")
    if quantile is not None and not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    rows = np.flatnonzero(fit)
    if len(rows) < MIN_NONMEMBERS:
        raise ValueError(
            f"difficulty calibration fits on the calibration non-members: {len(rows)} is too few (at least "
            f"{MIN_NONMEMBERS})"
        )
    predicted = _regression(quantile).fit(features[rows], scores[rows]).predict(features)
    if folds is None:
        splits = KFold(min(FOLDS, len(rows)), shuffle=True, random_state=seed).split(rows)
    else:
        fold = np.asarray(folds)[rows]
        splits = [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in np.unique(fold)]
    for inside, outside in splits:
        if len(inside) < 2:
            raise ValueError(f"a cross-fitting fold leaves {len(inside)} calibration non-members to fit on")
        model = _regression(quantile).fit(features[rows[inside]], scores[rows[inside]])
        predicted[rows[outside]] = model.predict(features[rows[outside]])
    return predicted


def difficulty_calibrated(
    scores, features, fit, quantile: float | None = None, seed: int = 0, folds=None
) -> np.ndarray:
    """The raw score minus the difficulty prediction (:func:`difficulty_predictions`)."""
    predicted = difficulty_predictions(scores, features, fit, quantile, seed, folds)
    return np.asarray(scores, dtype=np.float64) - predicted


def reference_calibrated(scores, references) -> np.ndarray:
    """Target scores (n,) against the same attack's scores on k reference models (k, n), image by image:
    k = 1, the difference; k >= 2, (score - the references' mean) / their spread pooled over images
    (LiRA offline with a fixed variance)."""
    scores = np.asarray(scores, dtype=np.float64)
    references = np.atleast_2d(np.asarray(references, dtype=np.float64))
    if references.shape[1] != len(scores):
        raise ValueError(f"reference scores must be (k, {len(scores)}), got {references.shape}")
    if len(references) == 1:
        return scores - references[0]
    spread = float(np.sqrt(references.var(axis=0, ddof=1).mean()))
    if not spread > 0:
        raise ValueError(
            f"the {len(references)} reference models give identical scores on every image: their spread cannot scale "
            "the difference"
        )
    return (scores - references.mean(axis=0)) / spread


def fitted_summary(features, labels, fit, folds) -> np.ndarray:
    """A per-image curve (n, k) summarised by a logistic regression of membership on it (standardised features,
    scikit-learn's ``LogisticRegression``), fitted on the rows where ``fit`` is true (the calibration split,
    members and non-members) and nowhere else: those rows' own scores are cross-fitted by ``folds`` (no
    score comes from a fit that saw its image), every other row's from the fit on all of them. The score is
    the fit's decision function (log-odds of membership): higher means member."""
    from sklearn.linear_model import LogisticRegression

    features = np.asarray(features, dtype=np.float64)
    labels, fit, folds = np.asarray(labels), np.asarray(fit, dtype=bool), np.asarray(folds)
    if features.ndim != 2 or not len(features) == len(labels) == len(fit) == len(folds):
        raise ValueError(f"features must be (n, k) with n labels, fit flags and folds, got {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("a curve value is NaN or infinite")
    rows = np.flatnonzero(fit)
    counts = np.bincount(labels[rows].astype(int), minlength=2)
    if counts.min() < MIN_NONMEMBERS:
        raise ValueError(
            f"calibrate=fit fits on the calibration split: {counts[1]} members and {counts[0]} non-members, at least "
            f"{MIN_NONMEMBERS} of each"
        )

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))

    summary = model().fit(features[rows], labels[rows]).decision_function(features)
    for k in np.unique(folds[rows]):
        inside, outside = rows[folds[rows] != k], rows[folds[rows] == k]
        if len(np.unique(labels[inside])) < 2:
            raise ValueError(f"a cross-fitting fold leaves only one class of {len(inside)} calibration images")
        summary[outside] = model().fit(features[inside], labels[inside]).decision_function(features[outside])
    return summary


def id_folds(ids, seed: int = 0) -> np.ndarray:
    """Each image's cross-fitting fold, from its id and ``seed`` alone (the same in any order or subset)."""
    return np.asarray([image_seed(str(i), seed) % FOLDS for i in ids])


def feature_frame(ids, pixels: torch.Tensor) -> pd.DataFrame:
    """``id`` and every image-only feature of :data:`FEATURES` for a batch."""
    return pd.DataFrame({"id": list(ids), **{name: function(pixels) for name, function in FEATURES.items()}})
