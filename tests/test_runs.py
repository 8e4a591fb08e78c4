"""mialib.runs and mialib.trajectories: the per-image trajectory cache that attacks read themselves, the
batched run layer over an image set, the registry's costs, and the one place where a setting and a
direction are chosen."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import helpers
from mialib import hashing, imagesets, runs, studies
from mialib import metrics as mialib_metrics
from mialib.attacks import REGISTRY, parse_request, secmi_attack, structural_attack
from mialib.attacks.registry import AttackRequest, assert_within_tolerance
from mialib.hashing import pixel_digest, pixel_digests, vouch_digests
from mialib.settings import Settings
from mialib.target import load_target
from mialib.trajectories import TrajectoryCache

IDS = ["1F34E", "1F600", "1F468-200D-1F33E"]
CAPTIONS = ["red apple", "grinning face", "man farmer"]
SETTINGS = dict(guidance=1.0, prompt="caption", encode_mode="mode", schedule="model", seed=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_runs")
    helpers.save_tiny_pipeline(folder)
    return load_target(folder)


@pytest.fixture(scope="module")
def images():
    return helpers.make_images(3, seed=1)


@pytest.fixture(scope="module")
def imageset(tmp_path_factory):
    folder = helpers.write_imagefolder(tmp_path_factory.mktemp("set") / "set", n=8)
    return imagesets.open_imageset(f"imagefolder:{folder}")


def _attack(target, images, t, cache=None, captions=CAPTIONS, ids=IDS, **overrides):
    output = structural_attack(target, images, captions, ids, t=t, stride=50, cache=cache, **overrides)
    TrajectoryCache.flush()  # the files are written in the background; the tests look at them
    return output


# --------------------------------------------------------------------------------------------------
# The trajectory cache, read by the attack functions themselves
# --------------------------------------------------------------------------------------------------
def test_cached_inversion_equals_the_uncached_one(target, images, tmp_path):
    cache = TrajectoryCache(tmp_path)
    for t in (50, 100, 150):
        cached, fresh = _attack(target, images, t, cache), _attack(target, images, t)
        for key in ("ssim", "mse", "latent_mse"):
            np.testing.assert_allclose(cached.extras[key], fresh.extras[key], rtol=0, atol=1e-6)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3  # one file per image, whatever t
    before = target.unet_evals
    again = _attack(target, images, 150, cache)
    assert target.unet_evals == before  # read back, no inversion
    np.testing.assert_allclose(again.scores, fresh.scores, rtol=0, atol=1e-6)


def test_a_shorter_path_is_read_and_a_longer_one_extended(target, images, tmp_path):
    cache = TrajectoryCache(tmp_path)
    _attack(target, images, 200, cache)
    before = target.unet_evals
    short = _attack(target, images, 100, cache)
    assert target.unet_evals == before
    np.testing.assert_allclose(short.scores, _attack(target, images, 100).scores, atol=1e-6)
    before = target.unet_evals
    extended = _attack(target, images, 300, cache)
    assert target.unet_evals - before == 3 * 2  # 200 -> 250 -> 300 for three images
    np.testing.assert_allclose(extended.scores, _attack(target, images, 300).scores, atol=1e-6)


def test_captions_pixels_and_settings_key_the_cache(target, images, tmp_path):
    cache = TrajectoryCache(tmp_path)
    base = _attack(target, images, 100, cache)
    before = target.unet_evals
    other = _attack(target, images, 100, cache, captions=list(np.roll(CAPTIONS, 1)))
    assert target.unet_evals - before == 3 * 2  # inverted again: the caption is part of the key
    assert not np.allclose(other.scores, base.scores)
    flipped = _attack(target, images.flip(-1), 100, cache)
    assert not np.allclose(flipped.extras["mse"], base.extras["mse"])
    before = target.unet_evals
    _attack(target, images, 100, cache, guidance=3.0)
    spec = REGISTRY["structural"]
    assert (
        (target.unet_evals - before) / len(images) == spec.cost(spec.params({"t": 100}), Settings(guidance=3.0)) == 4
    )  # inverted again
    assert len(list(tmp_path.glob("*.safetensors"))) == 4 * 3


def test_vouched_digests_hold_for_that_tensor_until_it_is_changed():
    """The reader threads hash each batch once; the store and the cache reuse those digests only for the
    very tensor they were computed for, and only while it is unchanged."""
    batch = helpers.make_images(3, seed=4)
    honest = [pixel_digest(image) for image in batch]
    assert pixel_digests(batch) == honest
    vouch_digests(batch, ["a", "b", "c"])  # a deliberately wrong vouch shows which path answered
    assert pixel_digests(batch) == ["a", "b", "c"]
    assert pixel_digests(batch.clone()) == honest  # another tensor: hashed
    batch.mul_(0.5)  # changed in place: the vouch no longer holds
    assert pixel_digests(batch) == [pixel_digest(image) for image in batch] != honest
    with pytest.raises(ValueError, match="2 digests for 3 images"):
        vouch_digests(batch, ["a", "b"])


def test_batches_arrive_with_their_digests_and_keys_equal_hashing(imageset, tmp_path):
    for threads in (1, 3):
        for rows, pixels in imageset.batches(16, 3, threads=threads):
            expected = [pixel_digest(p) for p in pixels]
            assert hashing._VOUCHED[id(pixels)][2] == expected  # hashed and vouched for by the reader thread
            vouch_digests(pixels.clone(), ["x"] * len(pixels))  # vouching another tensor changes nothing
            assert pixel_digests(pixels) == expected


def test_an_interrupted_write_is_never_read(target, images, tmp_path):
    cache = TrajectoryCache(tmp_path)
    _attack(target, images, 100, cache)
    stray = sorted(tmp_path.glob("*.safetensors"))[0].with_suffix(".partial")
    stray.write_bytes(b"half a file")  # what a kill during a write leaves
    before = target.unet_evals
    _attack(target, images, 150, cache)
    assert target.unet_evals - before == 3  # resumed from the complete files, the partial ignored


def test_partly_cached_batches_invert_only_what_is_missing(target, images, tmp_path):
    cache = TrajectoryCache(tmp_path)
    _attack(target, images[:2], 100, cache, captions=CAPTIONS[:2], ids=IDS[:2])
    before = target.unet_evals
    both = _attack(target, images, 150, cache)
    assert target.unet_evals - before == 2 * 1 + 1 * 3  # two images extended by one step, one inverted from 0
    np.testing.assert_allclose(both.scores, _attack(target, images, 150).scores, atol=1e-6)


@pytest.mark.numerics
def test_secmi_and_the_structural_attack_share_a_path_at_its_stride(target, images, tmp_path):
    cache = TrajectoryCache(tmp_path)
    secmi = secmi_attack(target, images, CAPTIONS, IDS, t_sec=30, interval=10, cache=cache)
    cache.flush()
    spec = REGISTRY["secmi"]
    assert_within_tolerance(
        spec,
        spec.params({"t_sec": 30}),
        secmi.scores,
        secmi_attack(target, images, CAPTIONS, IDS, t_sec=30, interval=10).scores,
        secmi.extras,
    )
    before = target.unet_evals
    structural_attack(target, images, CAPTIONS, IDS, t=40, stride=10, cache=cache)
    assert target.unet_evals == before  # 0 -> 10 -> ... -> 40 was SecMI's path


def test_the_cap_removes_the_least_recently_written_trajectories_and_says_so(
    target, images, tmp_path, monkeypatch, capfd
):
    import os
    import time

    from mialib import memo

    cache = TrajectoryCache(tmp_path)
    _attack(target, images[:1], 100, cache, captions=CAPTIONS[:1], ids=IDS[:1])
    time.sleep(0.01)
    one = next(tmp_path.glob("*.safetensors"))
    size = one.stat().st_size
    monkeypatch.setenv("MIALIB_TRAJECTORY_CACHE_GB", str(2.5 * size / 2**30))  # room for two files
    _attack(target, images[1:], 100, cache, captions=CAPTIONS[1:], ids=IDS[1:])
    files = sorted(tmp_path.glob("*.safetensors"))
    assert one not in files and len(files) == 2  # the oldest went, the two newest stay
    assert sum(f.stat().st_size for f in files) <= 2.5 * size
    assert "reached its cap" in capfd.readouterr().err
    memo.clear()  # a new process: the removed path is computed again, and equals the first result
    before = target.unet_evals
    again = _attack(target, images[:1], 100, cache, captions=CAPTIONS[:1], ids=IDS[:1])
    assert target.unet_evals - before == 2
    np.testing.assert_array_equal(
        again.scores, _attack(target, images[:1], 100, captions=CAPTIONS[:1], ids=IDS[:1]).scores
    )
    assert os.environ["MIALIB_TRAJECTORY_CACHE_GB"]


def test_latents_are_stored_in_the_models_dtype(tmp_path):
    import torch
    from safetensors import safe_open

    folder = tmp_path / "model"
    helpers.save_tiny_pipeline(folder)
    half = load_target(folder, dtype=torch.bfloat16)
    cache = TrajectoryCache(tmp_path / "cache")
    structural_attack(half, helpers.make_images(2, seed=3), CAPTIONS[:2], IDS[:2], t=100, stride=50, cache=cache)
    cache.flush()
    for path in (tmp_path / "cache").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}


def test_an_in_memory_copy_never_hides_a_damaged_or_removed_file(target, images, tmp_path, capfd):
    """The memory of cached trajectories is keyed by the file's size and modification time: a file
    truncated after it was read is reported and recomputed as in a new process; the remembered decodes
    give the scores a fresh computation gives."""
    from mialib import memo

    memo.configure(64)  # as the notebooks run
    try:
        cache = TrajectoryCache(tmp_path)
        first = _attack(target, images, 100, cache)
        assert memo.LATENTS.entries and memo.DECODED.entries
        hits = memo.DECODED.hits
        assert _attack(target, images, 100, cache).scores.tolist() == first.scores.tolist()
        assert memo.DECODED.hits == hits + 3  # no decode the second time
        victim = sorted(tmp_path.glob("*.safetensors"))[0]
        victim.write_bytes(victim.read_bytes()[:100])
        before = target.unet_evals
        again = _attack(target, images, 100, cache)
        assert target.unet_evals - before == 2  # one image inverted again
        assert "damaged cache file" in capfd.readouterr().err
        np.testing.assert_array_equal(again.scores, first.scores)
    finally:
        memo.configure(0)


# --------------------------------------------------------------------------------------------------
# The registry and the run layer
# --------------------------------------------------------------------------------------------------
MODEL_ATTACKS = [name for name, spec in REGISTRY.items() if spec.kind != "blind"]


@pytest.mark.numerics
@pytest.mark.parametrize("name", MODEL_ATTACKS)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_each_attack_through_the_run_layer_equals_the_function_and_its_cost_formula(
    target, imageset, tmp_path, name, guidance
):
    spec = REGISTRY[name]
    settings = Settings(guidance=guidance)
    params = spec.params()
    before = target.unet_evals
    values = runs.attack_values(target, imageset, spec, params, settings, tmp_path, 3, 32, progress=False)
    counted = (target.unet_evals - before) / len(imageset)
    assert counted == spec.cost(params, settings)  # the registry's formula is what a cold run costs
    assert (values["unet_evals"] == spec.cost(params, settings)).all()
    pixels = imageset.load(32)
    direct = spec.function(
        target,
        pixels,
        list(imageset.records["caption"]),
        list(imageset.records["id"]),
        **params,
        **settings.for_function(spec.function),
    )
    assert list(values["id"]) == list(imageset.records["id"])
    # batches of 3 against one batch of 8: float32 convolutions round differently by batch size, within the
    # registry's tolerance (SecMI's scores, 1e-8 to 2e-6, sit below any fixed atol; its tolerance scales with its
    # latents)
    assert_within_tolerance(spec, params, values["score"], direct.scores, direct.extras)
    before = target.unet_evals
    again = runs.attack_values(target, imageset, spec, params, settings, tmp_path, 3, 32, progress=False)
    assert target.unet_evals == before  # every batch read back from the cache
    np.testing.assert_array_equal(again["score"], values["score"])


def test_every_attack_file_has_one_registry_entry():
    from pathlib import Path

    import mialib.attacks as package

    files = {p.stem for p in Path(package.__file__).parent.glob("*.py")} - {"__init__", "base", "registry"}
    functions = {spec.function.__module__.rsplit(".", 1)[-1] for spec in REGISTRY.values() if spec.kind != "blind"}
    assert files == functions


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_spec_declares_what_its_function_takes(name):
    """The registry's declared capability agrees with the function's signature (the run layer reads the
    declaration, never the signature): ``inverts`` iff the function takes the trajectory ``cache``. A model
    or control attack takes (target, images, captions, ids), then the method's parameters (the registry's
    defaults), then the shared settings and the cache keyword-only; a blind one (imageset, size, batch_size, seed)."""
    import inspect
    from dataclasses import fields

    spec = REGISTRY[name]
    parameters = inspect.signature(spec.function).parameters
    if spec.kind == "blind":
        assert list(parameters) == ["imageset", "size", "batch_size", "seed"]
        assert not spec.inverts
        return
    assert spec.inverts == ("cache" in parameters)
    names = list(parameters)
    assert names[:4] == ["target", "images", "captions", "ids"]
    shared = {f.name for f in fields(Settings)}
    keyword_only = [key for key, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    positional = [key for key, p in parameters.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert len(positional) + len(keyword_only) == len(parameters)  # no *args, no **kwargs
    assert positional == names[:4] + list(spec.defaults)  # the method's parameters, in the registry's order
    assert (
        set(keyword_only) <= shared | {"cache"} and set(keyword_only) >= set(names) & shared
    )  # every shared setting keyword-only
    assert set(Settings().for_function(spec.function)) == set(keyword_only) - {"cache"}  # for_function picks them


@pytest.mark.parametrize(
    "text, fixed, grid, direction",
    [
        ("structural", {}, {}, "method"),
        ("structural:t=200,stride=20", {"t": 200, "stride": 20}, {}, "method"),
        ("structural:t=50:200:50", {}, {"t": [50, 100, 150, 200]}, "auto"),
        ("loss:t=[50,100]", {}, {"t": [50, 100]}, "method"),
        ("pia:calibrate", {}, {"t": REGISTRY["pia"].grid["t"]}, "method"),
        ("structural:t=100,direction=-1", {"t": 100}, {}, -1),
        ("structural:t=[50,100],direction=1", {}, {"t": [50, 100]}, 1),
    ],
)
def test_parse_request(text, fixed, grid, direction):
    request = parse_request(text)
    assert (request.fixed, request.grid, request.direction) == (fixed, grid, direction)
    assert parse_request(request.text()).points() == request.points()


@pytest.mark.parametrize(
    "text, message",
    [
        ("nope", "unknown attack"),
        ("structural:tt=3", "takes"),
        ("loss:t=100,direction=-1", "fixed by its method"),
        ("structural:t", "key=value"),
        ("vae_control:calibrate", "no calibration grid"),
        ("structural:t=100:50:50", "range"),
    ],
)
def test_parse_request_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_request(text)


def test_settings_are_validated_once():
    with pytest.raises(ValueError, match="prompt"):
        Settings(prompt="none")
    with pytest.raises(ValueError, match="schedule"):
        Settings(schedule="linear")
    with pytest.raises(ValueError, match="dtype"):
        Settings(dtype="int8")
    settings = Settings.from_parameters({"GUIDANCE": 3, "SSIM_DATA_RANGE": 1, "SEED": 4, "OTHER": 1})
    assert (settings.guidance, settings.data_range, settings.seed) == (3.0, 1.0, 4)
    assert settings.for_function(REGISTRY["clid"].function) == {
        "encode_mode": "mode",
        "seed": 4,
    }  # CLiD ignores the rest
    assert settings.unet_branches() == 2


def test_choice_and_direction_come_from_calibration_only(target, imageset, tmp_path):
    result = runs.run_request(target, imageset, "structural:t=50:200:50", Settings(), tmp_path, 4, 32)
    values = result.values.merge(imageset.records[["id", "label", "subset"]], on="id")
    calibration = values[values["subset"] == "calibration"]
    aucs = {(t, d): roc_auc_score(g["label"], d * g["score"]) for t, g in calibration.groupby("t") for d in (1, -1)}
    best = max(aucs.values())
    assert aucs[(result.chosen["t"], result.direction)] == pytest.approx(best)
    assert result.calibration_auc == pytest.approx(best)
    rows = result.rows.set_index("id").loc[imageset.records["id"]]
    at_choice = result.values[result.values["t"] == result.chosen["t"]].set_index("id").loc[imageset.records["id"]]
    np.testing.assert_array_equal(rows["score"], result.direction * at_choice["score"])  # the direction, applied once
    np.testing.assert_array_equal(rows["value"], at_choice["score"])
    assert set(rows["t"]) == {result.chosen["t"]} and set(rows["stride"]) == {50} and set(rows["measure"]) == {"ssim"}
    assert set(rows["guidance"]) == {1.0} and set(rows["prompt"]) == {"caption"} and set(rows["dtype"]) == {"float32"}
    assert list(result.rows.columns) == runs.SCORE_COLUMNS
    # test rows never influence the choice: reversing every test label leaves it unchanged
    flipped = imageset.select(np.ones(len(imageset), dtype=bool))
    flipped.records["label"] = np.where(
        flipped.records["subset"] == "test", 1 - flipped.records["label"], flipped.records["label"]
    )
    again = runs.run_request(target, flipped, "structural:t=50:200:50", Settings(), tmp_path, 4, 32)
    assert (again.chosen, again.direction) == (result.chosen, result.direction)


def test_a_method_direction_is_never_reversed(target, imageset, tmp_path):
    result = runs.run_request(target, imageset, "pia:t=[50,100,200]", Settings(), tmp_path, 4, 32)
    assert result.direction == 1
    assert (result.rows["score"] == result.rows["value"]).all()


def test_requirements_are_checked_before_any_compute(target, tmp_path):
    folder = helpers.write_imagefolder(tmp_path / "small", n=8)
    small = imagesets.open_imageset(f"imagefolder:{folder}")
    before = target.unet_evals
    with pytest.raises(ValueError, match="at least 5 calibration images of each class"):
        runs.score(target, small, {"s": "structural", "b": "blind_image"}, Settings(), tmp_path / "cache", 4, 32)
    assert target.unet_evals == before  # refused before the structural attack ran
    keep, skipped = runs.runnable(small, {"s": "structural", "b": "blind_image", "c": "blind_caption"})
    assert list(keep) == ["s"] and set(skipped) == {"b", "c"}
    members_only = small.select((small.records["label"] == 1).to_numpy())
    with pytest.raises(ValueError, match="no non-members"):
        runs.check_requirements(members_only, [parse_request("structural")], metrics=True)


def test_score_table_and_metrics_agree_with_sklearn(target, imageset, tmp_path):
    table, results = runs.score(
        target,
        imageset,
        {"paper": "structural", "loss": "loss:t=[50,100]"},
        Settings(),
        tmp_path,
        3,
        32,
        progress=False,
    )
    assert list(table.columns) == runs.SCORE_COLUMNS
    assert set(table["run"]) == {"paper", "loss"} and len(table) == 2 * len(imageset)
    metrics = mialib_metrics.metric_table(table, n_bootstrap=50)
    for row in metrics.itertuples():
        test = table[(table["run"] == row.run) & (table["subset"] == "test")]
        assert row.auc == pytest.approx(roc_auc_score(test["label"], test["score"]), abs=1e-12)
        assert row.auc_low <= row.auc <= row.auc_high
    # what calibration chose replays as fixed requests with the same scores (04 and 05 rely on it)
    replay = studies.chosen_requests({run: r.chosen_record() for run, r in results.items()})
    again, _ = runs.score(target, imageset, replay, Settings(), tmp_path, 5, 32, progress=False)
    pd.testing.assert_series_equal(
        again.set_index(["run", "id"])["score"].sort_index(),
        table.set_index(["run", "id"])["score"].sort_index(),
        atol=1e-9,
    )


def test_a_replayed_request_keeps_a_reversed_direction():
    requests = studies.chosen_requests(
        {
            "cal": {
                "attack": "structural",
                "params": {"t": 300, "stride": 50, "measure": "ssim"},
                "direction": -1,
                "display": "x",
            }
        }
    )
    request = requests["cal"]
    assert isinstance(request, AttackRequest) and request.direction == -1 and request.fixed["t"] == 300


# --------------------------------------------------------------------------------------------------
# Per-image results: any batch size, any subset, resume, damaged files, warm equals cold
# --------------------------------------------------------------------------------------------------
def _values(target, imageset, tmp_path, batch_size, name="structural", **params):
    spec = REGISTRY[name]
    return runs.attack_values(
        target, imageset, spec, spec.params(params), Settings(), tmp_path, batch_size, 32, progress=False
    )


def test_results_are_kept_per_image_so_any_batch_size_and_subset_reuse_them(target, imageset, tmp_path):
    calibration = imageset.subset("calibration")
    before = target.unet_evals
    part = _values(target, calibration, tmp_path, 3, "loss")
    assert target.unet_evals - before == len(calibration)  # one U-Net evaluation per image
    before = target.unet_evals
    whole = _values(target, imageset, tmp_path, 5, "loss")
    assert target.unet_evals - before == len(imageset) - len(calibration)  # only the images not seen yet
    assert list(whole["id"]) == list(imageset.records["id"])
    assert (whole.set_index("id").loc[part["id"], "unet_evals_run"] == 1).all()  # the cost when computed
    before = target.unet_evals
    for batch_size in (1, 8):
        again = _values(target, imageset, tmp_path, batch_size, "loss")
        np.testing.assert_array_equal(again["score"], whole["score"])
    assert target.unet_evals == before


def test_a_damaged_result_file_is_set_aside_reported_and_recomputed(target, imageset, tmp_path, capfd):
    first = _values(target, imageset, tmp_path, 4)
    shard = sorted((tmp_path / "structural").rglob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # as a copy or a full disk leaves it
    before = target.unet_evals
    again = _values(target, imageset, tmp_path, 4)
    assert "damaged cache file" in capfd.readouterr().err and shard.with_name(shard.name + ".damaged").exists()
    assert target.unet_evals == before  # the four images' inversions were still in the trajectory cache
    np.testing.assert_array_equal(again["score"], first["score"])


def test_a_damaged_trajectory_is_set_aside_reported_and_recomputed(target, imageset, tmp_path, capfd):
    first = _values(target, imageset, tmp_path, 4)
    for path in (tmp_path / "trajectory").glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:50])
    for shard in (tmp_path / "structural").rglob("*.parquet"):
        shard.unlink()
    before = target.unet_evals
    again = _values(target, imageset, tmp_path, 4)
    assert capfd.readouterr().err.count("damaged cache file") == len(imageset)
    assert target.unet_evals - before == 2 * len(imageset)  # every inversion recomputed
    np.testing.assert_array_equal(again["score"], first["score"])


def test_warm_trajectories_give_the_cold_scores_bit_for_bit(target, imageset, tmp_path):
    """Fresh latents and latents read back from the cache decode with the same rounding (both contiguous)."""
    cold = _values(target, imageset, tmp_path / "cold", 4, t=150)
    _values(target, imageset, tmp_path / "warm", 4, t=150)
    for shard in (tmp_path / "warm" / "structural").rglob("*.parquet"):
        shard.unlink()  # only the trajectories stay
    before = target.unet_evals
    warm = _values(target, imageset, tmp_path / "warm", 4, t=150)
    assert target.unet_evals == before
    np.testing.assert_array_equal(warm["score"], cold["score"])
    for name in ("ssim", "mse", "latent_mse"):
        np.testing.assert_array_equal(warm[name], cold[name])


@pytest.mark.numerics
def test_batch_size_changes_scores_only_within_the_stated_tolerance(target, imageset, tmp_path):
    """float32 kernels round differently by batch size; each attack states its tolerance once, in the
    registry (``AttackSpec.tolerance``: float32 epsilon times a stated factor times the magnitudes its score
    subtracts, from the extras). Which batch size filled a cache may move a score that much and no more."""
    for name in MODEL_ATTACKS:
        spec = REGISTRY[name]
        one = _values(target, imageset, tmp_path / f"{name}-1", 1, name)
        eight = _values(target, imageset, tmp_path / f"{name}-8", 8, name)
        assert_within_tolerance(spec, spec.params(), one["score"], eight["score"], eight)
