"""The attacks on a tiny seeded target, each against an independent hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

import helpers
from mialib.attacks import loss_attack, structural_attack, vae_control
from mialib.attacks.registry import REGISTRY, assert_within_tolerance
from mialib.hashing import image_seed
from mialib.inversion import condition
from mialib.settings import Settings
from mialib.target import load_target

CAPTIONS = ["red apple", "man farmer"]
IDS = ["1F34E", "1F468-200D-1F33E"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def pipeline_and_target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_attacks")
    pipeline = helpers.save_tiny_pipeline(folder)
    return pipeline, load_target(folder)


@pytest.fixture(scope="module")
def target(pipeline_and_target):
    return pipeline_and_target[1]


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return helpers.make_images(2)


def _skimage_ssim(x, y, data_range=2.0):
    x, y = x.double().numpy(), y.double().numpy()
    return np.array([structural_similarity(a, b, channel_axis=0, data_range=data_range) for a, b in zip(x, y)])


def _step(z, eps, a_from, a_to):
    x0 = (z - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
    return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps


def _cost(name, settings=None, **params):
    """The registry's cost formula at ``params`` (over the defaults) and ``settings`` (default: the
    defaults): U-Net evaluations per image."""
    spec = REGISTRY[name]
    return spec.cost(spec.params(params), settings or Settings())


# --------------------------------------------------------------------------------------------------
def test_image_seed_matches_its_specification():
    assert image_seed("1F34E") == helpers.reference_image_seed("1F34E")
    assert image_seed("1F34E@t100", 3) == helpers.reference_image_seed("1F34E@t100", 3)
    assert image_seed("1F34E") != image_seed("1F34E", 1)
    assert 0 <= image_seed("x") < 2**63


@pytest.mark.numerics
def test_structural_attack_equals_hand_computation(pipeline_and_target, images):
    pipeline, target = pipeline_and_target
    abar = pipeline.scheduler.alphas_cumprod  # from the pipeline object that was saved, not the loaded target
    cond = helpers.reference_text_embeddings(pipeline, CAPTIONS)
    sf = pipeline.vae.config.scaling_factor
    with torch.no_grad():
        z0 = pipeline.vae.encode(images).latent_dist.mode() * sf
        eps0 = pipeline.unet(z0, 0, encoder_hidden_states=cond).sample
        z50 = _step(z0, eps0, float(abar[0]), float(abar[50]))
        eps50 = pipeline.unet(z50, 50, encoder_hidden_states=cond).sample
        z100 = _step(z50, eps50, float(abar[50]), float(abar[100]))
        decoded = pipeline.vae.decode(z100 / sf).sample
    expected = _skimage_ssim(images, decoded)

    before = target.unet_evals
    with helpers.UNetCallCounter(target.unet) as counter:
        out = structural_attack(target, images, CAPTIONS, IDS, t=100, stride=50)
    # (eps at the target timestep instead, or the official linear schedule, moves these scores by > 3e-4)
    np.testing.assert_allclose(out.scores, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.extras["ssim"], expected, rtol=0, atol=1e-6)
    assert (
        counter.images
        == target.unet_evals - before
        == _cost("structural", t=100, stride=50) * len(images)
        == 2 * len(images)
    )
    assert [int(t.flatten()[0]) for t, _ in counter.calls] == [0, 50]
    # the scores genuinely depend on the inversion: SSIM after inversion differs from the VAE round trip
    with torch.no_grad():
        roundtrip = _skimage_ssim(images, pipeline.vae.decode(z0 / sf).sample)
    assert np.abs(roundtrip - expected).max() > 1e-3

    # the same decoded image gives the pixel MSE and the latent distance in the extras
    np.testing.assert_allclose(
        out.extras["mse"], ((images.double() - decoded.double()) ** 2).flatten(1).mean(1).numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(
        out.extras["latent_mse"], ((z100.double() - z0.double()) ** 2).flatten(1).mean(1).numpy(), rtol=1e-5
    )
    with pytest.raises(ValueError, match="measure"):
        structural_attack(target, images, CAPTIONS, IDS, measure="psnr")


@pytest.mark.numerics
def test_structural_attack_against_the_reconstruction(pipeline_and_target, images):
    """recon=True: SSIM(D(E(x)), D(z_100)), the autoencoder's own error cancelled (hand-computed DDIM, skimage)."""
    pipeline, target = pipeline_and_target
    abar = pipeline.scheduler.alphas_cumprod
    cond = helpers.reference_text_embeddings(pipeline, CAPTIONS)
    sf = pipeline.vae.config.scaling_factor
    with torch.no_grad():
        z0 = pipeline.vae.encode(images).latent_dist.mode() * sf
        z50 = _step(z0, pipeline.unet(z0, 0, encoder_hidden_states=cond).sample, float(abar[0]), float(abar[50]))
        z100 = _step(z50, pipeline.unet(z50, 50, encoder_hidden_states=cond).sample, float(abar[50]), float(abar[100]))
        reconstruction, decoded = pipeline.vae.decode(z0 / sf).sample, pipeline.vae.decode(z100 / sf).sample
    expected = _skimage_ssim(reconstruction, decoded)
    out = structural_attack(target, images, CAPTIONS, IDS, t=100, stride=50, recon=True)
    np.testing.assert_allclose(out.scores, expected, rtol=0, atol=1e-6)
    against_x = _skimage_ssim(images, decoded)
    assert np.abs(against_x - expected).min() > 1e-3  # another score than the paper's
    spec = REGISTRY["structural"]
    assert spec.describe(spec.params({"recon": True})) == "t=100, stride=50, +SSIM to D(E(x))"
    at_zero = structural_attack(target, images, CAPTIONS, IDS, t=0, stride=50, recon=True)
    np.testing.assert_allclose(at_zero.scores, 1.0, rtol=0, atol=1e-6)  # the reconstruction against itself


@pytest.mark.numerics
def test_structural_attack_at_t0_is_the_vae_round_trip_with_data_range_one(target, images):
    latents = target.encode_images(images)
    with torch.no_grad():
        decoded = target.decode(latents)
    before = target.unet_evals
    out = structural_attack(target, images, CAPTIONS, IDS, t=0, stride=50, data_range=1.0)
    assert (target.unet_evals - before) / len(images) == _cost("structural", t=0, stride=50) == 0
    np.testing.assert_allclose(out.scores, _skimage_ssim(images, decoded, 1.0), rtol=0, atol=1e-6)
    mse = ((images.double() - decoded.double()) ** 2).flatten(1).mean(1).numpy()
    np.testing.assert_allclose(out.extras["mse"], mse, rtol=1e-6)
    np.testing.assert_array_equal(out.extras["latent_mse"], 0.0)


def _hand_inversion_to_100(pipeline, images):
    abar = pipeline.scheduler.alphas_cumprod
    cond = helpers.reference_text_embeddings(pipeline, CAPTIONS)
    sf = pipeline.vae.config.scaling_factor
    with torch.no_grad():
        z = pipeline.vae.encode(images).latent_dist.mode() * sf
        for t_from, t_to in ((0, 50), (50, 100)):
            eps = pipeline.unet(z, t_from, encoder_hidden_states=cond).sample
            z = _step(z, eps, float(abar[t_from]), float(abar[t_to]))
        return pipeline.vae.decode(z / sf).sample


@pytest.mark.numerics
def test_structural_attack_ms_ssim_measure(pipeline_and_target, images):
    """MS-SSIM itself is checked against torchmetrics in test_similarity; here, that the attack scores it
    on the hand-inverted image."""
    from mialib.similarity import ms_ssim

    pipeline, target = pipeline_and_target
    expected = ms_ssim(images.double(), _hand_inversion_to_100(pipeline, images).double(), data_range=2.0).numpy()
    out = structural_attack(target, images, CAPTIONS, IDS, t=100, stride=50, measure="ms_ssim")
    np.testing.assert_allclose(out.scores, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out.scores, out.extras["ms_ssim"])
    assert "ssim" not in out.extras


def test_structural_attack_cost_with_guidance_and_empty_prompt(target, images):
    null = target.encode_prompts(["", ""]).hidden
    before = target.unet_evals
    with helpers.UNetCallCounter(target.unet) as counter:
        structural_attack(target, images, CAPTIONS, IDS, t=100, stride=25, guidance=3.0, prompt="empty")
    counted = (target.unet_evals - before) / len(images)
    assert (
        counted == _cost("structural", Settings(guidance=3.0, prompt="empty"), t=100, stride=25) == 8
    )  # 4 steps, two branches each
    assert counter.images == 8 * len(images) == target.unet_evals - before
    assert all(torch.equal(hidden, null) for _, hidden in counter.calls)  # empty prompt: both branches are ""


def test_condition_modes(target):
    cond, uncond = condition(target, CAPTIONS, prompt="caption", guidance=1.0)
    assert uncond is None
    assert cond.equal(target.encode_prompts(CAPTIONS))
    cond, uncond = condition(target, CAPTIONS, prompt="empty", guidance=2.0)
    assert cond.equal(target.encode_prompts(["", ""])) and uncond.equal(cond)
    with pytest.raises(ValueError):
        condition(target, CAPTIONS, prompt="none")


# --------------------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("t", [100, 400])
def test_loss_attack_equals_hand_computation(pipeline_and_target, images, t):
    pipeline, target = pipeline_and_target
    abar = float(pipeline.scheduler.alphas_cumprod[t])
    cond = helpers.reference_text_embeddings(pipeline, CAPTIONS)
    with torch.no_grad():
        z0 = pipeline.vae.encode(images).latent_dist.mode() * pipeline.vae.config.scaling_factor
        noise = torch.stack(
            [
                torch.randn(
                    z0.shape[1:], generator=torch.Generator().manual_seed(helpers.reference_image_seed(f"{i}@t{t}"))
                )
                for i in IDS
            ]
        )
        noisy = math.sqrt(abar) * z0 + math.sqrt(1 - abar) * noise
        predicted = pipeline.unet(noisy, t, encoder_hidden_states=cond).sample
    expected = -((predicted.double() - noise.double()) ** 2).flatten(1).mean(1).numpy()

    before = target.unet_evals
    with helpers.UNetCallCounter(target.unet) as counter:
        out = loss_attack(target, images, CAPTIONS, IDS, t=t)
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5)
    np.testing.assert_allclose(out.extras["mse"], -expected, rtol=1e-5)
    assert counter.images == target.unet_evals - before == _cost("loss", t=t) * len(images) == len(images)
    # the same image gets the same noise in another batch and run; another seed gives other noise
    alone = loss_attack(target, images[1:], CAPTIONS[1:], IDS[1:], t=t)
    assert_within_tolerance(
        REGISTRY["loss"],
        REGISTRY["loss"].params({"t": t}),
        alone.scores,
        out.scores[1:],
        {"mse": out.extras["mse"][1:]},
    )
    reseeded = loss_attack(target, images, CAPTIONS, IDS, t=t, seed=1)
    assert np.abs(reseeded.scores - out.scores).max() > 1e-6


# --------------------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_vae_control_equals_skimage_and_uses_no_unet(pipeline_and_target, images):
    pipeline, target = pipeline_and_target
    sf = pipeline.vae.config.scaling_factor
    with torch.no_grad():
        latents = pipeline.vae.encode(images).latent_dist.mode() * sf
        reconstruction = pipeline.vae.decode(latents / sf).sample
    expected = _skimage_ssim(images, reconstruction)
    before = target.unet_evals
    with helpers.UNetCallCounter(target.unet) as counter:
        out = vae_control(target, images, CAPTIONS, IDS)
    np.testing.assert_allclose(out.scores, expected, rtol=0, atol=1e-6)
    assert counter.images == target.unet_evals - before == _cost("vae_control") * len(images) == 0
    one = vae_control(target, images, CAPTIONS, IDS, data_range=1.0)
    np.testing.assert_allclose(one.scores, _skimage_ssim(images, reconstruction, 1.0), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
def test_encode_images_sample_mode_is_seeded(pipeline_and_target, images):
    pipeline, target = pipeline_and_target
    first = target.encode_images(images, mode="sample", seeds=[1, 2])
    again = target.encode_images(images, mode="sample", seeds=[1, 2])
    other = target.encode_images(images, mode="sample", seeds=[1, 3])
    assert torch.equal(first, again)
    assert torch.equal(first[0], other[0])  # per-image seeds: image 0 is unaffected by image 1's seed
    assert (first[1] - other[1]).abs().max() > 1e-4
    assert (first - target.encode_images(images)).abs().max() > 1e-4  # a sample is not the mode
    # by hand: mean + std * N(0, 1) drawn from a generator seeded with the image's seed, times the scaling factor
    with torch.no_grad():
        posterior = pipeline.vae.encode(images).latent_dist
    noise = torch.stack(
        [torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    )
    expected = (posterior.mean + posterior.std * noise) * pipeline.vae.config.scaling_factor
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        target.encode_images(images, mode="sample")
    with pytest.raises(ValueError):
        target.encode_images(images, mode="sample", seeds=[1])


def test_sample_encode_mode_reaches_the_attacks(target, images):
    mode = structural_attack(target, images, CAPTIONS, IDS, encode_mode="mode")
    sample = structural_attack(target, images, CAPTIONS, IDS, encode_mode="sample")
    sample_again = structural_attack(target, images, CAPTIONS, IDS, encode_mode="sample")
    np.testing.assert_array_equal(sample.scores, sample_again.scores)
    assert np.abs(sample.scores - mode.scores).max() > 1e-6
