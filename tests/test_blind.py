"""Blind baselines: they learn only from the calibration split and detect a split that leaks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from mialib import blind


def _image_set(n: int, shift: float, seed: int = 0):
    """Members are plain noise images; non-members the same plus ``shift`` brightness."""
    generator = torch.Generator().manual_seed(seed)
    labels = np.array([1, 0] * n)
    tensors = torch.rand((2 * n, 3, 16, 16), generator=generator) * 1.6 - 0.8
    tensors[labels == 0] += shift
    frame = pd.DataFrame(
        {
            "id": [f"i{k}" for k in range(2 * n)],
            "label": labels,
            "subset": ["calibration"] * n + ["test"] * n,
            "caption": ["red apple" if label else "blue square" for label in labels],
        }
    )
    return frame, tensors


def test_image_features_are_model_free_and_shaped():
    frame, tensors = _image_set(4, 0.0)
    features = blind.image_features(tensors)
    assert features.shape[0] == 8 and np.isfinite(features).all()
    # The channel means are among the features: compare with numpy.
    means = ((tensors.double() + 1) / 2).mean(dim=(2, 3)).numpy()
    assert any(np.allclose(features[:, j : j + 3], means) for j in range(features.shape[1] - 2))


def test_image_only_baseline_detects_a_shifted_split_and_not_a_fair_one():
    frame, tensors = _image_set(60, 0.15)
    scores = blind.image_only_scores(frame, blind.image_features(tensors))
    test = frame["subset"] == "test"
    assert roc_auc_score(frame["label"][test], scores["score"][test]) > 0.95
    frame, tensors = _image_set(60, 0.0)
    scores = blind.image_only_scores(frame, blind.image_features(tensors))
    assert abs(roc_auc_score(frame["label"][test], scores["score"][test]) - 0.5) < 0.2


def test_caption_only_baseline_uses_only_calibration_labels():
    frame, _ = _image_set(20, 0.0)
    scores = blind.caption_only_scores(frame)
    test = frame["subset"] == "test"
    assert roc_auc_score(frame["label"][test], scores["score"][test]) == 1.0  # captions give labels away
    # Flip the test labels: the scores must not change (the classifier never saw test labels).
    flipped = frame.copy()
    flipped.loc[test, "label"] = 1 - flipped.loc[test, "label"]
    np.testing.assert_allclose(blind.caption_only_scores(flipped)["score"], scores["score"])


def test_requirement_names_the_calibration_counts():
    frame = pd.DataFrame({"label": [1] * 6 + [0] * 4, "subset": ["calibration"] * 10})
    reason = blind.missing_requirement(frame)
    assert "at least 5" in reason and "6 members and 4 non-members" in reason
    assert blind.missing_requirement(frame.assign(label=[1] * 5 + [0] * 5)) is None
