"""Execute every notebook at smoke size (papermill) and check the numbers it wrote against references."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import structural_similarity
from sklearn.metrics import roc_auc_score, roc_curve

from mialib import data, experiment
from mialib.attacks.base import image_seed
from mialib.target import load_target


def test_all_notebooks_executed(smoke_outputs):
    for name in experiment.NOTEBOOKS:
        executed = smoke_outputs / "notebooks" / f"{name}.ipynb"
        assert executed.exists()
        cells = json.loads(executed.read_text())["cells"]
        errors = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors
    for figure in ("examples", "closest_cross_split_pairs", "memorisation_samples", "observation_ssim_vs_t", "trajectory_grid", "roc", "../biased/figures/roc", "robustness_sweep", "robustness_examples", "ablation_t_and_stride", "training_dynamics"):
        for suffix in ("png", "pdf"):
            assert (smoke_outputs / "figures" / f"{figure}.{suffix}").stat().st_size > 1000
    for table in ("comparison.csv", "comparison.tex", "beats_blind.csv"):
        assert (smoke_outputs / "tables" / table).stat().st_size > 100


def test_01_split_counts_and_no_leak(smoke_outputs, smoke_params):
    summary = json.loads((smoke_outputs / "data_split.json").read_text())
    assert summary["shared_ids"] == summary["shared_groups"] == summary["shared_sha256s"] == 0
    assert summary["near_duplicate_pairs"] == 0
    assert summary["closest_pair_ssim"] < data.NEAR_DUPLICATE_SSIM
    counts = {(r["split"], r["subset"]): r["images"] for r in summary["counts"]}
    half = smoke_params["N_MEMBERS"] // 2
    assert counts == {
        ("public", ""): smoke_params["N_PUBLIC"],
        ("member", "calibration"): smoke_params["N_MEMBERS"] - half,
        ("member", "test"): half,
        ("nonmember", "calibration"): smoke_params["N_NONMEMBERS"] - smoke_params["N_NONMEMBERS"] // 2,
        ("nonmember", "test"): smoke_params["N_NONMEMBERS"] // 2,
    }


def test_02_observation_curve(smoke_outputs, smoke_params):
    observation = pd.read_csv(smoke_outputs / "tables" / "observation.csv", index_col="t")
    assert list(observation.index) == list(range(0, smoke_params["CURVE_T_MAX"] + 1, smoke_params["CURVE_STRIDE"]))
    np.testing.assert_allclose(observation["difference"], observation["member"] - observation["nonmember"], atol=1e-12)
    assert observation[["member", "nonmember"]].abs().le(1).all().all()
    # SSIM falls as the inversion goes deeper, for both groups.
    assert (observation["member"].iloc[-1] < observation["member"].iloc[0]) and (observation["nonmember"].iloc[-1] < observation["nonmember"].iloc[0])
    # The t = 0 value is the VAE round trip, which 03 also reports as its own control.
    scores = pd.read_parquet(smoke_outputs / "scores.parquet")
    vae = scores[scores["attack"] == "VAE-only control"]
    np.testing.assert_allclose(observation.loc[0, "member"], vae[vae["label"] == 1]["score"].mean(), atol=1e-9)
    memorisation = pd.read_csv(smoke_outputs / "tables" / "memorisation.csv", index_col="split")
    assert set(memorisation.index) == {"member", "nonmember"}


ATTACKS = {
    # attack: U-Net evaluations per image at the smoke preset's settings (None: no U-Net)
    "structural (paper)": 2,
    "pixel MSE (paper setting)": 2,
    "structural (calibrated)": None,  # depends on the calibrated t
    "pixel MSE (calibrated)": None,
    "backward reconstruction": 4,
    "loss": 1,
    "SecMI": 12,
    "PIA": 2,
    "CLiD": 3,
    "VAE-only control": 0,
    "blind image-only": 0,
    "blind caption-only": 0,
}


@pytest.mark.parametrize("run", ["", "biased"])
def test_03_metrics_match_sklearn(smoke_outputs, run):
    folder = smoke_outputs / run
    scores = pd.read_parquet(folder / "scores.parquet")
    table = pd.read_csv(folder / "metrics.csv")
    assert set(table["attack"]) == set(ATTACKS)
    assert not scores["score"].isna().any()
    for row in table.itertuples():
        rows = scores[(scores["attack"] == row.attack) & (scores["setting"] == row.setting)]
        test = rows[rows["subset"] == "test"]
        assert row.auc == pytest.approx(roc_auc_score(test["label"], test["score"]), abs=1e-12)
        fpr, tpr, _ = roc_curve(test["label"], test["score"], drop_intermediate=False)
        assert row.tpr_at_1fpr == pytest.approx(tpr[fpr <= 0.01].max(), abs=1e-12)
        assert row.n_test_members == (test["label"] == 1).sum()
        # Bootstrap intervals hold the point estimate.
        for metric in ("auc", "balanced_accuracy", "tpr_at_1fpr"):
            assert getattr(row, f"{metric}_low") <= getattr(row, metric) <= getattr(row, f"{metric}_high")
        expected = ATTACKS[row.attack]
        if expected is not None:
            assert row.unet_evals == expected
        else:
            t = int(row.setting.split(",")[0].removeprefix("t="))
            assert row.unet_evals == t // 50  # stride 50 on the calibration path
    verdict = pd.read_csv(folder / "tables" / "beats_blind.csv")
    bar = table[table["attack"].str.startswith("blind")]["auc"].max()
    assert (verdict["beats blind baselines"] == (verdict["auc_low"] > bar)).all()


def test_03_biased_split_inflation(smoke_outputs):
    fair = pd.read_csv(smoke_outputs / "metrics.csv").set_index("attack")
    inflation = pd.read_csv(smoke_outputs / "biased" / "tables" / "bias_inflation.csv").set_index("attack")
    np.testing.assert_allclose(inflation["auc_fair"], fair.loc[inflation.index, "auc"], atol=1e-12)
    np.testing.assert_allclose(inflation["auc_inflation"], inflation["auc_biased"] - inflation["auc_fair"], atol=1e-12)
    # Only non-member pixels changed: members' scores are identical in both runs.
    fair_scores = pd.read_parquet(smoke_outputs / "scores.parquet")
    biased_scores = pd.read_parquet(smoke_outputs / "biased" / "scores.parquet")
    key = ["attack", "id"]
    members = fair_scores[(fair_scores["label"] == 1) & (fair_scores["attack"] == "VAE-only control")].set_index(key)["score"]
    np.testing.assert_allclose(members, biased_scores.set_index(key).loc[members.index, "score"], atol=1e-12)
    # The source shift is visible without the model: the image-only blind classifier catches it.
    assert inflation.loc["blind image-only", "auc_biased"] > 0.9


def test_03_loss_attack_sees_memorisation(smoke_outputs):
    """The smoke target memorises its 24 members: the loss attack separates them well above chance."""
    table = pd.read_csv(smoke_outputs / "metrics.csv").set_index("attack")
    assert table.loc["loss", "auc"] > 0.75


def test_03_structural_score_equals_hand_computation(smoke_outputs, smoke_target_dir, smoke_params):
    """Two images' paper-setting scores: DDIM written out by hand, SSIM by skimage."""
    scores = pd.read_parquet(smoke_outputs / "scores.parquet")
    paper = scores[scores["attack"] == "structural (paper)"].head(2)
    images = experiment.prepare_data(**experiment.data_args(smoke_params)).set_index("id")
    target = load_target(smoke_target_dir)
    abar = target.scheduler.alphas_cumprod.double()
    for image_id, expected in zip(paper["id"], paper["score"]):
        x, _ = data.load_images(images.loc[[image_id]].reset_index(), smoke_params["IMAGE_SIZE"])
        with torch.no_grad():
            z = target.vae.encode(x).latent_dist.mean * target.vae.config.scaling_factor
            tokens = target.tokenizer([images.loc[image_id, "caption"]], padding="max_length", max_length=target.tokenizer.model_max_length, truncation=True, return_tensors="pt")
            cond = target.text_encoder(tokens.input_ids)[0]
            for t_from, t_to in ((0, 50), (50, 100)):
                eps = target.unet(z, torch.tensor([t_from]), encoder_hidden_states=cond).sample
                x0 = (z - (1 - abar[t_from]).sqrt().float() * eps) / abar[t_from].sqrt().float()
                z = abar[t_to].sqrt().float() * x0 + (1 - abar[t_to]).sqrt().float() * eps
            decoded = target.vae.decode(z / target.vae.config.scaling_factor).sample
        reference = structural_similarity(x[0].double().numpy(), decoded[0].double().numpy(), data_range=2.0, channel_axis=0)
        assert expected == pytest.approx(reference, abs=1e-5)
    assert image_seed("a") == image_seed("a") != image_seed("b")


def test_04_robustness(smoke_outputs, smoke_params):
    result = pd.read_csv(smoke_outputs / "tables" / "robustness.csv")
    fair = pd.read_csv(smoke_outputs / "metrics.csv").set_index("attack")
    clean = result[result["distortion"] == "none"].set_index("attack")
    # Undistorted, every attack at its calibrated settings reproduces 03's test AUC and TPR@1%FPR exactly.
    assert len(clean) == 9
    np.testing.assert_allclose(clean["auc"], fair.loc[clean.index, "auc"], atol=1e-9)
    np.testing.assert_allclose(clean["tpr_at_1fpr"], fair.loc[clean.index, "tpr_at_1fpr"], atol=1e-9)
    expected = {(name, float(s)) for name, strengths in smoke_params["ROBUSTNESS_SWEEP"].items() for s in strengths}
    assert {(d, float(s)) for d, s in zip(result["distortion"], result["strength"]) if d != "none"} == expected
    distorted = result[result["distortion"] != "none"]
    assert distorted["auc"].between(0, 1).all() and len(distorted) == 9 * len(expected)
    # Distortions change the scores: not every AUC stays what it was on clean images.
    merged = distorted.merge(clean["auc"].rename("clean_auc").reset_index(), on="attack")
    assert (merged["auc"] != merged["clean_auc"]).any()
    layout = pd.read_csv(smoke_outputs / "tables" / "robustness_paper_layout.csv", index_col="attack")
    assert "none" in layout.columns and "salt_pepper" in layout.columns


def test_05_ablations_agree_with_03_and_count_evaluations(smoke_outputs, smoke_params):
    ablations = pd.read_csv(smoke_outputs / "tables" / "ablations.csv")
    fair = pd.read_csv(smoke_outputs / "metrics.csv").set_index("attack")
    paper_auc = fair.loc["structural (paper)", "auc"]

    def row(study, value):
        match = ablations[(ablations["study"] == study) & (ablations["value"].astype(str) == str(value))]
        assert len(match) == 1, (study, value)
        return match.iloc[0]

    # Every study passes through the paper setting once; all must reproduce 03's test AUC.
    for study, value in [("T (+SSIM)", 100), ("stride at T=100", 50), ("guidance", 1.0), ("prompt", "true caption"),
                         ("encoding", "posterior mode"), ("schedule", "model alphas_cumprod"), ("path", "forward only (invert)"),
                         ("similarity", "SSIM, data range 2.0")]:
        assert row(study, value)["auc"] == pytest.approx(paper_auc, abs=1e-9)
    assert row("path", "invert then denoise")["auc"] == pytest.approx(fair.loc["backward reconstruction", "auc"], abs=1e-9)
    assert row("similarity", "-MSE")["auc"] == pytest.approx(fair.loc["pixel MSE (paper setting)", "auc"], abs=1e-9)
    # MSE and PSNR rank images identically.
    assert row("similarity", "PSNR")["auc"] == pytest.approx(row("similarity", "-MSE")["auc"], abs=1e-12)
    for stride in smoke_params["ABLATION_STRIDES"]:
        assert row("stride at T=100", stride)["unet_evals"] == 100 // stride
    for guidance in smoke_params["ABLATION_GUIDANCE"]:
        assert row("guidance", guidance)["unet_evals"] == (2 if guidance in (0.0, 1.0) else 4)
    assert row("prompt", "empty")["auc"] != row("prompt", "true caption")["auc"]
    # Every row's AUC is sklearn's on the per-image scores the notebook wrote beside the table.
    scores = pd.read_parquet(smoke_outputs / "ablation_scores.parquet")
    assert len(scores) == len(ablations) * (smoke_params["N_MEMBERS"] // 2 + smoke_params["N_NONMEMBERS"] // 2)
    for (study, value), group in scores.groupby(["study", "value"]):
        assert row(study, value)["auc"] == pytest.approx(roc_auc_score(group["label"], group["score"]), abs=1e-12)
    # Another image's caption is a different computation, not the true caption's cached scores.
    def image_scores(study, value):
        return scores[(scores["study"] == study) & (scores["value"] == value)].set_index("id")["score"]
    assert not np.allclose(image_scores("prompt", "unrelated caption"), image_scores("prompt", "true caption").loc[image_scores("prompt", "unrelated caption").index])
    # The similarity rows at T = 100 are the T sweep's rows at 100, read off the same cached path.
    for study, value in [("T (+MS-SSIM)", "MS-SSIM"), ("T (-MSE)", "-MSE"), ("T (-latent MSE)", "-latent MSE")]:
        assert row(study, smoke_params["PAPER_T"])["auc"] == pytest.approx(row("similarity", value)["auc"], abs=1e-12)
    # At t = 0 the latent is the clean one: zero latent distance for every image, so chance AUC.
    assert row("T (-latent MSE)", 0)["auc"] == pytest.approx(0.5, abs=1e-12)
    # At the training resolution the resolution study reproduces 03's paper and calibrated rows.
    size = smoke_params["IMAGE_SIZE"]
    assert row("resolution (paper setting)", size)["auc"] == pytest.approx(paper_auc, abs=1e-9)
    chosen = json.loads((smoke_outputs / "chosen_settings.json").read_text())
    sign = "+" if chosen["structural_direction"] > 0 else "-"
    calibrated = row(f"resolution (calibrated t={chosen['structural_t']}, {sign}SSIM)", size)
    assert calibrated["auc"] == pytest.approx(fair.loc["structural (calibrated)", "auc"], abs=1e-9)
    for other in smoke_params["ABLATION_RESOLUTIONS"]:
        assert 0 <= row("resolution (paper setting)", other)["auc"] <= 1


def test_05_training_dynamics_end_at_the_final_model(smoke_outputs, smoke_params):
    dynamics = pd.read_csv(smoke_outputs / "tables" / "training_dynamics.csv")
    assert sorted(dynamics["step"].unique()) == sorted(smoke_params["CHECKPOINTS"])
    # The last checkpoint is the saved model: its AUCs equal 04's clean-image AUCs exactly.
    final = dynamics[dynamics["step"] == smoke_params["UNET_STEPS"]].set_index("attack")
    clean = pd.read_csv(smoke_outputs / "tables" / "robustness.csv").query("distortion == 'none'").set_index("attack")
    np.testing.assert_allclose(final["auc"], clean.loc[final.index, "auc"], atol=1e-9)
    # The model-free VAE control cannot change with U-Net training.
    vae = dynamics[dynamics["attack"] == "VAE-only control"]["auc"]
    assert vae.max() - vae.min() < 1e-12
