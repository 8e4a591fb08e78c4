"""Blind baselines (Das et al. 2024): membership classifiers that never look at the model.

They are trained on the calibration split and score the test split. If one of them separates members
from non-members, the split differs in its images or captions and an attack's success there measures
the split, not membership. Calibration-split scores come from cross-validation (each calibration image
is scored by a classifier that did not train on it), so thresholds can be chosen there as for attacks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline


def image_features(images: torch.Tensor, bins: int = 8) -> np.ndarray:
    """Model-free features of images in [-1, 1] (n, 3, h, w): per-channel histograms, mean and standard
    deviation, gradient energy, fraction of near-white pixels and an 8x8 grey thumbnail. Shape (n, d)."""
    x = (images.detach().cpu().double() + 1) / 2
    n = x.shape[0]
    histograms = [
        torch.stack([torch.histc(x[i, c], bins=bins, min=0, max=1) for c in range(3)]).flatten() / x[0, 0].numel()
        for i in range(n)
    ]
    grey = x.mean(dim=1, keepdim=True)
    gradient = (grey[..., 1:, :] - grey[..., :-1, :]).abs().flatten(1).mean(1, keepdim=True) + (
        grey[..., :, 1:] - grey[..., :, :-1]
    ).abs().flatten(1).mean(1, keepdim=True)
    white = (x.min(dim=1).values > 0.95).double().flatten(1).mean(1, keepdim=True)
    thumbnail = torch.nn.functional.adaptive_avg_pool2d(grey, 8).flatten(1)
    features = torch.cat(
        [torch.stack(histograms), x.mean(dim=(2, 3)), x.std(dim=(2, 3)), gradient, white, thumbnail], dim=1
    )
    return features.numpy()


FOLDS = 5  # cross-validation folds on the calibration split


def missing_requirement(records: pd.DataFrame) -> str | None:
    """Why the blind baselines cannot run on these records (None when they can): scoring calibration
    images by cross-validation needs at least ``FOLDS`` calibration images of each class."""
    calibration = records[records["subset"] == "calibration"]["label"].value_counts()
    members, nonmembers = int(calibration.get(1, 0)), int(calibration.get(0, 0))
    if min(members, nonmembers) < FOLDS:
        return (
            f"needs at least {FOLDS} calibration images of each class for {FOLDS}-fold cross-validation; "
            f"the calibration split has {members} members and {nonmembers} non-members"
        )
    return None


def _fit_and_score(model, features: np.ndarray, labels: np.ndarray, calibration: np.ndarray, seed: int) -> np.ndarray:
    """Cross-validated scores on calibration rows, scores of a calibration-trained model on the rest."""
    scores = np.empty(len(labels), dtype=np.float64)
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    scores[calibration] = cross_val_predict(
        model, features[calibration], labels[calibration], cv=folds, method="predict_proba"
    )[:, 1]
    model.fit(features[calibration], labels[calibration])
    scores[~calibration] = model.predict_proba(features[~calibration])[:, 1]
    return scores


def image_only_scores(images: pd.DataFrame, features: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """Gradient-boosted trees on :func:`image_features` (``features``, row for row with ``images``);
    returns ``id, score`` (higher means member)."""
    calibration = (images["subset"] == "calibration").to_numpy()
    # Leaves of at most 20 samples (sklearn's default), fewer on small calibration splits so trees can split.
    leaf = int(np.clip(calibration.sum() // 10, 2, 20))
    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, min_samples_leaf=leaf, random_state=seed)
    scores = _fit_and_score(model, np.asarray(features), images["label"].to_numpy(), calibration, seed)
    return pd.DataFrame({"id": list(images["id"]), "score": scores})


def caption_only_scores(images: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Logistic regression on character 2-4-gram TF-IDF of the captions; returns ``id, score``."""
    calibration = (images["subset"] == "calibration").to_numpy()
    model = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=1, sublinear_tf=True),
        LogisticRegression(C=1.0, max_iter=2000, random_state=seed),
    )
    captions = np.asarray(images["caption"], dtype=object)
    scores = _fit_and_score(model, captions, images["label"].to_numpy(), calibration, seed)
    return pd.DataFrame({"id": list(images["id"]), "score": scores})


def image_only(imageset, size: int, batch_size: int, seed: int = 0) -> pd.DataFrame:
    """The image-only baseline on an image set: features batch by batch, then :func:`image_only_scores`."""
    features = [image_features(pixels) for _, pixels in imageset.batches(size, batch_size)]
    return image_only_scores(imageset.records, np.concatenate(features), seed)


def caption_only(imageset, size: int, batch_size: int, seed: int = 0) -> pd.DataFrame:
    """The caption-only baseline on an image set (pixels are never read)."""
    return caption_only_scores(imageset.records, seed)
