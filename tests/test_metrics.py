"""mialib.metrics against scikit-learn and against hand-computed values on small arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mialib import metrics

# A small hand-worked example with ties (P = 4 members, N = 6 non-members).
#   threshold  members >= thr  non-members >= thr   TPR    FPR
#      0.9          1                 0             0.25   0
#      0.8          2                 1             0.50   1/6    (tie: one member, one non-member)
#      0.7          3                 1             0.75   1/6
#      0.6          3                 3             0.75   1/2    (tie: two non-members)
#      0.5          4                 3             1.00   1/2
#      0.4          4                 4             1.00   2/3
LABELS_A = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0])
SCORES_A = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.6, 0.5, 0.4, 0.3, 0.2])


def _brute_force_points(labels, scores):
    """(threshold, TPR, FPR) for every distinct score, "member" meaning score >= threshold."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    points = []
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        points.append((threshold, predicted[labels == 1].mean(), predicted[labels == 0].mean()))
    return points


def _tpr_at_largest_fpr_not_above(labels, scores, target):
    points = [(0.0, 0.0)] + [(fpr, tpr) for _, tpr, fpr in _brute_force_points(labels, scores)]
    best_fpr = max(fpr for fpr, _ in points if fpr <= target)
    return max(tpr for fpr, tpr in points if fpr == best_fpr)


def _tpr_at_nearest_fpr(labels, scores, target):
    points = [(0.0, 0.0)] + [(fpr, tpr) for _, tpr, fpr in _brute_force_points(labels, scores)]
    nearest = min(points, key=lambda p: abs(p[0] - target))[0]
    return max(tpr for fpr, tpr in points if fpr == nearest)


# --------------------------------------------------------------------------------------------------
def test_auc_equals_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + 0.7 * labels
    assert metrics.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-15)
    # with ties and pandas input
    tied = np.round(scores, 1)
    assert metrics.auc(pd.Series(labels), pd.Series(tied)) == pytest.approx(roc_auc_score(labels, tied), abs=1e-15)
    # hand-computed: of 24 member/non-member pairs 19 are ordered correctly and 1 is tied (0.8, 0.8: counts 1/2)
    assert metrics.auc(LABELS_A, SCORES_A) == pytest.approx(19.5 / 24)


@pytest.mark.parametrize(
    "target, expected",
    [(0.0, 0.25), (0.1, 0.25), (1 / 6, 0.75), (0.2, 0.75), (0.45, 0.75), (0.5, 1.0), (0.6, 1.0), (1.0, 1.0)],
)
def test_tpr_at_fpr_takes_the_largest_fpr_not_above_target(target, expected):
    assert metrics.tpr_at_fpr(LABELS_A, SCORES_A, target) == pytest.approx(expected)
    assert _tpr_at_largest_fpr_not_above(LABELS_A, SCORES_A, target) == pytest.approx(expected)


def test_tpr_at_fpr_is_not_the_nearest_fpr_reading():
    # scores 5 4 3 2 1 for labels 1 0 1 1 0: ROC points (0, 1/3), (1/2, 1/3), (1/2, 1), (1, 1)
    labels = np.array([1, 0, 1, 1, 0])
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    # at target 0.45 the nearest ROC FPR is 0.5 (TPR 1), but it is above the target: the answer is FPR 0
    assert _tpr_at_nearest_fpr(labels, scores, 0.45) == pytest.approx(1.0)
    assert metrics.tpr_at_fpr(labels, scores, 0.45) == pytest.approx(1 / 3)
    assert metrics.tpr_at_fpr(labels, scores, 0.5) == pytest.approx(1.0)  # "not above" includes equality


def test_tpr_at_fpr_matches_brute_force_on_random_scores():
    rng = np.random.default_rng(1)
    for trial in range(40):
        labels = rng.permutation(np.r_[np.ones(15, int), np.zeros(25, int)])
        if trial % 2:  # many ties (integer scores)
            scores = rng.integers(0, 6, 40) + 1.5 * labels * rng.integers(0, 2, 40)
        else:  # continuous scores
            scores = rng.normal(size=40) + labels
        for target in (0.0, 0.01, 0.04, 0.1, 0.25, 0.5):
            expected = _tpr_at_largest_fpr_not_above(labels, scores, target)
            assert metrics.tpr_at_fpr(labels, scores, target) == pytest.approx(expected, abs=1e-12)


def test_tpr_at_fpr_keeps_collinear_roc_points():
    # each threshold admits one member and one non-member: ROC points (k/4, k/4) all lie on the diagonal
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    scores = np.array([4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.0, 1.0])
    # hand: threshold 3 flags 2 of 4 non-members (FPR 0.5) and 2 of 4 members (TPR 0.5)
    assert _tpr_at_largest_fpr_not_above(labels, scores, 0.5) == 0.5
    assert metrics.tpr_at_fpr(labels, scores, 0.5) == pytest.approx(0.5)  # mialib returns 0.25


# --------------------------------------------------------------------------------------------------
def test_best_accuracy_threshold_hand_example():
    # TPR - FPR per threshold: 0.9 -> .25, 0.8 -> .333, 0.7 -> .583, 0.6 -> .25, 0.5 -> .5, 0.4 -> .333
    assert metrics.best_accuracy_threshold(LABELS_A, SCORES_A) == pytest.approx(0.7)


def test_best_accuracy_threshold_when_all_members_score_lowest():
    # members below non-members: every cut is worse than or equal to "nobody is a member" (TPR - FPR = 0),
    # which sklearn represents with an infinite threshold; mialib replaces it by max score + 1
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    threshold = metrics.best_accuracy_threshold(labels, scores)
    assert threshold == pytest.approx(1.4)
    assert metrics.rates_at(labels, scores, threshold) == (0.0, 0.0)


@pytest.mark.parametrize(
    "threshold, tpr, fpr",
    [(0.7, 0.75, 1 / 6), (0.65, 0.75, 1 / 6), (0.6, 0.75, 0.5), (0.8, 0.5, 1 / 6), (0.95, 0.0, 0.0), (0.0, 1.0, 1.0)],
)
def test_rates_and_balanced_accuracy_hand_example(threshold, tpr, fpr):
    got_tpr, got_fpr = metrics.rates_at(LABELS_A, SCORES_A, threshold)
    assert got_tpr == pytest.approx(tpr) and got_fpr == pytest.approx(fpr)
    assert metrics.balanced_accuracy_at(LABELS_A, SCORES_A, threshold) == pytest.approx(0.5 * (tpr + 1 - fpr))


def test_balanced_accuracy_hand_numbers():
    assert metrics.balanced_accuracy_at(LABELS_A, SCORES_A, 0.7) == pytest.approx((0.75 + 5 / 6) / 2)  # 0.7917
    assert metrics.balanced_accuracy_at(LABELS_A, SCORES_A, 0.8) == pytest.approx((0.5 + 5 / 6) / 2)  # 0.6667


@pytest.mark.parametrize(
    "target, expected",
    [(0.0, 0.9), (0.1, 0.9), (0.2, 0.7), (0.5, 0.5), (0.7, 0.4)],
)
def test_threshold_at_fpr_hand_example(target, expected):
    # lowest threshold with FPR <= target, read off the table above LABELS_A
    assert metrics.threshold_at_fpr(LABELS_A, SCORES_A, target) == pytest.approx(expected)
    tpr, fpr = metrics.rates_at(LABELS_A, SCORES_A, expected)
    assert fpr <= target


def test_threshold_at_fpr_returns_the_lowest_admissible_threshold():
    # scores 10..5 for labels 1 0 0 0 1 0: thresholds 10, 9, 8 give FPR 0, 1/4, 1/2
    labels = np.array([1, 0, 0, 0, 1, 0])
    scores = np.array([10.0, 9.0, 8.0, 7.0, 6.0, 5.0])
    admissible = [thr for thr, _, fpr in _brute_force_points(labels, scores) if fpr <= 0.5]
    assert min(admissible) == 8.0
    assert metrics.threshold_at_fpr(labels, scores, 0.5) == 8.0  # mialib returns 10.0


# --------------------------------------------------------------------------------------------------
CAL_LABELS = np.array([1, 1, 1, 0, 0, 0])
CAL_SCORES = np.array([0.9, 0.8, 0.6, 0.5, 0.3, 0.1])  # separable: best threshold 0.6, FPR 0 down to 0.6
TEST_LABELS = np.array([1, 1, 1, 0, 0, 0])
TEST_SCORES = np.array([0.65, 0.45, 0.4, 0.35, 0.3, 0.2])  # separable too, but at 0.4 instead


def test_evaluate_takes_thresholds_from_calibration_only():
    result = metrics.evaluate(CAL_LABELS, CAL_SCORES, TEST_LABELS, TEST_SCORES)
    # the test-optimal threshold would be 0.4 (balanced accuracy 1) ...
    assert metrics.best_accuracy_threshold(TEST_LABELS, TEST_SCORES) == pytest.approx(0.4)
    assert metrics.balanced_accuracy_at(TEST_LABELS, TEST_SCORES, 0.4) == 1.0
    # ... but the reported one is calibration's 0.6: on test it flags 1 of 3 members and 0 non-members
    assert result.threshold == pytest.approx(0.6)
    assert result.balanced_accuracy == pytest.approx((1 / 3 + 1.0) / 2)
    # low-FPR threshold from calibration: lowest threshold with zero calibration false positives, 0.6
    assert result.transfer_tpr_at_1fpr == pytest.approx(1 / 3)
    assert result.transfer_fpr_at_1fpr == 0.0
    # threshold-free test metrics
    assert result.auc == 1.0
    assert result.tpr_at_1fpr == 1.0 and result.tpr_at_01fpr == 1.0
    assert result.calibration_auc == 1.0
    assert (result.n_test_members, result.n_test_nonmembers) == (3, 3)


def test_evaluate_threshold_does_not_move_with_test_scores():
    first = metrics.evaluate(CAL_LABELS, CAL_SCORES, TEST_LABELS, TEST_SCORES)
    second = metrics.evaluate(CAL_LABELS, CAL_SCORES, TEST_LABELS, TEST_SCORES - 10.0)
    assert first.threshold == second.threshold
    # shifted test scores all fall below the calibration threshold: nobody is flagged
    assert second.balanced_accuracy == 0.5 and second.transfer_tpr_at_1fpr == 0.0
    assert second.auc == first.auc  # AUC is shift invariant


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_scores_raise(bad):
    scores = SCORES_A.copy()
    scores[3] = bad
    for call in (
        lambda: metrics.auc(LABELS_A, scores),
        lambda: metrics.tpr_at_fpr(LABELS_A, scores, 0.1),
        lambda: metrics.best_accuracy_threshold(LABELS_A, scores),
        lambda: metrics.threshold_at_fpr(LABELS_A, scores, 0.1),
        lambda: metrics.rates_at(LABELS_A, scores, 0.5),
        lambda: metrics.balanced_accuracy_at(LABELS_A, scores, 0.5),
        lambda: metrics.evaluate(CAL_LABELS, CAL_SCORES, LABELS_A, scores),
        lambda: metrics.evaluate(LABELS_A, scores, TEST_LABELS, TEST_SCORES),
    ):
        with pytest.raises(ValueError):
            call()


def test_single_class_and_malformed_labels_raise():
    with pytest.raises(ValueError):
        metrics.auc(np.ones(4, int), np.arange(4.0))
    with pytest.raises(ValueError):
        metrics.tpr_at_fpr(np.zeros(4, int), np.arange(4.0), 0.1)
    with pytest.raises(ValueError):
        metrics.evaluate(CAL_LABELS, CAL_SCORES, np.ones(6, int), TEST_SCORES)
    with pytest.raises(ValueError):
        metrics.auc(np.array([0, 1, 2, 1]), np.arange(4.0))  # a label other than 0/1
    with pytest.raises(ValueError):
        metrics.auc(np.array([0, 1, 1]), np.arange(4.0))  # lengths differ


# --------------------------------------------------------------------------------------------------
def _selection_table(test_rows: list[dict]) -> pd.DataFrame:
    cal = []
    # t = 50: calibration AUC 3/4 by hand (pairs: .8>.6, .8>.2, .4<.6, .4>.2)
    for label, score in zip([1, 1, 0, 0], [0.8, 0.4, 0.6, 0.2]):
        cal.append(dict(t=50, subset="calibration", label=label, score=score))
    # t = 100: every member below every non-member, AUC 0 (1 after flipping the direction)
    for label, score in zip([1, 1, 0, 0], [0.1, 0.15, 0.5, 0.2]):
        cal.append(dict(t=100, subset="calibration", label=label, score=score))
    return pd.DataFrame(cal + test_rows)


MISLEADING_TEST_ROWS = (
    # t = 50 is perfect on test, t = 100 is perfect in the raw direction on test, and t = 150 exists only on test
    [dict(t=50, subset="test", label=label, score=score) for label, score in zip([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.0])]
    + [dict(t=100, subset="test", label=label, score=score) for label, score in zip([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.0])]
    + [dict(t=150, subset="test", label=label, score=score) for label, score in zip([1, 1, 0, 0], [5.0, 4.0, 1.0, 0.0])]
)


def test_select_on_calibration_flips_direction():
    value, direction, cal_auc = metrics.select_on_calibration(_selection_table(MISLEADING_TEST_ROWS), "t")
    assert (value, direction) == (100, -1)
    assert cal_auc == pytest.approx(1.0)


def test_select_on_calibration_without_flip():
    value, direction, cal_auc = metrics.select_on_calibration(
        _selection_table(MISLEADING_TEST_ROWS), "t", allow_flip=False
    )
    assert (value, direction) == (50, 1)
    assert cal_auc == pytest.approx(0.75)


def test_select_on_calibration_never_reads_test_rows():
    # test rows that would crash any metric (NaN scores, a single class) and a setting that only exists on test
    poison = [dict(t=50, subset="test", label=1, score=np.nan), dict(t=100, subset="test", label=1, score=np.nan)]
    poison += [dict(t=150, subset="test", label=label, score=score) for label, score in zip([1, 0], [1.0, 0.0])]
    assert metrics.select_on_calibration(_selection_table(poison), "t") == (100, -1, pytest.approx(1.0))
    assert metrics.select_on_calibration(_selection_table([]), "t") == (100, -1, pytest.approx(1.0))


def test_evaluate_scores_groups_by_attack():
    rows = []
    for attack, shift in (("a", 0.0), ("b", 1.0)):
        for subset, labels, scores in (("calibration", CAL_LABELS, CAL_SCORES), ("test", TEST_LABELS, TEST_SCORES)):
            for label, score in zip(labels, scores):
                rows.append(dict(attack=attack, subset=subset, label=label, score=score + shift))
    table = metrics.evaluate_scores(pd.DataFrame(rows))
    assert list(table["attack"]) == ["a", "b"]
    assert list(table["threshold"]) == pytest.approx([0.6, 1.6])
    assert list(table["balanced_accuracy"]) == pytest.approx([2 / 3, 2 / 3])


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_more_samples():
    rng = np.random.default_rng(0)

    def draw(n):
        labels = np.repeat([1, 0], n)
        scores = rng.normal(labels * 0.8, 1.0)
        return labels, scores

    widths = []
    for n in (50, 800):
        cal = draw(n)
        test = draw(n)
        table = metrics.bootstrap(*cal, *test, n_boot=300, seed=1).set_index("metric")
        assert table.loc["auc", "estimate"] == pytest.approx(roc_auc_score(*test))
        assert (table["low"] <= table["estimate"]).all() and (table["estimate"] <= table["high"]).all()
        widths.append(table.loc["auc", "high"] - table.loc["auc", "low"])
    assert widths[1] < widths[0] / 2  # about 1 / sqrt(16) = 1/4 of the width


def test_every_bootstrap_resample_equals_sklearn_on_the_resampled_arrays():
    """The bootstrap's one-pass resample metrics against roc_curve / sklearn.auc / tpr_at_fpr on each
    resample's drawn arrays (scores rounded so that ties occur)."""
    from sklearn.metrics import auc as sklearn_auc
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    labels = np.repeat([1, 0], [60, 140])
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)
    threshold = 0.35
    weights = metrics.bootstrap_weights(labels, 40, seed=5)
    assert (weights[:, labels == 1].sum(axis=1) == 60).all() and (weights[:, labels == 0].sum(axis=1) == 140).all()
    table = metrics.resampled_metrics(labels, scores, weights, threshold)
    for row, counts in zip(table.itertuples(), weights):
        index = np.repeat(np.arange(len(labels)), counts.astype(int))
        drawn_labels, drawn_scores = labels[index], scores[index]
        fpr, tpr, _ = roc_curve(drawn_labels, drawn_scores, drop_intermediate=False)
        assert row.auc == pytest.approx(sklearn_auc(fpr, tpr), abs=1e-12)
        assert row.auc == pytest.approx(roc_auc_score(drawn_labels, drawn_scores), abs=1e-12)
        assert row.tpr_at_1fpr == metrics.tpr_at_fpr(drawn_labels, drawn_scores, 0.01)
        assert row.tpr_at_01fpr == metrics.tpr_at_fpr(drawn_labels, drawn_scores, 0.001)
        assert row.balanced_accuracy == pytest.approx(
            metrics.balanced_accuracy_at(drawn_labels, drawn_scores, threshold), abs=1e-12
        )
