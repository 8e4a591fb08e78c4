"""The studies behind the notebooks, as library calls: each takes a :class:`~mialib.experiment.Study`,
computes, writes its tables under the study's output folder and returns what the notebook shows.

- :func:`data_split` (01): counts, exact and near-duplicate leakage checks across the split;
- :func:`memorisation`, :func:`observation` (02): samples from captions; SSIM after inversion versus t;
- :func:`compare` (03): every requested attack with calibration -> test transfer, bootstrap intervals,
  the blind-baseline verdict, and the biased split's inflation;
- :func:`robustness` (04): the calibrated attacks on distorted test images;
- :class:`Ablations` (05): one-factor studies of the structural attack, and training dynamics;
- :func:`audit_features`, :func:`audit_null`, :func:`audit_power` (06): the set audit's validity and power;
- :func:`regime_comparison`, :func:`regime_audit` (07): 03 and 06 on every memorisation regime and seed.

Studies whose inputs do not exist for a set (a public split, checkpoints) are skipped with a reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import audit, data, ddim, metrics, runs, scoring, transforms
from .attacks import registry
from .attacks.registry import AttackRequest
from .audit import COMBINED
from .inversion import decoded_trajectory
from .paths import resolve
from .trajectories import TrajectoryCache

FPR = 0.01


def test_metrics(labels, scores) -> dict:
    """Threshold-free test metrics of one score (AUC and TPR at 1 % FPR)."""
    return {"auc": metrics.auc(labels, scores), "tpr_at_1fpr": metrics.tpr_at_fpr(labels, scores, FPR)}


def signed(direction: int, name: str) -> str:
    return f"{'+' if direction > 0 else '-'}{name}"


# --------------------------------------------------------------------------------------------------
# 01 · data split
# --------------------------------------------------------------------------------------------------
@dataclass
class DataSplit:
    counts: pd.DataFrame
    summary: dict
    closest: pd.DataFrame
    frame: pd.DataFrame  # the rows checked (with split), row for row with ``tensors``
    tensors: torch.Tensor


def data_split(study, check_size: int = 32, near_duplicate_ssim: float = data.NEAR_DUPLICATE_SSIM) -> DataSplit:
    """Counts per split and subset, and the leakage checks: shared ids / groups / hashes and the closest
    cross-split pairs at ``check_size`` px. The embedded set includes its public (VAE-only) split; a
    user's set has members and non-members only."""
    records = study.imageset.records.assign(split=lambda d: np.where(d["label"] == 1, "member", "nonmember"))
    if study.is_emoji:
        images = emoji_rows(study)
        public = images[images["split"] == "public"].assign(subset="", label=0)
        frame = pd.concat(
            [public, records.merge(images[["id", "pixel_sha256"]], on="id", how="left")], ignore_index=True
        )
        tensors = torch.cat([data.load_tensors(public["path"], check_size), study.imageset.load(check_size)])
    else:
        study.skip("public split", "a user's image set has no public (VAE-only) split")
        frame, tensors = records, study.imageset.load(check_size)
    counts = frame.groupby(["split", "subset"]).size().rename("images").reset_index()
    summary, closest = data.split_checks(frame, tensors, near_duplicate_ssim)
    summary.update(given=study.imageset.given, skipped=len(study.imageset.skipped), counts=counts.to_dict("records"))
    counts.to_csv(study.tables / "split_counts.csv", index=False)
    (study.out / "data_split.json").write_text(json.dumps(summary, indent=2))
    closest.to_csv(study.tables / "closest_cross_split_pairs.csv", index=False)
    return DataSplit(counts, summary, closest, frame.reset_index(drop=True), tensors)


def emoji_rows(study) -> pd.DataFrame:
    from .experiment import emoji_training_images

    return emoji_training_images(study.params)


def leaks(summary: dict) -> bool:
    shared = sum(v for k, v in summary.items() if k.startswith("shared_"))
    return bool(shared or summary.get("near_duplicate_pairs", 0))


# --------------------------------------------------------------------------------------------------
# 02 · observation
# --------------------------------------------------------------------------------------------------
@dataclass
class Samples:
    values: pd.DataFrame  # id, caption, label, split, sample_ssim
    originals: torch.Tensor  # the images, row for row
    samples: torch.Tensor  # the image generated from each one's caption


def memorisation(study, steps: int, images_per_class: int = 0) -> Samples:
    """Generate one image from each caption (seeded DDIM at the attack size) and compare it with the
    image it captions: SSIM per image, and its summary per split (``tables/memorisation.csv``).
    ``images_per_class`` > 0 samples only the first that many of each class (sampling costs ``steps``
    U-Net evaluations per image)."""
    from .similarity import ssim

    records = study.imageset.records
    if images_per_class > 0:
        records = pd.concat([records[records["label"] == label].head(images_per_class) for label in (1, 0)])
    chosen = study.imageset.select(list(records["id"]))
    settings = study.settings
    latent = study.size // study.target.downscale
    originals, samples = [], []
    for start, (rows, pixels) in enumerate(chosen.batches(study.size, study.batch_size)):
        latents = ddim.sample(
            study.target,
            list(rows["caption"]),
            steps=steps,
            guidance=settings.guidance,
            seed=settings.seed + start * study.batch_size,
            size=latent,
        )
        samples.append(study.target.decode(latents).detach().cpu().float())
        originals.append(pixels)
    originals, samples = torch.cat(originals), torch.cat(samples)
    values = chosen.records[["id", "caption", "label"]].assign(
        split=lambda d: np.where(d["label"] == 1, "member", "nonmember")
    )
    values["sample_ssim"] = ssim(originals, samples, data_range=settings.data_range).numpy()
    values.groupby("split")["sample_ssim"].describe().to_csv(study.tables / "memorisation.csv")
    return Samples(values.reset_index(drop=True), originals, samples)


def vae_curve(study) -> pd.DataFrame | None:
    """The embedded target's autoencoder: mean SSIM(x, D(E(x))) of the attacked images, which it never
    trained on (it trains on the public split), at steps along its training (:func:`mialib.tiny.train_vae`);
    ``tables/vae_held_out_curve.csv``. None, with the reason recorded, for a model without that record (any
    model but the embedded target, or one built before it was kept)."""
    from .experiment import locate_model
    from .tiny import HELD_OUT_CURVE

    path = resolve(locate_model(study.params["MODEL"])) / "training" / "vae" / HELD_OUT_CURVE
    if not path.is_file():
        study.skip(
            "autoencoder curve",
            f"{study.params['MODEL']} has no training/vae/{HELD_OUT_CURVE} (the embedded target records it while "
            "its VAE trains)",
        )
        return None
    curve = pd.DataFrame(json.loads(path.read_text()))
    curve.to_csv(study.tables / "vae_held_out_curve.csv", index=False)
    return curve


def observation(study, t_max: int, stride: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """SSIM (and MSE, latent MSE) between each image and its decoded inverted latent at t = 0, stride,
    ..., t_max, read off one cached inversion path. Returns (per-image curve, per-t AUC of raw SSIM)."""
    request = AttackRequest(
        "structural", {"stride": stride}, {"t": ddim.path(t_max, stride)}, "auto", run="observation"
    )
    curve = runs.grid_values(
        study.target, study.imageset, request, study.settings, study.cache, study.batch_size, study.size
    )
    # the same inverted latents against the autoencoder's own reconstruction D(E(x)) (structural:recon=true):
    # the image's VAE error cancels, the inversion's effect remains (one more decode, no more U-Net)
    against = AttackRequest(
        "structural", {"stride": stride, "recon": True}, {"t": ddim.path(t_max, stride)}, "auto", run="observation"
    )
    recon = runs.grid_values(
        study.target, study.imageset, against, study.settings, study.cache, study.batch_size, study.size
    )
    curve = curve.merge(
        recon[["id", "t", "ssim"]].rename(columns={"ssim": "ssim_recon"}), on=["id", "t"], validate="one_to_one"
    )
    labelled = curve.merge(study.imageset.records[["id", "label"]], on="id")
    per_t = labelled.groupby("t").apply(
        lambda g: pd.Series(
            {
                "raw_auc_all_images": metrics.auc(g["label"], g["ssim"]),
                "raw_auc_recon_all_images": metrics.auc(g["label"], g["ssim_recon"]),
            }
        ),
        include_groups=False,
    )
    return curve, per_t


def observation_text(observation: pd.DataFrame) -> str:
    gap = observation["difference"]
    at = gap.abs().idxmax()
    return (
        f"Largest member - non-member SSIM gap {gap.abs().max():.4f} at t = {at} "
        f"({'members keep MORE structure' if gap[at] > 0 else 'members keep LESS structure'}); "
        f"gap at t = 0 (VAE only): {gap.iloc[0]:.4f}."
    )


def decoded_examples(study, timesteps: list[int], stride: int) -> tuple[list, list]:
    """The input and its decoded inverted latents at ``timesteps`` for the first member and the first
    non-member (rows for :func:`mialib.plots.image_grid`, and their labels)."""

    off_path = [t for t in timesteps if t % stride]
    if off_path:
        raise ValueError(f"GRID_TIMESTEPS {off_path} are not multiples of the stride {stride}")
    rows, labels = [], []
    for label, name in ((1, "member"), (0, "non-member")):
        record = study.imageset.records[study.imageset.records["label"] == label].head(1)
        if record.empty:
            continue
        image = study.imageset.load(study.size, record)[0]
        path = decoded_trajectory(
            study.target,
            image,
            record["caption"].iloc[0],
            record["id"].iloc[0],
            timesteps,
            stride,
            **study.settings.for_function(decoded_trajectory),
            cache=TrajectoryCache(study.cache / "trajectory"),
        )
        rows.append([image] + [path[t].detach().cpu().float() for t in timesteps])
        labels.append(f"{name}: {record['caption'].iloc[0][:16]}")
    TrajectoryCache.flush()
    return rows, labels


# --------------------------------------------------------------------------------------------------
# 03 · comparison
# --------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    scores: pd.DataFrame  # one row per image and run (runs.SCORE_COLUMNS)
    results: dict  # run id -> runs.RequestResult
    table: pd.DataFrame  # test metrics with bootstrap intervals and costs, one row per run
    paper_table: pd.DataFrame  # the same, formatted for a paper
    verdict: pd.DataFrame  # which attacks beat the blind baselines
    skipped: dict = field(default_factory=dict)  # run id -> why it could not run on this set


def compare(study, attacks: dict, n_bootstrap: int = 1000) -> Comparison:
    """Score every requested attack (run id -> request text), choose settings on calibration, report on
    test, and write ``scores.parquet``, ``metrics.csv`` / ``.json``, ``chosen_settings.json`` and tables."""
    requests, skipped = runs.runnable(study.imageset, attacks)
    for run, reason in skipped.items():
        study.skip(run, reason)
    runs.check_requirements(study.imageset, requests.values(), metrics=True)  # before any compute
    run = scoring.score_run(
        study.target,
        study.imageset,
        requests,
        study.settings,
        study.out,
        cache=study.cache,
        batch_size=study.batch_size,
        size=study.size,
        n_bootstrap=n_bootstrap,
        references=study.references,
    )
    scores, results, table = run.scores, run.results, run.metrics
    paper = paper_table(table)
    paper.to_csv(study.tables / "comparison.csv", index=False)
    paper.to_latex(study.tables / "comparison.tex", index=False, escape=True)
    verdict = blind_verdict(table)
    verdict.to_csv(study.tables / "beats_blind.csv", index=False)
    return Comparison(scores, results, table, paper, verdict, skipped)


def caption_controls(study, comparison: Comparison, prompts) -> pd.DataFrame | None:
    """Every model attack of ``comparison`` at the setting (and direction) its calibration chose, scored
    again under each caption control of ``prompts`` (:data:`mialib.settings.PROMPTS`: the empty prompt, a
    neutral prompt, another image's caption): threshold-free test AUC and TPR@1%FPR per run and prompt, beside
    the true caption's. An attack that keeps its AUC without the true caption does not need it; one that
    falls to chance measured the caption's fit. Writes ``tables/caption_controls.csv``."""
    prompts = [p for p in dict.fromkeys(prompts) if p != study.settings.prompt]
    if not prompts:
        return None
    chosen = {run: result.chosen_record() for run, result in comparison.results.items()}
    requests = chosen_requests(chosen, kinds=("model",))
    if not requests:
        study.skip("caption controls", "no attack that runs the model was scored")
        return None
    rows = []
    for prompt in [study.settings.prompt, *prompts]:
        if prompt == study.settings.prompt:
            scores = comparison.scores[comparison.scores["run"].isin(list(requests))]
        else:
            scores, _ = study.score(requests, settings=study.settings.replace(prompt=prompt), progress=False)
        test = scores[scores["subset"] == "test"]
        for run, group in test.groupby("run", sort=False):
            rows.append(
                {"run": run, "display": group["display"].iloc[0], "setting": group["setting"].iloc[0],
                 "prompt": prompt, **test_metrics(group["label"], group["score"])}
            )  # fmt: skip
    table = pd.DataFrame(rows)
    table.to_csv(study.tables / "caption_controls.csv", index=False)
    return table


def paper_table(table: pd.DataFrame) -> pd.DataFrame:
    """AUC, balanced accuracy and TPR at 1 % / 0.1 % FPR as "estimate [low, high]", the FPR that the
    calibration threshold reached on test, and U-Net evaluations per image."""

    def cell(row, metric):
        return f"{row[metric]:.3f} [{row[metric + '_low']:.3f}, {row[metric + '_high']:.3f}]"

    rows = table.to_dict("records")
    return pd.DataFrame(
        {
            "attack": table["display"],
            "setting": table["setting"],
            "AUC": [cell(r, "auc") for r in rows],
            "balanced acc.": [cell(r, "balanced_accuracy") for r in rows],
            "TPR@1%FPR": [cell(r, "tpr_at_1fpr") for r in rows],
            "TPR@0.1%FPR": [cell(r, "tpr_at_01fpr") for r in rows],
            "test FPR at cal. 1% threshold": table["transfer_fpr_at_1fpr"].round(3),
            "U-Net evals / image": table["unet_evals"].round(1),
        }
    )


def blind_verdict(table: pd.DataFrame) -> pd.DataFrame:
    """Every attack that runs the model, and whether its AUC interval lies above the best blind baseline's
    AUC (when no blind baseline ran, nothing can be said: the column is empty)."""
    kinds = table["attack"].map(lambda name: registry.get(name).kind)
    blind = table[kinds == "blind"]
    verdict = table[kinds == "model"][["run", "display", "setting", "auc", "auc_low", "auc_high"]].copy()
    verdict["blind_auc"] = blind["auc"].max() if len(blind) else np.nan
    verdict["beats blind baselines"] = (verdict["auc_low"] > verdict["blind_auc"]) if len(blind) else pd.NA
    return verdict


def verdict_text(comparison: Comparison) -> str:
    verdict = comparison.verdict
    if verdict["blind_auc"].isna().all():
        return "No blind baseline ran on this set, so no attack can be said to beat one."
    winners = list(verdict.loc[verdict["beats blind baselines"] == True, "display"])  # noqa: E712
    losers = list(verdict.loc[verdict["beats blind baselines"] == False, "display"])  # noqa: E712
    return (
        f"Best blind baseline AUC on this split: {verdict['blind_auc'].iloc[0]:.3f}.\n"
        f"Attacks whose AUC 95% interval lies above it: {', '.join(winners) or 'none'}.\n"
        "Attacks that do not clearly beat it (they may measure the split, not membership): "
        f"{', '.join(losers) or 'none'}."
    )


def structural_text(comparison: Comparison) -> str:
    """What the structural runs of this comparison found, in one line each."""
    lines = []
    for row in comparison.table[comparison.table["attack"] == "structural"].itertuples():
        holds = "the paper's direction (+SSIM)" if row.direction > 0 else "the REVERSED direction (-SSIM)"
        lines.append(f"{row.display} ({row.setting}): test AUC {row.auc:.3f}, scored with {holds}.")
    return "\n".join(lines) or "No structural run in this comparison."


def fair_choices(attacks: dict, fair_metrics: str = "") -> dict:
    """The requests of a biased-split run: every model attack and control at the setting (and direction)
    that the fair run's calibration chose (``chosen_settings.json`` beside ``fair_metrics``), so that
    the inflation compares one attack setting on two splits; the blind baselines are refitted on the
    biased calibration split as requested. Without ``fair_metrics``: ``attacks`` unchanged."""
    if not fair_metrics:
        return attacks
    path = resolve(fair_metrics).parent / "chosen_settings.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run 03_attack on the fair split first (FAIR_RESULTS={fair_metrics!r})"
        )
    replayed = chosen_requests(json.loads(path.read_text()))
    requests = {}
    for run, request in attacks.items():
        if run in replayed:
            requests[run] = replayed[run]
        elif (
            request if isinstance(request, AttackRequest) else registry.parse_request(request, run=run)
        ).spec.kind == "blind":
            requests[run] = request
        else:
            raise ValueError(f"{run} is not in the fair run's choices ({path}); run both splits with the same ATTACKS")
    return requests


def inflation(study, comparison: Comparison, fair_metrics) -> pd.DataFrame:
    """Biased-split AUC and TPR minus the fair split's, per run (both runs of 03 on one target);
    written to ``tables/bias_inflation.csv``."""
    fair = pd.read_csv(resolve(fair_metrics))[["run", "display", "auc", "tpr_at_1fpr"]]
    table = fair.merge(comparison.table[["run", "auc", "tpr_at_1fpr"]], on="run", suffixes=("_fair", "_biased"))
    table["auc_inflation"] = table["auc_biased"] - table["auc_fair"]
    table.to_csv(study.tables / "bias_inflation.csv", index=False)
    controls = table[table["run"].map(lambda r: comparison.results[r].request.spec.kind != "model")]
    print(
        "Model-free controls on the biased split (AUC):",
        dict(zip(controls["display"], controls["auc_biased"].round(3))),
    )
    return table


# --------------------------------------------------------------------------------------------------
# 04 · robustness
# --------------------------------------------------------------------------------------------------
def chosen_requests(chosen: dict, kinds=("model", "control"), study=None) -> dict[str, AttackRequest]:
    """Fixed requests that replay what 03's calibration chose (blind baselines excluded by default: they
    would have to be refitted on distorted calibration images). With ``study`` (a replay on the test split
    alone), difficulty-calibrated runs are skipped there with the reason: their regression is fitted on
    the calibration non-members."""
    requests = {}
    for run, record in chosen.items():
        spec = registry.get(record["attack"])
        if spec.kind not in kinds:
            continue
        calibrate = record.get("calibrate", "none")
        if study is not None and calibrate in ("difficulty", "fit"):
            study.skip(
                run,
                f"calibrate={calibrate} is fitted on the calibration split; this study scores test images only",
            )
            continue
        direction = int(record["direction"])
        requests[run] = AttackRequest(
            spec.name,
            dict(record["params"]),
            {},
            direction if spec.flippable else "method",
            run=run,
            label=record["display"],
            calibrate=calibrate,
        )
    return requests


def robustness(study, sweep: dict) -> tuple[pd.DataFrame, dict]:
    """Every calibrated attack on the test split under each distortion and strength (threshold-free
    test AUC and TPR@1%FPR). Returns (one row per condition and attack, an example image per condition)."""
    requests = chosen_requests(study.read_chosen(), study=study)
    test = study.imageset.subset("test")
    first = test.select(list(test.records["id"][:1]))
    rows, examples = [], {}
    conditions = [("none", 0)] + [(name, s) for name, strengths in sweep.items() for s in strengths]
    for name, strength in conditions:
        distorted = (
            test if name == "none" else test.map(transforms.distortion(name, strength, seed=study.settings.seed))
        )
        examples[(name, strength)] = (
            first if name == "none" else first.map(transforms.distortion(name, strength, seed=study.settings.seed))
        ).load(study.size)[0]
        scores, _ = study.score(requests, imageset=distorted, progress=False)
        for run, group in scores.groupby("run", sort=False):
            rows.append(
                {
                    "distortion": name,
                    "strength": strength,
                    "run": run,
                    "attack": group["display"].iloc[0],
                    **test_metrics(group["label"], group["score"]),
                    "unet_evals": group["unet_evals"].mean(),
                }
            )
    result = pd.DataFrame(rows)
    result.to_csv(study.tables / "robustness.csv", index=False)
    return result, examples


def robustness_paper_layout(result: pd.DataFrame) -> pd.DataFrame:
    """The paper's Tables 7-8: AUC / TPR@1%FPR per attack under its four distortions at its strengths."""
    paper = result[result["distortion"].isin(["none", *transforms.PAPER_DISTORTIONS])]
    paper = paper[
        (paper["distortion"] == "none") | (paper["strength"] == paper["distortion"].map(transforms.PAPER_DISTORTIONS))
    ]
    layout = paper.assign(
        cell=lambda d: d["auc"].map("{:.3f}".format) + " / " + d["tpr_at_1fpr"].map("{:.3f}".format)
    ).pivot_table(index="attack", columns="distortion", values="cell", aggfunc="first", sort=False)
    return layout[[c for c in ["none", *transforms.PAPER_DISTORTIONS] if c in layout.columns]]


# --------------------------------------------------------------------------------------------------
# 05 · ablations
# --------------------------------------------------------------------------------------------------
class Ablations:
    """One-factor studies on the test split: each :meth:`add` scores one variation, records its test AUC,
    TPR@1%FPR and cost as one row, and keeps its per-image scores for reanalysis."""

    def __init__(self, study):
        self.study = study
        self.test = study.imageset.subset("test")
        self.rows: list[dict] = []
        self.per_image: list[pd.DataFrame] = []
        self.paper = registry.get("structural").defaults

    def add(
        self,
        study_name: str,
        value,
        request,
        imageset=None,
        settings=None,
        target=None,
        size=None,
        column="score",
        sign=1,
    ) -> dict:
        """Score one variation (a request text or object, at fixed settings) and record it."""
        request = registry.parse_request(request) if isinstance(request, str) else request
        result = runs.run_request(
            target or self.study.target,
            imageset if imageset is not None else self.test,
            request,
            settings or self.study.settings,
            self.study.cache,
            self.study.batch_size,
            size or self.study.size,
            progress=False,
        )
        return self.record(study_name, value, result.rows if column == "score" else result.values, column, sign)

    def record(self, study_name: str, value, frame: pd.DataFrame, column="score", sign=1) -> dict:
        """Record a row from per-image values already computed (``sign * frame[column]`` is the score)."""
        merged = frame.drop(columns=["label", "subset"], errors="ignore").merge(
            self.test.records[["id", "label"]], on="id", validate="one_to_one"
        )
        merged = merged.assign(score=sign * merged[column].astype(float))
        self.per_image.append(merged[["id", "label", "score"]].assign(study=study_name, value=str(value)))
        row = {
            "study": study_name,
            "value": value,
            **test_metrics(merged["label"], merged["score"]),
            "unet_evals": merged["unet_evals"].mean(),
        }
        self.rows.append(row)
        return row

    def t_sweep(self, t_max: int, stride: int) -> pd.DataFrame:
        """+SSIM, +MS-SSIM, -MSE and -latent MSE at every t of one cached inversion path."""
        path = ddim.path(t_max, stride)
        ssim = AttackRequest("structural", {"stride": stride}, {"t": path}, 1, run="t_sweep")
        msssim = AttackRequest("structural", {"stride": stride, "measure": "ms_ssim"}, {"t": path}, 1, run="t_sweep_ms")
        common = (self.study.settings, self.study.cache, self.study.batch_size, self.study.size, False)
        values = runs.grid_values(self.study.target, self.test, ssim, *common)
        ms = runs.grid_values(self.study.target, self.test, msssim, *common)
        for t in path:
            at_t, ms_t = values[values["t"] == t], ms[ms["t"] == t]
            self.record("T (+SSIM)", t, at_t, "ssim")
            self.record("T (+MS-SSIM)", t, ms_t, "ms_ssim")
            self.record("T (-MSE)", t, at_t, "mse", -1)
            self.record("T (-latent MSE)", t, at_t, "latent_mse", -1)
        return self.table(prefix="T (").pivot_table(index="value", columns="study", values="auc", sort=False)

    def sizes(self, sizes: list[int]) -> list[int]:
        """The attack sizes that the model can take (multiples of its VAE's downscale factor, times a flow
        transformer's patch size); the others are skipped with their reason before any compute."""
        factor = self.study.target.size_factor
        for size in sizes:
            if size % factor:
                self.study.skip(f"resolution {size} px", f"not a multiple of the model's size factor {factor}")
        return [size for size in sizes if size % factor == 0]

    def table(self, prefix: str | None = None, exclude: str | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        if prefix is not None:
            frame = frame[frame["study"].str.startswith(prefix)]
        if exclude is not None:
            frame = frame[~frame["study"].str.startswith(exclude)]
        return frame

    def save(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        frame.to_csv(self.study.tables / "ablations.csv", index=False)
        pd.concat(self.per_image, ignore_index=True).to_parquet(self.study.out / "ablation_scores.parquet")
        return frame


def calibrated_structural(chosen: dict) -> tuple[str, dict] | None:
    """The run of 03 that calibrated the structural attack: (run id, its record), or None."""
    for run, record in chosen.items():
        if record["attack"] == "structural" and record["display"].endswith("(calibrated)"):
            return run, record
    return None


def training_dynamics(study, checkpoints: list[int]) -> pd.DataFrame | None:
    """Every calibrated attack on the test split at each saved training checkpoint of the target.
    None (with the reason recorded) when the model has no such checkpoints."""
    from .experiment import locate_model
    from .target import load_target
    from .tiny import LORA_FILE, checkpoint_dir, target_loras

    model_dir = locate_model(study.params["MODEL"])
    lora = bool(target_loras(model_dir))  # a LoRA target's checkpoints are LoRA files of its base model
    flow = (Path(model_dir) / "transformer").is_dir()  # a flow model's checkpoints hold its transformer
    saved = LORA_FILE if lora else Path("transformer" if flow else "unet")
    steps = [s for s in checkpoints if (checkpoint_dir(model_dir, s) / saved).exists()]
    if not steps:
        study.skip(
            "training dynamics",
            f"{study.params['MODEL']} has no training checkpoints (checkpoints/step-N/{saved.as_posix()}) for steps "
            f"{list(checkpoints)}",
        )
        return None
    requests = chosen_requests(study.read_chosen(), study=study)
    test = study.imageset.subset("test")
    rows = []
    for step in steps:
        folder = checkpoint_dir(model_dir, step)
        snapshot = load_target(
            model_dir,
            device=study.params.get("DEVICE", "cpu"),
            dtype=study.settings.dtype,
            checkpoint=None if lora else folder,
            loras=[str(folder / LORA_FILE)] if lora else (),
        )
        scores, _ = study.score(requests, imageset=test, target=snapshot, progress=False)
        for run, group in scores.groupby("run", sort=False):
            rows.append(
                {
                    "step": step,
                    "run": run,
                    "attack": group["display"].iloc[0],
                    **test_metrics(group["label"], group["score"]),
                }
            )
    dynamics = pd.DataFrame(rows)
    dynamics.to_csv(study.tables / "training_dynamics.csv", index=False)
    return dynamics


# --------------------------------------------------------------------------------------------------
# 06 · set audit (the features, from the run layer's scores; the statistics are mialib.audit's)
# --------------------------------------------------------------------------------------------------
def audit_requests(attacks) -> dict:
    """Requests for audit features: run id -> request at a fixed setting. The audit has no labels, so no
    setting can be chosen on a calibration split: a grid, ``direction=auto`` and the blind baselines (fitted
    on labels) are refused, naming the run. The scorer orients each feature on the fit halves instead."""
    requests = runs.as_requests(attacks)
    for run, request in requests.items():
        if request.spec.kind == "blind":
            raise ValueError(
                f"{run}: the blind baselines are fitted on membership labels, which an audit does not have"
            )
        if request.calibrate in ("difficulty", "fit"):
            raise ValueError(
                f"{run}: calibrate={request.calibrate} is fitted on a labelled split, which an audit does not "
                f"have; calibrate=reference works (e.g. {request.name}:calibrate=reference with reference models)"
            )
        if request.grid or request.direction == "auto":
            raise ValueError(
                f"{run}: {request.text()} is chosen on a labelled calibration split; the audit needs fixed settings "
                f"(e.g. {request.name}:t=100)"
            )
    return requests


def feature_table(
    target,
    imageset,
    attacks,
    settings,
    cache_dir,
    batch_size: int,
    size: int,
    progress: bool = True,
    references: tuple = (),
) -> pd.DataFrame:
    """One row per image of ``imageset``: ``id``, the set's ``label`` where it has one (never used by the
    audit), and one column per run: the attack's per-image score in the method's direction (higher =
    member); a run with ``calibrate=reference`` is the score against the same attack on ``references``
    (:func:`mialib.runs.calibrated_values`). Scores go through the run layer's per-image cache, so
    features already scored for a comparison are read back."""
    table = imageset.records[["id"]].copy()
    if "label" in imageset.records:
        table["label"] = imageset.records["label"].to_numpy()
    for run, request in audit_requests(attacks).items():
        params = request.spec.params(request.fixed)
        values = runs.attack_values(
            target, imageset, request.spec, params, settings, cache_dir, batch_size, size, progress
        )
        if request.calibrate == "reference":
            values = runs.calibrated_values(
                target, imageset, request, values, settings, cache_dir, batch_size, size, progress, tuple(references)
            )
        direction = 1 if request.direction == "method" else int(request.direction)
        scores = values.set_index("id")["score"].astype(float) * direction
        table[run] = table["id"].map(scores).to_numpy()
    return table.reset_index(drop=True)


def audit_features(study, attacks) -> pd.DataFrame | None:
    """Per-image audit features (one column per run of ``attacks``, fixed settings) of the study's set,
    written to ``audit_features.parquet``; None (and a recorded skip) when the set has no labels, since
    the example audits and the simulations below draw suspect sets of known membership."""
    if study.imageset.records["label"].isna().any():
        study.skip(
            "set audit",
            "the simulations draw suspect sets of known membership; this set has unlabelled images (use `mialib "
            "audit`)",
        )
        return None
    table = feature_table(
        study.target,
        study.imageset,
        attacks,
        study.settings,
        study.cache,
        study.batch_size,
        study.size,
        progress=False,
        references=tuple(study.references),
    )
    table.to_parquet(study.out / "audit_features.parquet")
    return table


def _pools(features: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return features[features["label"] == 1].reset_index(drop=True), features[features["label"] == 0].reset_index(
        drop=True
    )


def audit_examples(study, features: pd.DataFrame, level: float) -> pd.DataFrame:
    """Two audits with every feature combined: the members as the suspect set against the non-members,
    and a null case (half the non-members against the other half). ``tables/audit_examples.csv``."""
    members, nonmembers = _pools(features)
    rng = np.random.default_rng(study.settings.seed)
    half = rng.permutation(len(nonmembers))
    cases = {
        f"{len(members)} members vs {len(nonmembers)} non-members": (members, nonmembers),
        f"null: {len(half) // 2} non-members vs {len(half) - len(half) // 2} others": (
            nonmembers.iloc[half[: len(half) // 2]],
            nonmembers.iloc[half[len(half) // 2 :]],
        ),
    }
    rows = []
    for name, (suspect, reference) in cases.items():
        result = audit.set_audit(
            suspect.drop(columns="label"), reference.drop(columns="label"), level=level, seed=study.settings.seed
        )
        rows.append({"audit": name, **result.as_dict()})
        print(f"{name}: {result.verdict}\n", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(study.tables / "audit_examples.csv", index=False)
    return table


def _feature_sets(features: pd.DataFrame) -> dict[str, list[str]]:
    runs_ = [c for c in features.columns if c not in ("id", "label")]
    return {**{run: [run] for run in runs_}, COMBINED: runs_}


def audit_null(study, features: pd.DataFrame, sizes, n_sets: int, level: float = 0.05) -> pd.DataFrame:
    """False-positive rate of the audit on suspect sets drawn from non-members (each feature alone and
    combined), at every size whose suspect and reference sets fit in the non-member pool without
    replacement. ``tables/audit_null.csv``."""
    _, nonmembers = _pools(features)
    fitting = [int(n) for n in sizes if 2 * int(n) <= len(nonmembers)]
    frames = [
        audit.null_rate(nonmembers, columns, fitting, n_sets, level, study.settings.seed).assign(feature_set=name)
        for name, columns in _feature_sets(features).items()
    ]
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(study.tables / "audit_null.csv", index=False)
    return table


def audit_power(
    study, features: pd.DataFrame, sizes, fractions, n_sets: int, level: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Detection probability at ``level`` against suspect-set size: every feature alone and combined for
    suspect sets of members only, and the combination for sets that mix ``fractions`` of members; then
    the images needed for 80 % power. ``tables/audit_power.csv``, ``tables/audit_images_needed.csv``."""
    members, nonmembers = _pools(features)
    sets = _feature_sets(features)
    pure = audit.power(members, nonmembers, sets, sizes, (1.0,), n_sets, level, study.settings.seed)
    mixed = [f for f in fractions if f != 1.0]
    frames = [pure]
    if mixed:
        frames.append(
            audit.power(
                members, nonmembers, {COMBINED: sets[COMBINED]}, sizes, tuple(mixed), n_sets, level, study.settings.seed
            )
        )
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(study.tables / "audit_power.csv", index=False)
    needed = audit.images_for_power(table, 0.8)
    needed.to_csv(study.tables / "audit_images_needed.csv", index=False)
    return table, needed


# --------------------------------------------------------------------------------------------------
# 07 · memorisation regimes
# --------------------------------------------------------------------------------------------------
def regime_study(study, regime: str, seed: int, model: str, references: dict | None = None):
    """The study of one regime's target: the same set and settings, the target loaded, outputs under
    ``regimes/<regime>-seed<seed>/`` (its own scores, metrics and chosen settings). ``references``: regime ->
    its reference models' folders (:func:`mialib.experiment.prepare_regime_references`), the references of
    ``calibrate=reference`` runs."""
    from dataclasses import replace

    from .experiment import claim_output, locate_model
    from .target import load_target
    from .tiny import target_loras

    out = claim_output(study.out / "regimes" / f"{regime}-seed{seed}")
    # one list of skip notes per regime and seed, kept by this notebook's study: the audit after the comparison
    # adds to the comparison's notes instead of overwriting them
    notes = study.__dict__.setdefault("regime_notes", {}).setdefault((regime, seed), [])
    sub = replace(study, out=out, notes=notes, params={**study.params, "MODEL": model})
    for folder in (sub.tables, sub.figures):
        folder.mkdir(parents=True, exist_ok=True)
    device, dtype = study.params.get("DEVICE", "cpu"), study.settings.dtype
    folder = locate_model(model)
    sub.params["LORA"] = target_loras(folder)  # the LoRA regime's file, loaded as a user's --lora
    sub.target = load_target(folder, device=device, dtype=dtype, loras=sub.params["LORA"])
    sub.references = [
        load_target(locate_model(folder), device=device, dtype=dtype) for folder in (references or {}).get(regime, [])
    ]
    return sub


def _runnable(sub, regime: str, attacks) -> dict:
    """``attacks`` less the ``calibrate=reference`` runs when the regime has no reference models (each
    recorded as a skip with the reason)."""
    runnable = runs.as_requests(attacks)
    if not sub.references:
        for run, request in list(runnable.items()):
            if request.calibrate == "reference":
                sub.skip(run, f"the {regime} regime has no reference models (REGIME_REFERENCES)")
                del runnable[run]
    return runnable


def regime_comparison(
    study, targets: dict, attacks: dict, n_bootstrap: int = 1000, references: dict | None = None
) -> pd.DataFrame:
    """03's comparison (calibration -> test) on every target of the regime study, ``targets`` being
    (regime, seed) -> model folder (:func:`mialib.experiment.prepare_regimes`). One row per regime, seed
    and run with 03's metric columns; ``tables/regime_metrics.csv``. Every target shares the study's
    cache, whose keys hold the model's fingerprint. ``references`` (regime -> reference model folders): the
    reference models of ``calibrate=reference`` runs; a regime without any skips those runs, with the
    reason."""
    frames = []
    for (regime, seed), model in targets.items():
        sub = regime_study(study, regime, seed, model, references)
        comparison = compare(sub, _runnable(sub, regime, attacks), n_bootstrap)
        frames.append(
            comparison.table.drop(columns=["threshold"], errors="ignore").assign(
                regime=regime, seed=seed, model=str(model)
            )
        )
        print(
            f"{regime}, seed {seed}: " + ", ".join(f"{r.display} {r.auc:.3f}" for r in comparison.table.itertuples()),
            flush=True,
        )
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(study.tables / "regime_metrics.csv", index=False)
    return table


def regime_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per regime and run: test AUC and TPR@1%FPR as mean and standard deviation over the seeds, and as
    "mean ± sd" text. ``tables/regime_summary.csv``."""
    grouped = table.groupby(["regime", "run"], sort=False)
    summary = grouped.agg(
        attack=("display", "first"),
        kind=("attack", lambda a: registry.get(a.iloc[0]).kind),
        seeds=("seed", "nunique"),
        auc_mean=("auc", "mean"),
        auc_sd=("auc", "std"),
        tpr_mean=("tpr_at_1fpr", "mean"),
        tpr_sd=("tpr_at_1fpr", "std"),
        auc_min=("auc", "min"),
        auc_max=("auc", "max"),
    ).reset_index()
    for name, column in (("AUC", "auc"), ("TPR@1%FPR", "tpr")):  # one seed has no spread: said, not written 0
        summary[name] = [
            f"{m:.3f} ± {s:.3f}" if n > 1 else f"{m:.3f} (one seed)"
            for m, s, n in zip(summary[f"{column}_mean"], summary[f"{column}_sd"], summary["seeds"])
        ]
    return summary


def regime_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The layout of docs/results.md's regimes table: one row per attack, AUC and TPR@1%FPR (mean ± sd over
    seeds) per regime."""
    regimes = list(dict.fromkeys(summary["regime"]))
    wide = summary.pivot_table(
        index=["run", "attack"], columns="regime", values=["AUC", "TPR@1%FPR"], aggfunc="first", sort=False
    )
    wide = wide[[(metric, regime) for regime in regimes for metric in ("AUC", "TPR@1%FPR")]]
    order = list(dict.fromkeys(summary["run"]))
    wide = wide.reindex(sorted(wide.index, key=lambda key: order.index(key[0])))
    wide.index = wide.index.get_level_values("attack")
    return wide


def regime_dynamics(study, targets: dict, regimes: dict, references: dict | None = None) -> pd.DataFrame | None:
    """05's training dynamics (every calibrated attack on the test split at each checkpoint) along the
    fine-tuning: for every seed of each regime that pretrains (``PRETRAIN_STEPS``), at its ``CHECKPOINTS``.
    ``tables/regime_dynamics.csv``; None (a recorded skip) when no regime fine-tunes."""
    frames = []
    for (regime, seed), model in targets.items():
        overrides = regimes.get(regime) or {}
        if not overrides.get("PRETRAIN_STEPS"):
            continue
        sub = regime_study(study, regime, seed, model, references)
        dynamics = training_dynamics(sub, list(overrides.get("CHECKPOINTS", [])))
        if dynamics is not None:
            frames.append(dynamics.assign(regime=regime, seed=seed))
    if not frames:
        study.skip("dynamics along the fine-tuning", "no regime pretrains (PRETRAIN_STEPS) and keeps checkpoints")
        return None
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(study.tables / "regime_dynamics.csv", index=False)
    return table


@dataclass
class RegimeAudit:
    null: pd.DataFrame  # false-positive rate at 0.05, per regime, seed, feature set and size
    power: pd.DataFrame  # detection probability at the audit's level, per regime, seed, feature set, share and size
    needed: pd.DataFrame  # images for 80 % power per regime, feature set and share (power averaged over the seeds)


def regime_audit(
    study,
    targets: dict,
    attacks,
    sizes,
    fractions,
    null_sets: int,
    power_sets: int,
    level: float,
    references: dict | None = None,
) -> RegimeAudit | None:
    """06's validity and power studies on every target of the regime study (each seed's own features),
    then the images needed for 80 % power per regime from the power averaged over the seeds.
    ``tables/regime_audit_null.csv``, ``regime_audit_power.csv``, ``regime_images_needed.csv``."""
    nulls, powers = [], []
    for (regime, seed), model in targets.items():
        sub = regime_study(study, regime, seed, model, references)
        features = audit_features(sub, _runnable(sub, regime, attacks))
        if features is None:
            return None
        nulls.append(audit_null(sub, features, sizes, null_sets).assign(regime=regime, seed=seed))
        powers.append(
            audit_power(sub, features, sizes, fractions, power_sets, level)[0].assign(regime=regime, seed=seed)
        )
    null, power = pd.concat(nulls, ignore_index=True), pd.concat(powers, ignore_index=True)
    keys = ["regime", "feature_set", "member_fraction", "size"]
    averaged = power[~power["skipped"].astype(bool)].groupby(keys, sort=False)["power_t"].mean().reset_index()
    needed = pd.concat(
        [
            audit.images_for_power(group.drop(columns="regime"), 0.8).assign(regime=regime)
            for regime, group in averaged.groupby("regime", sort=False)
        ],
        ignore_index=True,
    )
    needed = needed[["regime", *[c for c in needed.columns if c != "regime"]]]
    null.to_csv(study.tables / "regime_audit_null.csv", index=False)
    power.to_csv(study.tables / "regime_audit_power.csv", index=False)
    needed.to_csv(study.tables / "regime_images_needed.csv", index=False)
    return RegimeAudit(null, power, needed)


def regime_verdict(summary: pd.DataFrame, audit_result: RegimeAudit, regime: str = "weak", chance: float = 0.6) -> str:
    """Plain words on one regime: how far the best per-image attack gets, and whether the set audit
    (every feature combined, suspect sets of members only) reaches 80 % power within the sizes tried."""
    rows = summary[(summary["regime"] == regime) & (summary["kind"] == "model")]
    if rows.empty:
        return f"The regime {regime!r} is not in this study."
    best = rows.loc[rows["auc_mean"].idxmax()]
    blind = summary[(summary["regime"] == regime) & (summary["kind"] == "blind")]
    per_image = (
        f"In the {regime} regime the best per-image attack is {best['attack']} with test AUC {best['AUC']} and "
        "TPR@1%FPR "
        f"{best['TPR@1%FPR']} over {int(best['seeds'])} seeds"
        + (f" (best blind baseline: AUC {blind['auc_mean'].max():.3f})" if len(blind) else "")
        + (": near chance." if best["auc_mean"] < chance else f": above the {chance:g} this text calls near chance.")
    )
    needed = audit_result.needed
    combined = needed[
        (needed["regime"] == regime) & (needed["feature_set"] == COMBINED) & (needed["member_fraction"] == 1.0)
    ]
    power = audit_result.power
    done = power[
        (power["regime"] == regime)
        & (power["feature_set"] == COMBINED)
        & (power["member_fraction"] == 1.0)
        & ~power["skipped"].astype(bool)
    ]
    largest = int(done["size"].max()) if len(done) else 0
    at_largest = done[done["size"] == largest]["power_t"].mean() if len(done) else float("nan")
    level = float(power["level"].iloc[0])
    if len(combined) and pd.notna(combined["images"].iloc[0]):
        n = int(combined["images"].iloc[0])
        audit_text = (
            f"The set audit (every attack combined) detects a suspect set of {n} members at p < {level:g} "
            "with 80 % power (mean over seeds)"
        )
        audit_text += (
            ": it detects membership where the per-image attacks are near chance." if best["auc_mean"] < chance else "."
        )
    else:
        audit_text = (
            f"The set audit (every attack combined) does not reach 80 % power at p < {level:g} within {largest} "
            "suspect images "
            f"(power {at_largest:.2f} there, mean over seeds): on this model it does not detect membership either."
        )
    return per_image + "\n" + audit_text
