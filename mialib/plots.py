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
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    sns.lineplot(data=data, x="t", y="ssim", hue="group", errorbar=("ci", 95), n_boot=500, seed=0, ax=axes[0])
    axes[0].set(title="SSIM(x0, decoded x_t)", xlabel="inversion timestep t", ylabel="SSIM")
    means = data.groupby(["t", "label"])["ssim"].mean().unstack("label")
    difference = means[1] - means[0]
    axes[1].plot(difference.index, difference.values, marker="o")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(title="member - non-member", xlabel="t", ylabel="SSIM difference")
    rate = means.diff().div(means.index.to_series().diff(), axis=0).dropna()
    for label, name in GROUP_LABELS.items():
        axes[2].plot(rate.index, rate[label], marker="o", label=name)
    axes[2].set(title="decrease rate v(t)", xlabel="t", ylabel="dSSIM / dt")
    axes[2].legend()
    fig.tight_layout()
    return fig, pd.DataFrame({"member": means[1], "nonmember": means[0], "difference": difference})


def roc_curves(scores: pd.DataFrame, subset: str = "test"):
    """ROC of every attack on one subset, in linear and log-log axes."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for (attack, setting), group in scores[scores["subset"] == subset].groupby(["attack", "setting"], sort=False):
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
