"""Figures for notebooks and papers; every figure is saved as PNG and PDF."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from sklearn.metrics import roc_curve

from .audit import COMBINED

warnings.filterwarnings("ignore", category=DeprecationWarning, module="seaborn")
GROUP_LABELS = {1: "member", 0: "non-member"}


def save(fig: matplotlib.figure.Figure, folder: str | Path, name: str) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def to_display(image: torch.Tensor) -> np.ndarray:
    """(3, h, w) in [-1, 1] -> (h, w, 3) in [0, 1] for imshow (clipped for display only)."""
    return ((image.detach().cpu().float().permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()


def image_grid(rows: list[list[torch.Tensor]], row_labels: list[str], col_labels: list[str], size: float = 1.3):
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(size * len(rows[0]), size * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = axes[r][c]
            ax.imshow(to_display(image))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
            if r == 0 or len(col_labels) == len(rows) * len(row):
                label = col_labels[c] if len(col_labels) == len(row) else col_labels[r * len(row) + c]
                ax.set_title(label, fontsize=7)
    fig.tight_layout()
    return fig


def observation(curve: pd.DataFrame, images: pd.DataFrame):
    """Mean SSIM(x0, decoded x_t) versus t per group with 95 % bootstrap bands, the member minus
    non-member difference, and the decrease rate v(t) = (SSIM_{t+dt} - SSIM_t) / dt."""
    data = curve.merge(images[["id", "label"]], on="id")
    data["group"] = data["label"].map(GROUP_LABELS)
    recon = "ssim_recon" in data
    fig, axes = plt.subplots(1, 4 if recon else 3, figsize=(17 if recon else 13, 3.6))
    sns.lineplot(data=data, x="t", y="ssim", hue="group", errorbar=("ci", 95), n_boot=500, seed=0, ax=axes[0])
    axes[0].set(title="SSIM(x0, decoded x_t)", xlabel="inversion timestep t", ylabel="SSIM")
    means = data.groupby(["t", "label"])["ssim"].mean().unstack("label")
    difference = means[1] - means[0]
    axes[1].plot(difference.index, difference.values, marker="o", label="against x0 (the paper's)")
    table = pd.DataFrame({"member": means[1], "nonmember": means[0], "difference": difference})
    if recon:
        sns.lineplot(data=data, x="t", y="ssim_recon", hue="group", errorbar=("ci", 95), n_boot=500, seed=0, ax=axes[3])
        axes[3].set(title="SSIM(D(E(x0)), decoded x_t)", xlabel="inversion timestep t", ylabel="SSIM")
        against = data.groupby(["t", "label"])["ssim_recon"].mean().unstack("label")
        table["recon_member"], table["recon_nonmember"] = against[1], against[0]
        table["recon_difference"] = against[1] - against[0]
        axes[1].plot(table.index, table["recon_difference"], marker="s", label="against D(E(x0))")
        axes[1].legend(fontsize=7)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(title="member - non-member", xlabel="t", ylabel="SSIM difference")
    rate = means.diff().div(means.index.to_series().diff(), axis=0).dropna()
    for label, name in GROUP_LABELS.items():
        axes[2].plot(rate.index, rate[label], marker="o", label=name)
    axes[2].set(title="decrease rate v(t)", xlabel="t", ylabel="dSSIM / dt")
    axes[2].legend()
    fig.tight_layout()
    return fig, table


def vae_curve(curve: pd.DataFrame):
    """The autoencoder's mean reconstruction SSIM(x, D(E(x))) of images it never trained on, along its training."""
    fig, ax = plt.subplots(figsize=(4.5, 3))
    sns.lineplot(data=curve, x="step", y="ssim", marker="o", ax=ax)
    ax.set(xlabel="VAE training step", ylabel="SSIM(x, D(E(x))), held out", ylim=(0, 1))
    final = curve.iloc[-1]
    ax.annotate(f"{final['ssim']:.3f}", (final["step"], final["ssim"]), textcoords="offset points", xytext=(-10, -14))
    fig.tight_layout()
    return fig


def roc_curves(scores: pd.DataFrame, subset: str = "test"):
    """ROC of every run on one subset, in linear and log-log axes."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for (attack, setting), group in scores[scores["subset"] == subset].groupby(["display", "setting"], sort=False):
        fpr, tpr, _ = roc_curve(group["label"], group["score"])
        for ax in axes:
            ax.plot(fpr, tpr, label=f"{attack} ({setting})", drawstyle="steps-post")
    for ax, scale in zip(axes, ("linear", "log")):
        ax.plot([1e-4, 1], [1e-4, 1], ls="--", color="grey", lw=0.8)
        ax.set(xscale=scale, yscale=scale, xlabel="false positive rate", ylabel="true positive rate")
    axes[0].set(xlim=(0, 1), ylim=(0, 1), title=f"ROC ({subset} split)")
    n_neg = (scores[scores["subset"] == subset].drop_duplicates("id")["label"] == 0).sum()
    floor = 1.0 / max(n_neg, 1) / 2
    axes[1].set(xlim=(floor, 1), ylim=(floor, 1.05), title="ROC, log-log")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def split_pairs(split, count: int = 6):
    """The closest cross-split pairs of 01's check, side by side with their SSIM."""
    index = {image_id: i for i, image_id in enumerate(split.frame["id"])}
    pairs = split.closest.head(count)
    rows = [[split.tensors[index[a]], split.tensors[index[b]]] for a, b in zip(pairs["id_a"], pairs["id_b"])]
    if not rows:
        fig = plt.figure(figsize=(3, 1))
        fig.text(0.5, 0.5, "no cross-split pairs", ha="center")
        return fig
    titles = [t for a, b in zip(pairs["caption_a"], pairs["caption_b"]) for t in (a[:18], b[:18])]
    return image_grid(rows, [f"SSIM {s:.2f}" for s in pairs["ssim"]], titles)


def split_examples(split, per_split: int = 8):
    """The first images of every split of 01's check, one row per split (short rows padded with white)."""
    parts = [
        (name, split.frame.index[split.frame["split"] == name][:per_split])
        for name in ("public", "member", "nonmember")
    ]
    parts = [(name, index) for name, index in parts if len(index)]
    width = max(len(index) for _, index in parts)
    rows, labels, titles = [], [], []
    for name, index in parts:
        pad = width - len(index)
        rows.append([split.tensors[i] for i in index] + [torch.ones_like(split.tensors[0])] * pad)
        labels.append(name)
        titles += [split.frame["caption"][i][:16] for i in index] + [""] * pad
    return image_grid(rows, labels, titles)


def memorisation_samples(samples, per_class: int = 6):
    """Images (top) and the images generated from their captions (bottom), members first."""
    values = samples.values
    show = list(values.index[values["label"] == 1][:per_class]) + list(values.index[values["label"] == 0][:per_class])
    return image_grid(
        [[samples.originals[i] for i in show], [samples.samples[i] for i in show]],
        ["image", "sample from its caption"],
        [f"{'M' if values['label'][i] else 'N'}: {values['caption'][i][:14]}" for i in show],
    )


def robustness_sweep(result: pd.DataFrame):
    """AUC and TPR@1%FPR of every attack versus the strength of each distortion."""
    sweep = result[result["distortion"] != "none"].melt(
        id_vars=["distortion", "strength", "attack"], value_vars=["auc", "tpr_at_1fpr"], var_name="metric"
    )
    grid = sns.relplot(
        data=sweep,
        x="strength",
        y="value",
        hue="attack",
        col="distortion",
        row="metric",
        kind="line",
        marker="o",
        facet_kws=dict(sharex=False, sharey="row"),
        height=2.2,
        aspect=1.0,
    )
    return grid.figure


def ablations(table: pd.DataFrame, training_size: int, stride: int, paper_t: int):
    """05's summary: AUC versus T per measure, AUC versus stride (cost), AUC versus resolution."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for study in ("T (+SSIM)", "T (+MS-SSIM)", "T (-MSE)", "T (-latent MSE)"):
        part = table[table["study"] == study]
        axes[0].plot(part["value"].astype(int), part["auc"], marker="o", label=study)
    axes[0].axhline(0.5, color="grey", lw=0.8)
    axes[0].set(xlabel="total inversion timestep T", ylabel="test AUC", title=f"AUC versus T (stride {stride})")
    axes[0].legend(fontsize=7)
    part = table[table["study"] == f"stride at T={paper_t}"]
    axes[1].plot(part["unet_evals"], part["auc"], marker="o")
    for _, row in part.iterrows():
        axes[1].annotate(f"stride {row['value']}", (row["unet_evals"], row["auc"]), fontsize=7)
    axes[1].set(xscale="log", xlabel="U-Net evaluations per image", ylabel="test AUC", title=f"stride at T = {paper_t}")
    for study in table["study"][table["study"].str.startswith("resolution")].unique():
        part = table[table["study"] == study]
        axes[2].plot(part["value"].astype(int), part["auc"], marker="o", label=study)
    axes[2].axvline(training_size, color="grey", lw=0.8, ls="--")
    axes[2].set(xlabel="attack resolution (px; dashed: the preset's IMAGE_SIZE)", ylabel="test AUC", title="resolution")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig


def training_dynamics(dynamics: pd.DataFrame):
    """AUC and TPR@1%FPR of every attack at each training checkpoint."""
    long = dynamics.melt(id_vars=["step", "attack"], value_vars=["auc", "tpr_at_1fpr"], var_name="metric")
    grid = sns.relplot(
        data=long,
        x="step",
        y="value",
        hue="attack",
        col="metric",
        kind="line",
        marker="o",
        height=3.2,
        facet_kws=dict(sharey=False),
    )
    return grid.figure


def audit_power(power: pd.DataFrame, level: float):
    """Detection probability against suspect-set size: each feature and the combination (members only),
    and the combination for sets that mix members with non-members."""
    done = power[~power["skipped"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    pure = done[done["member_fraction"] == 1.0]
    sns.lineplot(
        pure, x="size", y="power_t", hue="feature_set", style="feature_set", markers=True, dashes=False, ax=axes[0]
    )
    axes[0].set(
        xscale="log",
        xlabel="suspect images (all members)",
        ylabel=f"P(detect at p < {level:g})",
        title="each attack and combined",
    )
    combined = done[done["feature_set"] == "combined"]
    sns.lineplot(combined, x="size", y="power_t", hue="member_fraction", marker="o", palette="viridis", ax=axes[1])
    axes[1].set(xscale="log", xlabel="suspect images", title="combined, share of members in the suspect set")
    for ax in axes:
        ax.axhline(0.8, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def audit_null(null: pd.DataFrame):
    """False-positive rate on suspect sets without members, with the band of 3 Monte Carlo standard errors
    around the level."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.pointplot(null, x="size", y="fpr_t", hue="feature_set", dodge=0.4, linestyle="none", ax=ax)
    level, se = null["level"].iloc[0], null["mc_se"].iloc[0]
    ax.axhspan(level - 3 * se, level + 3 * se, color="grey", alpha=0.2, label=f"{level:g} ± 3 MC s.e.")
    ax.set(
        xlabel="suspect images (non-members only)", ylabel=f"rejection rate at {level:g}", title="audit under the null"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def audit_scores(held_out, result):
    """The held-out scores the audit's tests compare: suspect against reference images."""
    frame = pd.concat(
        [
            pd.DataFrame(
                {"score": held_out.suspect_scores, "set": f"suspect ({len(held_out.suspect_scores)} held out)"}
            ),
            pd.DataFrame(
                {"score": held_out.reference_scores, "set": f"reference ({len(held_out.reference_scores)} held out)"}
            ),
        ]
    )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    sns.histplot(frame, x="score", hue="set", stat="density", common_norm=False, element="step", ax=ax)
    ax.set(
        xlabel="combined score (logistic regression fitted on the other halves)",
        title=(
            f"Welch p = {result.p_value_t:.2g}, permutation p = {result.p_value_permutation:.2g}, "
            f"g = {result.effect_size:.2f}"
        ),
    )
    fig.tight_layout()
    return fig


def regimes(metrics: pd.DataFrame):
    """Every attack, blind baselines included, in every regime: test AUC and TPR@1%FPR, a bar for the mean
    over the training seeds (error bar: standard deviation) and a dot per seed."""
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * metrics["display"].nunique() + 2), 7), sharex=True)
    for ax, (metric, label) in zip(axes, (("auc", "test AUC"), ("tpr_at_1fpr", "test TPR@1%FPR"))):
        sns.barplot(metrics, x="display", y=metric, hue="regime", errorbar="sd", alpha=0.55, ax=ax)
        sns.stripplot(metrics, x="display", y=metric, hue="regime", dodge=True, size=3.5, legend=False, ax=ax)
        ax.set(xlabel="", ylabel=label)
        if metric == "auc":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7, title="regime (mean ± sd; dots: seeds)", title_fontsize=7)
    axes[1].tick_params(axis="x", rotation=60)
    plt.setp(axes[1].get_xticklabels(), ha="right")
    fig.tight_layout()
    return fig


def regime_audit(power: pd.DataFrame, null: pd.DataFrame, level: float):
    """The set audit in every regime: detection probability of suspect sets of members against their size
    (every attack combined; mean and sd over seeds), and the false-positive rate at 0.05 without members."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    done = power[
        ~power["skipped"].astype(bool) & (power["feature_set"] == COMBINED) & (power["member_fraction"] == 1.0)
    ]
    sns.lineplot(done, x="size", y="power_t", hue="regime", marker="o", errorbar="sd", ax=axes[0])
    axes[0].axhline(0.8, color="grey", lw=0.8, ls="--")
    axes[0].set(
        xscale="log",
        xlabel="suspect images (all members)",
        ylabel=f"P(detect at p < {level:g})",
        title="power, every attack combined",
    )
    combined = null[null["feature_set"] == COMBINED]
    sns.lineplot(combined, x="size", y="fpr_t", hue="regime", marker="o", errorbar="sd", ax=axes[1])
    rate, se = combined["level"].iloc[0], combined["mc_se"].iloc[0]
    axes[1].axhspan(rate - 3 * se, rate + 3 * se, color="grey", alpha=0.2, label=f"{rate:g} ± 3 MC s.e.")
    axes[1].set(
        xscale="log",
        xlabel="suspect images (non-members only)",
        ylabel=f"rejection rate at {rate:g}",
        title="validity, every attack combined",
    )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
