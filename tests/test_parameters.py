"""One validation of every attack parameter and every shared setting, before any compute or write.

Each defect had a test here that failed before the registry declared its parameters: a negative or
fractional ``t``, a boolean where an integer belongs, a zero stride, a timestep outside the schedule and a
non-numeric value were run (or recorded) as given, or failed later with a traceback naming neither the
attack nor the parameter.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mialib import runs
from mialib.attacks import REGISTRY, parse_request
from mialib.attacks.registry import AttackRequest
from mialib.settings import Settings


# --------------------------------------------------------------------------------------------------
# Through the request text, as the command line and the presets give it
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("structural:t=-5", r"structural: t must be an integer in \[0, T\) .*, got -5$"),
        ("structural:t=abc", r"structural: t must be an integer in \[0, T\) .*, got 'abc' \(text\)$"),
        ("loss:t=true", r"loss: t must be an integer in \[0, T\) .*, got true \(a boolean\)$"),
        ("loss:t=false", r"loss: t must be an integer .*, got false \(a boolean\)$"),
        ("structural:t=100.5", r"structural: t must be an integer .*, got 100.5$"),
        ("structural:t=", r"structural: t must be an integer .*, got nothing \(null\)$"),
        ("structural:t=100,stride=0", r"structural: stride must be an integer >= 1, got 0$"),
        ("structural:t=100,stride=-50", r"structural: stride must be an integer >= 1, got -50$"),
        ("structural:t=[50,-1]", r"structural: t must be an integer in \[0, T\) .*, got -1$"),
        ("structural:t=[50,true]", r"structural: t must be an integer .*, got true \(a boolean\)$"),
        ("structural:t=75", r"structural: t must be a multiple of stride .*, got t=75, stride=50$"),
        ("structural:t=[50,75],stride=50", r"structural: t must be a multiple of stride .*, got t=75, stride=50$"),
        (
            "structural:t=50:200:50,stride=[50,100]",
            r"structural: t must be a multiple of stride .*, got t=50, stride=100$",
        ),
        ("structural:measure=psnr", r"structural: measure must be one of ssim, ms_ssim, got 'psnr' \(text\)$"),
        ("pixel:metric=ssim", r"pixel: metric must be one of mse, psnr, got 'ssim' \(text\)$"),
        ("latent:t=100,stride=1.5", r"latent: stride must be an integer >= 1, got 1.5$"),
        ("backward:t=0", r"backward: t must be an integer in \[1, T\) .*, got 0$"),
        ("secmi:t_sec=25", r"secmi: t_sec must be a multiple of interval .*, got t_sec=25, interval=10$"),
        ("secmi:interval=0", r"secmi: interval must be an integer >= 1, got 0$"),
        ("secmi:t_sec=-10", r"secmi: t_sec must be an integer in \[0, T\) .*, got -10$"),
        ("pia:t=0", r"pia: t must be an integer in \[1, T\) .*, got 0$"),
        ("pia:p=0", r"pia: p must be a finite number > 0, got 0$"),
        ("pia:p=-2", r"pia: p must be a finite number > 0, got -2$"),
        ("pia:p=true", r"pia: p must be a finite number > 0, got true \(a boolean\)$"),
        ("pia:p=.nan", r"pia: p must be a finite number > 0, got nan$"),
        ("pia:p=abc", r"pia: p must be a finite number > 0, got 'abc' \(text\)$"),
        ("pia:official_rescale=1", r"pia: official_rescale must be true or false, got 1$"),
        ("pia:official_rescale=yes_please", r"pia: official_rescale must be true or false, got 'yes_please' \(text\)$"),
        ("clid:n_noise=0", r"clid: n_noise must be an integer >= 1, got 0$"),
        ("clid:n_noise=true", r"clid: n_noise must be an integer >= 1, got true \(a boolean\)$"),
        ("structural:direction=abc", r"structural: direction must be method, auto, 1 or -1, got 'abc' \(text\)$"),
        ("structural:direction=true", r"structural: direction must be method, auto, 1 or -1, got true \(a boolean\)$"),
        ("structural:direction=2", r"structural: direction must be method, auto, 1 or -1, got 2$"),
        ("structural:t=[1,", r"structural: t: cannot read '\[1,' as a value or a \[list\]"),
        ("vae_control:t=100", r"vae_control takes no parameters, not \['t'\]"),
    ],
)
def test_a_bad_value_names_the_attack_the_parameter_the_value_and_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=message):
        parse_request(text)


def test_integral_floats_are_normalised_to_integers_and_recorded_as_such():
    request = parse_request("structural:t=100.0,stride=50.0")
    assert request.fixed == {"t": 100, "stride": 50} and all(type(v) is int for v in request.fixed.values())
    assert request.text() == "structural:t=100,stride=50"
    grid = parse_request("loss:t=[50.0,100]")
    assert grid.grid == {"t": [50, 100]} and all(type(v) is int for v in grid.grid["t"])
    assert parse_request("structural:t=100,direction=-1.0").direction == -1
    # a real parameter keeps its type: p=4 and p=2.5 are both what the user wrote
    assert parse_request("pia:p=2.5").fixed == {"p": 2.5}
    assert type(parse_request("pia:p=4").fixed["p"]) is int


def test_every_grid_point_is_checked_not_only_the_first():
    with pytest.raises(ValueError, match="got 1001"):
        AttackRequest("loss", {}, {"t": [50, 100.0, 1001.5 - 0.5]}).check_schedule(1000)
    with pytest.raises(ValueError, match=r"got t=150, stride=100"):
        parse_request("structural:t=100:1000:50,stride=[50,100]")


def test_requests_built_directly_are_checked_too():
    with pytest.raises(ValueError, match=r"loss: t must be an integer .*got true \(a boolean\)"):
        AttackRequest("loss", {"t": True})
    with pytest.raises(ValueError, match=r"structural: t must be an integer .*got -5"):
        AttackRequest("structural", {}, {"t": [100, -5]})
    with pytest.raises(ValueError, match="must be a list"):
        AttackRequest("structural", {}, {"t": "100"})
    with pytest.raises(ValueError, match="is empty"):
        AttackRequest("structural", {}, {"t": []})
    with pytest.raises(ValueError, match=r"structural: t must be an integer .*got -5"):
        REGISTRY["structural"].params({"t": -5})
    with pytest.raises(ValueError, match=r"pia: official_rescale must be true or false, got 0"):
        REGISTRY["pia"].params({"official_rescale": np.int64(0)})
    assert REGISTRY["loss"].params({"t": np.int64(200)}) == {"t": 200}
    assert type(REGISTRY["loss"].params({"t": np.int64(200)})["t"]) is int


# --------------------------------------------------------------------------------------------------
# The schedule bound, once the model is known
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        (
            "structural:t=1000",
            r"structural: t must be an integer in \[0, 1000\) \(this model has 1000 training timesteps\), got 1000$",
        ),
        ("structural:t=[500,1000]", r"structural: t must be an integer in \[0, 1000\) .*, got 1000$"),
        ("loss:t=1500", r"loss: t must be an integer in \[0, 1000\) .*, got 1500$"),
        ("pia:t=1000", r"pia: t must be an integer in \[1, 1000\) .*, got 1000$"),
        ("clid:t=[450,999,1000]", r"clid: t must be an integer in \[0, 1000\) .*, got 1000$"),
        ("backward:t=1000", r"backward: t must be an integer in \[1, 1000\) .*, got 1000$"),
        (
            "secmi:t_sec=990",
            r"secmi: t_sec \+ interval = 990 \+ 10 \(the inversion goes one interval past t_sec\) "
            r"must be below 1000 .*, got 1000$",
        ),
    ],
)
def test_check_schedule_refuses_a_timestep_outside_the_model_s_schedule(text, message):
    request = parse_request(text)  # valid without the model
    with pytest.raises(ValueError, match=message):
        request.check_schedule(1000)
    request.check_schedule(2000)  # a model with more training timesteps takes it


def test_check_schedule_accepts_every_registry_setting_and_grid():
    for name, spec in REGISTRY.items():
        AttackRequest(name).check_schedule(1000)
        if spec.grid:
            parse_request(f"{name}:calibrate").check_schedule(1000)
    parse_request("structural:t=999,stride=1").check_schedule(1000)
    parse_request("secmi:t_sec=980,interval=10").check_schedule(1000)
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive integer"):
        AttackRequest("structural").check_schedule(True)
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive integer"):
        AttackRequest("structural").check_schedule(0)


# --------------------------------------------------------------------------------------------------
# Valid requests are unchanged: the same parameters, types and recorded rows
# --------------------------------------------------------------------------------------------------
def test_valid_requests_keep_their_parameters_and_types():
    for name, spec in REGISTRY.items():
        params = spec.params()
        assert params == spec.defaults and [type(v) for v in params.values()] == [
            type(v) for v in spec.defaults.values()
        ]
        assert AttackRequest(name).points() == [spec.defaults]
        if spec.grid:
            for point in parse_request(f"{name}:calibrate").points():
                assert all(type(point[k]) is type(spec.defaults[k]) for k in point)
    assert parse_request("structural:t=200,stride=20").points() == [
        {"t": 200, "stride": 20, "measure": "ssim", "recon": False}
    ]
    assert parse_request("secmi:t_sec=[50,100,200]").points()[1] == {"t_sec": 100, "interval": 10}


def test_score_rows_record_the_parameters_with_their_types():
    request = parse_request("structural:t=100.0")
    params = request.points()[0]
    records = pd.DataFrame({"id": ["a", "b"], "label": [1, 0], "subset": ["test", "test"]})
    values = pd.DataFrame(
        {
            "id": ["a", "b"],
            "score": [0.5, 0.25],
            "unet_evals": 2,
            "unet_evals_run": 2.0,
            "seconds_per_image": 0.1,
            "peak_memory_mb": 1.0,
        }
    )
    rows = runs.score_rows(records, values, request, params, 1, Settings(), 32)
    assert rows["t"].tolist() == [100, 100] and rows["t"].dtype == np.int64
    assert json.loads(rows["params"][0]) == {"t": 100, "stride": 50, "measure": "ssim", "recon": False}
    assert rows["setting"][0] == "t=100, stride=50, +SSIM"


def test_pia_official_rescale_is_a_registered_default_that_changes_nothing_by_default():
    spec = REGISTRY["pia"]
    assert spec.defaults == {"t": 200, "p": 4, "official_rescale": False}
    assert spec.describe(spec.params()) == "t=200, p=4, -l4"  # the default is not shown
    rescaled = parse_request("pia:official_rescale=true")
    assert spec.describe(rescaled.points()[0]) == "t=200, p=4, official_rescale, -l4"
    assert (
        rescaled.text() == "pia:official_rescale=True" and parse_request(rescaled.text()).points() == rescaled.points()
    )
    settings = Settings()
    assert spec.cost(rescaled.points()[0], settings) == spec.cost(spec.params(), settings) == 2
    assert spec.measure(rescaled.points()[0]) == "-l4"


# --------------------------------------------------------------------------------------------------
# The shared settings
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(guidance=float("nan")), r"guidance must be a finite number >= 0, got nan$"),
        (dict(guidance=float("inf")), r"guidance must be a finite number >= 0, got inf$"),
        (dict(guidance=-1.0), r"guidance must be a finite number >= 0, got -1.0$"),
        (dict(guidance="abc"), r"guidance must be a finite number >= 0, got 'abc' \(text\)$"),
        (dict(guidance=True), r"guidance must be a finite number >= 0, got true \(a boolean\)$"),
        (dict(seed=-1), r"seed must be an integer >= 0, got -1$"),
        (dict(seed=True), r"seed must be an integer >= 0, got true \(a boolean\)$"),
        (dict(seed=2.5), r"seed must be an integer >= 0, got 2.5$"),
        (dict(seed="abc"), r"seed must be an integer >= 0, got 'abc' \(text\)$"),
        (dict(data_range=0), r"data_range must be a finite number > 0, got 0$"),
        (dict(data_range=float("inf")), r"data_range must be a finite number > 0, got inf$"),
        (dict(data_range="2"), r"data_range must be a finite number > 0, got '2' \(text\)$"),
        (dict(prompt="none"), r"prompt must be one of caption, empty, neutral, other, got 'none' \(text\)$"),
        (dict(encode_mode="random"), r"encode_mode must be one of mode, sample, got 'random' \(text\)$"),
        (dict(schedule="linear"), r"schedule must be one of model, official_linear, got 'linear' \(text\)$"),
        (dict(dtype="int8"), r"dtype must be one of float32, bfloat16, float16, got 'int8' \(text\)$"),
    ],
)
def test_settings_name_the_setting_and_what_is_allowed(changes, message):
    with pytest.raises(ValueError, match=message):
        Settings(**changes)


def test_valid_settings_keep_their_values_and_types():
    settings = Settings(guidance=3, seed=4.0, data_range=1)
    assert (settings.guidance, settings.seed, settings.data_range) == (3.0, 4, 1.0)
    assert (type(settings.guidance), type(settings.seed), type(settings.data_range)) == (float, int, float)
    assert Settings().columns() == dict(
        guidance=1.0, prompt="caption", encode_mode="mode", schedule="model", seed=0, data_range=2.0, dtype="float32"
    )
    assert Settings(seed=np.int64(7)).seed == 7 and type(Settings(seed=np.int64(7)).seed) is int
