"""mialib.audit (CDI-style set-level audit) against scipy, scikit-learn, hand computations and
simulations with known answers (Gaussian features: no shift under the null, a mean shift for members)."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from mialib import audit
from mialib.audit import set_audit


def feature_table(
    n: int,
    shifts: dict[str, float],
    rng: np.random.Generator,
    start: int = 0,
    label: int | None = None,
    prefix: str = "img",
) -> pd.DataFrame:
    """``n`` images with ids ``{prefix}-{start + i}`` and one N(shift, 1) column per feature."""
    table = pd.DataFrame({"id": [f"{prefix}-{start + i:04d}" for i in range(n)]})
    for name, shift in shifts.items():
        table[name] = rng.normal(shift, 1.0, n)
    if label is not None:
        table["label"] = label
    return table


SHIFTED = {"a": 0.6, "b": 0.3, "noise": 0.0}
UNSHIFTED = {"a": 0.0, "b": 0.0, "noise": 0.0}


@pytest.fixture()
def sets():
    rng = np.random.default_rng(7)
    suspect = feature_table(60, SHIFTED, rng, start=0, label=1)
    reference = feature_table(50, UNSHIFTED, rng, start=1000, label=0)
    return suspect, reference


def by_hand_scores(suspect, reference, split):
    """The held-out scores, recomputed from the split's ids with an independently built pipeline."""
    features = list(split.features)
    s, r = suspect.set_index("id"), reference.set_index("id")
    x = np.vstack([s.loc[split.suspect_fit_ids, features], r.loc[split.reference_fit_ids, features]])
    y = np.r_[np.ones(len(split.suspect_fit_ids)), np.zeros(len(split.reference_fit_ids))]
    scorer = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "logistic",
                LogisticRegression(
                    C=1.0, class_weight="balanced", solver="lbfgs", tol=1e-10, max_iter=1000, random_state=0
                ),
            ),
        ]
    ).fit(x, y)
    return (
        scorer.decision_function(s.loc[split.suspect_test_ids, features].to_numpy()),
        scorer.decision_function(r.loc[split.reference_test_ids, features].to_numpy()),
        scorer,
    )


def hand_hedges_g(x, y) -> float:
    n1, n2 = len(x), len(y)
    pooled = math.sqrt(((n1 - 1) * statistics.variance(x) + (n2 - 1) * statistics.variance(y)) / (n1 + n2 - 2))
    return (statistics.mean(x) - statistics.mean(y)) / pooled * (1 - 3 / (4 * (n1 + n2) - 9))


# --------------------------------------------------------------------------------------------------
# set_audit against references
# --------------------------------------------------------------------------------------------------
def test_split_partitions_each_set_and_scores_match_a_hand_built_pipeline(sets):
    suspect, reference = sets
    split = audit.held_out_scores(suspect, reference, fit_fraction=0.5, seed=3)
    assert split.features == ("a", "b", "noise")  # default: numeric columns except id and label
    for fit, test, table in [
        (split.suspect_fit_ids, split.suspect_test_ids, suspect),
        (split.reference_fit_ids, split.reference_test_ids, reference),
    ]:
        assert len(fit) == len(table) // 2 and len(test) == len(table) - len(table) // 2
        assert set(fit).isdisjoint(test) and set(fit) | set(test) == set(table["id"])
    suspect_scores, reference_scores, scorer = by_hand_scores(suspect, reference, split)
    np.testing.assert_allclose(split.suspect_scores, suspect_scores, rtol=1e-12)
    np.testing.assert_allclose(split.reference_scores, reference_scores, rtol=1e-12)
    np.testing.assert_allclose(split.scorer["logistic"].coef_, scorer["logistic"].coef_, rtol=1e-12)


def test_set_audit_statistics_equal_scipy_and_sklearn_on_the_held_out_scores(sets):
    suspect, reference = sets
    result = audit.set_audit(suspect, reference, seed=3, permutations=9999, level=0.01)
    s, r, _ = by_hand_scores(suspect, reference, audit.held_out_scores(suspect, reference, seed=3))
    welch = stats.ttest_ind(s, r, equal_var=False, alternative="greater")
    assert result.p_value_t == pytest.approx(welch.pvalue, rel=1e-9)
    assert result.t_statistic == pytest.approx(welch.statistic, rel=1e-9)
    assert result.effect_size == pytest.approx(hand_hedges_g(list(s), list(r)), rel=1e-9)
    assert result.auc == pytest.approx(roc_auc_score(np.r_[np.ones(len(s)), np.zeros(len(r))], np.r_[s, r]), abs=1e-15)
    # the permutation p-value: a multiple of 1 / 10,000, within Monte Carlo error of scipy with many resamples
    reference_p = stats.permutation_test(
        (s, r),
        lambda x, y, axis: x.mean(axis) - y.mean(axis),
        permutation_type="independent",
        vectorized=True,
        n_resamples=99_999,
        alternative="greater",
        rng=123,
    ).pvalue
    assert result.p_value_permutation * 10_000 == pytest.approx(round(result.p_value_permutation * 10_000), abs=1e-6)
    assert abs(result.p_value_permutation - reference_p) < 4 * math.sqrt(max(reference_p, 1e-3) / 9_999)
    assert (result.n_suspect, result.n_reference, result.n_suspect_test, result.n_reference_test) == (60, 50, 30, 25)
    assert result.detected == (welch.pvalue < 0.01)


def test_hedges_g_against_hand_computation():
    x, y = [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 1.0, 2.0]
    # d = 1.5 / sqrt((3 * 5/3 + 3 * 2/3) / 6) = 1.38873, J = 1 - 3 / (4 * 8 - 9) = 20/23
    assert float(audit.hedges_g(x, y)) == pytest.approx(1.2075914344859366, rel=1e-12)
    rng = np.random.default_rng(0)
    xs, ys = rng.normal(0.5, 1, (5, 13)), rng.normal(0, 2, (5, 8))
    np.testing.assert_allclose(
        audit.hedges_g(xs, ys), [hand_hedges_g(list(a), list(b)) for a, b in zip(xs, ys)], rtol=1e-12
    )


def test_welch_test_is_scipy_row_by_row_and_constant_scores_give_no_evidence():
    rng = np.random.default_rng(1)
    xs, ys = rng.normal(0.3, 1, (6, 11)), rng.normal(0, 3, (6, 17))
    t, p = audit.welch_test(xs, ys)
    for i in range(6):
        reference = stats.ttest_ind(xs[i], ys[i], equal_var=False, alternative="greater")
        assert (t[i], p[i]) == pytest.approx((reference.statistic, reference.pvalue), rel=1e-12)
    t, p = audit.welch_test(np.ones(5), np.ones(4))
    assert (float(t), float(p)) == (0.0, 1.0)


def test_label_column_is_never_used(sets):
    suspect, reference = sets
    base = audit.set_audit(suspect, reference, seed=1, permutations=999).as_dict()
    rng = np.random.default_rng(2)
    relabelled = (suspect.assign(label=rng.permutation(np.r_[np.ones(30), np.zeros(30)])), reference.assign(label=1))
    assert audit.set_audit(*relabelled, seed=1, permutations=999).as_dict() == base
    assert (
        audit.set_audit(
            suspect.drop(columns="label"), reference.drop(columns="label"), seed=1, permutations=999
        ).as_dict()
        == base
    )
    with pytest.raises(ValueError, match="never used"):
        audit.set_audit(suspect, reference, ["a", "label"])


def test_held_out_rows_only_enter_the_test_and_fit_rows_only_train_the_scorer(sets):
    suspect, reference = sets
    split = audit.held_out_scores(suspect, reference, seed=5)
    coef = split.scorer["logistic"].coef_.copy()

    # (a) a held-out image changes: same split, same scorer, only that image's score changes
    moved_id = split.suspect_test_ids[3]
    moved = suspect.copy()
    moved.loc[moved["id"] == moved_id, ["a", "b", "noise"]] += 5.0
    after = audit.held_out_scores(moved, reference, seed=5)
    np.testing.assert_array_equal(after.suspect_test_ids, split.suspect_test_ids)
    np.testing.assert_array_equal(after.scorer["logistic"].coef_, coef)
    changed = np.flatnonzero(after.suspect_scores != split.suspect_scores)
    assert list(changed) == [3]
    np.testing.assert_array_equal(after.reference_scores, split.reference_scores)

    # (b) a fit image changes: the scorer changes, and the held-out scores are the new scorer on the
    # unchanged held-out images (the changed image is in no test sample)
    moved_id = split.suspect_fit_ids[0]
    moved = suspect.copy()
    moved.loc[moved["id"] == moved_id, ["a", "b", "noise"]] += 5.0
    after = audit.held_out_scores(moved, reference, seed=5)
    assert not np.allclose(after.scorer["logistic"].coef_, coef)
    held_out = suspect.set_index("id").loc[split.suspect_test_ids, list(split.features)].to_numpy()
    np.testing.assert_allclose(after.suspect_scores, after.scorer.decision_function(held_out), rtol=1e-12)
    assert moved_id not in set(after.suspect_test_ids) | set(after.reference_test_ids)

    # (c) with one feature the fit part only orients the score: moving a fit image (the direction stays)
    # leaves every statistic unchanged, moving a held-out image does not
    one = audit.set_audit(suspect, reference, ["a"], seed=5, permutations=999)
    fit_moved = audit.set_audit(moved, reference, ["a"], seed=5, permutations=999)
    assert (fit_moved.p_value_t, fit_moved.effect_size, fit_moved.auc, fit_moved.p_value_permutation) == pytest.approx(
        (one.p_value_t, one.effect_size, one.auc, one.p_value_permutation), rel=1e-9
    )
    test_moved = suspect.copy()
    test_moved.loc[test_moved["id"] == split.suspect_test_ids[0], "a"] += 5.0
    assert audit.set_audit(test_moved, reference, ["a"], seed=5, permutations=999).p_value_t < one.p_value_t


def test_same_seed_same_result_any_row_order_and_another_seed_another_split(sets):
    suspect, reference = sets
    first = audit.set_audit(suspect, reference, seed=11, permutations=999)
    assert audit.set_audit(suspect, reference, seed=11, permutations=999) == first
    shuffled = audit.set_audit(
        suspect.sample(frac=1, random_state=0), reference.sample(frac=1, random_state=1), seed=11, permutations=999
    )
    assert shuffled == first
    a, b = audit.held_out_scores(suspect, reference, seed=11), audit.held_out_scores(suspect, reference, seed=12)
    assert set(a.suspect_test_ids) != set(b.suspect_test_ids)
    assert audit.set_audit(suspect, reference, seed=12, permutations=999).p_value_t != first.p_value_t


def test_verdicts_and_one_row_table():
    rng = np.random.default_rng(3)
    suspect = feature_table(100, {"a": 1.0, "b": 0.5}, rng, label=1)
    reference = feature_table(100, {"a": 0.0, "b": 0.0}, rng, start=500)
    found = audit.set_audit(suspect, reference)
    assert found.detected and found.p_value_t < 0.01 and found.p_value_permutation < 0.01
    assert "evidence that the suspect set (all or part of it) was used" in found.verdict
    assert "from 100 suspect and 100 reference images (50 and 50 held out" in found.verdict
    assert f"g = {found.effect_size:.2f}" in found.verdict
    nothing = audit.set_audit(feature_table(100, {"a": 0.0, "b": 0.0}, rng, start=2000), reference)
    assert not nothing.detected and "no evidence" in nothing.verdict and "NOT proof" in nothing.verdict
    table = pd.DataFrame([found.as_dict(), nothing.as_dict()])
    assert list(table["features"]) == ["a,b", "a,b"] and list(table["detected"]) == [True, False]
    # the verdict says when the permutation test disagrees with the decision
    assert "caution" in audit._verdict(0.005, 0.02, 0.5, 0.6, 40, 40, 20, 20, 0.01)
    assert "permutation test alone" in audit._verdict(0.02, 0.005, 0.5, 0.6, 40, 40, 20, 20, 0.01)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_errors_name_the_offending_ids_columns_and_sizes(sets):
    suspect, reference = sets
    broken = suspect.copy()
    broken.loc[7, "b"] = np.nan
    broken.loc[9, "a"] = np.inf
    with pytest.raises(
        ValueError,
        match=r"suspect set has NaN or infinite values in \['a', 'b'\] for 2 images, ids \['img-0007', 'img-0009'\]",
    ):
        audit.set_audit(broken, reference)
    overlapping = pd.concat([reference, suspect.iloc[[4, 5]]])
    with pytest.raises(
        ValueError, match=r"2 ids are in both the suspect and the reference set, e.g. \['img-0004', 'img-0005'\]"
    ):
        audit.set_audit(suspect, overlapping)
    with pytest.raises(ValueError, match=r"reference set lacks the feature columns \['extra'\]"):
        audit.set_audit(suspect.assign(extra=1.0), reference)
    with pytest.raises(ValueError, match="has 2 images; with fit_fraction=0.5 each set needs at least 3 images"):
        audit.set_audit(suspect, reference.iloc[:2])
    assert (
        audit.minimum_set_size(0.5) == 3 and audit.minimum_set_size(0.8) == 6
    )  # 1 fit image, 2 held out; 4 fit, 2 held out
    small = audit.set_audit(suspect.iloc[:3], reference.iloc[:3], permutations=99)  # the smallest sets that work
    assert (small.n_suspect_test, small.n_reference_test) == (2, 2)


# --------------------------------------------------------------------------------------------------
# the batched machinery of the simulations against the single-set one
# --------------------------------------------------------------------------------------------------
def test_fit_scorers_equals_the_sklearn_pipeline_on_every_set():
    rng = np.random.default_rng(4)
    suspect_fit = rng.normal(0, 1, (25, 15, 3)) + np.array([0.8, 0.0, -0.4])
    reference_fit = rng.normal(0, 1, (25, 22, 3))
    held_out = rng.normal(0, 1, (25, 9, 3))
    scorers = audit.fit_scorers(suspect_fit, reference_fit)
    scores = audit.score_with(scorers, held_out)
    for i in range(25):
        pipeline = audit.make_scorer().fit(
            np.vstack([suspect_fit[i], reference_fit[i]]), np.r_[np.ones(15), np.zeros(22)]
        )
        np.testing.assert_allclose(scorers[2][i], pipeline["logistic"].coef_[0], atol=1e-7)
        np.testing.assert_allclose(scores[i], pipeline.decision_function(held_out[i]), atol=1e-7)


def test_batched_permutation_test_agrees_with_scipy():
    greater = lambda x, y, axis: x.mean(axis) - y.mean(axis)  # noqa: E731
    # exact agreement at the extremes: no relabelling reaches the observed difference, or all do
    low, high = np.arange(20.0), np.arange(20.0) + 100
    for s, r, expected in [(high, low, 1 / 1000), (low, high, 1.0)]:
        scipy_p = stats.permutation_test(
            (s, r),
            greater,
            permutation_type="independent",
            vectorized=True,
            n_resamples=999,
            alternative="greater",
            rng=0,
        ).pvalue
        ours = audit.permutation_pvalues(s, r, 999, np.random.default_rng(0))
        assert scipy_p == pytest.approx(expected) and ours[0] == pytest.approx(expected)
    # small samples with ties: scipy's exact test (70 relabellings) against 40,000 random ones
    s, r = np.array([3.0, 2.0, 2.0, 5.0]), np.array([1.0, 2.0, 0.0, 2.0])
    exact = stats.permutation_test(
        (s, r), greater, permutation_type="independent", vectorized=True, n_resamples=10_000, alternative="greater"
    ).pvalue
    assert exact == pytest.approx(6 / 70)  # 6 of the 70 splits have a difference of means >= the observed 1.75
    ours = audit.permutation_pvalues(s, r, 40_000, np.random.default_rng(1))[0]
    assert abs(ours - exact) < 4 * math.sqrt(exact * (1 - exact) / 40_000)
    # a batch of sets, each against scipy with many resamples
    rng = np.random.default_rng(2)
    xs, ys = rng.normal(0.4, 1, (4, 25)), rng.normal(0, 1, (4, 30))
    ours = audit.permutation_pvalues(xs, ys, 20_000, np.random.default_rng(3))
    for i in range(4):
        theirs = stats.permutation_test(
            (xs[i], ys[i]),
            greater,
            permutation_type="independent",
            vectorized=True,
            n_resamples=20_000,
            alternative="greater",
            rng=i,
        ).pvalue
        assert abs(ours[i] - theirs) < 4 * math.sqrt(2 * max(theirs, 1e-3) / 20_000)


# --------------------------------------------------------------------------------------------------
# simulations: validity and power
# --------------------------------------------------------------------------------------------------
def test_false_positive_rate_under_the_null_is_the_level():
    rng = np.random.default_rng(5)
    pool = feature_table(500, UNSHIFTED, rng, label=0)
    frame = pd.concat(
        [
            audit.null_rate(pool, ["a", "b", "noise"], sizes=(12, 40), n_sets=1000, level=0.05, seed=0),
            audit.null_rate(pool, ["a"], sizes=(20,), n_sets=1000, level=0.05, seed=1, reference_size=60),
        ]
    )
    assert list(frame["size"]) == [12, 40, 20] and list(frame["reference_size"]) == [12, 40, 60]
    assert np.allclose(frame["mc_se"], math.sqrt(0.05 * 0.95 / 1000))
    for column in ("fpr_t", "fpr_permutation"):
        assert (np.abs(frame[column] - 0.05) <= 3 * frame["mc_se"]).all(), frame
    with pytest.raises(ValueError, match="needs 600 distinct non-members; the pool has 500"):
        audit.null_rate(pool, ["a"], sizes=(300,), n_sets=10)


@pytest.fixture(scope="module")
def pools():
    rng = np.random.default_rng(6)
    members = feature_table(300, {"a": 0.8, "b": 0.8, "noise": 0.0}, rng, label=1, prefix="member")
    nonmembers = feature_table(600, UNSHIFTED, rng, label=0, prefix="non")
    return members, nonmembers


FEATURE_SETS = {"noise": ["noise"], "a": ["a"], "combined": ["a", "b", "noise"]}


def test_power_near_one_for_a_clear_shift_and_combined_features_beat_single_and_noise(pools):
    members, nonmembers = pools
    frame = audit.power(members, nonmembers, FEATURE_SETS, sizes=(60, 100, 400), n_sets=200, level=0.01, seed=0)
    rate = frame.set_index(["feature_set", "size"])["power_t"]
    permutation_rate = frame.set_index(["feature_set", "size"])["power_permutation"]
    assert rate["combined", 100] >= 0.95 and permutation_rate["combined", 100] >= 0.95
    assert rate["combined", 60] > rate["a", 60] + 0.1  # two informative features pooled beat one (paired draws)
    null_bound = 0.01 + 3 * math.sqrt(0.01 * 0.99 / 200)
    assert rate["noise", 60] <= null_bound and rate["noise", 100] <= null_bound
    assert rate["combined", 60] > 0.8
    skipped = frame[frame["size"] == 400]
    assert skipped["skipped"].all() and skipped["power_t"].isna().all()
    assert "needs 400 members and 400 non-members" in skipped["note"].iloc[0]
    assert not frame[frame["size"] < 400]["skipped"].any()


def test_power_of_a_member_free_suspect_set_is_the_level_and_cells_have_their_own_streams(pools):
    members, nonmembers = pools
    frame = audit.power(
        members,
        nonmembers,
        {"combined": FEATURE_SETS["combined"]},
        sizes=(40, 60),
        member_fractions=(0.0, 0.5),
        n_sets=200,
        level=0.05,
        seed=1,
    )
    none = frame[frame["member_fraction"] == 0.0]
    assert (none["n_members"] == 0).all()
    assert (none["power_t"] <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 200)).all()
    half = frame[frame["member_fraction"] == 0.5].set_index("size")
    assert list(half["n_members"]) == [20, 30] and half.loc[60, "power_t"] > 0.2
    alone = audit.power(
        members,
        nonmembers,
        {"combined": FEATURE_SETS["combined"]},
        sizes=(60,),
        member_fractions=(0.5,),
        n_sets=200,
        level=0.05,
        seed=1,
    )
    assert alone["power_t"].iloc[0] == half.loc[60, "power_t"]
    with pytest.raises(ValueError, match="in both the member and the non-member set"):
        audit.power(members, pd.concat([nonmembers, members.iloc[:3]]), FEATURE_SETS, sizes=(20,), n_sets=5)


def test_images_for_power_on_a_handcrafted_table():
    rows = [
        # feature set, fraction, size, power, skipped
        ("combined", 1.0, 25, 0.40, False),
        ("combined", 1.0, 50, 0.85, False),
        ("combined", 1.0, 100, 0.70, False),  # Monte Carlo dip: the smallest size reaching 0.8 is still 50
        ("combined", 1.0, 200, 0.99, False),
        ("combined", 0.5, 25, 0.10, False),
        ("combined", 0.5, 50, 0.30, False),
        ("combined", 0.5, 100, 0.79, False),
        ("combined", 0.5, 400, np.nan, True),  # skipped: never counts
        ("noise", 1.0, 25, 0.01, False),
        ("noise", 1.0, 50, 0.02, False),
        ("tiny pools", 1.0, 1000, np.nan, True),
    ]
    frame = pd.DataFrame(rows, columns=["feature_set", "member_fraction", "size", "power_t", "skipped"])
    result = audit.images_for_power(frame, target=0.8).set_index(["feature_set", "member_fraction"])
    assert result.loc[("combined", 1.0), "images"] == 50 and result.loc[("combined", 1.0), "power"] == 0.85
    assert np.isnan(result.loc[("combined", 0.5), "images"])
    assert result.loc[("combined", 0.5), "note"] == "not reached up to 100"
    assert result.loc[("noise", 1.0), "note"] == "not reached up to 50"
    assert (
        np.isnan(result.loc[("tiny pools", 1.0), "images"])
        and result.loc[("tiny pools", 1.0), "note"] == "no size evaluated"
    )
    assert (
        audit.images_for_power(frame, target=0.75)
        .set_index(["feature_set", "member_fraction"])
        .loc[("combined", 0.5), "images"]
        == 100
    )


# --------------------------------------------------------------------------------------------------
# `mialib audit` on the smoke target
# --------------------------------------------------------------------------------------------------
def _unlabelled_folder(folder, records):
    """An imagefolder of ``records``' images with captions and no label column (what an auditor brings)."""
    import shutil
    from pathlib import Path

    folder.mkdir(parents=True)
    rows = ["file_name,caption"]
    for record in records.itertuples():
        name = Path(record.location).name
        shutil.copy(record.location, folder / name)
        rows.append(f'{name},"{record.caption}"')
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_mialib_audit_writes_the_verdict_p_values_and_figure_of_the_audit(
    smoke_params, smoke_target_dir, tmp_path, capsys
):
    from mialib import cli, experiment

    records = experiment.open_data(smoke_params).records
    suspect = _unlabelled_folder(tmp_path / "suspect", records[records["label"] == 1])
    reference = _unlabelled_folder(tmp_path / "reference", records[records["label"] == 0])
    out = tmp_path / "audit"
    cli.main(
        [
            "audit",
            "--model",
            str(smoke_target_dir),
            "--suspect",
            f"imagefolder:{suspect}",
            "--reference",
            f"imagefolder:{reference}",
            "--out",
            str(out),
            "--attack",
            "loss",
            "--attack",
            "structural",
            "--attack",
            "secmi",
            "--quiet",
            "--permutations",
            "999",
        ]
    )
    features = pd.read_parquet(out / "features.parquet")
    assert len(features) == len(records) and set(features["set"]) == {"suspect", "reference"}
    table = pd.read_csv(out / "audit.csv").set_index("feature_set")
    assert list(table.index) == ["combined", "loss", "structural", "secmi"]
    tables = {name: part.drop(columns="set") for name, part in features.groupby("set")}
    for name, columns in (("combined", ["loss", "structural", "secmi"]), ("loss", ["loss"])):
        again = set_audit(tables["suspect"], tables["reference"], columns, permutations=999, level=0.01)
        assert table.loc[name, "p_value_t"] == pytest.approx(again.p_value_t, rel=1e-12)
        assert table.loc[name, "effect_size"] == pytest.approx(again.effect_size, rel=1e-12)
    combined = set_audit(
        tables["suspect"], tables["reference"], ["loss", "structural", "secmi"], permutations=999, level=0.01
    )
    assert combined.detected and (out / "verdict.txt").read_text().strip() == combined.verdict
    assert json.loads((out / "audit.json").read_text())["result"]["p_value_t"] == pytest.approx(
        combined.p_value_t, rel=1e-12
    )
    assert (out / "held_out_scores.png").stat().st_size > 1000
    assert "evidence that the suspect set" in capsys.readouterr().out


def test_mialib_audit_refuses_label_chosen_settings_and_shared_images(smoke_params, smoke_target_dir, tmp_path, capsys):
    from mialib import cli, experiment

    records = experiment.open_data(smoke_params).records
    suspect = _unlabelled_folder(tmp_path / "suspect", records.iloc[:6])
    reference = _unlabelled_folder(tmp_path / "reference", records.iloc[4:12])
    common = [
        "audit",
        "--model",
        str(smoke_target_dir),
        "--suspect",
        f"imagefolder:{suspect}",
        "--reference",
        f"imagefolder:{reference}",
        "--quiet",
    ]
    for extra, message in (
        (["--attack", "loss:t=[50,100]", "--out", str(tmp_path / "a")], "fixed settings"),
        (["--attack", "blind_image", "--out", str(tmp_path / "b")], "labels"),
        (["--attack", "loss", "--out", str(tmp_path / "c")], "in both the suspect and the reference set"),
    ):
        with pytest.raises(SystemExit):
            cli.main(common + extra)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything was written
