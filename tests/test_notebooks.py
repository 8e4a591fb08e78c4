"""Execute every notebook at smoke size (papermill), on the embedded emoji set and on a user's imagefolder,
and check the numbers they wrote against references."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import structural_similarity
from sklearn.metrics import roc_auc_score, roc_curve

from conftest import IMAGEFOLDER_NOTEBOOKS
from mialib import experiment
from mialib.attacks import REGISTRY, parse_request
from mialib.settings import Settings
from mialib.target import load_target

FIGURES = (
    "examples", "closest_cross_split_pairs", "memorisation_samples", "observation_ssim_vs_t", "trajectory_grid",
    "roc", "robustness_sweep", "robustness_examples", "ablation_t_and_stride", "training_dynamics", "audit_null",
    "audit_power",
)  # fmt: skip
# U-Net evaluations per image at the smoke preset's fixed settings (the registry's formulas are checked for every run
# below)
FIXED_COSTS = {
    "structural_paper": 2,
    "pixel_paper": 2,
    "backward": 4,
    "secmi": 12,
    "pia": 2,
    "clid": 3,
    "vae_control": 0,
    "blind_image": 0,
    "blind_caption": 0,
}


def _errors(notebook) -> list:
    cells = json.loads(notebook.read_text())["cells"]
    return [
        o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]


def test_all_notebooks_executed(smoke_outputs):
    runs = json.loads((smoke_outputs / "notebook_runs.json").read_text())
    assert {name: r["status"] for name, r in runs.items()} == {name: "ok" for name in experiment.NOTEBOOKS}
    for name in experiment.NOTEBOOKS:
        assert not _errors(smoke_outputs / "notebooks" / f"{name}.ipynb")
    for figure in (*FIGURES, "../biased/figures/roc"):
        for suffix in ("png", "pdf"):
            assert (smoke_outputs / "figures" / f"{figure}.{suffix}").stat().st_size > 1000
    for table in ("comparison.csv", "comparison.tex", "beats_blind.csv", "image_set.csv", "skipped_images.csv"):
        assert (smoke_outputs / "tables" / table).exists()


def test_01_split_counts_and_no_leak(smoke_outputs, smoke_params):
    summary = json.loads((smoke_outputs / "data_split.json").read_text())
    assert summary["shared_ids"] == summary["shared_groups"] == summary["shared_pixel_sha256s"] == 0
    assert summary["near_duplicate_pairs"] == 0
    counts = {(r["split"], r["subset"]): r["images"] for r in summary["counts"]}
    half = smoke_params["N_MEMBERS"] // 2
    assert counts == {
        ("public", ""): smoke_params["N_PUBLIC"],
        ("member", "calibration"): smoke_params["N_MEMBERS"] - half,
        ("member", "test"): half,
        ("nonmember", "calibration"): smoke_params["N_NONMEMBERS"] - smoke_params["N_NONMEMBERS"] // 2,
        ("nonmember", "test"): smoke_params["N_NONMEMBERS"] // 2,
    }
    assert summary["given"] == smoke_params["N_MEMBERS"] + smoke_params["N_NONMEMBERS"] and summary["skipped"] == 0


def test_02_observation_curve(smoke_outputs, smoke_params):
    observation = pd.read_csv(smoke_outputs / "tables" / "observation.csv", index_col="t")
    assert list(observation.index) == list(range(0, smoke_params["CURVE_T_MAX"] + 1, smoke_params["CURVE_STRIDE"]))
    np.testing.assert_allclose(observation["difference"], observation["member"] - observation["nonmember"], atol=1e-12)
    assert observation[["member", "nonmember"]].abs().le(1).all().all()
    assert (observation["member"].iloc[-1] < observation["member"].iloc[0]) and (
        observation["nonmember"].iloc[-1] < observation["nonmember"].iloc[0]
    )
    # t = 0 is the VAE round trip, which 03 reports as its own control
    scores = pd.read_parquet(smoke_outputs / "scores.parquet")
    vae = scores[scores["run"] == "vae_control"]
    np.testing.assert_allclose(observation.loc[0, "member"], vae[vae["label"] == 1]["score"].mean(), atol=1e-9)
    # the autoencoder's held-out curve, recorded while the smoke target's VAE trained: steps 0 to VAE_STEPS, and
    # at the end the VAE-only control's mean over the same (attacked) images, up to SSIM's float32 rounding
    curve = pd.read_csv(smoke_outputs / "tables" / "vae_held_out_curve.csv")
    assert curve["step"].iloc[0] == 0 and curve["step"].iloc[-1] == smoke_params["VAE_STEPS"]
    assert curve["step"].is_monotonic_increasing and len(curve) >= 10
    np.testing.assert_allclose(curve["ssim"].iloc[-1], vae["score"].mean(), rtol=0, atol=1e-4)
    assert curve["ssim"].iloc[-1] > curve["ssim"].iloc[0]  # training improved the held-out reconstruction
    assert (smoke_outputs / "figures" / "vae_held_out_curve.png").stat().st_size > 1000
    # the same inversion against D(E(x)) (structural:recon=true): at t = 0 the reconstruction against itself
    np.testing.assert_allclose(observation.loc[0, ["recon_member", "recon_nonmember"]], 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        observation["recon_difference"], observation["recon_member"] - observation["recon_nonmember"], atol=1e-12
    )
    memorisation = pd.read_csv(smoke_outputs / "tables" / "memorisation.csv", index_col="split")
    assert set(memorisation.index) == {"member", "nonmember"}
    assert memorisation["count"].sum() == smoke_params["N_MEMBERS"] + smoke_params["N_NONMEMBERS"]


def test_03_calibrated_rows_and_caption_controls(smoke_outputs, smoke_params):
    scores = pd.read_parquet(smoke_outputs / "scores.parquet")
    requests = {run: parse_request(text, run) for run, text in smoke_params["ATTACKS"].items()}
    for run, request in requests.items():
        rows = scores[scores["run"] == run]
        assert set(rows["calibrate"]) == {request.calibrate}, run
        if request.calibrate == "none":
            np.testing.assert_array_equal(rows["raw_value"], rows["value"])
    # the difficulty-calibrated paper setting keeps the paper row's value as its raw value, and moves it
    paper = scores[scores["run"] == "structural_paper"].set_index("id")
    calibrated = scores[scores["run"] == "structural_difficulty"].set_index("id").loc[paper.index]
    np.testing.assert_array_equal(calibrated["raw_value"], paper["value"])
    assert not np.allclose(calibrated["value"], paper["value"])
    controls = pd.read_csv(smoke_outputs / "tables" / "caption_controls.csv")
    model_runs = [run for run, r in requests.items() if r.spec.kind == "model"]
    assert set(controls["prompt"]) == {"caption", *smoke_params["CAPTION_CONTROLS"]}
    assert sorted(controls["run"].unique()) == sorted(model_runs)
    metrics = pd.read_csv(smoke_outputs / "metrics.csv").set_index("run")
    caption = controls[controls["prompt"] == "caption"].set_index("run")
    for run in model_runs:
        assert caption.loc[run, "auc"] == pytest.approx(metrics.loc[run, "auc"], abs=1e-12)
    # CLiD contrasts the caption with a reduced and a null prompt: under the empty prompt every score is 0
    assert controls[(controls["run"] == "clid") & (controls["prompt"] == "empty")]["auc"].item() == 0.5
    assert not (smoke_outputs / "biased" / "tables" / "caption_controls.csv").exists()  # the fair run shows them


@pytest.mark.parametrize("run", ["", "biased"])
def test_03_metrics_match_sklearn_and_the_registry(smoke_outputs, smoke_params, run):
    folder = smoke_outputs / run
    scores = pd.read_parquet(folder / "scores.parquet")
    table = pd.read_csv(folder / "metrics.csv")
    chosen = json.loads((folder / "chosen_settings.json").read_text())
    assert list(table["run"]) == list(smoke_params["ATTACKS"]) == list(chosen)
    assert not scores["score"].isna().any()
    settings = Settings.from_parameters(smoke_params)
    for row in table.itertuples():
        rows = scores[scores["run"] == row.run]
        test = rows[rows["subset"] == "test"]
        assert row.auc == pytest.approx(roc_auc_score(test["label"], test["score"]), abs=1e-12)
        fpr, tpr, _ = roc_curve(test["label"], test["score"], drop_intermediate=False)
        assert row.tpr_at_1fpr == pytest.approx(tpr[fpr <= 0.01].max(), abs=1e-12)
        assert row.n_test_members == (test["label"] == 1).sum()
        for metric in ("auc", "balanced_accuracy", "tpr_at_1fpr"):
            assert getattr(row, f"{metric}_low") <= getattr(row, metric) <= getattr(row, f"{metric}_high")
        spec = REGISTRY[row.attack]
        assert row.unet_evals == spec.cost(chosen[row.run]["params"], settings)
        if row.run in FIXED_COSTS:
            assert row.unet_evals == FIXED_COSTS[row.run]
        # the direction is applied once: score = direction * value, with the direction calibration chose
        np.testing.assert_array_equal(rows["score"], chosen[row.run]["direction"] * rows["value"])
        # settings are structured columns of every row
        assert set(rows["guidance"]) == {settings.guidance} and set(rows["seed"]) == {settings.seed}
    # the calibrated structural run's t is one of its grid's
    calibrated = chosen["structural_calibrated"]
    assert calibrated["params"]["t"] in range(50, smoke_params["CURVE_T_MAX"] + 1, 50)
    verdict = pd.read_csv(folder / "tables" / "beats_blind.csv")
    bar = table[table["attack"].str.startswith("blind")]["auc"].max()
    assert (verdict["beats blind baselines"] == (verdict["auc_low"] > bar)).all()


def test_html_report_has_every_executed_notebook(smoke_outputs):
    index = (smoke_outputs / "html" / "index.html").read_text()
    for name in experiment.NOTEBOOKS:
        assert f'href="{name}.html"' in index
        page = (smoke_outputs / "html" / f"{name}.html").read_text()
        assert "<html" in page and "data:image/png;base64" in page  # figures inline: the page stands alone


def test_executed_notebooks_and_pages_hold_only_what_the_notebooks_say(smoke_outputs):
    """No stderr block (progress bars, library notices), no progress widget or its state, no script of the
    widget manager, and neither the output folder's absolute location nor the repository's: papermill writes
    the parameters into each notebook, and they are given relative to the repository root (a path such as
    ``../../tmp/.../outputs`` is relative)."""
    import html

    absolute = re.compile(r"(?<!\.\.)" + re.escape(str(smoke_outputs)))
    relative = experiment.relative_to_root(smoke_outputs, always=True)
    for name in experiment.NOTEBOOKS:
        notebook = json.loads((smoke_outputs / "notebooks" / f"{name}.ipynb").read_text())
        outputs = [o for c in notebook["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("name") == "stderr"], name
        assert not [o for o in outputs if any("widget" in kind for kind in o.get("data", {}))], name
        assert "widgets" not in notebook["metadata"], name
        sources = "".join("".join(c["source"]) for c in notebook["cells"])
        assert not absolute.search(sources + json.dumps(outputs)) and str(experiment.ROOT) not in sources + json.dumps(
            outputs
        ), name
        page = (smoke_outputs / "html" / f"{name}.html").read_text()
        assert 'data-mime-type="application/vnd.jupyter.stderr"' not in page and "vnd.jupyter.widget" not in page, name
        assert not absolute.search(page) and str(experiment.ROOT) not in page, name
        shown = f'OUTPUT_DIR = "{relative}{"/biased" if name == "03_attack_biased" else ""}"'
        assert shown in html.unescape(re.sub(r"<[^>]+>", "", page)), name  # read back by experiment.resolve


def test_index_opens_with_the_headline_that_03_and_06_wrote(smoke_outputs, smoke_params):
    """index.html: a title, the run's line, then 03's test metrics as its first table (the numbers of
    metrics.csv and beats_blind.csv), the verdicts (06's as written), then the notebooks; no script."""
    from bs4 import BeautifulSoup

    index = (smoke_outputs / "html" / "index.html").read_text()
    soup = BeautifulSoup(index, "html.parser")
    assert not soup.find_all("script") and soup.title.get_text() == "mialib run: smoke"
    assert [t.name for t in soup.body.find_all(["h1", "p", "h2", "table"])][:4] == ["h1", "p", "h2", "table"]
    assert (
        f"{smoke_params['N_MEMBERS']} members and {smoke_params['N_NONMEMBERS']} non-members"
        in soup.find("p", class_="run").get_text()
    )
    table = soup.find("table")
    assert "headline" in table["class"] and index.index("<table") < index.index('href="01_data_split.html"')
    header = [th.get_text() for th in table.find("thead").find_all("th")]
    assert header == [
        "attack",
        "setting",
        "AUC [95% CI]",
        "TPR@1%FPR [95% CI]",
        "test FPR at the calibration's 1% threshold",
        "U-Net evals / image",
        "beats blind baselines",
    ]
    rows = [[td.get_text() for td in tr.find_all("td")] for tr in table.find("tbody").find_all("tr")]
    metrics = pd.read_csv(smoke_outputs / "metrics.csv")
    beats = pd.read_csv(smoke_outputs / "tables" / "beats_blind.csv").set_index("run")["beats blind baselines"]
    assert [r[0] for r in rows] == list(metrics["display"])
    numbers = re.compile(r"-?\d+(?:\.\d+)?")
    for row, metric in zip(rows, metrics.itertuples()):
        assert row[1] == metric.setting
        assert [float(x) for x in numbers.findall(row[2])] == pytest.approx(
            [metric.auc, metric.auc_low, metric.auc_high], abs=5e-4
        )
        assert [float(x) for x in numbers.findall(row[3])] == pytest.approx(
            [metric.tpr_at_1fpr, metric.tpr_at_1fpr_low, metric.tpr_at_1fpr_high], abs=5e-4
        )
        assert float(row[4]) == pytest.approx(metric.transfer_fpr_at_1fpr, abs=5e-4) and float(row[5]) == pytest.approx(
            metric.unet_evals, abs=0.05
        )
        assert row[6] == ({True: "yes", False: "no"}[bool(beats[metric.run])] if metric.run in beats.index else "")
    verdicts = soup.find("ul", class_="verdicts").get_text(" ")
    assert "Best blind baseline (model-free) test AUC: " in verdicts
    for verdict in pd.read_csv(smoke_outputs / "tables" / "audit_examples.csv")["verdict"]:
        assert verdict in verdicts
    assert index.index('class="verdicts"') < index.index('href="01_data_split.html"')


def test_06_features_are_the_registry_scores_of_03(smoke_outputs, smoke_params):
    """The audit's features are the attacks' per-image scores at their fixed settings: structural and pixel
    are 03's paper runs, image for image."""
    features = pd.read_parquet(smoke_outputs / "audit_features.parquet").set_index("id")
    assert list(features.columns) == ["label", *smoke_params["AUDIT_ATTACKS"]]
    scores = pd.read_parquet(smoke_outputs / "scores.parquet")
    for feature, run in (
        ("structural", "structural_paper"),
        ("pixel", "pixel_paper"),
        ("secmi", "secmi"),
        ("clid", "clid"),
    ):
        paper = scores[scores["run"] == run].set_index("id")
        np.testing.assert_array_equal(features.loc[paper.index, feature].to_numpy(), paper["score"].to_numpy())
        np.testing.assert_array_equal(features.loc[paper.index, "label"].to_numpy(), paper["label"].to_numpy())


def test_06_null_rate_power_and_images_needed_are_what_the_audit_gives(smoke_outputs, smoke_params):
    from mialib import audit

    features = pd.read_parquet(smoke_outputs / "audit_features.parquet")
    members, nonmembers = (features[features["label"] == k].reset_index(drop=True) for k in (1, 0))
    runs = list(smoke_params["AUDIT_ATTACKS"])
    seed = smoke_params["SEED"]
    null = pd.read_csv(smoke_outputs / "tables" / "audit_null.csv")
    combined = null[null["feature_set"] == "combined"]
    sizes = [n for n in smoke_params["AUDIT_SIZES"] if 2 * n <= len(nonmembers)]
    assert list(combined["size"]) == sizes and set(combined["n_sets"]) == {smoke_params["AUDIT_NULL_SETS"]}
    again = audit.null_rate(nonmembers, runs, sizes, smoke_params["AUDIT_NULL_SETS"], 0.05, seed)
    np.testing.assert_allclose(
        combined[["fpr_t", "fpr_permutation"]].to_numpy(),
        again[["fpr_t", "fpr_permutation"]].to_numpy(),
        rtol=0,
        atol=0,
    )
    # validity: at level 0.05 no feature set rejects more often than 0.05 + 3 Monte Carlo standard errors
    assert (null["fpr_t"] <= 0.05 + 3 * null["mc_se"]).all() and (
        null["fpr_permutation"] <= 0.05 + 3 * null["mc_se"]
    ).all()
    power = pd.read_csv(smoke_outputs / "tables" / "audit_power.csv")
    level = smoke_params["AUDIT_LEVEL"]
    pure = audit.power(
        members,
        nonmembers,
        {"combined": runs},
        smoke_params["AUDIT_SIZES"],
        (1.0,),
        smoke_params["AUDIT_POWER_SETS"],
        level,
        seed,
    )
    written = power[(power["feature_set"] == "combined") & (power["member_fraction"] == 1.0)]
    np.testing.assert_allclose(
        written["power_t"].to_numpy(), pure["power_t"].to_numpy(), rtol=0, atol=0, equal_nan=True
    )
    assert set(power["member_fraction"]) == set(smoke_params["AUDIT_FRACTIONS"])
    # the smoke target memorises its 24 members: the combination detects a members-only set of 10 nearly always
    assert written.set_index("size").loc[10, "power_t"] >= 0.8
    needed = pd.read_csv(smoke_outputs / "tables" / "audit_images_needed.csv")
    expected = audit.images_for_power(power, 0.8)
    pd.testing.assert_frame_equal(needed.drop(columns="note"), expected.drop(columns="note"), check_dtype=False)
    assert list(needed["note"].fillna("")) == list(expected["note"].fillna(""))  # an empty note reads back as NaN
    examples = pd.read_csv(smoke_outputs / "tables" / "audit_examples.csv")
    detected = examples[examples["audit"].str.contains("members vs")].iloc[0]
    result = audit.set_audit(members.drop(columns="label"), nonmembers.drop(columns="label"), level=level, seed=seed)
    assert (
        detected["p_value_t"] == pytest.approx(result.p_value_t, rel=1e-12)
        and bool(detected["detected"]) == result.detected
    )


def test_03_biased_split_inflation(smoke_outputs):
    fair = pd.read_csv(smoke_outputs / "metrics.csv").set_index("run")
    inflation = pd.read_csv(smoke_outputs / "biased" / "tables" / "bias_inflation.csv").set_index("run")
    np.testing.assert_allclose(inflation["auc_fair"], fair.loc[inflation.index, "auc"], atol=1e-12)
    np.testing.assert_allclose(inflation["auc_inflation"], inflation["auc_biased"] - inflation["auc_fair"], atol=1e-12)
    # only non-member pixels changed: members' values are identical in both runs, and so are their scores
    # except where a difficulty calibration is fitted on the (changed) calibration non-members
    fair_scores = pd.read_parquet(smoke_outputs / "scores.parquet")
    biased_scores = pd.read_parquet(smoke_outputs / "biased" / "scores.parquet").set_index(["run", "id"])
    model_runs = [run for run in fair.index if not run.startswith("blind")]
    members = fair_scores[(fair_scores["label"] == 1) & fair_scores["run"].isin(model_runs)].set_index(["run", "id"])
    np.testing.assert_array_equal(members["raw_value"], biased_scores.loc[members.index, "raw_value"])
    fixed = members[members["calibrate"] == "none"]
    assert len(fixed) and (members["calibrate"] == "difficulty").any()
    np.testing.assert_array_equal(fixed["score"], biased_scores.loc[fixed.index, "score"])
    # the biased run replays the fair calibration's settings and directions for every model attack and control
    fair_chosen = json.loads((smoke_outputs / "chosen_settings.json").read_text())
    biased_chosen = json.loads((smoke_outputs / "biased" / "chosen_settings.json").read_text())
    for run in model_runs:
        assert {k: biased_chosen[run][k] for k in ("attack", "params", "direction")} == {
            k: fair_chosen[run][k] for k in ("attack", "params", "direction")
        }
    # the source shift is visible without the model: the image-only blind classifier catches it
    assert inflation.loc["blind_image", "auc_biased"] > 0.9


def test_03_loss_attack_sees_memorisation(smoke_outputs):
    """The smoke target memorises its 24 members: the loss attack separates them well above chance."""
    table = pd.read_csv(smoke_outputs / "metrics.csv").set_index("run")
    assert table.loc["loss", "auc"] > 0.75


def test_03_structural_score_equals_hand_computation(smoke_outputs, smoke_target_dir, smoke_params):
    """Two images' paper-setting scores: DDIM written out by hand, SSIM by skimage."""
    scores = pd.read_parquet(smoke_outputs / "scores.parquet")
    paper = scores[scores["run"] == "structural_paper"].head(2)
    imageset = experiment.open_data(smoke_params)
    target = load_target(smoke_target_dir)
    abar = target.scheduler.alphas_cumprod.double()
    for image_id, expected in zip(paper["id"], paper["score"]):
        rows = imageset.records[imageset.records["id"] == image_id]
        x = imageset.load(smoke_params["IMAGE_SIZE"], rows)
        with torch.no_grad():
            z = target.vae.encode(x).latent_dist.mean * target.vae.config.scaling_factor
            tokens = target.tokenizer(
                list(rows["caption"]),
                padding="max_length",
                max_length=target.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            cond = target.text_encoder(tokens.input_ids)[0]
            for t_from, t_to in ((0, 50), (50, 100)):
                eps = target.unet(z, torch.tensor([t_from]), encoder_hidden_states=cond).sample
                x0 = (z - (1 - abar[t_from]).sqrt().float() * eps) / abar[t_from].sqrt().float()
                z = abar[t_to].sqrt().float() * x0 + (1 - abar[t_to]).sqrt().float() * eps
            decoded = target.vae.decode(z / target.vae.config.scaling_factor).sample
        reference = structural_similarity(
            x[0].double().numpy(), decoded[0].double().numpy(), data_range=2.0, channel_axis=0
        )
        assert expected == pytest.approx(reference, abs=1e-5)


def test_04_robustness(smoke_outputs, smoke_params):
    result = pd.read_csv(smoke_outputs / "tables" / "robustness.csv")
    fair = pd.read_csv(smoke_outputs / "metrics.csv").set_index("run")
    clean = result[result["distortion"] == "none"].set_index("run")
    # every non-blind run of 03, at its calibrated settings, reproduces 03's test AUC and TPR@1%FPR exactly;
    # the difficulty-calibrated ones are skipped with the reason (their regression lives on calibration)
    requests = {run: parse_request(text, run) for run, text in smoke_params["ATTACKS"].items()}
    expected_runs = [r for r, q in requests.items() if q.spec.kind != "blind" and q.calibrate != "difficulty"]
    assert list(clean.index) == expected_runs
    skipped = pd.read_csv(smoke_outputs / "tables" / "skipped_studies_04_robustness.csv").set_index("study")
    difficulty = [r for r, q in requests.items() if q.calibrate == "difficulty"]
    assert difficulty and set(difficulty) <= set(skipped.index)
    assert skipped.loc[difficulty[0], "reason"].startswith("calibrate=difficulty is fitted on the calibration split")
    np.testing.assert_allclose(clean["auc"], fair.loc[clean.index, "auc"], atol=1e-9)
    np.testing.assert_allclose(clean["tpr_at_1fpr"], fair.loc[clean.index, "tpr_at_1fpr"], atol=1e-9)
    assert list(clean["attack"]) == list(fair.loc[clean.index, "display"])
    expected = {(name, float(s)) for name, strengths in smoke_params["ROBUSTNESS_SWEEP"].items() for s in strengths}
    assert {(d, float(s)) for d, s in zip(result["distortion"], result["strength"]) if d != "none"} == expected
    distorted = result[result["distortion"] != "none"]
    assert distorted["auc"].between(0, 1).all() and len(distorted) == len(expected_runs) * len(expected)
    merged = distorted.merge(clean["auc"].rename("clean_auc").reset_index(), on="run")
    assert (merged["auc"] != merged["clean_auc"]).any()  # distortions change the scores
    layout = pd.read_csv(smoke_outputs / "tables" / "robustness_paper_layout.csv", index_col="attack")
    assert "none" in layout.columns and "salt_pepper" in layout.columns


def _ablation_row(ablations, study, value):
    match = ablations[(ablations["study"] == study) & (ablations["value"].astype(str) == str(value))]
    assert len(match) == 1, (study, value)
    return match.iloc[0]


def test_05_ablations_agree_with_03_and_count_evaluations(smoke_outputs, smoke_params):
    ablations = pd.read_csv(smoke_outputs / "tables" / "ablations.csv")
    fair = pd.read_csv(smoke_outputs / "metrics.csv").set_index("run")
    paper_auc = fair.loc["structural_paper", "auc"]

    def row(study, value):
        return _ablation_row(ablations, study, value)

    for study, value in [
        ("T (+SSIM)", 100),
        ("stride at T=100", 50),
        ("guidance", 1.0),
        ("prompt", "true caption"),
        ("encoding", "posterior mode"),
        ("schedule", "model alphas_cumprod"),
        ("path", "forward only (invert)"),
        ("similarity", "SSIM, data range 2.0"),
    ]:
        assert row(study, value)["auc"] == pytest.approx(paper_auc, abs=1e-9)
    assert row("path", "invert then denoise")["auc"] == pytest.approx(fair.loc["backward", "auc"], abs=1e-9)
    assert row("similarity", "-MSE")["auc"] == pytest.approx(fair.loc["pixel_paper", "auc"], abs=1e-9)
    assert row("similarity", "PSNR")["auc"] == pytest.approx(row("similarity", "-MSE")["auc"], abs=1e-12)
    for stride in smoke_params["ABLATION_STRIDES"]:
        assert row("stride at T=100", stride)["unet_evals"] == 100 // stride
    for guidance in smoke_params["ABLATION_GUIDANCE"]:
        assert row("guidance", guidance)["unet_evals"] == (2 if guidance in (0.0, 1.0) else 4)
    assert row("prompt", "empty")["auc"] != row("prompt", "true caption")["auc"]
    scores = pd.read_parquet(smoke_outputs / "ablation_scores.parquet")
    assert len(scores) == len(ablations) * (smoke_params["N_MEMBERS"] // 2 + smoke_params["N_NONMEMBERS"] // 2)
    for (study, value), group in scores.groupby(["study", "value"]):
        assert row(study, value)["auc"] == pytest.approx(roc_auc_score(group["label"], group["score"]), abs=1e-12)

    def image_scores(study, value):
        return scores[(scores["study"] == study) & (scores["value"] == value)].set_index("id")["score"]

    unrelated = image_scores("prompt", "unrelated caption")
    assert not np.allclose(unrelated, image_scores("prompt", "true caption").loc[unrelated.index])
    for study, value in [("T (+MS-SSIM)", "MS-SSIM"), ("T (-MSE)", "-MSE"), ("T (-latent MSE)", "-latent MSE")]:
        assert row(study, 100)["auc"] == pytest.approx(row("similarity", value)["auc"], abs=1e-12)
    assert row("T (-latent MSE)", 0)["auc"] == pytest.approx(0.5, abs=1e-12)  # t = 0: zero distance for every image
    size = smoke_params["IMAGE_SIZE"]
    assert row("resolution (paper setting)", size)["auc"] == pytest.approx(paper_auc, abs=1e-9)
    chosen = json.loads((smoke_outputs / "chosen_settings.json").read_text())["structural_calibrated"]
    sign = "+" if chosen["direction"] > 0 else "-"
    calibrated = row(f"resolution (calibrated t={chosen['params']['t']}, {sign}SSIM)", size)
    assert calibrated["auc"] == pytest.approx(fair.loc["structural_calibrated", "auc"], abs=1e-9)


def test_05_training_dynamics_end_at_the_final_model(smoke_outputs, smoke_params):
    dynamics = pd.read_csv(smoke_outputs / "tables" / "training_dynamics.csv")
    assert sorted(dynamics["step"].unique()) == sorted(smoke_params["CHECKPOINTS"])
    final = dynamics[dynamics["step"] == smoke_params["UNET_STEPS"]].set_index("run")
    clean = pd.read_csv(smoke_outputs / "tables" / "robustness.csv").query("distortion == 'none'").set_index("run")
    np.testing.assert_allclose(final["auc"], clean.loc[final.index, "auc"], atol=1e-9)
    vae = dynamics[dynamics["run"] == "vae_control"]["auc"]
    assert vae.max() - vae.min() < 1e-12  # the model-free control cannot change with U-Net training


# --------------------------------------------------------------------------------------------------
# The same notebooks on a user's imagefolder
# --------------------------------------------------------------------------------------------------
def test_imagefolder_notebooks_ran_and_the_biased_split_was_skipped(imagefolder_outputs):
    runs = json.loads((imagefolder_outputs / "notebook_runs.json").read_text())
    assert runs["03_attack_biased"]["status"] == "skipped" and "emoji" in runs["03_attack_biased"]["reason"]
    assert {n: r["status"] for n, r in runs.items() if n != "03_attack_biased"} == {
        n: "ok" for n in IMAGEFOLDER_NOTEBOOKS if n != "03_attack_biased"
    }
    for name, run in runs.items():
        if run["status"] == "ok":
            assert not _errors(imagefolder_outputs / "notebooks" / f"{name}.ipynb")
    for figure in (
        "examples",
        "closest_cross_split_pairs",
        "roc",
        "robustness_sweep",
        "robustness_examples",
        "ablation_t_and_stride",
        "training_dynamics",
    ):
        assert (imagefolder_outputs / "figures" / f"{figure}.png").stat().st_size > 1000
    skipped = pd.read_csv(imagefolder_outputs / "tables" / "skipped_studies_01_data_split.csv")
    assert list(skipped["study"]) == ["public split"]


def test_imagefolder_records_are_the_users_files(imagefolder_outputs, user_imagefolder, smoke_params):
    records = pd.read_csv(imagefolder_outputs / "tables" / "image_set.csv", dtype={"id": str})
    assert len(records) == smoke_params["N_MEMBERS"] + smoke_params["N_NONMEMBERS"]
    for record in records.itertuples():
        assert record.sha256 == hashlib.sha256((user_imagefolder / record.source).read_bytes()).hexdigest()
        assert record.source.startswith("members/" if record.label == 1 else "nonmembers/")
    summary = json.loads((imagefolder_outputs / "data_split.json").read_text())
    assert "shared_sha256s" in summary and summary["shared_sha256s"] == 0
    assert {r["split"] for r in summary["counts"]} == {"member", "nonmember"}  # no public split in a user's set


def test_imagefolder_scores_equal_the_embedded_runs_image_for_image(imagefolder_outputs, smoke_outputs):
    """The same pixels, captions, ids and subsets through another adapter, in another order: every model
    attack gives the same score per image (to float32 batching noise) and the same choices."""
    emoji = pd.read_parquet(smoke_outputs / "scores.parquet").set_index(["run", "id"])
    user = pd.read_parquet(imagefolder_outputs / "scores.parquet").set_index(["run", "id"])
    assert sorted(user.index) == sorted(emoji.index)
    model_runs = [r for r in user.index.get_level_values("run").unique() if not r.startswith("blind")]
    for run in model_runs:
        np.testing.assert_allclose(
            user.loc[run, "score"].sort_index(), emoji.loc[run, "score"].sort_index(), rtol=0, atol=2e-5, err_msg=run
        )
    assert json.loads((imagefolder_outputs / "chosen_settings.json").read_text()) == json.loads(
        (smoke_outputs / "chosen_settings.json").read_text()
    )
    table = pd.read_csv(imagefolder_outputs / "metrics.csv").set_index("run")
    fair = pd.read_csv(smoke_outputs / "metrics.csv").set_index("run")
    np.testing.assert_allclose(table.loc[model_runs, "auc"], fair.loc[model_runs, "auc"], atol=0.02)
    # 04 and 05 ran on the imagefolder too and their clean rows reproduce its own 03
    clean = (
        pd.read_csv(imagefolder_outputs / "tables" / "robustness.csv").query("distortion == 'none'").set_index("run")
    )
    np.testing.assert_allclose(clean["auc"], table.loc[clean.index, "auc"], atol=1e-9)
    ablations = pd.read_csv(imagefolder_outputs / "tables" / "ablations.csv")
    assert _ablation_row(ablations, "T (+SSIM)", 100)["auc"] == pytest.approx(
        table.loc["structural_paper", "auc"], abs=1e-9
    )
