"""mialib.ddim: the DDIM step by hand, the schedule against diffusers and numpy, inversion on a tiny U-Net."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import helpers
from mialib import ddim
from mialib.target import load_target

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_ddim")
    helpers.save_tiny_pipeline(folder)
    return load_target(folder)


@pytest.fixture(scope="module")
def inputs(target):
    torch.manual_seed(0)
    images = helpers.make_images(2)
    latents = target.encode_images(images)
    cond = target.encode_prompts(["red apple", "man farmer"]).hidden
    uncond = target.encode_prompts(["", ""]).hidden
    return latents, cond, uncond


def _abar(target, t):
    return float(target.scheduler.alphas_cumprod[t])


def _manual_step(z, eps, a_from, a_to):
    """DDIM eq. 12 (sigma = 0) in float64, written out independently of mialib."""
    x0 = (z.double() - math.sqrt(1 - a_from) * eps.double()) / math.sqrt(a_from)
    return (math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps.double()).float()


def _unet(target, z, t, embeddings):
    with torch.no_grad():
        return target.unet(z, t, encoder_hidden_states=embeddings).sample


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------
def test_ddim_step_hand_computed():
    # a_from = 0.64: sqrt = 0.8, sqrt(1 - a) = 0.6;  a_to = 0.36: sqrt = 0.6, sqrt(1 - a) = 0.8
    z = torch.tensor([1.0, -2.0], dtype=torch.float64)
    eps = torch.tensor([0.5, 0.25], dtype=torch.float64)
    # x0_hat = (z - 0.6 eps) / 0.8 = [(1 - 0.3) / 0.8, (-2 - 0.15) / 0.8] = [0.875, -2.6875]
    # z_to   = 0.6 x0_hat + 0.8 eps = [0.525 + 0.4, -1.6125 + 0.2]     = [0.925, -1.4125]
    z_to = ddim.ddim_step(z, eps, 0.64, 0.36)
    np.testing.assert_allclose(z_to.numpy(), [0.925, -1.4125], rtol=0, atol=1e-14)
    # going back with the same eps lands exactly where it started
    np.testing.assert_allclose(ddim.ddim_step(z_to, eps, 0.36, 0.64).numpy(), [1.0, -2.0], rtol=0, atol=1e-14)
    # a_to = 1 returns the predicted clean sample
    np.testing.assert_allclose(ddim.ddim_step(z, eps, 0.64, 1.0).numpy(), [0.875, -2.6875], rtol=0, atol=1e-14)
    # float32 samples stay float32 and agree to float32 precision; tensors as alphas work too
    z32 = ddim.ddim_step(z.float(), eps.float(), torch.tensor(0.64, dtype=torch.float64), torch.tensor(0.36))
    assert z32.dtype == torch.float32
    np.testing.assert_allclose(z32.numpy(), [0.925, -1.4125], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------------
def test_model_schedule_is_the_schedulers_own():
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    abar = ddim.alphas_cumprod(scheduler, "model")
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert torch.equal(abar, scheduler.alphas_cumprod.double())
    # scaled_linear by hand: betas linear in sqrt(beta), squared (float32 in diffusers, hence the tolerance)
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    np.testing.assert_allclose(abar.numpy(), np.cumprod(1 - betas), rtol=2e-6)
    # the returned tensor is a copy: editing it leaves the scheduler alone
    abar[5] = 0.0
    assert scheduler.alphas_cumprod[5] > 0.99


def test_official_linear_schedule_and_the_abar100_gap():
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    official = ddim.alphas_cumprod(scheduler, "official_linear")
    expected = np.cumprod(1 - np.linspace(0.00085, 0.012, 1000))
    np.testing.assert_allclose(official.numpy(), expected, rtol=1e-12)
    model = ddim.alphas_cumprod(scheduler, "model")
    # computed here: scaled_linear 0.894223..., linear 0.867344... (docs/method.md: SD 0.894 vs official code 0.867)
    assert round(float(model[100]), 3) == 0.894
    assert round(float(official[100]), 3) == 0.867
    assert round(float(np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)[100]), 3) == 0.894
    assert abs(float(model[100]) - float(official[100])) > 0.02
    with pytest.raises(ValueError):
        ddim.alphas_cumprod(scheduler, "cosine")


def test_loaded_target_keeps_the_sd_schedule(target):
    reference = DDIMScheduler(**SD_SCHEDULER).alphas_cumprod.double()
    assert torch.equal(ddim.alphas_cumprod(target.scheduler, "model"), reference)


# --------------------------------------------------------------------------------------------------
# Timesteps
# --------------------------------------------------------------------------------------------------
def test_path():
    assert ddim.path(100, 50) == [0, 50, 100]
    assert ddim.path(100, 10) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    with pytest.raises(ValueError):
        ddim.path(100, 30)


@pytest.mark.parametrize(
    "steps, increasing",
    [
        ([0, 50, 40], True),  # not monotone
        ([0, 50, 50], True),  # repeated
        ([100, 50, 0], True),  # decreasing where increasing is asked
        ([0, 50, 100], False),  # increasing where decreasing is asked
        ([0, 1000], True),  # out of range (1000 training timesteps: 0..999)
        ([-1, 10], True),  # negative
        ([0], True),  # a single timestep is no path
    ],
)
def test_check_timesteps_rejects(steps, increasing):
    with pytest.raises(ValueError):
        ddim.check_timesteps(steps, 1000, increasing=increasing)


def test_check_timesteps_accepts():
    assert ddim.check_timesteps([0, 50, 999], 1000) == [0, 50, 999]
    assert ddim.check_timesteps(np.array([100, 50, 0]), 1000, increasing=False) == [100, 50, 0]


def test_invert_and_denoise_check_direction(target, inputs):
    latents, cond, _ = inputs
    with pytest.raises(ValueError):
        ddim.invert(target, latents, [100, 50, 0], cond)
    with pytest.raises(ValueError):
        ddim.denoise(target, latents, [0, 50, 100], cond)


# --------------------------------------------------------------------------------------------------
# Inversion: cost, conditioning and the timestep at which eps is evaluated
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance, per_image", [(1.0, 2), (3.0, 4), (0.0, 2)])
def test_invert_unet_evaluations(target, inputs, guidance, per_image):
    latents, cond, uncond = inputs
    n = len(latents)
    before = target.unet_evals
    with helpers.UNetCallCounter(target.unet) as counter:
        trajectory = ddim.invert(target, latents, [0, 50, 100], cond, uncond, guidance=guidance)
    assert target.unet_evals - before == per_image * n
    assert counter.images == per_image * n
    assert len(counter.calls) == per_image  # one batched call per U-Net evaluation
    assert sorted(trajectory) == [0, 50, 100] and trajectory[0] is latents
    timesteps = sorted({int(t.flatten()[0]) for t, _ in counter.calls})
    assert timesteps == [0, 50]  # eps at the source timesteps, never at 100
    embeddings = [hidden for _, hidden in counter.calls]
    if guidance == 0.0:
        assert all(torch.equal(h, uncond) for h in embeddings)
        assert not torch.equal(cond, uncond)
    elif guidance == 1.0:
        assert all(torch.equal(h, cond) for h in embeddings)
    else:
        assert sum(torch.equal(h, uncond) for h in embeddings) == 2
        assert sum(torch.equal(h, cond) for h in embeddings) == 2


def test_guidance_other_than_one_needs_uncond(target, inputs):
    latents, cond, _ = inputs
    for guidance in (0.0, 3.0):
        with pytest.raises(ValueError):
            ddim.invert(target, latents, [0, 50], cond, None, guidance=guidance)


def test_invert_first_step_uses_eps_at_the_source_timestep(target, inputs):
    latents, cond, _ = inputs
    trajectory = ddim.invert(target, latents, [0, 50, 100], cond)
    a0, a50, a100 = _abar(target, 0), _abar(target, 50), _abar(target, 100)
    eps_0 = _unet(target, latents, 0, cond)
    z50 = _manual_step(latents, eps_0, a0, a50)
    np.testing.assert_allclose(trajectory[50].numpy(), z50.numpy(), rtol=0, atol=1e-5)
    # the other convention (diffusers' DDIMInverseScheduler: eps at the target timestep) is measurably different
    z50_target_convention = _manual_step(latents, _unet(target, latents, 50, cond), a0, a50)
    assert (z50_target_convention - z50).abs().max() > 1e-3
    # second step from the manual z50, eps at t = 50
    z100 = _manual_step(z50, _unet(target, z50, 50, cond), a50, a100)
    np.testing.assert_allclose(trajectory[100].numpy(), z100.numpy(), rtol=0, atol=1e-5)


def test_invert_with_guidance_matches_manual_cfg(target, inputs):
    latents, cond, uncond = inputs
    trajectory = ddim.invert(target, latents, [0, 50], cond, uncond, guidance=3.0)
    eps_u, eps_c = _unet(target, latents, 0, uncond), _unet(target, latents, 0, cond)
    expected = _manual_step(latents, eps_u + 3.0 * (eps_c - eps_u), _abar(target, 0), _abar(target, 50))
    np.testing.assert_allclose(trajectory[50].numpy(), expected.numpy(), rtol=0, atol=1e-5)
    trajectory0 = ddim.invert(target, latents, [0, 50], cond, uncond, guidance=0.0)
    expected0 = _manual_step(latents, eps_u, _abar(target, 0), _abar(target, 50))
    np.testing.assert_allclose(trajectory0[50].numpy(), expected0.numpy(), rtol=0, atol=1e-5)


def test_invert_official_linear_schedule(target, inputs):
    latents, cond, _ = inputs
    trajectory = ddim.invert(target, latents, [0, 50], cond, schedule="official_linear")
    linear = np.cumprod(1 - np.linspace(0.00085, 0.012, 1000))
    expected = _manual_step(latents, _unet(target, latents, 0, cond), linear[0], linear[50])
    np.testing.assert_allclose(trajectory[50].numpy(), expected.numpy(), rtol=0, atol=1e-5)


def test_invert_then_denoise_returns_close_to_the_start(target, inputs):
    latents, cond, _ = inputs
    errors = {}
    for stride in (10, 5):
        up = ddim.path(100, stride)
        trajectory = ddim.invert(target, latents, up, cond)
        back = ddim.denoise(target, trajectory[100], up[::-1], cond)
        assert sorted(back) == up
        errors[stride] = float((back[0] - latents).norm() / latents.norm())
        travelled = float((trajectory[100] - latents).norm() / latents.norm())
    assert travelled > 0.3  # z_100 is far from z_0 ...
    assert errors[5] < 0.1 and errors[5] < travelled / 8  # ... the round trip is not
    assert errors[5] < 0.7 * errors[10]  # and the error shrinks with the step (first order: about half)
