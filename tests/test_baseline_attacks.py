"""SecMI, PIA, CLiD, the pixel-level and the backward-reconstruction attacks on a tiny seeded target.

Every score is checked against an independent hand computation: the U-Net calls and the DDIM step
(eq. 12, sigma = 0) are written out here on the saved pipeline object, not through mialib.ddim.
Every registry cost formula is checked against a forward hook on the loaded target's U-Net (and the
target's own counter, which the run layer reads).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

import helpers
from mialib.attacks.backward import backward_attack
from mialib.attacks.clid import clid_attack, reduce_caption
from mialib.attacks.latent import latent_attack
from mialib.attacks.pia import pia_attack
from mialib.attacks.pixel import pixel_attack
from mialib.attacks.registry import REGISTRY, assert_within_tolerance
from mialib.attacks.secmi import secmi_attack
from mialib.settings import Settings
from mialib.target import load_target

CAPTIONS = ["red apple", "man farmer"]
REDUCED = ["red", "man"]  # reduce_caption of CAPTIONS, written out
IDS = ["1F34E", "1F468-200D-1F33E"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def pipeline_and_target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_baselines")
    pipeline = helpers.save_tiny_pipeline(folder)
    return pipeline, load_target(folder)


@pytest.fixture(scope="module")
def target(pipeline_and_target):
    return pipeline_and_target[1]


@pytest.fixture(scope="module")
def images():
    return helpers.make_images(2)


# --------------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------------
def _abar(pipeline, t):
    return float(pipeline.scheduler.alphas_cumprod[t])  # the pipeline object that was saved, not the target


def _step(z, eps, a_from, a_to):
    """DDIM eq. 12 with sigma = 0: predicted x0, then the direction pointing to x_t."""
    x0 = (z - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
    return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps


def _latents(pipeline, images):
    with torch.no_grad():
        return pipeline.vae.encode(images).latent_dist.mode() * pipeline.vae.config.scaling_factor


def _decode(pipeline, latents):
    with torch.no_grad():
        return pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample


def _unet(pipeline, z, t, embeddings):
    with torch.no_grad():
        return pipeline.unet(z, t, encoder_hidden_states=embeddings).sample


def _noise(shape, name):
    return torch.randn(shape, generator=torch.Generator().manual_seed(helpers.reference_image_seed(name)))


def _per_image(x):
    return x.double().flatten(1).mean(1).numpy()


def _skimage_ssim(x, y, data_range=2.0):
    x, y = x.double().numpy(), y.double().numpy()
    return np.array([structural_similarity(a, b, channel_axis=0, data_range=data_range) for a, b in zip(x, y)])


def _cost(attack, guidance=1.0, **params):
    """The registry's cost formula for ``attack`` at ``params`` (over its defaults) and ``guidance``."""
    spec = next(s for s in REGISTRY.values() if s.function is attack)
    return spec.cost(spec.params(params), Settings(guidance=guidance))


def _run_counted(target, attack, images, **settings):
    """Run an attack; return its output and the U-Net evaluations per image seen by a forward hook."""
    before = target.unet_evals
    with helpers.UNetCallCounter(target.unet) as counter:
        out = attack(target, images, CAPTIONS, IDS, **settings)
    assert counter.images % len(images) == 0
    assert target.unet_evals - before == counter.images  # the target's own counter agrees with the hook
    return out, counter.images // len(images), counter


# --------------------------------------------------------------------------------------------------
# SecMI
# --------------------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_secmi_equals_hand_computation(pipeline_and_target, images):
    pipeline, target = pipeline_and_target
    cond = helpers.reference_text_embeddings(pipeline, CAPTIONS)
    z = {0: _latents(pipeline, images)}
    for t in range(0, 110, 10):  # inversion 0 -> 10 -> ... -> 100 -> 110, eps at the source timestep
        z[t + 10] = _step(z[t], _unet(pipeline, z[t], t, cond), _abar(pipeline, t), _abar(pipeline, t + 10))
    eps_110 = _unet(pipeline, z[110], 110, cond)  # one denoising step 110 -> 100, eps at the source 110
    reconstruction = _step(z[110], eps_110, _abar(pipeline, 110), _abar(pipeline, 100))
    error = _per_image((z[100] - reconstruction) ** 2)

    out, evals, counter = _run_counted(target, secmi_attack, images)
    # (the error is ~5e-7 on this untrained U-Net; eps at the target timestep 100 instead moves it by 30 %)
    np.testing.assert_allclose(out.extras["error"], error, rtol=1e-5, atol=0)
    np.testing.assert_allclose(out.scores, -error, rtol=1e-5, atol=0)
    assert evals == _cost(secmi_attack) == 100 // 10 + 2
    assert [int(t.flatten()[0]) for t, _ in counter.calls] == list(range(0, 110, 10)) + [110]
    assert error.min() > 0


# --------------------------------------------------------------------------------------------------
# PIA
# --------------------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_pia_equals_hand_computation(pipeline_and_target, images, guidance):
    pipeline, target = pipeline_and_target
    cond = helpers.reference_text_embeddings(pipeline, CAPTIONS)
    null = helpers.reference_text_embeddings(pipeline, ["", ""])

    def eps(z, t):
        if guidance == 1.0:
            return _unet(pipeline, z, t, cond)
        uncond = _unet(pipeline, z, t, null)
        return uncond + guidance * (_unet(pipeline, z, t, cond) - uncond)

    z0 = _latents(pipeline, images)
    eps_0 = eps(z0, 0)
    a = _abar(pipeline, 200)
    z_200 = math.sqrt(a) * z0 + math.sqrt(1 - a) * eps_0
    distance = _per_image((eps_0 - eps(z_200, 200)).abs() ** 4)

    out, evals, counter = _run_counted(target, pia_attack, images, guidance=guidance)
    np.testing.assert_allclose(out.extras["distance"], distance, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(out.scores, -distance, rtol=1e-5, atol=1e-12)
    assert evals == _cost(pia_attack, guidance) == (2 if guidance == 1.0 else 4)
    assert sorted({int(t.flatten()[0]) for t, _ in counter.calls}) == [0, 200]

    squared = pia_attack(target, images, CAPTIONS, IDS, p=2, guidance=guidance)
    np.testing.assert_allclose(-squared.scores, _per_image((eps_0 - eps(z_200, 200)) ** 2), rtol=1e-5)


@pytest.mark.numerics
def test_pia_official_rescale_applies_2z_minus_1_to_the_latent(pipeline_and_target, images):
    """The official code's normalize(x) = x * 2 - 1, applied to the already scaled latent; off by default."""
    pipeline, target = pipeline_and_target
    cond = helpers.reference_text_embeddings(pipeline, CAPTIONS)
    z0 = 2 * _latents(pipeline, images) - 1
    eps_0 = _unet(pipeline, z0, 0, cond)
    a = _abar(pipeline, 200)
    distance = _per_image((eps_0 - _unet(pipeline, math.sqrt(a) * z0 + math.sqrt(1 - a) * eps_0, 200, cond)).abs() ** 4)
    rescaled, evals, _ = _run_counted(target, pia_attack, images, official_rescale=True)
    np.testing.assert_allclose(rescaled.extras["distance"], distance, rtol=1e-5, atol=1e-12)
    assert evals == _cost(pia_attack, official_rescale=True) == 2
    default = pia_attack(target, images, CAPTIONS, IDS)
    np.testing.assert_array_equal(
        pia_attack(target, images, CAPTIONS, IDS, official_rescale=False).scores, default.scores
    )
    assert np.abs(rescaled.scores - default.scores).max() > 1e-3 * np.abs(default.scores).max()
    with pytest.raises(ValueError, match="official_rescale"):
        pia_attack(target, images, CAPTIONS, IDS, official_rescale=1)


# --------------------------------------------------------------------------------------------------
# CLiD
# --------------------------------------------------------------------------------------------------
def test_reduce_caption():
    assert reduce_caption("red apple") == "red"
    assert reduce_caption("a red apple on a table") == "a apple a"
    assert reduce_caption("one two three") == "one three"
    assert reduce_caption("apple") == "apple"  # at least one word is kept
    assert reduce_caption("  man   farmer  with hat ") == "man with"
    assert reduce_caption("") == ""
    assert [reduce_caption(c) for c in CAPTIONS] == REDUCED


@pytest.mark.numerics
def test_clid_equals_hand_computation(pipeline_and_target, images):
    pipeline, target = pipeline_and_target
    t, n_noise = 450, 2
    embeddings = {
        "full": helpers.reference_text_embeddings(pipeline, CAPTIONS),
        "reduced": helpers.reference_text_embeddings(pipeline, REDUCED),
        "null": helpers.reference_text_embeddings(pipeline, ["", ""]),
    }
    z0 = _latents(pipeline, images)
    a = _abar(pipeline, t)
    losses = {name: np.zeros(2) for name in embeddings}
    for r in range(n_noise):
        noise = torch.stack([_noise(z0.shape[1:], f"{i}@clid{t}r{r}") for i in IDS])  # one draw, every condition
        z_t = math.sqrt(a) * z0 + math.sqrt(1 - a) * noise
        for name, hidden in embeddings.items():
            losses[name] += _per_image((_unet(pipeline, z_t, t, hidden) - noise) ** 2) / n_noise
    expected = 0.5 * ((losses["reduced"] - losses["full"]) + (losses["null"] - losses["full"]))

    out, evals, counter = _run_counted(target, clid_attack, images, t=t, n_noise=n_noise)
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5, atol=1e-9)
    for name in embeddings:
        np.testing.assert_allclose(out.extras[f"loss_{name}"], losses[name], rtol=1e-5)
    assert evals == _cost(clid_attack, t=t, n_noise=n_noise) == 3 * n_noise
    assert all(int(ts.flatten()[0]) == t for ts, _ in counter.calls)
    # every condition is a plain conditional call with its own embedding (no guidance mixing)
    hidden = [h for _, h in counter.calls]
    for r in range(n_noise):
        draw = hidden[3 * r : 3 * r + 3]
        for reference in embeddings.values():
            assert sum(torch.allclose(h, reference, atol=1e-6) for h in draw) == 1


@pytest.mark.numerics
def test_clid_uses_common_noise_across_conditions(target, images):
    samples = []
    handle = target.unet.register_forward_hook(lambda module, args, output: samples.append(args[0].clone()))
    try:
        clid_attack(target, images, CAPTIONS, IDS, t=450, n_noise=2)
    finally:
        handle.remove()
    assert len(samples) == 6
    assert all(torch.equal(samples[0], s) for s in samples[1:3])  # draw 0: full, reduced, null see one z_t
    assert all(torch.equal(samples[3], s) for s in samples[4:6])  # draw 1: the same
    assert (samples[0] - samples[3]).abs().max() > 1e-3  # the two draws differ
    # noise is per image id: an image alone in its batch gets the same score, within the rounding of its
    # losses (the score is a gap of two losses ~1: a relative tolerance on the gap could not hold)
    together = clid_attack(target, images, CAPTIONS, IDS, t=450)
    alone = clid_attack(target, images[1:], CAPTIONS[1:], IDS[1:], t=450)
    spec = REGISTRY["clid"]
    extras = {k: v[1:] for k, v in together.extras.items()}
    assert_within_tolerance(spec, spec.params({"t": 450}), alone.scores, together.scores[1:], extras)
    # other noise (another seed) moves the gap by far more than the tolerance
    reseeded = clid_attack(target, images[1:], CAPTIONS[1:], IDS[1:], t=450, seed=1)
    with pytest.raises(AssertionError, match="times the tolerance"):
        assert_within_tolerance(spec, spec.params({"t": 450}), reseeded.scores, together.scores[1:], extras)


# --------------------------------------------------------------------------------------------------
# Pixel-level and backward reconstruction
# --------------------------------------------------------------------------------------------------
def _inverted_100(pipeline, images, cond):
    z0 = _latents(pipeline, images)
    z50 = _step(z0, _unet(pipeline, z0, 0, cond), _abar(pipeline, 0), _abar(pipeline, 50))
    z100 = _step(z50, _unet(pipeline, z50, 50, cond), _abar(pipeline, 50), _abar(pipeline, 100))
    return z0, z100


@pytest.mark.numerics
def test_pixel_attack_equals_skimage(pipeline_and_target, images):
    pipeline, target = pipeline_and_target
    cond = helpers.reference_text_embeddings(pipeline, CAPTIONS)
    _, z100 = _inverted_100(pipeline, images, cond)
    decoded = _decode(pipeline, z100).double().numpy()
    x = images.double().numpy()
    mse = np.array([mean_squared_error(a, b) for a, b in zip(x, decoded)])
    psnr = np.array([peak_signal_noise_ratio(a, b, data_range=2.0) for a, b in zip(x, decoded)])

    out, evals, _ = _run_counted(target, pixel_attack, images, t=100, stride=50)
    np.testing.assert_allclose(out.scores, -mse, rtol=1e-5)
    np.testing.assert_allclose(out.extras["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(out.extras["psnr"], psnr, rtol=0, atol=1e-4)
    assert evals == _cost(pixel_attack, t=100, stride=50) == 2
    by_psnr = pixel_attack(target, images, CAPTIONS, IDS, metric="psnr")
    np.testing.assert_allclose(by_psnr.scores, psnr, rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        pixel_attack(target, images, CAPTIONS, IDS, metric="ssim")


@pytest.mark.numerics
def test_backward_attack_equals_hand_computation(pipeline_and_target, images):
    pipeline, target = pipeline_and_target
    cond = helpers.reference_text_embeddings(pipeline, CAPTIONS)
    z0, z100 = _inverted_100(pipeline, images, cond)
    back50 = _step(z100, _unet(pipeline, z100, 100, cond), _abar(pipeline, 100), _abar(pipeline, 50))
    back0 = _step(back50, _unet(pipeline, back50, 50, cond), _abar(pipeline, 50), _abar(pipeline, 0))
    expected = _skimage_ssim(images, _decode(pipeline, back0))

    out, evals, counter = _run_counted(target, backward_attack, images, t=100, stride=50)
    np.testing.assert_allclose(out.scores, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.extras["latent_mse"], _per_image((back0 - z0) ** 2), rtol=1e-5, atol=1e-12)
    assert evals == _cost(backward_attack, t=100, stride=50) == 2 * 100 // 50
    assert [int(t.flatten()[0]) for t, _ in counter.calls] == [0, 50, 100, 50]


@pytest.mark.numerics
def test_latent_attack_equals_hand_computation(pipeline_and_target, images):
    pipeline, target = pipeline_and_target
    cond = helpers.reference_text_embeddings(pipeline, CAPTIONS)
    z0, z100 = _inverted_100(pipeline, images, cond)
    expected = _per_image((z100 - z0) ** 2)
    out, evals, _ = _run_counted(target, latent_attack, images, t=100, stride=50)
    np.testing.assert_allclose(out.extras["latent_mse"], expected, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(out.scores, -expected, rtol=1e-5, atol=1e-12)
    assert evals == _cost(latent_attack, t=100, stride=50) == 2


# --------------------------------------------------------------------------------------------------
# Costs at guidance 1 and 3 (the hook counts images per U-Net call)
# --------------------------------------------------------------------------------------------------
COSTS = [
    (secmi_attack, dict(t_sec=20, interval=10), 4),  # 2 inversion steps, 1 more, 1 back
    (pia_attack, dict(t=100), 2),
    (pixel_attack, dict(t=100, stride=50), 2),
    (backward_attack, dict(t=100, stride=50), 4),
]


@pytest.mark.parametrize("attack, settings, evals", COSTS, ids=[a.__name__ for a, _, _ in COSTS])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_registry_cost_matches_unet_calls(target, images, attack, settings, evals, guidance):
    _, counted, counter = _run_counted(target, attack, images, guidance=guidance, **settings)
    expected = evals if guidance == 1.0 else 2 * evals
    assert counted == _cost(attack, guidance, **settings) == expected
    null = target.encode_prompts(["", ""]).hidden
    n_null = sum(torch.equal(hidden, null) for _, hidden in counter.calls)
    assert n_null == (0 if guidance == 1.0 else len(counter.calls) // 2)  # explicit guidance, no hidden branch


@pytest.mark.parametrize("n_noise", [1, 2])
def test_clid_cost(target, images, n_noise):
    _, counted, _ = _run_counted(target, clid_attack, images, t=450, n_noise=n_noise)
    assert counted == _cost(clid_attack, t=450, n_noise=n_noise) == 3 * n_noise


def test_invalid_settings(target, images):
    with pytest.raises(ValueError):
        secmi_attack(target, images, CAPTIONS, IDS, t_sec=25, interval=10)
    with pytest.raises(ValueError):
        pia_attack(target, images, CAPTIONS, IDS, t=0)
    with pytest.raises(ValueError):
        clid_attack(target, images, CAPTIONS, IDS, n_noise=0)
