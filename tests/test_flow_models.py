"""Flow-matching models as users have them: SD3 / SD3.5 and FLUX.1 (dev, with its guidance embedding, and
schnell-like without), tiny random pipelines in the real component classes saved in the hub layout
(tests/model_zoo.py), as folders, fp16-variant folders and with a LoRA file, through `mialib score` with every
attack that applies. The flow ODE step is checked against a hand Euler step and against diffusers' own
pipelines and FlowMatchEulerDiscreteScheduler; the loss against the flow-matching velocity error; the
refusals with their messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import helpers
import model_zoo
from mialib import cli, ddim, flow, runs
from mialib.attacks.loss import loss_errors
from mialib.hashing import seeded_normal
from mialib.target import FLUX_DISTILLED_GUIDANCE, UnsupportedModel, load_target

pytestmark = pytest.mark.slow

ATTACKS = {
    "sd3": ["structural", "structural:recon=true", "pixel", "latent", "backward", "loss:t=[100,300]", "pia", "secmi"],
    "flux": ["structural", "structural:recon=true", "pixel", "latent", "backward", "loss:t=[100,300]", "pia", "secmi"],
}
ATTACKS["sd3"].append("clid")  # SD3 has a trained unconditional branch; FLUX.1 has none (refused below)
CAPTIONS = ["red apple", "man farmer"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def flow_zoo(tmp_path_factory):
    """family -> {"pipeline", "folder", "fp16", "lora"}; also "sd3-no-t5" and "flux-schnell" (folders only)."""
    root = tmp_path_factory.mktemp("flow_zoo")
    models = {}
    for family, build in (("sd3", model_zoo.build_sd3), ("flux", model_zoo.build_flux)):
        pipeline = build(root / family)
        models[family] = {
            "pipeline": pipeline,
            "folder": root / family,
            "fp16": model_zoo.variant_copy(root / family, root / f"{family}-fp16"),
            "lora": helpers.save_tiny_lora(pipeline, root / f"{family}-lora"),
        }
    model_zoo.build_sd3(root / "sd3-no-t5", t5=False)
    model_zoo.build_flux(root / "flux-schnell", guidance_embeds=False)
    models["sd3-no-t5"] = {"folder": root / "sd3-no-t5"}
    models["flux-schnell"] = {"folder": root / "flux-schnell"}
    return models


@pytest.fixture(scope="module")
def user_set(tmp_path_factory):
    return helpers.write_imagefolder(tmp_path_factory.mktemp("flow_data") / "set", n=4)


def _score(model, user_set, out, *extra, attacks):
    argv = ["score", "--model", str(model), "--data", f"imagefolder:{user_set}", "--out", str(out)]
    argv += ["--bootstrap", "20", "--quiet", "--batch-size", "4", *extra]
    for attack in attacks:
        argv += ["--attack", attack]
    cli.main(argv)
    scores = pd.read_parquet(out / "scores.parquet").sort_values(["run", "id"]).reset_index(drop=True)
    return scores, json.loads((out / "parameters.json").read_text())


# --------------------------------------------------------------------------------------------------
# Every file form through `mialib score`
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_families_score_in_every_file_form(flow_zoo, user_set, tmp_path, family):
    model, attacks = flow_zoo[family], ATTACKS[family]
    scores, parameters = _score(model["folder"], user_set, tmp_path / "folder", attacks=attacks)
    assert parameters["family"] == family and parameters["prediction_type"] == flow.FLOW_PREDICTION
    assert len(scores) == 4 * len(attacks) and scores["run"].nunique() == len(attacks)
    assert np.isfinite(scores["score"]).all()
    assert scores.groupby("run")["score"].std().gt(0).all()  # images are told apart

    # the fp16 variant files, found without being named and loaded in float32: the weights rounded to fp16
    variant, _ = _score(model["fp16"], user_set, tmp_path / "fp16", attacks=attacks)
    for run, group in scores.groupby("run"):
        other = variant.loc[group.index, "score"]
        assert np.corrcoef(group["score"], other)[0, 1] > 0.99, run
        assert not np.array_equal(group["score"], other), run

    # a LoRA at scale 0 is the base model, score for score; at scale 1 it is another model
    zero, zero_parameters = _score(model["folder"], user_set, tmp_path / "zero", "--lora", f"{model['lora']}:0",
                                   attacks=attacks)  # fmt: skip
    np.testing.assert_array_equal(zero["score"], scores["score"])
    assert zero_parameters["fingerprint"] != parameters["fingerprint"]  # the adapter is in every cache key
    one, _ = _score(model["folder"], user_set, tmp_path / "one", "--lora", str(model["lora"]), attacks=attacks)
    assert set(one["model"]) == {f"{model['folder'].name}+{model['lora'].name}:1"}
    assert not np.array_equal(one["score"], scores["score"])


@pytest.mark.parametrize(("family", "preset"), [("sd3", "sd35-lora"), ("flux", "flux-lora")])
def test_the_lora_presets_attacks_all_run_on_their_family(flow_zoo, user_set, tmp_path, family, preset):
    """configs/sd35-lora.yaml and configs/flux-lora.yaml on the tiny model of their family and its LoRA: every
    model attack of ATTACKS and AUDIT_ATTACKS scores (the base model is the reference), none is refused."""
    from mialib import experiment
    from mialib.attacks.registry import get

    params = experiment.load_preset(ROOT / "configs" / f"{preset}.yaml")
    assert params["LORA"] and not params["REFERENCE_MODELS"]
    texts = [*params["ATTACKS"].values(), *params["AUDIT_ATTACKS"].values()]
    model_attacks = sorted({t for t in texts if get(runs.as_requests([t])[t].name).kind != "blind"})
    # calibrate=fit needs 10 calibration images of each class, more than this set has (tests/test_curve.py)
    model_attacks = [t for t in model_attacks if "calibrate=fit" not in t]
    assert any("calibrate=reference" in t for t in model_attacks)
    scores, _ = _score(flow_zoo[family]["folder"], user_set, tmp_path / preset, "--lora", str(flow_zoo[family]["lora"]),
                       attacks=model_attacks)  # fmt: skip
    assert scores["run"].nunique() == len(model_attacks) and np.isfinite(scores["score"]).all()


def test_sd3_without_t5_and_flux_schnell_load_and_score(flow_zoo, user_set, tmp_path):
    no_t5 = load_target(flow_zoo["sd3-no-t5"]["folder"])
    assert no_t5.text_encoder_3 is None and "text_encoder_3" not in no_t5.modules()
    cond = no_t5.encode_prompts(CAPTIONS)
    # the SD3 pipeline pads the missing T5 tokens with zeros: 16 CLIP tokens, then 256 zero rows
    assert torch.count_nonzero(cond.hidden[:, 16:]) == 0 and torch.count_nonzero(cond.hidden[:, :16]) > 0
    schnell = load_target(flow_zoo["flux-schnell"]["folder"])
    assert schnell.distilled_guidance is None and schnell.unconditional  # no embedding, still no CFG branch
    for name in ("sd3-no-t5", "flux-schnell"):
        scores, parameters = _score(flow_zoo[name]["folder"], user_set, tmp_path / name, attacks=["structural"])
        assert np.isfinite(scores["score"]).all() and scores["score"].std() > 0


# --------------------------------------------------------------------------------------------------
# The flow ODE against diffusers and a hand computation
# --------------------------------------------------------------------------------------------------
def _pipeline_step(target, pipeline, x, u, cond):
    """diffusers' own pipeline, one Euler step from noise level shift(u) to 0 on the flow's x (float32):
    its prompt embeddings are ours, no classifier-free guidance, FLUX-dev's guidance embedding at its default."""
    kwargs = dict(
        prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.pooled, num_inference_steps=1, sigmas=[u],
        output_type="latent", height=x.shape[-2] * target.downscale, width=x.shape[-1] * target.downscale,
    )  # fmt: skip
    if target.flow == "sd3":
        return pipeline(latents=x, guidance_scale=1.0, **kwargs).images
    from diffusers import FluxPipeline

    n, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, n, c, h, w)
    out = pipeline(latents=packed, guidance_scale=FLUX_DISTILLED_GUIDANCE, **kwargs).images
    return FluxPipeline._unpack_latents(out, h * target.downscale, w * target.downscale, target.downscale)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_flow_step_equals_diffusers_pipeline_and_the_hand_euler_step(flow_zoo, family):
    """The attacks' DDIM step on the variance-preserving coordinates is the flow's Euler step:
    - denoising from t to 0 equals diffusers' pipeline doing one Euler step of its own scheduler
      (x_0 = x_s - s v), with the model's shifted noise level s(t), which the scheduler sets itself;
    - inverting from t_a to t_b equals x_b = x_a + (s_b - s_a) v(x_a, s_a), v read from that pipeline step."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    target = load_target(flow_zoo[family]["folder"])
    pipeline = flow_zoo[family]["pipeline"]
    cond = target.encode_prompts(CAPTIONS)
    z0 = target.encode_images(helpers.make_images(2))
    levels = target.noise_levels.numpy()
    assert levels[0] == 0.0 and np.all(np.diff(levels) > 0)
    t_a, t_b = 100, 300
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(target.flow_scheduler.config)
    config = scheduler.config
    mu = None
    if config.use_dynamic_shifting:
        tokens = (z0.shape[-1] // 2) ** 2
        mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)  # fmt: skip
    else:
        assert levels[t_a] == pytest.approx(3 * 0.1 / (1 + 2 * 0.1), rel=1e-15)  # SD3's shift 3: s(100) = 0.25
    for t in (t_a, t_b):
        scheduler.set_timesteps(sigmas=[t / 1000], mu=mu)
        assert float(scheduler.sigmas[0]) == pytest.approx(levels[t], rel=1e-6)  # float32 in diffusers
    s_a, s_b = levels[t_a], levels[t_b]

    # the flow's x at t_a, from the same noise as the VP latents
    noise = seeded_normal(tuple(z0.shape[1:]), ["a", "b"], 0)
    x_a = ((1 - s_a) * z0.double() + s_a * noise.double()).float()
    z_a = x_a / np.sqrt((1 - s_a) ** 2 + s_a**2)

    # denoising t_a -> 0 against the pipeline's Euler step
    ours = ddim.denoise(target, z_a, [t_a, 0], cond)[0]  # s(0) = 0: the VP latent is the flow's x
    theirs = _pipeline_step(target, pipeline, x_a, t_a / 1000, cond)
    velocity = (x_a - theirs) / float(scheduler_sigma(scheduler, t_a / 1000, mu))
    scale = max(x_a.abs().max().item(), (s_a * velocity).abs().max().item())
    tolerance = 64 * torch.finfo(torch.float32).eps * scale  # a few float32 roundings of the step's terms
    assert (ours - x_a).abs().max() > 100 * tolerance  # the step moved the latents far beyond the tolerance
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)

    # inverting t_a -> t_b against the hand Euler step with that velocity
    ours = flow.to_flow(ddim.invert(target, z_a, [t_a, t_b], cond)[t_b], s_b)
    hand = x_a + (s_b - s_a) * velocity
    assert (hand - x_a).abs().max() > 100 * tolerance
    torch.testing.assert_close(ours, hand, rtol=0, atol=tolerance)


def scheduler_sigma(scheduler, u, mu):
    scheduler.set_timesteps(sigmas=[u], mu=mu)
    return scheduler.sigmas[0]


@pytest.mark.numerics
def test_the_loss_on_a_flow_model_is_its_velocity_error(flow_zoo):
    """loss at t = mean (eps_hat - eps)^2 = (1 - s)^2 mean (v_hat - (noise - x0))^2: the flow-matching loss at
    s(t), scaled by a constant of t (so any ranking, AUC or calibrated threshold at t is the flow loss's)."""
    target = load_target(flow_zoo["sd3"]["folder"])
    images, ids, t = helpers.make_images(2), ["a", "b"], 300
    errors = loss_errors(target, images, CAPTIONS, ids, [t])[t]
    x0 = target.encode_images(images)
    noise = seeded_normal(tuple(x0.shape[1:]), [f"{i}@t{t}" for i in ids], 0)
    s = float(target.noise_levels[t])
    x_s = (1 - s) * x0 + s * noise
    cond = target.encode_prompts(CAPTIONS)
    velocity = target.unet(
        hidden_states=x_s, timestep=torch.full((2,), s * 1000), encoder_hidden_states=cond.hidden,
        pooled_projections=cond.pooled,
    ).sample  # fmt: skip
    hand = (1 - s) ** 2 * (velocity - (noise - x0)).double().pow(2).flatten(1).mean(1).numpy()
    # float32 inputs of a squared error: a relative rounding of a few hundred float32 eps
    np.testing.assert_allclose(errors, hand, rtol=256 * np.finfo(np.float32).eps, atol=0)
    assert np.abs(errors - hand).max() < 1e-3 * np.abs(hand).min()


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------
def test_flux_refuses_what_needs_an_unconditional_branch(flow_zoo, user_set, tmp_path, capsys):
    target = load_target(flow_zoo["flux"]["folder"])
    with pytest.raises(UnsupportedModel, match=r"clid \(CLiD\) does not apply to flux: FLUX.1 has no trained uncond"):
        runs.check_schedule(target, runs.as_requests(["clid"]).values())
    cond = target.encode_prompts(CAPTIONS)
    z = target.encode_images(helpers.make_images(2))
    with pytest.raises(UnsupportedModel, match=r"guidance 3 needs an unconditional branch. FLUX.1 has no trained"):
        target.eps(z, 100, cond, target.encode_prompts(["", ""]), guidance=3.0)
    with pytest.raises(SystemExit) as exit_:
        _score(flow_zoo["flux"]["folder"], user_set, tmp_path / "clid", attacks=["clid", "structural"])
    assert exit_.value.code == 2
    assert "mialib score: error: clid (CLiD) does not apply to flux: FLUX.1 has no" in capsys.readouterr().err
    assert not (tmp_path / "clid" / "scores.parquet").exists()  # refused before anything was scored


@pytest.mark.parametrize(("pipeline_class", "name"), [("AuraFlowPipeline", "AuraFlow"), ("Flux2Pipeline", "FLUX.2")])
def test_other_flow_matching_families_are_refused_by_name(tmp_path, pipeline_class, name):
    folder = model_zoo.build_flow(tmp_path / "flow", pipeline_class)
    with pytest.raises(
        UnsupportedModel,
        match=rf"is {name} \({pipeline_class}\), a flow-matching model that mialib does not read.*Supported: "
        r"Stable Diffusion 1.x and 2.x .* SD3 / SD3.5 .* FLUX.1",
    ):
        load_target(folder)
    (folder / "model_index.json").unlink()  # the scheduler alone gives it away
    with pytest.raises(UnsupportedModel, match=r"a flow-matching model \(FlowMatchEulerDiscreteScheduler\)"):
        load_target(folder)


def test_a_single_flow_file_is_refused_with_what_to_pass(flow_zoo, tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "sd3.safetensors"
    save_file({"x": torch.zeros(1)}, str(file))
    with pytest.raises(UnsupportedModel, match=r"single-file sd3 checkpoints are not read here; pass the diffusers"):
        load_target(file, config=flow_zoo["sd3"]["folder"])


# --------------------------------------------------------------------------------------------------
# The embedded flow target (configs/flow.yaml) at a few steps
# --------------------------------------------------------------------------------------------------
def test_the_tiny_flow_target_trains_saves_as_sd3_and_scores(tmp_path, user_set):
    """TINY_FAMILY: sd3 builds an SD3 pipeline folder with the project's training code (here 20 steps), its
    checkpoints hold the transformer and both text encoders, and it scores through `mialib score`."""
    from mialib import experiment

    params = experiment.load_preset(ROOT / "configs" / "smoke.yaml")
    params.update(
        MODEL=str(tmp_path / "tiny-flow"), VAE_STEPS=10, UNET_STEPS=20, CHECKPOINTS=[10, 20], TINY_FAMILY="sd3"
    )
    folder = Path(experiment.prepare_target(params, progress=False))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    losses = json.loads((folder / "training" / "unet_loss.json").read_text())
    assert len(losses) == 20 and np.isfinite(losses).all()
    final = load_target(folder)
    early = load_target(folder, checkpoint=folder / "checkpoints" / "step-000010")
    assert final.family == early.family == "sd3" and set(early.sources) == set(final.sources)
    assert all(
        "step-000010" in p for name in ("transformer", "text_encoder", "text_encoder_2") for p in early.sources[name]
    )
    assert final.fingerprint() != early.fingerprint()
    scores, parameters = _score(folder, user_set, tmp_path / "scores", attacks=["structural", "loss", "clid"])
    assert parameters["family"] == "sd3" and np.isfinite(scores["score"]).all()
