"""The memorisation regimes (07): the target recipes and the preset's expansion, and 07 executed at smoke
size (configs/smoke.yaml's REGIMES, two seeds), checked against the numbers each regime's run wrote."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from mialib import experiment, studies, tiny
from mialib.tiny import TinyConfig

ROOT = Path(__file__).resolve().parent.parent


def _seeds(params: dict, regime: str) -> list[int]:
    """A regime's training seeds: its own SEEDS, else REGIME_SEEDS."""
    return list((params["REGIMES"][regime] or {}).get("SEEDS", params["REGIME_SEEDS"]))


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------
def test_a_config_written_before_the_regimes_reads_back_as_the_same_target():
    """tiny_config.json files written before the regime fields existed still match the default recipe."""
    old = {
        "image_size": 32, "latent_channels": 4, "vae_channels": [16, 32], "unet_channels": [32, 64], "text_dim": 64,
        "max_tokens": 32, "vae_steps": 400, "vae_crop": 0, "vae_lr": 0.001, "vae_kl_weight": 1e-06, "unet_steps": 900,
        "unet_lr": 0.001, "batch_size": 16, "caption_dropout": 0.1, "checkpoints": [300, 600, 900], "seed": 0,
        "threads": 0,
    }  # fmt: skip
    params = experiment.load_preset(ROOT / "configs" / "quick.yaml")  # the default of those days
    assert TinyConfig.from_saved(old) == experiment.tiny_config(params)
    assert experiment.tiny_config(params).shared_seed == params["TRAIN_SEED"]
    with pytest.raises(ValueError, match="unet_data"):
        TinyConfig(unet_data="everything")


def test_regime_targets_expand_the_preset():
    params = experiment.load_preset(ROOT / "configs" / "regimes.yaml")
    targets = experiment.regime_targets(params)
    assert list(targets) == [(regime, seed) for regime in params["REGIMES"] for seed in _seeds(params, regime)]
    assert len(params["REGIME_SEEDS"]) >= 3 and _seeds(params, "flow") == [0]  # the flow target: one seed
    # the from-scratch regime at the preset's seed is the default target itself, the others are built beside it
    assert targets[("from-scratch", 0)]["MODEL"] == params["MODEL"]
    assert targets[("weak", 2)]["MODEL"] == f"{params['MODEL']}-weak-seed2"
    configs = {key: experiment.tiny_config(target) for key, target in targets.items()}
    quick = experiment.load_preset(ROOT / "configs" / "quick.yaml")
    assert configs[("from-scratch", 0)] == experiment.tiny_config(quick)
    assert {c.shared_seed for c in configs.values()} == {params["TRAIN_SEED"]} and {
        c.seed for c in configs.values()
    } == set(params["REGIME_SEEDS"])
    fine, weak = configs[("fine-tuned", 1)], configs[("weak", 1)]
    assert fine.pretrain_steps > 0 and fine.unet_data == "members" and fine.uses_pool
    assert weak.pretrain_steps == 0 and weak.unet_data == "members+pool"
    # the weak regime's members are a small share of its training set, seen a few times each
    pool = params["N_PUBLIC"] + weak.filler_images
    share = params["N_MEMBERS"] / (params["N_MEMBERS"] + pool)
    epochs = weak.unet_steps * weak.batch_size / (params["N_MEMBERS"] + pool)
    assert share < 0.1 and 3 <= epochs <= 8, (share, epochs)
    # the LoRA regime adapts the fine-tuned regime's base model (the same pretraining, shared), rank 8
    lora = configs[("lora", 1)]
    assert lora.lora_rank == 8 and lora.unet_data == "members" and lora.seed == 1
    assert {k: getattr(lora, k) for k in tiny.BASE_FIELDS} == {k: getattr(fine, k) for k in tiny.BASE_FIELDS}
    # the flow regime is the from-scratch recipe on the SD3-shaped target
    flow, scratch = configs[("flow", 0)], configs[("from-scratch", 0)]
    assert flow.family == "sd3" and replace(flow, family="sd") == scratch
    assert targets[("flow", 0)]["MODEL"] == f"{params['MODEL']}-flow-seed0"
    with pytest.raises(ValueError, match="may set"):
        experiment.regime_targets({**params, "REGIMES": {"odd": {"IMAGE_SIZE": 64}}})
    with pytest.raises(ValueError, match="at least one training seed"):
        experiment.regime_targets({**params, "REGIMES": {"flow": {"TINY_FAMILY": "sd3", "SEEDS": []}}})
    with pytest.raises(ValueError, match="SD-shaped target only"):  # a LoRA of a flow base model: not built
        experiment.tiny_config({**targets[("lora", 0)], "TINY_FAMILY": "sd3"})
    with pytest.raises(ValueError, match="DATA=emoji"):
        experiment.regime_targets({**params, "DATA": "imagefolder:somewhere"})
    assert isinstance(experiment.notebook_runs({**params, "DATA": "imagefolder:x"})["07_regimes"], str)


def test_regime_references_train_each_recipe_without_the_members():
    params = experiment.load_preset(ROOT / "configs" / "regimes.yaml")
    references = experiment.regime_references(params)
    seeds = params["REFERENCE_SEEDS"]
    assert len(seeds) >= 2 and {r: len(p) for r, p in references.items()} == {
        "from-scratch": len(seeds),
        "fine-tuned": 1,  # the base model does not depend on a seed: built once
        "lora": 1,  # the same base model, without the LoRA
        "weak": len(seeds),
        "flow": len(seeds),
    }
    configs = {(r, i): experiment.tiny_config(p) for r, presets in references.items() for i, p in enumerate(presets)}
    targets = {key: experiment.tiny_config(p) for key, p in experiment.regime_targets(params).items()}
    # from-scratch: the members' recipe (steps, learning rate, batch) on stand-ins, one draw per seed
    scratch = configs[("from-scratch", 0)]
    assert scratch.unet_data == "stand-ins" and [configs[("from-scratch", i)].seed for i in (0, 1)] == seeds[:2]
    assert (scratch.unet_steps, scratch.unet_lr, scratch.pretrain_steps) == (
        targets[("from-scratch", 0)].unet_steps,
        targets[("from-scratch", 0)].unet_lr,
        0,
    )
    # fine-tuned: the shared base model, no step of fine-tuning
    base = configs[("fine-tuned", 0)]
    fine = targets[("fine-tuned", 0)]
    assert base.unet_steps == 0 and base.pretrain_steps == fine.pretrain_steps and base.shared_seed == fine.shared_seed
    assert references["fine-tuned"][0]["MODEL"] == f"{params['MODEL']}-fine-tuned-base"
    lora_base = configs[("lora", 0)]
    assert lora_base.unet_steps == 0 and lora_base.lora_rank == 0 and lora_base.pretrain_steps == fine.pretrain_steps
    # flow: the flow target's recipe on stand-ins, as from scratch
    flow_reference = configs[("flow", 1)]
    assert flow_reference.family == "sd3" and flow_reference.unet_data == "stand-ins" and len(references["flow"]) == 2
    assert replace(flow_reference, family="sd") == configs[("from-scratch", 1)]
    # weak: the same training on the pool alone
    weak = configs[("weak", 0)]
    assert weak.unet_data == "pool" and weak.unet_steps == targets[("weak", 0)].unet_steps and weak.uses_pool
    assert references["weak"][1]["MODEL"] == f"{params['MODEL']}-weak-reference{seeds[1]}"
    assert {c.shared_seed for c in configs.values()} == {params["TRAIN_SEED"]}  # the targets' VAE
    with pytest.raises(ValueError, match="must not see the attacked images"):
        experiment.regime_references({**params, "REGIME_REFERENCES": {"from-scratch": {}}})
    with pytest.raises(ValueError, match="must not see the attacked images"):
        experiment.regime_references({**params, "REGIME_REFERENCES": {"weak": {"UNET_DATA": "members+pool"}}})
    with pytest.raises(ValueError, match="REGIMES does not have"):
        experiment.regime_references({**params, "REGIME_REFERENCES": {"strong": {"UNET_DATA": "pool"}}})
    with pytest.raises(ValueError, match="REFERENCE_SEEDS"):
        experiment.regime_references({**params, "REFERENCE_SEEDS": []})
    assert experiment.regime_references({**params, "REGIME_REFERENCES": {}}) == {}


def test_stand_ins_are_public_images_drawn_per_seed():
    from mialib import data

    split = data.read_manifest(ROOT / "data" / "emoji_split.csv")
    attacked = set(split.loc[split["split"].isin(["member", "nonmember"]), "id"])
    draws = {seed: list(experiment.stand_ins(split, 128, seed)["id"]) for seed in (10, 11)}
    for ids in draws.values():
        assert len(set(ids)) == 128 and set(split.loc[split["id"].isin(ids), "split"]) == {"public"}
        assert not set(ids) & attacked
    assert draws[10] == list(experiment.stand_ins(split, 128, 10)["id"])  # reproducible
    assert len(set(draws[10]) & set(draws[11])) < 100  # another seed, another subset
    with pytest.raises(data.DataError, match="public split has"):
        experiment.stand_ins(split, 10_000, 0)


def test_the_filler_images_are_outside_every_split():
    from mialib import data

    split = data.read_manifest(ROOT / "data" / "emoji_split.csv")
    filler = data.read_manifest(ROOT / experiment.FILLER)
    assert len(filler) == 696 and set(filler["split"]) == {"filler"}
    assert not set(filler["group"]) & set(split["group"]) and not set(filler["pixel_sha256"]) & set(
        split["pixel_sha256"]
    )
    data.validate_manifest(pd.concat([split, filler]))


# --------------------------------------------------------------------------------------------------
# 07 at smoke size
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def regimes_run(smoke_params, smoke_target_dir, tmp_path_factory):
    """07 executed with papermill on the smoke preset's REGIMES (each trained with two seeds)."""
    import yaml

    folder = tmp_path_factory.mktemp("regimes")
    # a few of 03's runs (a calibrated grid, fixed settings, a control and a blind baseline) keep it short
    attacks = {
        run: smoke_params["ATTACKS"][run] for run in ("structural_paper", "loss", "pia", "vae_control", "blind_caption")
    }
    # two of them against each regime's reference models (REGIME_REFERENCES)
    attacks.update(structural_reference="structural:calibrate=reference", pia_reference="pia:calibrate=reference")
    # and audit features that those runs already scored (structural t=100, loss t=100, PIA t=200)
    features = {run: smoke_params["AUDIT_ATTACKS"][run] for run in ("structural", "loss", "pia")}
    features["structural_reference"] = "structural:calibrate=reference"
    # the weak regime without its references (the recipe is checked above): its reference runs are skipped
    references = {regime: recipe for regime, recipe in smoke_params["REGIME_REFERENCES"].items() if regime != "weak"}
    params = dict(
        smoke_params,
        OUTPUT_DIR=str(folder / "outputs"),
        NOTEBOOKS=["07_regimes"],
        ATTACKS=attacks,
        AUDIT_ATTACKS=features,
        REGIME_REFERENCES=references,
    )
    path = folder / "preset.yaml"
    path.write_text(yaml.safe_dump(params))
    targets = experiment.prepare_regimes(params, progress=False)
    return experiment.run_notebooks(path), params, targets


def test_07_ran_every_regime_and_seed(regimes_run):
    out, params, targets = regimes_run
    runs = json.loads((out / "notebook_runs.json").read_text())
    assert {k: v["status"] for k, v in runs.items()} == {"07_regimes": "ok"}
    assert (out / "html" / "07_regimes.html").exists()
    metrics = pd.read_csv(out / "tables" / "regime_metrics.csv")
    expected = {(r, s, run) for r in params["REGIMES"] for s in _seeds(params, r) for run in params["ATTACKS"]}
    assert {"lora", "flow"} <= set(params["REGIMES"]) and _seeds(params, "flow") == [0]
    # the weak regime has no reference models here: its calibrate=reference runs are skipped, with the reason, which
    # the audit (whose features include one of them) adds to without overwriting the comparison's
    skipped = {(r, s, run) for r, s, run in expected if r == "weak" and run.endswith("_reference")}
    assert len(skipped) == 2 * len(_seeds(params, "weak"))
    assert set(zip(metrics["regime"], metrics["seed"], metrics["run"])) == expected - skipped
    assert len(metrics) == len(expected - skipped)
    for seed in _seeds(params, "weak"):
        notes = pd.read_csv(out / "regimes" / f"weak-seed{seed}" / "tables" / "skipped_studies_07_regimes.csv")
        said = notes.loc[notes["reason"].str.contains("no reference models"), "study"]
        assert sorted(said) == sorted(run for r, s, run in skipped if s == seed)  # each once
    # the dynamics follow both fine-tunings; a LoRA's checkpoints are LoRA files: its last one is the target itself
    dynamics = pd.read_csv(out / "tables" / "regime_dynamics.csv")
    assert set(dynamics["regime"]) == {"fine-tuned", "lora"}
    last = dynamics[dynamics["step"] == params["REGIMES"]["lora"]["UNET_STEPS"]]
    both = last.merge(metrics, on=["regime", "seed", "run"], suffixes=("_checkpoint", ""))
    assert set(both["regime"]) == {"fine-tuned", "lora"} and len(both) == len(last)
    np.testing.assert_array_equal(both["auc_checkpoint"], both["auc"])
    for figure in ("regimes", "regime_audit", "regime_dynamics"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
    # each row is the regime's own 03 run: its test AUC is sklearn's on the scores that run wrote
    for (regime, seed), group in metrics.groupby(["regime", "seed"]):
        scores = pd.read_parquet(out / "regimes" / f"{regime}-seed{seed}" / "scores.parquet")
        for row in group.itertuples():
            test = scores[(scores["run"] == row.run) & (scores["subset"] == "test")]
            assert row.auc == pytest.approx(roc_auc_score(test["label"], test["score"]), abs=1e-12)


def test_07_targets_share_the_vae_and_the_fine_tuned_base(regimes_run):
    _, params, targets = regimes_run
    vaes = [load_file(str(Path(model) / "vae" / "diffusion_pytorch_model.safetensors")) for model in targets.values()]
    for other in vaes[1:]:
        assert all(np.array_equal(vaes[0][k].numpy(), other[k].numpy()) for k in vaes[0])
    trained = {key: model for key, model in targets.items() if key[0] not in ("lora", "flow")}
    unets = {
        key: load_file(str(Path(model) / "unet" / "diffusion_pytorch_model.safetensors"))
        for key, model in trained.items()
    }
    first = next(iter(unets.values()))
    name = next(k for k in first if k.endswith("weight"))
    assert len({unets[key][name].sum().item() for key in unets}) == len(
        unets
    )  # every seed and regime trained its own U-Net
    # the LoRA regime's U-Net is the fine-tuned regime's base model; its seeds differ in the LoRA file alone
    base = load_file(str(Path(targets[("lora", 0)]) / "unet" / "diffusion_pytorch_model.safetensors"))
    loras = [load_file(str(Path(targets[("lora", s)]) / tiny.LORA_FILE)) for s in _seeds(params, "lora")]
    up = next(k for k in loras[0] if k.endswith("lora.up.weight"))
    assert len({lora[up].sum().item() for lora in loras}) == len(loras) and loras[0][up].abs().max() > 0
    for seed in _seeds(params, "lora"):
        assert tiny.target_loras(targets[("lora", seed)]) == [str(Path(targets[("lora", seed)]) / tiny.LORA_FILE)]
        theirs = load_file(str(Path(targets[("lora", seed)]) / "unet" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(base[k], theirs[k]) for k in base)
    # the flow regime trained an SD3-shaped transformer
    assert (Path(targets[("flow", 0)]) / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    shared = Path(next(iter(targets.values()))).parent / ".tiny-shared"
    bases = sorted(p.name for p in shared.iterdir() if p.name.startswith("base-"))
    assert len(bases) == 1, bases  # one pretrained base model for every fine-tuned seed
    for (regime, seed), model in targets.items():
        config = TinyConfig.from_saved(json.loads((Path(model) / "tiny_config.json").read_text()))
        assert config.seed == seed and config.shared_seed == params["TRAIN_SEED"]
        losses = json.loads((Path(model) / "training" / "unet_loss.json").read_text())
        assert len(losses) == config.unet_steps


def test_07_summary_is_the_mean_and_spread_over_seeds(regimes_run):
    out, params, _ = regimes_run
    metrics = pd.read_csv(out / "tables" / "regime_metrics.csv")
    summary = studies.regime_summary(metrics).set_index(["regime", "run"])
    for (regime, run), group in metrics.groupby(["regime", "run"]):
        row = summary.loc[(regime, run)]
        assert row["seeds"] == len(_seeds(params, regime))
        assert row["auc_mean"] == pytest.approx(group["auc"].mean(), abs=1e-12)
        assert row["auc_sd"] == pytest.approx(group["auc"].std(ddof=1), abs=1e-12, nan_ok=True)
        assert row["AUC"].endswith("(one seed)") == (len(group) == 1)  # no spread is written for one seed
        assert row["tpr_mean"] == pytest.approx(group["tpr_at_1fpr"].mean(), abs=1e-12)
    table = pd.read_csv(out / "tables" / "regime_table.csv", header=[0, 1], index_col=0)
    assert len(table) == len(params["ATTACKS"])
    # model-free controls do not depend on the regime: the blind baselines score the same in every one
    blind = metrics[metrics["attack"] == "blind_caption"]
    assert blind["auc"].nunique() == 1


def test_07_audit_null_rate_and_power_per_regime(regimes_run):
    from mialib import audit

    out, params, _ = regimes_run
    null = pd.read_csv(out / "tables" / "regime_audit_null.csv")
    assert (
        set(null["regime"]) == set(params["REGIMES"])
        and set(null["n_sets"]) == {params["AUDIT_NULL_SETS"]}
        and params["AUDIT_NULL_SETS"] >= 1000
    )
    # validity in every regime and seed: the rate at 0.05 stays within 3 Monte Carlo standard errors
    assert (null["fpr_t"] <= 0.05 + 3 * null["mc_se"]).all() and (
        null["fpr_permutation"] <= 0.05 + 3 * null["mc_se"]
    ).all()
    # the written rates are what the audit gives on that seed's features
    regime, seed = "lora", _seeds(params, "lora")[-1]
    features = pd.read_parquet(out / "regimes" / f"{regime}-seed{seed}" / "audit_features.parquet")
    nonmembers = features[features["label"] == 0].reset_index(drop=True)
    written = null[(null["regime"] == regime) & (null["seed"] == seed) & (null["feature_set"] == "combined")]
    again = audit.null_rate(
        nonmembers,
        list(params["AUDIT_ATTACKS"]),
        list(written["size"]),
        params["AUDIT_NULL_SETS"],
        0.05,
        params["SEED"],
    )
    np.testing.assert_array_equal(written["fpr_t"].to_numpy(), again["fpr_t"].to_numpy())
    power = pd.read_csv(out / "tables" / "regime_audit_power.csv")
    needed = pd.read_csv(out / "tables" / "regime_images_needed.csv")
    done = power[~power["skipped"]]
    averaged = (
        done.groupby(["regime", "feature_set", "member_fraction", "size"], sort=False)["power_t"].mean().reset_index()
    )
    for regime, group in averaged.groupby("regime"):
        expected = audit.images_for_power(group.drop(columns="regime"), 0.8)
        mine = needed[needed["regime"] == regime].drop(columns="regime").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine.drop(columns="note"), expected.drop(columns="note"), check_dtype=False)
    assert set(power["member_fraction"]) == set(params["AUDIT_FRACTIONS"])
    # the executed notebook states the verdict for every regime
    cells = json.loads((out / "notebooks" / "07_regimes.ipynb").read_text())["cells"]
    text = "".join("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code" for o in c.get("outputs", []))
    for regime in params["REGIMES"]:
        assert f"In the {regime} regime the best per-image attack" in text


def test_the_default_is_the_papers_regime_and_quick_and_strong_are_its_variants():
    """configs/default.yaml: an accurate autoencoder and strong memorisation (the regime the structural attack's paper
    studies) and 500 test non-members in 03 and 06; configs/quick.yaml: the same preset with the cheaper target of the
    regimes (07) and no extra non-members; configs/strong.yaml: the most accurate autoencoder and the fuller sweeps.
    Each target has its own folder (a folder built with other settings is refused, never overwritten)."""
    default, quick, strong, regimes = (
        experiment.load_preset(ROOT / "configs" / f"{name}.yaml") for name in ("default", "quick", "strong", "regimes")
    )
    target = ("MODEL", "VAE_STEPS", "VAE_LR", "UNET_STEPS", "CHECKPOINTS")
    extras = ("EXTRA_NONMEMBERS", "EXTRA_NONMEMBERS_RUNS")
    sweeps = ("CAPTION_CONTROLS", "ROBUSTNESS_SWEEP", "ABLATION_STRIDES", "ABLATION_RESOLUTIONS")  # trimmed for time

    def same(a, b, differ):
        differ = ("PRESET", "OUTPUT_DIR", *differ)
        return {k: v for k, v in a.items() if k not in differ} == {k: v for k, v in b.items() if k not in differ}

    assert same(default, quick, target + extras) and same(default, strong, target + extras + sweeps)
    ours, cheap, accurate = (experiment.tiny_config(p) for p in (default, quick, strong))
    assert ours.unet_steps == accurate.unet_steps == 3000 and ours.unet_lr == accurate.unet_lr
    assert ours.vae_steps == 2000 and ours.vae_lr == 3e-3 and accurate.vae_steps == 4000 and accurate.vae_lr == 1e-3
    # the quick target is 07's from-scratch target
    assert cheap == experiment.tiny_config({**regimes, **regimes["REGIMES"]["from-scratch"]})
    assert (cheap.vae_steps, cheap.unet_steps) == (400, 900)
    # 500 test non-members: the filler images that neither the default nor the strong target ever saw
    for preset in (default, strong):
        assert preset["N_NONMEMBERS"] // 2 + preset["EXTRA_NONMEMBERS"] >= 500
        experiment.check_unseen_extras(preset)  # built or not: no filler image in its training
    assert quick["EXTRA_NONMEMBERS"] == 0 and strong["EXTRA_NONMEMBERS_RUNS"] == "all"
    models = [str(p["MODEL"]) for p in (default, quick, strong)]
    assert len(set(models)) == 3 and not any(a != b and a.startswith(b) for a in models for b in models)
    assert len({p["OUTPUT_DIR"] for p in (default, quick, strong)}) == 3


def test_extra_nonmembers_go_to_the_runs_that_ask_for_them():
    """EXTRA_NONMEMBERS_RUNS: those notebook runs attack the extra test non-members, the others the split alone."""
    params = experiment.load_preset(ROOT / "configs" / "default.yaml")
    runs = experiment.notebook_runs(params)
    extra = {name: run[1].get("EXTRA_NONMEMBERS", params["EXTRA_NONMEMBERS"]) for name, run in runs.items()}
    attacked = {name for name, n in extra.items() if n}
    assert attacked == set(params["EXTRA_NONMEMBERS_RUNS"]) == {"03_attack", "06_set_audit"}
    assert extra["03_attack"] == 372 and extra["04_robustness"] == extra["03_attack_biased"] == 0
    assert runs["03_attack_biased"][1]["NONMEMBER_STYLE"] == "shifted"  # its own overrides stay
    every = experiment.notebook_runs({**params, "EXTRA_NONMEMBERS_RUNS": "all"})
    assert all("EXTRA_NONMEMBERS" not in run[1] for run in every.values())
    with pytest.raises(ValueError, match=r"unknown notebook runs \['03_atack'\]"):
        experiment.notebook_runs({**params, "EXTRA_NONMEMBERS_RUNS": ["03_atack"]})
    with pytest.raises(ValueError, match="a list of notebook runs, or all"):
        experiment.notebook_runs({**params, "EXTRA_NONMEMBERS_RUNS": "03_attack"})


def test_a_run_without_the_extra_nonmembers_keeps_the_runs_image_set_table(tmp_path):
    """tables/image_set.csv is the set of the run (the preset `make run` wrote parameters.json for); a notebook run
    without its extra non-members writes its own table beside it instead of overwriting it."""
    out = experiment.claim_output(tmp_path / "run")  # as run_notebooks does, before it writes parameters.json
    params = {**experiment.load_preset(ROOT / "configs" / "default.yaml"), "OUTPUT_DIR": str(out)}
    params["EXTRA_NONMEMBERS"] = 20
    (out / "parameters.json").write_text(json.dumps(params))
    experiment.setup(params, "03_attack", load_model=False)
    experiment.setup({**params, "EXTRA_NONMEMBERS": 0}, "04_robustness", load_model=False)
    tables = out / "tables"
    run, own = pd.read_csv(tables / "image_set.csv"), pd.read_csv(tables / "image_set_04_robustness.csv")
    assert (len(run), len(own)) == (404, 384) and set(own["id"]) < set(run["id"])
    assert (tables / "skipped_images_04_robustness.csv").exists()


def test_07_reference_runs_score_against_each_regimes_own_references(regimes_run, tmp_path):
    """The reference rows of 07 read the target's score against the regime's reference models: the
    fine-tuned regime's base model (the difference), the others' two references (standardised), each
    reference's values recomputed here on its own, in a fresh cache."""
    from mialib import runs
    from mialib.settings import Settings
    from mialib.target import load_target

    out, params, targets = regimes_run
    references = experiment.prepare_regime_references(params, progress=False)
    assert {r: len(f) for r, f in references.items()} == {"from-scratch": 2, "fine-tuned": 1, "lora": 1, "flow": 2}
    assert all((Path(folder) / "transformer").is_dir() for folder in references["flow"])  # flow models, as the target
    base = load_file(str(Path(references["fine-tuned"][0]) / "unet" / "diffusion_pytorch_model.safetensors"))
    fine = load_file(str(Path(targets[("fine-tuned", 0)]) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not np.array_equal(base[k].numpy(), fine[k].numpy()) for k in base)  # the fine-tuning moved it
    # the LoRA's reference is the same base model: the U-Net the LoRA target loads before its adapter
    for folder in (references["lora"][0], targets[("lora", 0)]):
        theirs = load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))
        assert set(theirs) == set(base) and all(torch.equal(base[k], theirs[k]) for k in base)
    imageset, settings = experiment.open_data(params), Settings.from_parameters(params)
    size, batch = int(params["IMAGE_SIZE"]), int(params["BATCH_SIZE"])
    own = {
        regime: [
            runs.score(
                load_target(folder), imageset, {"s": "structural"}, settings, tmp_path / f"{regime}-{i}", batch, size,
                progress=False,
            )[0].set_index("id")["value"]
            for i, folder in enumerate(folders)
        ]
        for regime, folders in references.items()
    }  # fmt: skip
    for (regime, seed), _ in targets.items():
        scores = pd.read_parquet(out / "regimes" / f"{regime}-seed{seed}" / "scores.parquet")
        calibrated = scores[scores["run"] == "structural_reference"].set_index("id")
        if regime not in references:  # the weak regime here: no reference models, no reference rows (skip noted)
            assert calibrated.empty and regime == "weak"
            continue
        raw = scores[scores["run"] == "structural_paper"].set_index("id").loc[calibrated.index]
        assert (calibrated["calibrate"] == "reference").all()
        np.testing.assert_array_equal(calibrated["raw_value"], raw["value"])
        theirs = np.stack([values.loc[calibrated.index].to_numpy() for values in own[regime]])
        if len(theirs) == 1:
            expected = calibrated["raw_value"].to_numpy() - theirs[0]
        else:
            expected = (calibrated["raw_value"].to_numpy() - theirs.mean(0)) / np.sqrt(theirs.var(0, ddof=1).mean())
        # the same float64 arithmetic on the same float32 values: equal to a few ulps of the largest term
        np.testing.assert_allclose(calibrated["value"], expected, rtol=0, atol=1e-12 * np.abs(expected).max())
        assert np.abs(expected).max() > 0
    metrics = pd.read_csv(out / "tables" / "regime_metrics.csv")
    assert set(metrics.loc[metrics["run"] == "pia_reference", "regime"]) == set(params["REGIMES"]) - {"weak"}
    audit_features = pd.read_parquet(out / "regimes" / "fine-tuned-seed0" / "audit_features.parquet")
    assert audit_features["structural_reference"].notna().all()


def test_extra_nonmembers_join_the_test_split_from_outside_the_split(tmp_path):
    """EXTRA_NONMEMBERS: the first N catalogue images outside the split become test non-members (nothing
    else changes); a target that trained on them, or a regime study that does, is refused."""
    from mialib import data, imagesets

    plain = imagesets.open_imageset("emoji").records
    extended = imagesets.open_imageset("emoji?extra_nonmembers=20").records
    filler = data.read_manifest(ROOT / experiment.FILLER)
    added = extended[~extended["id"].isin(plain["id"])]
    assert list(added["id"]) == list(filler["id"].head(20))
    assert set(added["label"]) == {0} and set(added["subset"]) == {"test"}
    kept = extended[extended["id"].isin(plain["id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[["id", "label", "subset"]], plain[["id", "label", "subset"]])
    with pytest.raises(data.DataError, match="emoji_filler.csv has 696 images; extra_nonmembers asks for 700"):
        imagesets.open_imageset("emoji?extra_nonmembers=700")
    # a target whose pool held the filler images is refused; the default recipe's is not
    for filler_images, refused in ((0, False), (32, True)):
        folder = tmp_path / f"target-{filler_images}"
        folder.mkdir()
        (folder / "tiny_config.json").write_text(json.dumps({"filler_images": filler_images}))
        params = {"DATA": "emoji", "MODEL": str(folder), "EXTRA_NONMEMBERS": 20}
        if refused:
            with pytest.raises(data.DataError, match="trained on 32 of them"):
                experiment.check_unseen_extras(params)
        else:
            experiment.check_unseen_extras(params)
    regimes = experiment.load_preset(ROOT / "configs" / "regimes.yaml")
    with pytest.raises(ValueError, match="train on them"):
        experiment.regime_targets({**regimes, "EXTRA_NONMEMBERS": 20})
