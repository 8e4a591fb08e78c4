"""mialib.calibration on synthetic scores with a known answer: score = difficulty + membership shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from mialib import calibration


def _synthetic(n: int, shift: float, seed: int):
    """Two features; a non-member's score is 2 f1 - f2 (its difficulty) plus unit Gaussian noise;
    a member's is that plus ``shift``. Half the images are members."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 2)) * [3.0, 2.0]
    labels = (np.arange(n) % 2).astype(int)
    difficulty = 2 * features[:, 0] - features[:, 1]
    scores = difficulty + shift * labels + rng.normal(size=n)
    return features, labels, scores, difficulty


def test_difficulty_calibration_recovers_the_membership_shift():
    features, labels, scores, difficulty = _synthetic(2000, shift=1.0, seed=0)
    calibration_rows = np.arange(len(scores)) < 1000
    fit = calibration_rows & (labels == 0)
    calibrated = calibration.difficulty_calibrated(scores, features, fit)
    test = ~calibration_rows
    # the raw score is dominated by difficulty (spread ~6.7 against a shift of 1): near chance
    raw_auc = roc_auc_score(labels[test], scores[test])
    calibrated_auc = roc_auc_score(labels[test], calibrated[test])
    best = roc_auc_score(labels[test], (scores - difficulty)[test])  # the oracle that knows each difficulty
    assert raw_auc < 0.6 and calibrated_auc > 0.72 and abs(calibrated_auc - best) < 0.01
    # the members' calibrated scores sit the shift above the non-members' (standard error ~0.06 on 500 + 500)
    gap = calibrated[test & (labels == 1)].mean() - calibrated[test & (labels == 0)].mean()
    assert gap == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_quantile_thresholds_hold_the_false_positive_rate(alpha):
    """Fitted at quantile 1 - alpha on 4000 non-members, the per-image thresholds flag alpha of 20000 fresh
    non-members, within Monte Carlo error (the fit's own error, alpha(1 - alpha) / 4000, dominates)."""
    features, labels, scores, _ = _synthetic(24000, shift=0.0, seed=1)
    fit = np.arange(len(scores)) < 4000
    thresholds = calibration.difficulty_predictions(scores, features, fit, quantile=1 - alpha)
    fresh = ~fit
    realised = float((scores[fresh] > thresholds[fresh]).mean())
    error = np.sqrt(alpha * (1 - alpha) * (1 / 4000 + 1 / 20000))
    assert abs(realised - alpha) < 4 * error
    # a global threshold at the same level (the raw score, no features) holds it too, but only on average:
    # it flags the easy images, not alpha of each difficulty
    easy = fresh & (features @ [2.0, -1.0] > 8)  # the simplest tenth (highest expected score)
    assert (scores[easy] > thresholds[easy]).mean() < 3 * alpha
    assert (scores[easy] > np.quantile(scores[fit], 1 - alpha)).mean() > 5 * alpha


def test_cross_fitting_never_predicts_a_row_from_a_fit_that_saw_it():
    features, labels, scores, _ = _synthetic(60, shift=0.0, seed=2)
    fit = np.ones(60, dtype=bool)
    crossed = calibration.difficulty_predictions(scores, features, fit)
    spiked = scores.copy()
    spiked[0] += 1e6  # a fit that saw row 0 would move; its own prediction must not
    assert calibration.difficulty_predictions(spiked, features, fit)[0] == pytest.approx(
        crossed[0], abs=1e-6 * np.abs(scores).max()
    )


def test_difficulty_calibration_refuses_too_few_nonmembers_and_bad_features():
    features, _, scores, _ = _synthetic(40, shift=0.0, seed=3)
    with pytest.raises(ValueError, match="calibration non-members: 9 is too few"):
        calibration.difficulty_calibrated(scores, features, np.arange(40) < 9)
    features[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        calibration.difficulty_calibrated(scores, features, np.ones(40, dtype=bool))


def test_reference_calibration():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=50)
    assert np.array_equal(
        calibration.reference_calibrated(scores, scores[None]), np.zeros(50)
    )  # a reference equal to the target
    references = scores + rng.normal(size=(4, 50)) * 0.5
    expected = (scores - references.mean(axis=0)) / np.sqrt(references.var(axis=0, ddof=1).mean())
    np.testing.assert_allclose(calibration.reference_calibrated(scores, references), expected, rtol=1e-12)
    # hand-computed: two references, one image each at +-1 around 2, spread sqrt(2): (3 - 2) / sqrt(2)
    assert calibration.reference_calibrated([3.0], [[1.0], [3.0]])[0] == pytest.approx(1 / np.sqrt(2), rel=1e-12)
    with pytest.raises(ValueError, match="identical scores"):
        calibration.reference_calibrated(scores, np.stack([scores, scores]))
    with pytest.raises(ValueError, match=r"must be \(k, 50\)"):
        calibration.reference_calibrated(scores, np.zeros((2, 49)))


def test_image_features_against_their_definitions(tmp_path):
    rng = np.random.default_rng(5)
    flat = torch.zeros(1, 3, 16, 16)
    noisy = torch.from_numpy(rng.uniform(-1, 1, size=(1, 3, 16, 16))).float()
    pixels = torch.cat([flat, noisy])
    bits = calibration.compressed_bits(pixels)
    # the PNG PIL writes for the same uint8 image
    image = ((noisy[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "noisy.png", compress_level=9)
    assert bits[1] == pytest.approx(8 * (tmp_path / "noisy.png").stat().st_size / 256, rel=1e-12)
    assert bits[0] < bits[1] / 5  # a flat image compresses far better
    tv = calibration.total_variation(pixels)
    x = noisy[0].double().numpy()
    assert tv[0] == 0 and tv[1] == pytest.approx(
        (np.abs(np.diff(x, axis=2)).mean() + np.abs(np.diff(x, axis=1)).mean()) / 2, rel=1e-12
    )


# --------------------------------------------------------------------------------------------------
# The run layer: calibrate=difficulty / reference on any registered attack
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny target, an exact copy of it in another folder, and a reference whose U-Net differs."""
    import shutil

    import helpers

    root = tmp_path_factory.mktemp("calibration_models")
    pipeline = helpers.save_tiny_pipeline(root / "target")
    shutil.copytree(root / "target", root / "copy")
    with torch.no_grad():
        for parameter in pipeline.unet.parameters():
            parameter.mul_(1.05)
    pipeline.save_pretrained(root / "reference", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def scored_set(tmp_path_factory):
    import helpers
    from mialib import imagesets

    folder = helpers.write_imagefolder(tmp_path_factory.mktemp("calibration_set") / "set", n=48)
    return imagesets.open_imageset(f"imagefolder:{folder}")


def test_requests_name_their_calibration_and_refuse_what_cannot_be_calibrated():
    from mialib.attacks.registry import parse_request

    request = parse_request("loss:t=[50,100],calibrate=difficulty")
    assert request.calibrate == "difficulty" and request.text() == "loss:t=[50, 100],calibrate=difficulty"
    assert parse_request(request.text()).text() == request.text()
    assert request.display == "loss (calibrated) vs difficulty"
    assert parse_request("structural:calibrate=reference").display == "structural (paper) vs reference"
    assert parse_request("pia:calibrate").calibrate == "none"  # the bare word still means the default grid
    # a grid names the settings it holds away from the defaults: two structural grids never share a name
    assert parse_request("structural:t=50:500:50,recon=true").display == "structural (calibrated, recon=true)"
    assert parse_request("structural:t=50:500:50").display == "structural (calibrated)"
    with pytest.raises(ValueError, match="calibrate must be one of none, difficulty, reference, fit, got 'lira'"):
        parse_request("loss:calibrate=lira")
    with pytest.raises(ValueError, match="applies to attacks that run the model, not to a control"):
        parse_request("vae_control:calibrate=difficulty")
    with pytest.raises(ValueError, match="not to a blind"):
        parse_request("blind_image:calibrate=reference")


def test_difficulty_calibration_in_the_run_layer(models, scored_set, tmp_path):
    from mialib import runs
    from mialib.attacks import REGISTRY
    from mialib.attacks.registry import assert_within_tolerance
    from mialib.settings import Settings
    from mialib.target import load_target

    target, settings = load_target(models / "target"), Settings()
    table, results = runs.score(
        target,
        scored_set,
        {"raw": "structural", "cal": "structural:calibrate=difficulty"},
        settings,
        tmp_path,
        8,
        32,
        progress=False,
    )
    raw, cal = (table[table["run"] == run].set_index("id") for run in ("raw", "cal"))
    assert (cal["calibrate"] == "difficulty").all() and (raw["calibrate"] == "none").all()
    np.testing.assert_array_equal(cal["raw_value"], raw["value"])  # the attack's own value is kept
    # the calibrated value is the raw one minus the regression on the run layer's features, fitted on the
    # calibration non-members
    features = runs.difficulty_features(target, scored_set, settings, tmp_path, 8, 32, progress=False).set_index("id")
    records = scored_set.records.set_index("id").loc[cal.index]
    fit = ((records["subset"] == "calibration") & (records["label"] == 0)).to_numpy()
    assert fit.sum() >= calibration.MIN_NONMEMBERS
    folds = calibration.id_folds(cal.index)
    expected = calibration.difficulty_calibrated(
        cal["raw_value"].to_numpy(), features.loc[cal.index].to_numpy(), fit, folds=folds
    )
    # (the regression solved on rows in another order agrees to float64 rounding: 1e-9 of the scores' scale)
    np.testing.assert_allclose(cal["value"].to_numpy(), expected, rtol=0, atol=1e-9 * np.abs(cal["raw_value"]).max())
    # the features: the image-only ones from the pixels, and the VAE-only SSIM within its registry tolerance
    pixels = scored_set.select(list(cal.index)).load(32)
    np.testing.assert_array_equal(features.loc[cal.index, "compressed_bits"], calibration.compressed_bits(pixels))
    np.testing.assert_array_equal(features.loc[cal.index, "total_variation"], calibration.total_variation(pixels))
    ids, captions = list(cal.index), list(records["caption"])
    direct = REGISTRY["vae_control"].function(target, pixels, captions, ids)
    assert_within_tolerance(
        REGISTRY["vae_control"], {}, features.loc[cal.index, "vae_ssim"], direct.scores, direct.extras
    )
    # too few calibration non-members: refused before any compute
    small = scored_set.select(list(scored_set.records["id"][:16]))
    with pytest.raises(ValueError, match="calibrate=difficulty fits on the calibration non-members; this set has"):
        runs.score(target, small, ["loss:calibrate=difficulty"], settings, tmp_path, 8, 32, progress=False)


def test_reference_calibration_uses_the_same_noise_per_image(models, scored_set, tmp_path):
    from mialib import runs
    from mialib.settings import Settings
    from mialib.target import load_target

    target, settings = load_target(models / "target"), Settings()
    request = {"ref": "loss:t=[50,100],calibrate=reference"}
    with pytest.raises(ValueError, match="no reference model was given"):
        runs.score(target, scored_set, request, settings, tmp_path / "a", 8, 32, progress=False)
    # a reference equal to the target (another folder, loaded on its own) gives exactly 0
    same, _ = runs.score(
        target,
        scored_set,
        request,
        settings,
        tmp_path / "a",
        8,
        32,
        progress=False,
        references=(load_target(models / "copy"),),
    )
    assert (same["score"] == 0).all() and (same["raw_value"] != 0).all()
    # another reference: the difference, image by image, from the reference's own scores with the same noise
    reference = load_target(models / "reference")
    table, results = runs.score(
        target, scored_set, request, settings, tmp_path / "b", 8, 32, progress=False, references=(reference,)
    )
    alone, _ = runs.score(
        reference,
        scored_set,
        {"r": f"loss:t={results['ref'].chosen['t']}"},
        settings,
        tmp_path / "c",
        8,
        32,
        progress=False,
    )
    ours = table.set_index("id")
    theirs = alone.set_index("id").loc[ours.index]
    np.testing.assert_array_equal(ours["value"], ours["raw_value"] - theirs["value"])
    assert np.abs(ours["value"]).min() > 0
    # two references: standardised by their pooled spread
    two, _ = runs.score(
        target,
        scored_set,
        {"r2": "loss:t=50,calibrate=reference"},
        settings,
        tmp_path / "b",
        8,
        32,
        progress=False,
        references=(reference, load_target(models / "copy")),
    )
    values = results["ref"].values
    assert "reference_value_0" in values.columns
    pair = runs.score(reference, scored_set, ["loss:t=50"], settings, tmp_path / "c", 8, 32, progress=False)[0]
    raw = two.set_index("id")["raw_value"]
    refs = np.stack([pair.set_index("id").loc[raw.index, "value"].to_numpy(), raw.to_numpy()])
    np.testing.assert_array_equal(two.set_index("id")["value"], calibration.reference_calibrated(raw.to_numpy(), refs))


def test_difficulty_calibration_is_continuous_in_the_features():
    """float32 noise in a feature (another batch size or CPU) moves the calibrated score by as little: the
    least-squares prediction is unique (a median regression of an even number of images is not)."""
    features, labels, scores, _ = _synthetic(12, shift=0.0, seed=6)
    fit = np.ones(12, dtype=bool)
    noise = 1 + np.random.default_rng(7).uniform(-1, 1, size=features.shape) * np.finfo(np.float32).eps
    before = calibration.difficulty_calibrated(scores, features, fit)
    after = calibration.difficulty_calibrated(scores, features * noise, fit)
    scale = np.abs(scores).max()
    assert np.abs(after - before).max() < 1e3 * np.finfo(np.float32).eps * scale  # ~ the features' own change


def test_folds_by_image_id_make_the_calibration_independent_of_row_order():
    """The run layer cross-fits by folds drawn from the image ids: another order of the same images (another
    adapter, a reversed metadata.csv) gives the same calibrated scores; positional folds would not."""
    features, labels, scores, _ = _synthetic(40, shift=0.0, seed=8)
    ids = np.array([f"img{i:03d}" for i in range(40)])
    fit = labels == 0
    ours = calibration.difficulty_calibrated(scores, features, fit, folds=calibration.id_folds(ids))
    order = np.random.default_rng(9).permutation(40)
    again = calibration.difficulty_calibrated(
        scores[order], features[order], fit[order], folds=calibration.id_folds(ids[order])
    )
    scale = np.abs(scores).max()
    np.testing.assert_allclose(again, ours[order], rtol=0, atol=1e-12 * scale)
    positional = calibration.difficulty_calibrated(scores[order], features[order], fit[order])
    assert np.abs(positional - ours[order]).max() > 1e-6 * scale
    assert set(calibration.id_folds(ids)) == set(range(calibration.FOLDS))


def test_mialib_audit_takes_reference_calibrated_features(models, tmp_path, capsys):
    """`mialib audit --reference-model`: a calibrate=reference feature is the target's feature minus the
    reference model's, image by image (each read from an audit of that model alone); calibrate=difficulty,
    which needs labelled non-members, and a reference feature without a reference model are refused."""
    import json

    import pandas as pd

    import helpers
    from mialib import cli

    suspect = helpers.write_imagefolder(tmp_path / "suspect", n=24, seed=1, subsets=False)
    reference = helpers.write_imagefolder(tmp_path / "reference", n=24, seed=2, subsets=False)

    def audit(model, attack, out, *extra):
        cli.main(
            [
                "audit", "--model", str(model), "--suspect", f"imagefolder:{suspect}", "--reference",
                f"imagefolder:{reference}", "--attack", attack, "--out", str(tmp_path / out), "--quiet",
                "--permutations", "99", "--size", "32", *extra,
            ]
        )  # fmt: skip
        return pd.read_parquet(tmp_path / out / "features.parquet").set_index("id")

    calibrated = audit(
        models / "target", "loss:calibrate=reference", "a", "--reference-model", str(models / "reference")
    )
    target, theirs = audit(models / "target", "loss", "b"), audit(models / "reference", "loss", "c")
    column = "loss:calibrate=reference"
    assert calibrated.columns.tolist() == [column, "set"]
    np.testing.assert_array_equal(calibrated[column], target["loss"] - theirs["loss"].loc[target.index])
    assert np.abs(calibrated[column]).min() > 0
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["parameters"]["reference_models"] == [
        str(models / "reference")
    ]
    for attack, message in (
        ("loss:calibrate=reference", "give its reference models with --reference-model"),
        ("loss:calibrate=difficulty", "calibrate=difficulty is fitted on a labelled split"),
    ):
        with pytest.raises(SystemExit):
            audit(models / "target", attack, "refused")
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
