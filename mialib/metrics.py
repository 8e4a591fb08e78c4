"""Attack-agnostic metrics on scikit-learn, with the calibration -> test protocol.

Scores follow one convention: higher means "member". Labels are 1 for members, 0 for non-members.
Thresholds and every other choice are made on the calibration split and applied once to the test split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import auc as sklearn_auc
from sklearn.metrics import roc_auc_score, roc_curve

FPR_TARGETS = (0.01, 0.001)


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels and scores must be 1-d arrays of one length, got {labels.shape} and {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite; drop or fix them first")
    if set(np.unique(labels)) != {0, 1}:
        raise ValueError("labels must contain both members (1) and non-members (0), and nothing else")
    return labels.astype(int), scores


def auc(labels, scores) -> float:
    labels, scores = _check(labels, scores)
    return float(roc_auc_score(labels, scores))


def tpr_at_fpr(labels, scores, fpr_target: float) -> float:
    """TPR at the largest ROC false-positive rate not above ``fpr_target`` (never the nearest one)."""
    labels, scores = _check(labels, scores)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= fpr_target].max())


def balanced_accuracy_at(labels, scores, threshold: float) -> float:
    """Mean of TPR and TNR when "member" means ``score >= threshold``."""
    labels, scores = _check(labels, scores)
    predicted = scores >= threshold
    return float(0.5 * (predicted[labels == 1].mean() + (~predicted[labels == 0]).mean()))


def rates_at(labels, scores, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) when "member" means ``score >= threshold``."""
    labels, scores = _check(labels, scores)
    predicted = scores >= threshold
    return float(predicted[labels == 1].mean()), float(predicted[labels == 0].mean())


def best_accuracy_threshold(labels, scores) -> float:
    """Threshold maximising balanced accuracy (the paper's ASR threshold), among the ROC thresholds."""
    labels, scores = _check(labels, scores)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    thresholds = np.where(np.isinf(thresholds), scores.max() + 1.0, thresholds)
    return float(thresholds[np.argmax(tpr - fpr)])


def threshold_at_fpr(labels, scores, fpr_target: float) -> float:
    """Lowest threshold whose false-positive rate on these scores is not above ``fpr_target``."""
    labels, scores = _check(labels, scores)
    fpr, _, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    thresholds = np.where(np.isinf(thresholds), scores.max() + 1.0, thresholds)
    return float(thresholds[fpr <= fpr_target].min())


@dataclass
class AttackMetrics:
    """Test-split metrics of one attack, with thresholds transferred from the calibration split."""

    auc: float
    balanced_accuracy: float  # at the calibration threshold that maximised balanced accuracy there
    threshold: float
    tpr_at_1fpr: float  # on the test ROC (threshold-free)
    tpr_at_01fpr: float
    transfer_tpr_at_1fpr: float  # TPR at the threshold that gave FPR <= 1 % on calibration ...
    transfer_fpr_at_1fpr: float  # ... and the FPR it actually reached on test
    n_test_members: int
    n_test_nonmembers: int
    calibration_auc: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(cal_labels, cal_scores, test_labels, test_scores) -> AttackMetrics:
    """Choose thresholds on calibration, report on test."""
    cal_labels, cal_scores = _check(cal_labels, cal_scores)
    test_labels, test_scores = _check(test_labels, test_scores)
    threshold = best_accuracy_threshold(cal_labels, cal_scores)
    low_fpr_threshold = threshold_at_fpr(cal_labels, cal_scores, 0.01)
    transfer_tpr, transfer_fpr = rates_at(test_labels, test_scores, low_fpr_threshold)
    return AttackMetrics(
        auc=auc(test_labels, test_scores),
        balanced_accuracy=balanced_accuracy_at(test_labels, test_scores, threshold),
        threshold=threshold,
        tpr_at_1fpr=tpr_at_fpr(test_labels, test_scores, 0.01),
        tpr_at_01fpr=tpr_at_fpr(test_labels, test_scores, 0.001),
        transfer_tpr_at_1fpr=transfer_tpr,
        transfer_fpr_at_1fpr=transfer_fpr,
        n_test_members=int((test_labels == 1).sum()),
        n_test_nonmembers=int((test_labels == 0).sum()),
        calibration_auc=auc(cal_labels, cal_scores),
    )


def evaluate_scores(scores: pd.DataFrame, by: tuple[str, ...] = ("attack",)) -> pd.DataFrame:
    """Metrics per attack from a scores table (columns ``label, subset, score`` plus ``by``)."""
    rows = []
    for key, group in scores.groupby(list(by), sort=False):
        cal = group[group["subset"] == "calibration"]
        test = group[group["subset"] == "test"]
        result = evaluate(cal["label"], cal["score"], test["label"], test["score"])
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), **result.as_dict()})
    return pd.DataFrame(rows)


def select_on_calibration(scores: pd.DataFrame, setting: str, allow_flip: bool = True) -> tuple[object, int, float]:
    """Pick the setting (and score direction) with the highest calibration AUC.

    ``scores`` holds raw scores of one attack for several values of the column ``setting``. Returns
    (value, direction, calibration AUC after applying the direction). Test rows are never looked at.
    """
    cal = scores[scores["subset"] == "calibration"]
    best = None
    for value, group in cal.groupby(setting):
        raw_auc = auc(group["label"], group["score"])
        for direction in (1, -1) if allow_flip else (1,):
            directed = raw_auc if direction == 1 else 1.0 - raw_auc
            if best is None or directed > best[2]:
                best = (value, direction, directed)
    return best


def choose_setting(values: pd.DataFrame, by: list[str], flip: bool = False) -> tuple[dict, int, float]:
    """The one place where a setting and a score direction are chosen: the combination of the columns
    ``by`` (and, when ``flip``, the direction) with the highest calibration AUC.

    ``values`` holds ``label, subset, score`` per image and candidate. Test rows are never looked at.
    Returns (chosen values of ``by``, direction +1 / -1, calibration AUC after the direction).
    """
    keyed = values.assign(_candidate=list(zip(*(values[c] for c in by))) if by else [()] * len(values))
    choice, direction, cal_auc = select_on_calibration(keyed, "_candidate", allow_flip=flip)
    return dict(zip(by, choice)), int(direction), float(cal_auc)


def resampled_metrics(labels, scores, weights: np.ndarray, threshold: float) -> pd.DataFrame:
    """AUC, balanced accuracy at ``threshold`` and TPR at 1 % and 0.1 % FPR of many resamples at once.

    ``weights`` is (resamples, n): how often each image was drawn. A resample is the weighted ROC that
    ``roc_curve(labels, scores, sample_weight=w, drop_intermediate=False)`` gives: one point per distinct
    score, counting down from the highest, plus (0, 0). The area is its trapezoid sum (``sklearn.auc``) and
    the operating points are read off it as :func:`tpr_at_fpr` does. Computed here for every resample in
    one pass because the bootstrap evaluates thousands of ROCs; the tests compare each resample with
    scikit-learn's functions on the resampled arrays.
    """
    labels, scores = _check(labels, scores)
    weights = np.asarray(weights, dtype=np.float64)
    distinct, inverse = np.unique(-scores, return_inverse=True)  # distinct scores, highest first
    members, nonmembers = labels == 1, labels == 0
    positives = weights[:, members].sum(axis=1, keepdims=True)
    negatives = weights[:, nonmembers].sum(axis=1, keepdims=True)
    tp = np.zeros((len(weights), len(distinct)))
    fp = np.zeros((len(weights), len(distinct)))
    np.add.at(tp.T, inverse[members], weights[:, members].T)
    np.add.at(fp.T, inverse[nonmembers], weights[:, nonmembers].T)
    zero = np.zeros((len(weights), 1))
    tpr = np.hstack([zero, np.cumsum(tp, axis=1)]) / positives
    fpr = np.hstack([zero, np.cumsum(fp, axis=1)]) / negatives
    area = (np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2).sum(axis=1)
    predicted = scores >= threshold
    accuracy = 0.5 * (
        weights[:, members & predicted].sum(axis=1) / positives[:, 0]
        + weights[:, nonmembers & ~predicted].sum(axis=1) / negatives[:, 0]
    )
    return pd.DataFrame(
        {
            "auc": area,
            "balanced_accuracy": accuracy,
            "tpr_at_1fpr": np.where(fpr <= 0.01, tpr, 0.0).max(axis=1),
            "tpr_at_01fpr": np.where(fpr <= 0.001, tpr, 0.0).max(axis=1),
        }
    )


def bootstrap(
    cal_labels, cal_scores, test_labels, test_scores, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> pd.DataFrame:
    """Bootstrap intervals of the test metrics: AUC, balanced accuracy (at the fixed calibration
    threshold), TPR at 1 % and 0.1 % FPR.

    Test members and non-members are resampled separately (stratified), the calibration threshold is held
    fixed, so the interval reflects test-sample variation. Returns one row per metric with the point
    estimate (scikit-learn on the test split) and the ``level`` percentile interval of the resamples
    (:func:`resampled_metrics`).
    """
    cal_labels, cal_scores = _check(cal_labels, cal_scores)
    test_labels, test_scores = _check(test_labels, test_scores)
    threshold = best_accuracy_threshold(cal_labels, cal_scores)
    fpr, tpr, _ = roc_curve(test_labels, test_scores, drop_intermediate=False)
    point = {
        "auc": float(sklearn_auc(fpr, tpr)),
        "balanced_accuracy": balanced_accuracy_at(test_labels, test_scores, threshold),
        "tpr_at_1fpr": float(tpr[fpr <= 0.01].max()),
        "tpr_at_01fpr": float(tpr[fpr <= 0.001].max()),
    }
    draws = resampled_metrics(test_labels, test_scores, bootstrap_weights(test_labels, n_boot, seed), threshold)
    tail = (1 - level) / 2 * 100
    return pd.DataFrame(
        {
            "metric": list(point),
            "estimate": list(point.values()),
            "low": [float(np.percentile(draws[m], tail)) for m in point],
            "high": [float(np.percentile(draws[m], 100 - tail)) for m in point],
        }
    )


def bootstrap_weights(labels, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n) draw counts of stratified resamples: members and non-members each drawn with
    replacement to their own number."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    members = np.flatnonzero(labels == 1)
    nonmembers = np.flatnonzero(labels == 0)
    weights = np.zeros((n_boot, len(labels)))
    for row in weights:
        index = np.concatenate([rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers))])
        np.add.at(row, index, 1.0)
    return weights


def metric_table(scores: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Test metrics (thresholds from calibration) per run, with bootstrap intervals and mean costs."""
    table = evaluate_scores(scores, by=("run",))
    intervals, described = [], []
    for run, group in scores.groupby("run", sort=False):
        cal, test = group[group["subset"] == "calibration"], group[group["subset"] == "test"]
        ci = bootstrap(cal["label"], cal["score"], test["label"], test["score"], n_boot=n_bootstrap, seed=seed)
        intervals.append(
            {"run": run, **{f"{r.metric}_{end}": getattr(r, end) for r in ci.itertuples() for end in ("low", "high")}}
        )
        first = group.iloc[0]
        described.append(
            {
                "run": run,
                "attack": first["attack"],
                "display": first["display"],
                "setting": first["setting"],
                "direction": first["direction"],
                "unet_evals": group["unet_evals"].mean(),
                "seconds_per_image": group["seconds_per_image"].mean(),
                "peak_memory_mb": group["peak_memory_mb"].max(),
            }
        )
    return pd.DataFrame(described).merge(table, on="run").merge(pd.DataFrame(intervals), on="run")
