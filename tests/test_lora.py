"""LoRA adapters (`--lora FILE[:SCALE]`, `LORA` in presets): fused through diffusers' own loader, checked
against the hand computation W + scale * alpha / r * up @ down; scale 0 scores exactly as the base model;
the adapter enters the fingerprint; the base model is the default reference of calibrate=reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers

RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    pipeline = helpers.save_tiny_pipeline(root / "base")
    lora = helpers.save_tiny_lora(pipeline, root / "adapter", rank=RANK, alpha=ALPHA)
    return root / "base", lora


@pytest.fixture(scope="module")
def lora_set(tmp_path_factory):
    folder = helpers.write_imagefolder(tmp_path_factory.mktemp("lora_set") / "set", n=16)
    return folder


@pytest.mark.numerics
def test_a_lora_fuses_as_its_hand_computation_and_scale_zero_is_the_base(lora_models):
    from mialib.target import load_target

    base_dir, lora = lora_models
    base = load_target(base_dir)
    zero = load_target(base_dir, loras=[f"{lora}:0"])
    half = load_target(base_dir, loras=[(str(lora), 0.5)])
    weights = {name: model.unet.state_dict() for name, model in (("base", base), ("zero", zero), ("half", half))}
    assert set(weights["base"]) == set(weights["zero"]) == set(weights["half"])  # no adapter layer is left
    for key, value in weights["base"].items():
        assert torch.equal(value, weights["zero"][key]), key
    adapter = load_file(str(lora))
    adapted = {key[len("unet.") : -len(".lora.up.weight")] for key in adapter if key.endswith(".lora.up.weight")}
    assert len(adapted) >= 8
    changed = 0
    for key, value in weights["base"].items():
        module = key[: -len(".weight")]
        if key.endswith(".weight") and module in adapted:
            up, down = adapter[f"unet.{module}.lora.up.weight"], adapter[f"unet.{module}.lora.down.weight"]
            expected = value + 0.5 * (ALPHA / RANK) * (up @ down)
            # float32 rounding of one matmul and one add, relative to the weights' magnitude
            torch.testing.assert_close(weights["half"][key], expected, rtol=0, atol=4e-7 * expected.abs().max().item())
            assert not torch.equal(weights["half"][key], value)
            changed += 1
        else:
            assert torch.equal(weights["half"][key], value), key  # layers the adapter does not touch
    assert changed == len(adapted)
    # the adapter and its scale enter the fingerprint and the name; the same files give the same fingerprint
    prints = {base.fingerprint(), zero.fingerprint(), half.fingerprint()}
    assert len(prints) == 3
    assert load_target(base_dir, loras=[f"{lora}:0.5"]).fingerprint() == half.fingerprint()
    assert half.name.endswith("+pytorch_lora_weights.safetensors:0.5") and half.loras == ((str(lora), 0.5),)


@pytest.mark.numerics
def test_a_kohya_format_lora_fuses_as_the_same_adapter_in_diffusers_format(lora_models, tmp_path):
    """The adapter rewritten as kohya's sd-scripts write SD 1.x U-Net LoRAs (``lora_unet_<module path with
    underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, no metadata), loaded through the same
    --lora path: diffusers converts it, and the fused weights equal those of the diffusers-format file."""
    from mialib.target import load_target

    base_dir, lora = lora_models
    kohya = {}
    for key, value in load_file(str(lora)).items():
        module, kind = key[len("unet.") :].rsplit(".lora.", 1)  # kind: down.weight or up.weight
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{kind}"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(ALPHA))
    assert len(kohya) == 3 * len(load_file(str(lora))) // 2
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    ours = load_target(base_dir, loras=[f"{tmp_path / 'kohya.safetensors'}:0.5"]).unet.state_dict()
    theirs = load_target(base_dir, loras=[(str(lora), 0.5)]).unet.state_dict()
    base = load_target(base_dir).unet.state_dict()
    assert set(ours) == set(theirs) == set(base)  # no adapter layer is left
    changed = 0
    for key, value in theirs.items():
        # alpha / rank is applied to the weights before the fuse here, after it there: a float32 rounding apart
        torch.testing.assert_close(ours[key], value, rtol=0, atol=4e-7 * value.abs().max().item())
        changed += not torch.equal(value, base[key])
    assert changed >= 8


def test_an_sdxl_lora_fuses_into_its_unet_and_scale_zero_is_the_base(tmp_path):
    """An SDXL LoRA (saved by StableDiffusionXLPipeline's own save_lora_weights) through the same --lora path:
    the SDXL pipeline's loader fuses it into the U-Net; at scale 0 every weight is the base model's, at scale 1
    the adapted projections move."""
    import model_zoo
    from mialib.target import load_target

    pipeline = model_zoo.build_sdxl(tmp_path / "sdxl")
    lora = helpers.save_tiny_lora(pipeline, tmp_path / "sdxl-lora")
    base = load_target(tmp_path / "sdxl").unet.state_dict()
    zero = load_target(tmp_path / "sdxl", loras=[f"{lora}:0"])
    one = load_target(tmp_path / "sdxl", loras=[str(lora)])
    assert zero.family == "sdxl" and zero.name.endswith(f"+{lora.name}:0")
    for key, value in base.items():
        assert torch.equal(zero.unet.state_dict()[key], value), key
    moved = [key for key, value in one.unet.state_dict().items() if not torch.equal(value, base[key])]
    assert len(moved) >= 8 and all(any(m in key for m in ("to_q", "to_k", "to_v", "to_out")) for key in moved)


def test_scale_zero_scores_exactly_as_the_base_model(lora_models, lora_set, tmp_path):
    from mialib import imagesets, runs
    from mialib.settings import Settings
    from mialib.target import load_target

    base_dir, lora = lora_models
    imageset = imagesets.open_imageset(f"imagefolder:{lora_set}")
    requests = {"loss": "loss:t=100", "structural": "structural", "clid": "clid"}
    tables = {}
    for name, loras in (("base", []), ("zero", [f"{lora}:0"]), ("one", [f"{lora}:1"])):
        tables[name], _ = runs.score(
            load_target(base_dir, loras=loras), imageset, requests, Settings(), tmp_path / name, 8, 32, progress=False
        )
    np.testing.assert_array_equal(tables["zero"]["value"], tables["base"]["value"])
    assert not np.array_equal(tables["one"]["value"], tables["base"]["value"])


def test_mialib_score_with_a_lora_takes_the_base_model_as_reference(lora_models, lora_set, tmp_path):
    from mialib import cli

    base_dir, lora = lora_models

    def score(out, *extra):
        cli.main(["score", "--model", str(base_dir), "--data", f"imagefolder:{lora_set}", "--out", str(tmp_path / out),
                  "--quiet", "--bootstrap", "20", *extra])  # fmt: skip
        return pd.read_parquet(tmp_path / out / "scores.parquet").set_index("id")

    calibrated = score("adapted", "--lora", f"{lora}:0.5", "--attack", "loss:t=100,calibrate=reference")
    adapted = score("adapted-raw", "--lora", f"{lora}:0.5", "--attack", "loss:t=100")
    base = score("base", "--attack", "loss:t=100")
    np.testing.assert_array_equal(calibrated["raw_value"], adapted.loc[calibrated.index, "value"])
    np.testing.assert_array_equal(calibrated["value"], calibrated["raw_value"] - base.loc[calibrated.index, "value"])
    assert np.abs(calibrated["value"]).min() > 0
    parameters = json.loads((tmp_path / "adapted" / "parameters.json").read_text())
    assert parameters["loras"] == [[str(lora), 0.5]]
    assert set(calibrated["model"]) == {"base+pytorch_lora_weights.safetensors:0.5"} and set(base["model"]) == {"base"}
    assert parameters["reference_fingerprints"] != [parameters["fingerprint"]]


def test_lora_files_are_checked_before_anything_loads(lora_models, tmp_path):
    from mialib.target import UnsupportedModel, load_target, parse_lora

    base_dir, lora = lora_models
    assert parse_lora(str(lora)) == (str(lora), 1.0) and parse_lora(f"{lora}:-0.25") == (str(lora), -0.25)
    pickled = tmp_path / "adapter.bin"
    pickled.write_bytes(b"not read")
    with pytest.raises(UnsupportedModel, match="pickled LoRA"):
        parse_lora(str(pickled))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_lora(str(tmp_path / "missing.safetensors:0.5"))
    with pytest.raises(ValueError, match="finite"):
        parse_lora(f"{lora}:nan")
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"unet.no_such_block.to_q.lora.up.weight": torch.ones(4, 4)}, str(unrelated))
    with pytest.raises(ValueError, match="does not fit"):
        load_target(base_dir, loras=[str(unrelated)])
    assert Path(lora).exists()


# --------------------------------------------------------------------------------------------------
# The embedded LoRA regime (07): a LoRA of the fine-tuned regime's base model, trained by the project
# --------------------------------------------------------------------------------------------------
def _build_lora_target(folder: Path, shared: Path, lora_rank: int = 4):
    from mialib import experiment, tiny

    config = tiny.TinyConfig(
        vae_steps=6, pretrain_steps=8, unet_steps=8, checkpoints=(4, 8), lora_rank=lora_rank, lora_lr=1e-2, seed=1
    )
    g = torch.Generator().manual_seed(0)
    public, members = torch.rand(24, 3, 32, 32, generator=g) * 2 - 1, torch.rand(12, 3, 32, 32, generator=g) * 2 - 1
    captions = [f"a grinning face number {i}" for i in range(12)]
    pool_captions = [f"a smiling cat number {i}" for i in range(24)]
    return tiny.build_tiny_target(
        folder, public, members, captions, captions + pool_captions, config, progress=False,
        tokenizer=experiment.emoji_tokenizer(config), pool_images=public, pool_captions=pool_captions, shared=shared,
    ), config  # fmt: skip


def test_the_lora_regime_trains_a_lora_file_of_the_shared_base_model(tmp_path, monkeypatch):
    """LORA_RANK: the fine-tuning trains a peft LoRA of the U-Net's attention projections on the members; the
    folder holds the base model (the shared pretrained U-Net and text encoder, untouched) and the adapter saved
    in diffusers' format, which loads like a user's (--lora) as W + up @ down (alpha = rank). Its checkpoints
    are LoRA files, and an interrupted training resumes to the same adapter."""
    from mialib import tiny
    from mialib.target import load_target

    folder, config = _build_lora_target(tmp_path / "lora-target", tmp_path / "shared")
    assert tiny.target_loras(folder) == [str(folder / tiny.LORA_FILE)]
    assert tiny.target_loras(tmp_path / "shared") == []
    base_dir = next((tmp_path / "shared").glob("base-*")) / "checkpoints" / "step-000008"
    for name in ("unet", "text_encoder"):  # the pipeline is the base model: the LoRA is only in the file
        ours = load_file(str(folder / name / "model.safetensors" if name == "text_encoder" else
                             folder / name / "diffusion_pytorch_model.safetensors"))  # fmt: skip
        theirs = load_file(str(next((base_dir / name).glob("*.safetensors"))))
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    adapter = load_file(str(folder / tiny.LORA_FILE))
    downs = [k for k in adapter if k.endswith(".lora.down.weight")]
    assert len(downs) >= 8 and all(adapter[k].shape[0] == config.lora_rank for k in downs)
    assert all(any(m in k for m in tiny.LORA_MODULES) for k in adapter)
    base = load_target(folder).unet.state_dict()
    adapted = load_target(folder, loras=tiny.target_loras(folder)).unet.state_dict()
    moved = 0
    for key in downs:
        module = key[len("unet.") : -len(".lora.down.weight")]
        up = adapter[f"unet.{module}.lora.up.weight"]
        assert up.abs().max() > 0  # trained: peft starts the up factor at zero
        expected = base[f"{module}.weight"] + up @ adapter[key]  # alpha = rank: scale 1
        torch.testing.assert_close(
            adapted[f"{module}.weight"], expected, rtol=0, atol=4e-7 * expected.abs().max().item()
        )
        moved += not torch.equal(adapted[f"{module}.weight"], base[f"{module}.weight"])
    assert moved == len(downs)
    early = load_file(str(tiny.checkpoint_dir(folder, 4) / tiny.LORA_FILE))
    assert set(early) == set(adapter) and any(not torch.equal(early[k], adapter[k]) for k in adapter)
    # a second build killed while it writes the checkpoint at step 8 resumes from step 4 to the same adapter
    calls, save = [], tiny.save_lora

    def killed(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save(*args, **kwargs)

    monkeypatch.setattr(tiny, "save_lora", killed)
    with pytest.raises(KeyboardInterrupt):
        _build_lora_target(tmp_path / "killed", tmp_path / "shared")
    monkeypatch.setattr(tiny, "save_lora", save)
    again, _ = _build_lora_target(tmp_path / "killed", tmp_path / "shared")
    losses = json.loads((again / "training" / "unet_loss.json").read_text())
    assert len(losses) == 4  # the 4 steps after the resume (the killed run wrote no log)
    resumed = load_file(str(again / tiny.LORA_FILE))
    assert set(resumed) == set(adapter) and all(torch.equal(resumed[k], adapter[k]) for k in adapter)
    # the full fine-tune of the same recipe (LORA_RANK 0) starts from the same base model: one shared folder
    _build_lora_target(tmp_path / "full", tmp_path / "shared", lora_rank=0)
    assert len(list((tmp_path / "shared").glob("base-*"))) == 1 and not tiny.target_loras(tmp_path / "full")
    with pytest.raises(ValueError, match="fine-tunes a base model"):
        tiny.TinyConfig(lora_rank=4)
    assert tiny.TinyConfig(lora_rank=4, pretrain_steps=8, unet_steps=0).lora_rank == 0  # no step: the base model
