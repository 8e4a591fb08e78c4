"""Stable Diffusion as users have it: each family (SD 1.x epsilon, SD 2.x v-prediction, SDXL, a sample-predicting
model) in each file form (hub folder, fp16-variant folder, single original-layout .safetensors) through
`mialib score`, checked against diffusers' own pipelines; and every refusal with its message.
The pipelines are tiny random ones in the real components' classes (tests/model_zoo.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import helpers
import model_zoo
from mialib import cli, ddim
from mialib.target import UnsupportedModel, load_target

FAMILIES = {
    "sd1": model_zoo.build_sd1,
    "sd2_v": model_zoo.build_sd2_v,
    "sdxl": model_zoo.build_sdxl,
    "sample": model_zoo.build_sample,
}
PREDICTION = {"sd1": "epsilon", "sd2_v": "v_prediction", "sdxl": "epsilon", "sample": "sample"}
ATTACKS = ["structural", "loss:t=[100,300]", "pia", "secmi", "clid"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """family -> {"pipeline", "folder", "fp16", "single"}."""
    root = tmp_path_factory.mktemp("zoo")
    models = {}
    for family, build in FAMILIES.items():
        folder = root / family
        pipeline = build(folder)
        models[family] = {
            "pipeline": pipeline,
            "folder": folder,
            "fp16": model_zoo.variant_copy(folder, root / f"{family}-fp16"),
            "single": model_zoo.single_file(folder, root / f"{family}.safetensors"),
        }
    return models


@pytest.fixture(scope="module")
def user_set(tmp_path_factory):
    return helpers.write_imagefolder(tmp_path_factory.mktemp("data") / "set", n=4)  # one per class and subset


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory):
    """family -> (scores, parameters) of the hub-layout folder in float32, filled by the first test that needs it."""
    return {}


def _score(model, user_set, out, *extra, attacks=ATTACKS):
    argv = [
        "score",
        "--model",
        str(model),
        "--data",
        f"imagefolder:{user_set}",
        "--out",
        str(out),
        "--bootstrap",
        "20",
        "--quiet",
        "--batch-size",
        "4",
        *extra,
    ]
    for attack in attacks:
        argv += ["--attack", attack]
    cli.main(argv)
    return pd.read_parquet(out / "scores.parquet"), json.loads((out / "parameters.json").read_text())


# --------------------------------------------------------------------------------------------------
# Every family and file form through `mialib score`
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_and_file_form_scores(zoo, user_set, tmp_path, family, folder_runs):
    model = zoo[family]
    folder_runs[family] = folder_scores, parameters = _score(model["folder"], user_set, tmp_path / "folder")
    assert parameters["family"] == ("sdxl" if family == "sdxl" else "sd")
    assert parameters["prediction_type"] == PREDICTION[family]
    assert folder_scores["run"].nunique() == len(ATTACKS)
    assert len(folder_scores) == 4 * len(ATTACKS) and np.isfinite(folder_scores["score"]).all()
    assert folder_scores.groupby("run")["score"].std().gt(0).all()  # images are told apart
    key = ["run", "id"]
    folder_scores = folder_scores.sort_values(key).reset_index(drop=True)

    # the single original-layout file, converted by diffusers with the folder as its config: the same model
    single_scores, parameters = _score(
        model["single"], user_set, tmp_path / "single", "--model-config", str(model["folder"])
    )
    assert parameters["prediction_type"] == PREDICTION[family] and parameters["model_config"] == str(model["folder"])
    single_scores = single_scores.sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(single_scores["score"], folder_scores["score"], rtol=1e-4, atol=1e-6)

    # the fp16 variant files, found without being named and loaded in float32: the weights rounded to fp16
    variant_scores, _ = _score(model["fp16"], user_set, tmp_path / "fp16")
    variant_scores = variant_scores.sort_values(key).reset_index(drop=True)
    for run, group in folder_scores.groupby("run"):
        other = variant_scores.loc[group.index, "score"]
        assert np.corrcoef(group["score"], other)[0, 1] > 0.99, run
        assert not np.array_equal(group["score"], other), run


def test_the_variant_can_be_named_a_missing_one_falls_back_or_is_refused(zoo, tmp_path, capsys):
    target = load_target(zoo["sd1"]["fp16"], variant="fp16")
    assert all(p.endswith(".fp16.safetensors") for files in target.sources.values() for p in files)
    # as diffusers does: a component without the variant loads its plain files, and says so
    plain = load_target(zoo["sd1"]["folder"], variant="fp16")
    assert not any(".fp16." in p for files in plain.sources.values() for p in files)
    assert "has no 'fp16' variant weights; its plain files are loaded" in capsys.readouterr().out
    with pytest.raises(
        FileNotFoundError, match=r"has no 'bf16' variant weights \(it has: fp16\); set VARIANT / --variant accordingly"
    ):
        load_target(zoo["sd1"]["fp16"], variant="bf16")


def test_bfloat16_scores_close_to_float32(zoo, user_set, tmp_path, folder_runs):
    fp32, fp32_parameters = folder_runs.get("sd2_v") or _score(zoo["sd2_v"]["folder"], user_set, tmp_path / "fp32")
    # bf16 on the CPU is slow, so two attacks; SecMI's step-wise error is small enough that bf16 rounding
    # reorders it (correlation 0.78 with fp32 here), so it is not expected to agree this closely
    bf16, parameters = _score(
        zoo["sd2_v"]["folder"], user_set, tmp_path / "bf16", "--dtype", "bfloat16", attacks=["structural", "pia"]
    )
    assert set(bf16["dtype"]) == {"bfloat16"} and parameters["settings"]["dtype"] == "bfloat16"
    assert parameters["fingerprint"] != fp32_parameters["fingerprint"]  # bf16 results never read fp32 caches
    both = fp32.merge(bf16, on=["run", "id"], suffixes=("_fp32", "_bf16"))
    assert len(both) == 2 * 4
    for run, group in both.groupby("run"):
        assert np.corrcoef(group["score_fp32"], group["score_bf16"])[0, 1] > 0.9, run


# --------------------------------------------------------------------------------------------------
# Against diffusers' own pipelines and scheduler
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd2_v", "sample", "sd1"])
def test_one_ddim_step_matches_diffusers_scheduler_for_each_prediction_type(zoo, family):
    """Our eps conversion plus DDIM step against diffusers' DDIMScheduler.step on the model's raw output."""
    from diffusers import DDIMScheduler

    target = load_target(zoo[family]["folder"])
    pipeline = zoo[family]["pipeline"]
    scheduler = DDIMScheduler.from_config(
        {**pipeline.scheduler.config, "clip_sample": False}
    )  # the walk never clips x0
    scheduler.set_timesteps(50)  # 1000 / 50: t = 501 -> 481 (steps_offset 1)
    t, t_prev = 501, 481
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = target.encode_prompts(["red apple", "man farmer"])
    with torch.no_grad():
        raw = pipeline.unet(latents, t, encoder_hidden_states=cond.hidden).sample
    expected = scheduler.step(raw, t, latents, eta=0.0).prev_sample
    abar = ddim.alphas_cumprod(target.scheduler)
    ours = ddim.ddim_step(latents, target.eps(latents, t, cond), abar[t], abar[t_prev])
    assert scheduler.config.prediction_type == PREDICTION[family]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_sdxl_conditioning_matches_the_sdxl_pipeline(zoo):
    pipeline = zoo["sdxl"]["pipeline"]
    target = load_target(zoo["sdxl"]["folder"])
    assert target.family == "sdxl" and target.zero_empty_prompt
    captions = ["red apple", "man farmer"]
    with torch.no_grad():
        hidden, negative, pooled, negative_pooled = pipeline.encode_prompt(
            captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    cond = target.encode_prompts(captions)
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-6)
    null = target.encode_prompts(["", ""])  # force_zeros_for_empty_prompt: the pipeline's negative conditioning
    assert torch.equal(null.hidden, negative) and torch.equal(null.pooled, negative_pooled) and not negative.any()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    time_ids = pipeline._get_add_time_ids(
        (32, 32),
        (0, 0),
        (32, 32),
        dtype=hidden.dtype,
        text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(target.time_ids(latents, hidden.dtype), time_ids.repeat(2, 1))
    with torch.no_grad():
        expected = pipeline.unet(
            latents,
            300,
            encoder_hidden_states=hidden,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(2, 1)},
        ).sample
    torch.testing.assert_close(target.eps(latents, 300, cond), expected, rtol=1e-4, atol=1e-5)
    assert target.resolution == 32


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_pickled_components_are_refused_with_a_conversion_hint(zoo, tmp_path, component):
    folder = model_zoo.pickle_copy(zoo["sd1"]["folder"], tmp_path / "pickled", component=component)
    with pytest.raises(
        UnsupportedModel,
        match=rf"{component} in .* has only pickled weights \(.*\.bin\).*never unpickles.*save_pretrained\(",
    ):
        load_target(folder)


def test_single_files_need_a_config_and_must_be_safetensors(zoo, tmp_path, user_set, capsys):
    with pytest.raises(
        ValueError,
        match=(
            r"is a single-file checkpoint"
            r".*MODEL_CONFIG / --model-config: stable-diffusion-v1-5/stable-diffusion-v1-5 \(SD 1.x\)"
        ),
    ):
        load_target(zoo["sd1"]["single"])
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(
        UnsupportedModel,
        match=r"model.ckpt is a pickled checkpoint \(.ckpt\).*never unpickles.*weights_only=True.*model.safetensors",
    ):
        load_target(ckpt, config=zoo["sd1"]["folder"])
    with pytest.raises(SystemExit):
        _score(zoo["sd1"]["single"], user_set, tmp_path / "out")
    assert "--model-config" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="config is for single-file checkpoints"):
        load_target(zoo["sd1"]["folder"], config=zoo["sd1"]["folder"])


def test_a_hub_id_is_checked_then_downloaded_safetensors_only(zoo, monkeypatch):
    """No hub here: diffusers' download is replaced by the zoo's folder, to check what mialib asks of it."""
    from diffusers import DiffusionPipeline

    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the fake hub is online (offline, an uncached id is refused at once)
    monkeypatch.setattr(
        DiffusionPipeline,
        "load_config",
        classmethod(lambda cls, name, **kw: {"_class_name": "StableDiffusionXLPipeline"}),
    )
    monkeypatch.setattr(
        DiffusionPipeline,
        "download",
        classmethod(lambda cls, name, **kw: calls.append((name, kw)) or str(zoo["sdxl"]["fp16"])),
    )
    target = load_target("stabilityai/stable-diffusion-xl-base-1.0", variant="fp16")
    assert target.family == "sdxl" and target.name == "stabilityai/stable-diffusion-xl-base-1.0"
    assert calls == [
        (
            "stabilityai/stable-diffusion-xl-base-1.0",
            {
                "variant": "fp16",
                "use_safetensors": True,
                "safety_checker": None,
                "feature_extractor": None,
                "image_encoder": None,
            },
        )
    ]
    monkeypatch.setattr(
        DiffusionPipeline, "load_config", classmethod(lambda cls, name, **kw: {"_class_name": "Flux2Pipeline"})
    )
    with pytest.raises(UnsupportedModel, match=r"is FLUX.2 \(Flux2Pipeline\)"):
        load_target("black-forest-labs/FLUX.2-dev")
    assert len(calls) == 1  # refused before any download
