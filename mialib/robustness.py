"""The attack suite at fixed settings, for studies that rerun every attack on changed inputs.

Settings that an attack tunes come from the calibration run of ``03_attack`` (its
``chosen_settings.json``), never from the data being studied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import pandas as pd
import torch

from . import attacks, ddim, runs


@dataclass
class PathScore:
    """An attack read off the shared inversion trajectory: ``direction * measure`` at ``t`` on
    ``path(t, stride)`` (``runs.structural_curves``). The structural and pixel attacks of a suite share
    one inversion per image this way, and reuse the paths that earlier notebooks cached."""

    t: int
    stride: int
    measure: str  # a column of structural_curves: ssim, mse, ms_ssim, latent_mse
    direction: int  # +1: higher measure means member
    settings: dict = field(default_factory=dict)  # guidance, prompt, encode_mode, schedule, data_range, seed

    def scores(self, target, images: pd.DataFrame, tensors: torch.Tensor, cache_dir, batch_size: int) -> pd.DataFrame:
        path = ddim.path(self.t, self.stride)
        curve = runs.structural_curves(target, images, tensors, path, cache_dir, batch_size, at=[self.t], **self.settings)
        at_t = curve[curve["t"] == self.t]
        return at_t[["id", "unet_evals", "seconds_per_image", "peak_memory_mb"]].assign(score=self.direction * at_t[self.measure].to_numpy())


def suite(chosen: dict, paper_t: int, paper_stride: int, curve_stride: int, common: dict) -> dict:
    """Attack name -> callable of the common signature with every setting bound, or a ``PathScore`` for
    the attacks that read the decoded inversion path (structural and pixel MSE).

    ``common`` holds guidance, prompt, encode_mode, schedule, data_range and seed.
    """
    no_range = {k: v for k, v in common.items() if k != "data_range"}
    clid = {k: v for k, v in common.items() if k in ("encode_mode", "seed")}
    vae = {k: v for k, v in common.items() if k in ("encode_mode", "data_range", "seed")}
    return {
        "structural (paper)": PathScore(paper_t, paper_stride, "ssim", 1, common),
        "structural (calibrated)": PathScore(chosen["structural_t"], curve_stride, "ssim", chosen["structural_direction"], common),
        "pixel MSE (paper setting)": PathScore(paper_t, paper_stride, "mse", -1, common),
        "backward reconstruction": partial(attacks.backward_attack, t=paper_t, stride=paper_stride, **common),
        "loss": partial(attacks.loss_attack, t=chosen["loss_t"], **{k: v for k, v in no_range.items() if k != "schedule"}),
        "SecMI": partial(attacks.secmi_attack, t_sec=chosen["secmi_t"], interval=chosen["secmi_interval"], **no_range),
        "PIA": partial(attacks.pia_attack, t=chosen["pia_t"], p=chosen["pia_p"], **no_range),
        "CLiD": partial(attacks.clid_attack, t=chosen["clid_t"], n_noise=chosen["clid_n_noise"], **clid),
        "VAE-only control": partial(attacks.vae_control, **vae),
    }


def score_suite(target, images: pd.DataFrame, tensors: torch.Tensor, attack_suite: dict, cache_dir, batch_size: int = 64, tag: str = "") -> pd.DataFrame:
    """Scores of every attack of a suite on one (possibly distorted) image set: ``id, label, attack, score``
    plus the cost columns. Batches are cached by content, so a distorted set never reuses clean scores."""
    frames = []
    fingerprint = target.fingerprint()
    for name, function in attack_suite.items():
        if isinstance(function, PathScore):  # cached per image by model, settings and pixels: no tag needed
            values = function.scores(target, images, tensors, cache_dir, batch_size)
        else:
            settings = {"bound": repr(function.keywords) if isinstance(function, partial) else "", "tag": tag}
            values = runs.cached_batches(
                f"suite/{name.replace(' ', '_').replace('(', '').replace(')', '')}",
                settings,
                fingerprint,
                images,
                tensors,
                lambda batch, rows, f=function: _as_frame(f(target, batch.to(target.device), list(rows["caption"]), list(rows["id"])), rows),
                cache_dir,
                batch_size,
            )
        frames.append(values.assign(attack=name).merge(images[["id", "label"]], on="id", validate="one_to_one"))
    return pd.concat(frames, ignore_index=True)


def _as_frame(output, rows) -> pd.DataFrame:
    return pd.DataFrame({"id": list(rows["id"]), "score": output.scores, "unet_evals": output.unet_evals})
