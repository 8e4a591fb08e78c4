"""Set-level membership audit (dataset inference), after CDI (Dubinski et al., CVPR 2025, "CDI:
Copyrighted Data Identification in Diffusion Models").

Question: was a *suspect set* of images (or part of it) used to train the model? Per-image attacks are
weak, but a set of images gives many weak signals, and a statistical test can pool them. Inputs are
per-image feature tables, one row per image: an ``id`` column and one float column per feature, each
feature an attack's per-image score oriented so that higher means more member-like (the convention of
:mod:`mialib.metrics`). A *reference set* holds images known NOT to be training members, drawn from the
same distribution as the suspect images. No membership labels are needed; a ``label`` column, if
present, is never used.

The audit follows CDI's recipe:

1. Each set is split at random into a fit part (``fit_fraction``) and a held-out part.
2. A scorer, ``StandardScaler`` + ``LogisticRegression`` with suspect = 1 and reference = 0, is fitted on
   the fit parts only. Its ``decision_function`` scores the held-out images. With one feature this is an
   affine map of the feature whose sign is the sign of the fitted coefficient, so every statistic below
   equals the one on +feature or -feature: the fit part only chooses the direction.
3. One-sided tests on the held-out scores only, alternative "suspect scores are larger": Welch's t-test
   (CDI's test) and a permutation test of the difference of means, whose validity does not rest on
   normal scores.
4. Effect sizes on the held-out scores: Hedges' g and the AUC of suspect against reference.

Null hypothesis and assumptions. Given the fit parts, the scorer is fixed; the held-out images of both
sets are then scored by the same function and never took part in choosing it. If no suspect image was
a training member and both sets come from one distribution, the held-out scores are exchangeable, so
the permutation p-value is exact (up to its Monte Carlo resolution) and the t-test's is exact for
normal scores and approximate otherwise. The one-sided alternative is justified because the scorer was
oriented on the fit part (suspect = 1). The audit cannot tell membership from a *distribution shift*:
if the reference images differ from the suspect ones in any way the features pick up (source, era,
captions, preprocessing), the test will report it as evidence. Choosing the reference set is the
audit's real assumption. A non-significant result is never proof of non-membership: it may mean too
few images or features too weak for this model (see :func:`power`).

Simulations (:func:`null_rate`, :func:`power`) draw many sets from pools of images with known
membership and audit each with the same split rule, the same scorer and the same tests, computed for
all sets at once: :func:`fit_scorers` fits the scorer's objective by Newton's method on every set
together (the tests check it against scikit-learn), and :func:`welch_test`, :func:`permutation_pvalues`
and :func:`hedges_g` work along the last axis of batched arrays. 1,000 sets of 50 + 50 images take
about a second.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import special, stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

RESERVED_COLUMNS = ("id", "label")  # never features; the label is never read
COMBINED = "combined"  # the name of the feature set that holds every run's feature (studies, plots)
MIN_HELD_OUT = 2  # images per held-out part: the t-test needs a variance in each sample
SHOWN_IDS = 5  # how many offending ids an error message names


# -------------------------------------------------------------------------------------------------
# Validation
# -------------------------------------------------------------------------------------------------
def default_features(table: pd.DataFrame) -> list[str]:
    """Every numeric (non-boolean) column of ``table`` except ``id`` and ``label``, in table order."""
    return [
        c
        for c in table.columns
        if c not in RESERVED_COLUMNS
        and pd.api.types.is_numeric_dtype(table[c])
        and not pd.api.types.is_bool_dtype(table[c])
    ]


def _resolve_features(features, table: pd.DataFrame) -> list[str]:
    if features is None:
        features = default_features(table)
    elif isinstance(features, str):
        features = [features]
    features = list(features)
    if not features:
        raise ValueError("no feature columns: pass features=[...] or give the tables numeric feature columns")
    reserved = [f for f in features if f in RESERVED_COLUMNS]
    if reserved:
        raise ValueError(f"{reserved} cannot be features: 'id' names the image and 'label' is never used by the audit")
    if len(set(features)) != len(features):
        raise ValueError(f"features are repeated: {features}")
    return features


def _shown(ids) -> str:
    ids = list(ids)
    more = f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
    return f"{ids[:SHOWN_IDS]}{more}"


def _check_table(table: pd.DataFrame, features: list[str], name: str) -> pd.DataFrame:
    """The table's ``id`` and ``features`` columns as float, after checking them; raises ValueError."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"the {name} set must be a pandas DataFrame, got {type(table).__name__}")
    if "id" not in table.columns:
        raise ValueError(f"the {name} set has no 'id' column")
    missing = [f for f in features if f not in table.columns]
    if missing:
        raise ValueError(f"the {name} set lacks the feature columns {missing}")
    not_numeric = [f for f in features if f not in default_features(table)]
    if not_numeric:
        raise ValueError(f"the {name} set's feature columns {not_numeric} are not numeric")
    duplicated = table["id"][table["id"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"the {name} set repeats the ids {_shown(duplicated)}; each image must appear once")
    values = table[features].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        columns = [f for f, column_bad in zip(features, ~np.isfinite(values).all(axis=0)) if column_bad]
        raise ValueError(
            f"the {name} set has NaN or infinite values in {columns} for {int(bad.sum())} images, "
            f"ids {_shown(table['id'][bad])}; drop or fix them first"
        )
    return pd.DataFrame({"id": table["id"].to_numpy(), **{f: values[:, j] for j, f in enumerate(features)}})


def _check_disjoint(first: pd.DataFrame, second: pd.DataFrame, names: tuple[str, str]) -> None:
    shared = pd.Index(first["id"]).intersection(pd.Index(second["id"]))
    if len(shared):
        raise ValueError(
            f"{len(shared)} ids are in both the {names[0]} and the {names[1]} set, e.g. {_shown(shared)}; "
            "an image cannot be in both"
        )


def fit_size(n: int, fit_fraction: float) -> int:
    """Images of a set of ``n`` that go to the fit part: floor(fit_fraction * n); the rest are held out."""
    return int(np.floor(fit_fraction * n))


def minimum_set_size(fit_fraction: float) -> int:
    """Smallest set size whose fit part has 1 image and whose held-out part has ``MIN_HELD_OUT``."""
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"fit_fraction must be strictly between 0 and 1, got {fit_fraction}")
    n = MIN_HELD_OUT + 1
    while fit_size(n, fit_fraction) < 1 or n - fit_size(n, fit_fraction) < MIN_HELD_OUT:
        n += 1
    return n


def _check_size(n: int, fit_fraction: float, name: str) -> None:
    needed = minimum_set_size(fit_fraction)
    if n < needed:
        raise ValueError(
            f"the {name} set has {n} images; with fit_fraction={fit_fraction} each set needs at least {needed} "
            f"images (at least 1 to fit the scorer and {MIN_HELD_OUT} held out for the test)"
        )


# -------------------------------------------------------------------------------------------------
# Split and scorer (shared by set_audit and the simulations)
# -------------------------------------------------------------------------------------------------
def _split(n: int, fit_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows) of a set of ``n`` rows: a random permutation cut at floor(fit_fraction*n)."""
    order = rng.permutation(n)
    cut = fit_size(n, fit_fraction)
    return order[:cut], order[cut:]


C = 1.0  # inverse L2 strength of the scorer's logistic regression (sklearn's default)
SCORER_TOL = 1e-10  # lbfgs tolerance: tight, so the scorer is the optimum and not the solver's stopping point


def make_scorer() -> Pipeline:
    """The audit's scorer, unfitted: standardisation, then L2 logistic regression (C = 1, lbfgs, which is
    deterministic) with classes weighted equally whatever the sizes of the fit parts ("balanced")."""
    return Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "logistic",
                LogisticRegression(
                    C=C, class_weight="balanced", solver="lbfgs", tol=SCORER_TOL, max_iter=1000, random_state=0
                ),
            ),
        ]
    )


def _fit_scorer(suspect_fit: np.ndarray, reference_fit: np.ndarray) -> Pipeline:
    """Scorer fitted with suspect = 1, reference = 0. Inputs are (n, d) feature arrays."""
    x = np.vstack([suspect_fit, reference_fit])
    y = np.r_[np.ones(len(suspect_fit), dtype=int), np.zeros(len(reference_fit), dtype=int)]
    return make_scorer().fit(x, y)


NEWTON_STEPS = 50  # at most; penalised logistic regression converges in about 6
NEWTON_TOL = 1e-10  # on the largest gradient entry, per image


def fit_scorers(suspect_fit: np.ndarray, reference_fit: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`make_scorer` fitted on many sets at once, for the simulations.

    ``suspect_fit`` (sets, n1, d) and ``reference_fit`` (sets, n2, d). Per set: standardise with the fit
    parts' mean and (population) standard deviation, as ``StandardScaler``; then minimise
    sum_i w_i logloss_i + |coef|^2 / (2 C), with balanced weights w_i = n / (2 n_class) and the
    intercept unpenalised, which is ``LogisticRegression``'s objective, by Newton's method on all sets
    together. Sets that do not converge are refitted with scikit-learn. Returns (mean, scale, coef,
    intercept) of shapes (sets, d), (sets, d), (sets, d), (sets,); scores are
    ``((x - mean) / scale) @ coef + intercept``, what the pipeline's ``decision_function`` gives.
    """
    suspect_fit, reference_fit = np.asarray(suspect_fit, float), np.asarray(reference_fit, float)
    n1, n2, d = suspect_fit.shape[1], reference_fit.shape[1], suspect_fit.shape[2]
    x = np.concatenate([suspect_fit, reference_fit], axis=1)
    y = np.r_[np.ones(n1), np.zeros(n2)]
    weight = np.where(y == 1, (n1 + n2) / (2.0 * n1), (n1 + n2) / (2.0 * n2))
    mean = x.mean(axis=1)
    scale = x.std(axis=1)
    scale = np.where(scale > 0, scale, 1.0)  # StandardScaler leaves constant features unscaled
    z = np.concatenate([(x - mean[:, None, :]) / scale[:, None, :], np.ones(x.shape[:2] + (1,))], axis=2)
    penalty = np.diag(np.r_[np.full(d, 1.0 / C), 0.0])
    theta = np.zeros((len(x), d + 1))
    for _ in range(NEWTON_STEPS):
        p = special.expit(np.einsum("bnk,bk->bn", z, theta))
        gradient = np.einsum("bnk,bn->bk", z, weight * (p - y)) + theta @ penalty
        converged = np.abs(gradient).max(axis=1) < NEWTON_TOL * (n1 + n2)
        if converged.all():
            break
        hessian = np.einsum("bnk,bn,bnl->bkl", z, weight * p * (1 - p), z) + penalty
        theta = theta - np.linalg.solve(hessian, gradient[..., None])[..., 0]
    for b in np.flatnonzero(~converged):
        fitted = _fit_scorer(suspect_fit[b], reference_fit[b])
        mean[b], scale[b] = fitted["scale"].mean_, fitted["scale"].scale_
        theta[b] = np.r_[fitted["logistic"].coef_[0], fitted["logistic"].intercept_]
    return mean, scale, theta[:, :d], theta[:, d]


def score_with(scorers: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    """Decision function of the batched scorers of :func:`fit_scorers` on ``x`` (sets, n, d): (sets, n)."""
    mean, scale, coef, intercept = scorers
    z = (np.asarray(x, float) - mean[:, None, :]) / scale[:, None, :]
    return np.einsum("bnk,bk->bn", z, coef) + intercept[:, None]


@dataclass(frozen=True)
class HeldOutScores:
    """The split of one audit and the held-out scores its tests use.

    ``*_fit_ids`` trained the scorer; ``*_test_ids`` are the held-out images, and ``suspect_scores`` /
    ``reference_scores`` are the scorer's ``decision_function`` on them, in the order of those ids.
    """

    suspect_fit_ids: np.ndarray
    suspect_test_ids: np.ndarray
    reference_fit_ids: np.ndarray
    reference_test_ids: np.ndarray
    suspect_scores: np.ndarray
    reference_scores: np.ndarray
    scorer: Pipeline
    features: tuple[str, ...]


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the split and for the permutation test, both from ``seed``."""
    split_seed, permutation_seed = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(split_seed), np.random.default_rng(permutation_seed)


def _sorted_by_id(table: pd.DataFrame) -> pd.DataFrame:
    """Rows in id order, so the split depends on the ids and the seed, not on the row order."""
    try:
        order = np.argsort(table["id"].to_numpy(), kind="stable")
    except TypeError:  # ids of mixed types
        order = np.argsort(table["id"].astype(str).to_numpy(), kind="stable")
    return table.iloc[order].reset_index(drop=True)


def held_out_scores(
    suspect: pd.DataFrame, reference: pd.DataFrame, features=None, *, fit_fraction: float = 0.5, seed: int = 0
) -> HeldOutScores:
    """Steps 1-2 of :func:`set_audit`: validate, split each set, fit the scorer on the fit parts and score
    the held-out parts. Same arguments as :func:`set_audit`.

    Each set is sorted by id, then split by a permutation from the split stream of ``seed`` (suspect
    first, then reference): floor(fit_fraction * n) images to the fit part, the rest held out.
    """
    features = _resolve_features(features, suspect)
    suspect = _sorted_by_id(_check_table(suspect, features, "suspect"))
    reference = _sorted_by_id(_check_table(reference, features, "reference"))
    _check_disjoint(suspect, reference, ("suspect", "reference"))
    _check_size(len(suspect), fit_fraction, "suspect")
    _check_size(len(reference), fit_fraction, "reference")
    split_rng, _ = _streams(seed)
    suspect_fit, suspect_test = _split(len(suspect), fit_fraction, split_rng)
    reference_fit, reference_test = _split(len(reference), fit_fraction, split_rng)
    x_suspect, x_reference = suspect[features].to_numpy(), reference[features].to_numpy()
    scorer = _fit_scorer(x_suspect[suspect_fit], x_reference[reference_fit])
    ids_suspect, ids_reference = suspect["id"].to_numpy(), reference["id"].to_numpy()
    return HeldOutScores(
        suspect_fit_ids=ids_suspect[suspect_fit],
        suspect_test_ids=ids_suspect[suspect_test],
        reference_fit_ids=ids_reference[reference_fit],
        reference_test_ids=ids_reference[reference_test],
        suspect_scores=scorer.decision_function(x_suspect[suspect_test]),
        reference_scores=scorer.decision_function(x_reference[reference_test]),
        scorer=scorer,
        features=tuple(features),
    )


# -------------------------------------------------------------------------------------------------
# Tests and effect sizes on held-out scores, batched along the last axis
# -------------------------------------------------------------------------------------------------
def _constant(suspect_scores: np.ndarray, reference_scores: np.ndarray) -> np.ndarray:
    """True where every held-out score of a set is the same (a scorer whose coefficients are all 0)."""
    both = np.concatenate([suspect_scores, reference_scores], axis=-1)
    return np.ptp(both, axis=-1) == 0


def welch_test(suspect_scores, reference_scores) -> tuple[np.ndarray, np.ndarray]:
    """(t, p) of the one-sided Welch t-test "suspect scores have the larger mean":
    ``scipy.stats.ttest_ind(equal_var=False, alternative="greater")`` along the last axis. Where all
    scores are equal there is no evidence: t = 0, p = 1."""
    suspect_scores, reference_scores = np.asarray(suspect_scores, float), np.asarray(reference_scores, float)
    constant = _constant(suspect_scores, reference_scores)
    with warnings.catch_warnings():
        if constant.any():  # scipy warns about them; they are answered below
            warnings.filterwarnings("ignore", message="Precision loss", category=RuntimeWarning)
        result = stats.ttest_ind(suspect_scores, reference_scores, axis=-1, equal_var=False, alternative="greater")
    return np.where(constant, 0.0, result.statistic), np.where(constant, 1.0, result.pvalue)


def hedges_g(suspect_scores, reference_scores) -> np.ndarray:
    """Hedges' g of suspect against reference scores along the last axis: Cohen's d with the pooled
    standard deviation, sqrt(((n1-1) s1^2 + (n2-1) s2^2) / (n1+n2-2)), times Hedges' small-sample
    correction J = 1 - 3 / (4 (n1+n2) - 9). 0 where all scores are equal."""
    suspect_scores, reference_scores = np.asarray(suspect_scores, float), np.asarray(reference_scores, float)
    n1, n2 = suspect_scores.shape[-1], reference_scores.shape[-1]
    s1, s2 = suspect_scores.var(axis=-1, ddof=1), reference_scores.var(axis=-1, ddof=1)
    pooled_var = ((n1 - 1) * s1 + (n2 - 1) * s2) / (n1 + n2 - 2)
    difference = suspect_scores.mean(axis=-1) - reference_scores.mean(axis=-1)
    constant = _constant(suspect_scores, reference_scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = difference / np.sqrt(pooled_var)
    return np.where(constant, 0.0, d * (1.0 - 3.0 / (4.0 * (n1 + n2) - 9.0)))


def _difference_of_means(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def scipy_permutation_pvalue(suspect_scores, reference_scores, n_resamples: int, rng) -> float:
    """One-sided permutation test of the difference of means ("suspect larger") on one pair of samples:
    ``scipy.stats.permutation_test(permutation_type="independent")``, exact when ``n_resamples`` covers
    every split of the pooled scores, otherwise p = (1 + #{resampled >= observed}) / (1 + n_resamples)."""
    if _constant(np.asarray(suspect_scores, float), np.asarray(reference_scores, float)):
        return 1.0
    result = stats.permutation_test(
        (np.asarray(suspect_scores, float), np.asarray(reference_scores, float)),
        _difference_of_means,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="greater",
        rng=rng,
    )
    return float(result.pvalue)


PERMUTATION_CHUNK = 4_000_000  # values per block of permuted copies: about 32 MB


def permutation_pvalues(suspect_scores, reference_scores, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The permutation test of :func:`scipy_permutation_pvalue` for a batch of sets at once.

    ``suspect_scores`` (sets, n1) and ``reference_scores`` (sets, n2); every set gets its own
    ``n_resamples`` random relabellings of its pooled scores. p = (1 + #{resampled >= observed}) /
    (1 + n_resamples), with scipy's tolerance of 100 machine epsilons (relative to the observed
    statistic) for resampled values that equal the observed one in exact arithmetic. Unlike scipy it
    never switches to the exact test; random relabellings give a valid, slightly conservative p-value.
    """
    suspect_scores = np.atleast_2d(np.asarray(suspect_scores, float))
    reference_scores = np.atleast_2d(np.asarray(reference_scores, float))
    n1 = suspect_scores.shape[1]
    pooled = np.concatenate([suspect_scores, reference_scores], axis=1)
    observed = _difference_of_means(suspect_scores, reference_scores)
    tolerance = np.abs(np.finfo(np.float64).eps * 100 * observed)
    exceed = np.zeros(len(pooled), dtype=np.int64)
    chunk = max(1, PERMUTATION_CHUNK // (n_resamples * pooled.shape[1]))
    for start in range(0, len(pooled), chunk):
        block = pooled[start : start + chunk]
        shuffled = rng.permuted(np.broadcast_to(block[:, None, :], (len(block), n_resamples, block.shape[1])), axis=-1)
        resampled = _difference_of_means(shuffled[..., :n1], shuffled[..., n1:])
        exceed[start : start + chunk] = (resampled >= (observed - tolerance)[start : start + chunk, None]).sum(axis=1)
    p = (exceed + 1.0) / (n_resamples + 1.0)
    return np.where(_constant(suspect_scores, reference_scores), 1.0, p)


# -------------------------------------------------------------------------------------------------
# The audit
# -------------------------------------------------------------------------------------------------
def _format_p(p: float) -> str:
    return f"{p:.2g}"


@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`set_audit`.

    ``detected`` is ``p_value_t < level``: the decision follows CDI's Welch t-test, fixed before looking
    at the data so that there is one test and no choice among p-values. ``p_value_permutation`` is
    reported beside it as a check that does not assume normal scores, and the verdict says when the two
    disagree at ``level``.
    """

    p_value_t: float
    p_value_permutation: float
    t_statistic: float
    effect_size: float  # Hedges' g of held-out suspect vs reference scores
    auc: float  # held-out suspect (positive) vs reference scores
    n_suspect: int
    n_reference: int
    n_suspect_test: int
    n_reference_test: int
    features: tuple[str, ...]
    level: float
    detected: bool
    verdict: str
    permutations: int
    fit_fraction: float
    seed: int

    def as_dict(self) -> dict:
        """One row for a results table; the features are joined with commas."""
        row = asdict(self)
        row["features"] = ",".join(self.features)
        return row


def _verdict(p_t, p_permutation, g, auc, n_suspect, n_reference, n_suspect_test, n_reference_test, level) -> str:
    evidence = (
        f"p = {_format_p(p_t)} (Welch t-test; permutation test p = {_format_p(p_permutation)}), "
        f"effect size g = {g:.2f} (AUC {auc:.2f}), from {n_suspect} suspect and {n_reference} reference images "
        f"({n_suspect_test} and {n_reference_test} held out for the test)."
    )
    if p_t < level:
        text = (
            f"The suspect set's images score higher than the reference images: {evidence} At level {level:g} this is "
            "evidence that the suspect set (all or part of it) was used to train the model, provided the reference "
            "images come from the same distribution as the suspect images."
        )
        if p_permutation >= level:
            text += (
                f" The permutation test, which does not assume normal scores, does not reach level {level:g}; "
                "treat the result with caution."
            )
    else:
        text = (
            f"The suspect set's images do not score significantly higher than the reference images: {evidence} "
            f"At level {level:g} there is no evidence that the suspect set was used to train the model. This is NOT "
            "proof that it was not used: too few images or features too weak for this model can miss real use."
        )
        if p_permutation < level:
            text += f" The permutation test alone reaches level {level:g}; the decision follows the t-test."
    return text


def set_audit(
    suspect: pd.DataFrame,
    reference: pd.DataFrame,
    features=None,
    *,
    fit_fraction: float = 0.5,
    seed: int = 0,
    permutations: int = 9999,
    level: float = 0.01,
) -> AuditResult:
    """Was the suspect set used to train the model? CDI's set-level test (Dubinski et al., CVPR 2025).

    ``suspect`` and ``reference`` are per-image feature tables (an ``id`` column, one float column per
    feature, higher = more member-like); the reference images must be known non-members from the same
    distribution as the suspect images. ``features`` defaults to every numeric column of the suspect
    table except ``id`` and ``label``; a ``label`` column is never read.

    1. Validate: feature columns present and finite, ids unique and not shared between the sets, each
       set large enough for a fit part of at least 1 and a held-out part of at least 2 images.
    2. Split each set (sorted by id) at random from ``seed``: floor(fit_fraction * n) images fit, the rest
       are held out (:func:`held_out_scores`).
    3. Fit ``StandardScaler`` + ``LogisticRegression`` (suspect = 1) on the fit parts; score held-out
       images with its ``decision_function`` (with one feature: the feature, up to a positive scale and
       shift, times the sign of the fitted coefficient).
    4. On held-out scores only: one-sided Welch t-test (:func:`welch_test`), one-sided permutation test of
       the difference of means with ``permutations`` resamples (:func:`scipy_permutation_pvalue`),
       Hedges' g (:func:`hedges_g`) and the AUC (``sklearn.metrics.roc_auc_score``, suspect positive).

    ``detected`` is ``p_value_t < level`` (see :class:`AuditResult`). The split and the permutation test
    use independent random streams spawned from ``seed``; the same inputs and seed give the same result,
    whatever the row order.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1, got {level}")
    scores = held_out_scores(suspect, reference, features, fit_fraction=fit_fraction, seed=seed)
    _, permutation_rng = _streams(seed)
    s, r = scores.suspect_scores, scores.reference_scores
    t, p_t = (float(v) for v in welch_test(s, r))
    p_permutation = scipy_permutation_pvalue(s, r, permutations, permutation_rng)
    g = float(hedges_g(s, r))
    auc = float(roc_auc_score(np.r_[np.ones(len(s)), np.zeros(len(r))], np.r_[s, r]))
    n_suspect = len(scores.suspect_fit_ids) + len(s)
    n_reference = len(scores.reference_fit_ids) + len(r)
    return AuditResult(
        p_value_t=p_t,
        p_value_permutation=p_permutation,
        t_statistic=t,
        effect_size=g,
        auc=auc,
        n_suspect=n_suspect,
        n_reference=n_reference,
        n_suspect_test=len(s),
        n_reference_test=len(r),
        features=scores.features,
        level=level,
        detected=bool(p_t < level),
        verdict=_verdict(p_t, p_permutation, g, auc, n_suspect, n_reference, len(s), len(r), level),
        permutations=permutations,
        fit_fraction=fit_fraction,
        seed=seed,
    )


# -------------------------------------------------------------------------------------------------
# Simulations: validity (null_rate) and power
# -------------------------------------------------------------------------------------------------
def _stream(seed: int, *keys: int) -> np.random.Generator:
    """A generator for one cell of a simulation, so a cell's draws do not depend on the other cells."""
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _batched_split(sets: int, n: int, fit_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_split` for ``sets`` sets of ``n`` rows at once: (fit rows, held-out rows), (sets, .) each."""
    order = rng.permuted(np.broadcast_to(np.arange(n), (sets, n)), axis=1)
    cut = fit_size(n, fit_fraction)
    return order[:, :cut], order[:, cut:]


def _simulate(suspect_rows: np.ndarray, reference_rows: np.ndarray, pools: dict, fit_fraction: float, rng) -> dict:
    """Held-out scores of simulated sets, split and scored as :func:`set_audit` does.

    ``suspect_rows`` (sets, n) and ``reference_rows`` (sets, m) index the rows of every array in
    ``pools`` (feature set name -> (pool size, d)). Every feature set sees the same images and the same
    split, so feature sets are compared on paired draws. Returns {name: (suspect scores (sets, n_test),
    reference scores (sets, m_test))}.
    """
    suspect_fit, suspect_test = (
        np.take_along_axis(suspect_rows, rows, axis=1)
        for rows in _batched_split(*suspect_rows.shape, fit_fraction, rng)
    )
    reference_fit, reference_test = (
        np.take_along_axis(reference_rows, rows, axis=1)
        for rows in _batched_split(*reference_rows.shape, fit_fraction, rng)
    )
    out = {}
    for name, pool in pools.items():
        scorers = fit_scorers(pool[suspect_fit], pool[reference_fit])
        out[name] = (score_with(scorers, pool[suspect_test]), score_with(scorers, pool[reference_test]))
    return out


def _rejection_rates(suspect_scores, reference_scores, level, permutations, rng) -> tuple[float, float]:
    _, p_t = welch_test(suspect_scores, reference_scores)
    p_permutation = permutation_pvalues(suspect_scores, reference_scores, permutations, rng)
    return float(np.mean(p_t < level)), float(np.mean(p_permutation < level))


def null_rate(
    nonmembers: pd.DataFrame,
    features,
    sizes,
    n_sets: int = 1000,
    level: float = 0.05,
    seed: int = 0,
    reference_size: int | None = None,
    *,
    fit_fraction: float = 0.5,
    permutations: int = 999,
) -> pd.DataFrame:
    """False-positive rate of the audit when the suspect set holds no member: is the test valid?

    For each suspect size n, ``n_sets`` times: draw n + m non-members without replacement (m =
    ``reference_size`` or n), the first n as the suspect set, the other m as the reference set; split and
    score as :func:`set_audit` does (scorer fitted by :func:`fit_scorers`); count p < ``level`` for the
    Welch t-test and for the permutation test (``permutations`` resamples, :func:`permutation_pvalues`;
    999 by default against set_audit's 9,999, enough for rates at 0.05 or 0.01). A valid test rejects
    at rate ``level`` or less; ``mc_se`` = sqrt(level (1 - level) / n_sets) is the Monte Carlo standard
    error of a rate at exactly ``level``. Each size has its own random stream from (``seed``, size).

    Returns one row per size: features, size, reference_size, n_sets, level, fpr_t, fpr_permutation,
    mc_se. Raises ValueError if the pool has fewer than n + m non-members for some size.
    """
    features = _resolve_features(features, nonmembers)
    pool = _check_table(nonmembers, features, "non-member")[features].to_numpy()
    rows = []
    for n in sizes:
        n = int(n)
        m = int(reference_size) if reference_size is not None else n
        _check_size(n, fit_fraction, "suspect")
        _check_size(m, fit_fraction, "reference")
        if n + m > len(pool):
            raise ValueError(
                f"suspect size {n} with a reference set of {m} needs {n + m} distinct non-members; "
                f"the pool has {len(pool)}"
            )
        rng = _stream(seed, n)
        chosen = np.stack([rng.choice(len(pool), n + m, replace=False) for _ in range(n_sets)])
        simulated = _simulate(chosen[:, :n], chosen[:, n:], {"features": pool}, fit_fraction, rng)
        suspect_scores, reference_scores = simulated["features"]
        fpr_t, fpr_permutation = _rejection_rates(suspect_scores, reference_scores, level, permutations, rng)
        rows.append(
            {
                "features": ",".join(features),
                "size": n,
                "reference_size": m,
                "n_sets": n_sets,
                "level": level,
                "fpr_t": fpr_t,
                "fpr_permutation": fpr_permutation,
                "mc_se": float(np.sqrt(level * (1 - level) / n_sets)),
            }
        )
    return pd.DataFrame(rows)


def members_in(size: int, member_fraction: float) -> int:
    """Members in a suspect set of ``size`` images: round(member_fraction * size), halves rounded up."""
    return int(np.floor(member_fraction * size + 0.5))


def power(
    members: pd.DataFrame,
    nonmembers: pd.DataFrame,
    features_sets: dict[str, list[str]],
    sizes,
    member_fractions=(1.0,),
    n_sets: int = 200,
    level: float = 0.01,
    seed: int = 0,
    *,
    fit_fraction: float = 0.5,
    permutations: int = 999,
) -> pd.DataFrame:
    """Probability that the audit detects a suspect set that was (partly) used in training.

    For each member fraction f and suspect size n, ``n_sets`` times: a suspect set of k = round(f n)
    members and n - k non-members, and a reference set of n further non-members, all drawn without
    replacement (so the reference never shares an image with the suspect set); split and score as
    :func:`set_audit` does (scorer fitted by :func:`fit_scorers`), once per named feature set in
    ``features_sets``, on the same images and the same split; count p < ``level`` for the Welch t-test
    (``power_t``, the audit's decision) and for the permutation test (``power_permutation``). ``mc_se``
    is sqrt(power_t (1 - power_t) / n_sets).

    A size that needs more members (k) or non-members (2n - k) than the pools hold is not simulated: its
    rows have ``skipped`` True, NaN rates and a ``note`` saying what was missing. Nothing is ever drawn
    with replacement. Each (fraction, size) has its own random stream from (``seed``, size, fraction).

    Returns one row per feature set, member fraction and size: feature_set, features, member_fraction,
    size, n_members, n_sets, level, power_t, power_permutation, mc_se, skipped, note.
    """
    if not features_sets:
        raise ValueError("features_sets is empty: name at least one feature set")
    resolved = {name: _resolve_features(f, members) for name, f in features_sets.items()}
    needed = list(dict.fromkeys(f for fs in resolved.values() for f in fs))
    member_table = _check_table(members, needed, "member")
    nonmember_table = _check_table(nonmembers, needed, "non-member")
    _check_disjoint(member_table, nonmember_table, ("member", "non-member"))
    pools = {  # rows: members, then non-members
        name: np.vstack([member_table[fs].to_numpy(), nonmember_table[fs].to_numpy()]) for name, fs in resolved.items()
    }
    n_member_pool, n_nonmember_pool = len(member_table), len(nonmember_table)
    rows = []
    for fraction in member_fractions:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"member fractions must lie in [0, 1], got {fraction}")
        for n in sizes:
            n = int(n)
            _check_size(n, fit_fraction, "suspect")
            k = members_in(n, fraction)
            base = {"member_fraction": float(fraction), "size": n, "n_members": k, "n_sets": n_sets, "level": level}
            if k > n_member_pool or 2 * n - k > n_nonmember_pool:
                note = (
                    f"skipped: needs {k} members and {2 * n - k} non-members without replacement; "
                    f"the pools hold {n_member_pool} and {n_nonmember_pool}"
                )
                for name, fs in resolved.items():
                    rates = {"power_t": np.nan, "power_permutation": np.nan, "mc_se": np.nan}
                    row = {"feature_set": name, "features": ",".join(fs), **base, **rates}
                    rows.append({**row, "skipped": True, "note": note})
                continue
            rng = _stream(seed, n, int(round(fraction * 1_000_000)))
            suspect_rows, reference_rows = [], []
            for _ in range(n_sets):
                member_rows = rng.choice(n_member_pool, k, replace=False)
                nonmember_rows = n_member_pool + rng.choice(n_nonmember_pool, 2 * n - k, replace=False)
                suspect_rows.append(np.r_[member_rows, nonmember_rows[: n - k]])
                reference_rows.append(nonmember_rows[n - k :])
            simulated = _simulate(np.stack(suspect_rows), np.stack(reference_rows), pools, fit_fraction, rng)
            for name, fs in resolved.items():
                rate_t, rate_permutation = _rejection_rates(*simulated[name], level, permutations, rng)
                mc_se = float(np.sqrt(rate_t * (1 - rate_t) / n_sets))
                rates = {"power_t": rate_t, "power_permutation": rate_permutation, "mc_se": mc_se}
                row = {"feature_set": name, "features": ",".join(fs), **base, **rates}
                rows.append({**row, "skipped": False, "note": ""})
    return pd.DataFrame(rows)


def images_for_power(power_frame: pd.DataFrame, target: float = 0.8, column: str = "power_t") -> pd.DataFrame:
    """Smallest suspect size whose simulated power (``column``) reaches ``target``, per feature set and
    member fraction of a :func:`power` table.

    Skipped or NaN rows are ignored. Where no evaluated size reaches the target, ``images`` is NaN and
    ``note`` says "not reached up to N" (N the largest evaluated size). Power estimates carry Monte Carlo
    noise (see ``mc_se``), so a size just at the target may be reached by chance; the answer is only as
    fine as the grid of sizes.

    Returns one row per group: feature_set, member_fraction (when the table has them), target, images,
    power (at that size, NaN when not reached), note.
    """
    keys = [c for c in ("feature_set", "member_fraction") if c in power_frame.columns]
    frame = power_frame
    if "skipped" in frame.columns:
        frame = frame[~frame["skipped"].astype(bool)]
    frame = frame[frame[column].notna()]
    groups = power_frame[keys].drop_duplicates() if keys else pd.DataFrame(index=[0])
    rows = []
    for _, group_key in groups.iterrows():
        mask = np.ones(len(frame), dtype=bool)
        for key in keys:
            mask &= (frame[key] == group_key[key]).to_numpy()
        group = frame[mask].sort_values("size")
        reached = group[group[column] >= target]
        row = {key: group_key[key] for key in keys}
        if len(reached):
            best = reached.iloc[0]
            row.update(target=target, images=float(best["size"]), power=float(best[column]), note="")
        elif len(group):
            row.update(target=target, images=np.nan, power=np.nan, note=f"not reached up to {int(group['size'].max())}")
        else:
            row.update(target=target, images=np.nan, power=np.nan, note="no size evaluated")
        rows.append(row)
    return pd.DataFrame(rows)
