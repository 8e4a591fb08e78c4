"""The one place that says which attacks exist, what they take, what calibration searches and what they cost.

Each :class:`AttackSpec` names its function (one file in this package), the method's own setting, the
grid that calibration searches by default, its cost in U-Net evaluations per image, what it needs from
the run layer (``inverts``: it walks the DDIM inversion path and takes the trajectory cache), and its
direction convention: the function's score is "higher means member" as the method says; only the
structural family may have that direction reversed by calibration (:func:`mialib.metrics.choose_setting`).
The functions return scores and extras only: the run layer counts the U-Net evaluations a call makes
(:func:`mialib.runs.attack_values`), against the cost stated here.

Notebooks, the robustness suite, the tests and the command line iterate :data:`REGISTRY`. Adding an
attack means one file in this package plus one entry below.

Each entry also states, once:

- what each parameter may be (``schema``: :class:`Param`; ``rules``: combinations such as t a multiple of
  stride; ``deepest``: the deepest timestep visited). Requests are checked when they are built, every grid
  point included, and against the model's schedule by :meth:`AttackRequest.check_schedule`;
- how far float32 rounding may move its score (:meth:`AttackSpec.tolerance`): ``roundings`` times float32
  epsilon times ``rounding(params, extras)``, the score's first-order move when every operand it subtracts
  moves by one part in one, computed from the operands' magnitudes (the two losses of CLiD, the latents
  of SecMI, the local pixel moments of SSIM), never from the score itself: a score that is a small
  difference of large quantities rounds like the quantities. Another batch size, batch composition, CPU
  instruction set or cache read moves a score within it (tests/test_tolerances.py).

A *request* names an attack and its parameters as text, on the command line and in presets:

    structural                         the registry's setting (the paper's: t=100, stride=50)
    structural:t=200,stride=20         fixed parameters
    structural:t=50:950:50             a list (here 50, 100, ..., 950) is a grid chosen on calibration
    loss:t=[50,100,200]                the same, written as a list
    pia:calibrate                      the registry's default grid
    structural:t=100,direction=-1      force a direction (+1: the method's, -1: reversed, auto: calibrate)
    loss:calibrate=difficulty          per-image calibration of the score (:mod:`mialib.calibration`):
    loss:calibrate=reference           against image-only difficulty features, or against reference models
    curve:calibrate=fit                a curve's summary fitted on the calibration split
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import yaml

from .. import blind
from .backward import backward_attack
from .clid import clid_attack
from .curve import FEATURE_PREFIX, noise_curve_attack
from .curve import levels as curve_levels
from .latent import latent_attack
from .loss import loss_attack
from .pia import pia_attack
from .pixel import pixel_attack
from .secmi import secmi_attack
from .structural import structural_attack
from .vae_control import vae_control

KINDS = ("model", "control", "blind")
# Per-image calibration of a request's scores (mialib.calibration): none, against image-only difficulty
# features, against the same attack on reference models, or (an attack with a per-image curve, ``features``)
# a summary of that curve fitted on the calibration split.
CALIBRATIONS = ("none", "difficulty", "reference", "fit")
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2^-23: one float32 rounding, relative


# --------------------------------------------------------------------------------------------------
# Parameters: what each one may be, checked once (AttackRequest.__post_init__, AttackSpec.params)
# --------------------------------------------------------------------------------------------------
def _shown(value) -> str:
    """A value as a message shows it: YAML's spelling for booleans and null, quotes for text."""
    if isinstance(value, np.generic):
        value = value.item()  # np.int64(0) -> 0
    if isinstance(value, (bool, np.bool_)):
        return f"{str(bool(value)).lower()} (a boolean)"
    if value is None:
        return "nothing (null)"
    if isinstance(value, str):
        return f"{value!r} (text)"
    return repr(value)


@dataclass(frozen=True)
class Param:
    """What one attack parameter may be.

    ``kind``: ``"int"`` an integer >= ``low``; ``"real"`` a finite number > ``above``; ``"choice"`` one of
    ``choices``; ``"flag"`` true or false. ``timestep``: an integer that is a diffusion timestep, so also
    below the model's number of training timesteps T (checked by :meth:`AttackRequest.check_schedule`,
    once the model is known).

    Integers: a boolean is refused (Python's ``True`` is an ``int``); a float with an integral value
    (``100.0``) is normalised to the int (``100``), any other float is refused. Reals keep their type
    (``4`` stays ``4``, ``2.5`` stays ``2.5``); booleans and text are refused. Flags take only true / false.
    """

    kind: str
    low: int = 0
    above: float = 0.0
    choices: tuple = ()
    timestep: bool = False

    def allowed(self) -> str:
        if self.kind == "int":
            return (
                f"an integer in [{self.low}, T) (T: the model's training timesteps)"
                if self.timestep
                else f"an integer >= {self.low}"
            )
        if self.kind == "real":
            return f"a finite number > {self.above:g}"
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        return "true or false"

    def check(self, attack: str, name: str, value):
        """``value`` normalised (see the class docstring), or a ValueError naming the attack and parameter."""
        refuse = ValueError(f"{attack}: {name} must be {self.allowed()}, got {_shown(value)}")
        if self.kind == "flag":
            if not isinstance(value, (bool, np.bool_)):
                raise refuse
            return bool(value)
        if self.kind == "choice":
            if isinstance(value, (bool, np.bool_)) or value not in self.choices:
                raise refuse
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise refuse
        if self.kind == "real":
            if not math.isfinite(value) or not value > self.above:
                raise refuse
            return value.item() if isinstance(value, np.generic) else value
        if not math.isfinite(value) or int(value) != value:
            raise refuse
        if int(value) < self.low:
            raise refuse
        return int(value)


def _timestep(low: int = 0) -> Param:
    return Param("int", low=low, timestep=True)


def _multiple(key: str, of: str):
    """A rule: ``params[key]`` must be a multiple of ``params[of]`` (the DDIM path 0, of, 2 of, ..., key)."""

    def rule(p: dict) -> str | None:
        if p[key] % p[of]:
            return (
                f"{key} must be a multiple of {of} (the path 0, {of}, 2 {of}, ... must reach it), "
                f"got {key}={p[key]}, {of}={p[of]}"
            )
        return None

    return rule


# --------------------------------------------------------------------------------------------------
# Tolerances: how far float32 rounding may move a score, from the magnitudes it subtracts
# --------------------------------------------------------------------------------------------------
def _squared_error(mean_square, operand_rms):
    """How far mean((a - b)^2) moves when a and b move by one part in one (relative), b of root mean square
    ``operand_rms``: 2 rms(a - b) (rms(a) + rms(b)) <= 2 sqrt(m) (2 rms(b) + sqrt(m)) (Cauchy-Schwarz,
    and rms(a) <= rms(b) + sqrt(m)). Scales with the operands, not with their difference."""
    root = np.sqrt(np.asarray(mean_square, dtype=np.float64))
    return 2 * root * (2 * np.asarray(operand_rms, dtype=np.float64) + root)


def _pia_rounding(p, x):
    """p mean(|d|^(p-1) |delta d|) <= p distance^((p-1)/p) (||eps_0||_p + ||eps_t||_p) for a relative
    rounding of one in both predictions (Hoelder, then Minkowski; p-norms as means, p >= 1)."""
    power = float(p["p"])
    distance = np.asarray(x["distance"], dtype=np.float64)
    return power * distance ** ((power - 1) / power) * np.asarray(x["eps_norm"], dtype=np.float64)


def _clid_rounding(p, x):
    """score = L_reduced / 2 + L_null / 2 - L_full: each loss's squared-error bound against unit noise."""
    return (
        _squared_error(x["loss_full"], 1.0)
        + 0.5 * _squared_error(x["loss_reduced"], 1.0)
        + 0.5 * _squared_error(x["loss_null"], 1.0)
    )


def _curve_rounding(p, x):
    """score = -mean_k log e_k, e_k a constant of t times the noise-prediction error m_k: each log moves by
    d m_k / m_k, m_k's squared-error bound against unit noise."""
    moves = [_squared_error(x[f"mse_t{t}"], 1.0) / np.asarray(x[f"mse_t{t}"], dtype=np.float64) for t in
             curve_levels(p["t_min"], p["t_max"], p["points"])]  # fmt: skip
    return np.mean(moves, axis=0)


def _curve_levels_rule(p: dict) -> str | None:
    if p["t_min"] >= p["t_max"]:
        return f"t_min must be below t_max, got t_min={p['t_min']}, t_max={p['t_max']}"
    if p["t_max"] - p["t_min"] < p["points"] - 1:
        return f"{p['points']} levels do not fit between t_min={p['t_min']} and t_max={p['t_max']}"
    return None


def _pixel_rounding(p, x):
    mse_bound = _squared_error(x["mse"], x["pixel_rms"])
    return mse_bound if p["metric"] == "mse" else 10 / np.log(10) * mse_bound / np.asarray(x["mse"], dtype=np.float64)


@dataclass(frozen=True)
class AttackSpec:
    name: str  # stable key, used in result files and on the command line
    function: Callable  # model / control: (target, images, captions, ids, **params, **settings) -> AttackOutput
    # (scores and extras), the shared settings keyword-only (Settings.for_function picks those it names), and
    # cache= when it inverts;
    # blind: (imageset, size, batch_size, seed) -> DataFrame(id, score), fitted on the calibration split
    label: str  # display name for figures and tables
    defaults: dict  # the method's (or paper's) setting
    grid: dict  # default calibration grid: parameter -> candidates
    cost: Callable  # (params, settings) -> U-Net evaluations per image (the run layer counts what a call makes)
    measure: Callable  # params -> "+SSIM", "-MSE": what the score is and which way means member
    flippable: bool = False  # may calibration reverse the direction? (the structural family only)
    kind: str = "model"  # model: runs the U-Net; control: the VAE only; blind: never sees the model
    # inverts: walks a DDIM inversion path 0, k, 2k, ...; the function takes cache= (the trajectory cache, which
    # runs.attack_values hands it)
    inverts: bool = False
    setting_name: str = ""  # how the defaults are known ("paper": Li et al.'s setting)
    citation: str = ""
    requires: Callable | None = None  # records -> why the attack cannot run on them (None: it can)
    unconditional: bool = False  # contrasts a caption with the unconditional branch (refused where there is none)
    features: str = ""  # prefix of the extras that form a per-image curve: calibrate=fit classifies it
    schema: dict = field(default_factory=dict)  # parameter -> Param: what each one may be
    rules: tuple = ()  # params -> None, or what is wrong with a combination of parameters
    deepest: Callable | None = None  # params -> (the deepest timestep visited, how it is reached): check_schedule
    rounding: Callable | None = None  # (params, extras) -> per image: the score's move for a relative rounding of 1
    roundings: float = 0.0  # the stated factor: roundings of float32 epsilon the operands may carry

    def params(self, overrides: dict | None = None) -> dict:
        """The defaults with ``overrides``, each value checked against :attr:`schema` (normalised as
        :class:`Param` says) and the combination against :attr:`rules`. An unknown parameter is an error
        naming the known ones; a bad value, one naming the attack, the parameter, the value and what is allowed."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name} takes {sorted(self.defaults) or 'no parameters'}, not {sorted(unknown)}")
        params = {**self.defaults, **{k: self.check(k, v) for k, v in overrides.items()}}
        for rule in self.rules:
            problem = rule(params)
            if problem:
                raise ValueError(f"{self.name}: {problem}")
        return params

    def check(self, key: str, value):
        """One parameter's value, normalised, or a ValueError (see :class:`Param`)."""
        if key not in self.defaults:
            raise ValueError(f"{self.name} takes {sorted(self.defaults) or 'no parameters'}, not {[key]}")
        return self.schema[key].check(self.name, key, value)

    def check_schedule(self, params: dict, num_train_timesteps: int) -> None:
        """Every timestep the attack visits at ``params`` must lie in [0, num_train_timesteps)."""
        for key, param in self.schema.items():
            if param.timestep and not params[key] < num_train_timesteps:
                raise ValueError(
                    f"{self.name}: {key} must be an integer in [{param.low}, {num_train_timesteps}) "
                    f"(this model has {num_train_timesteps} training timesteps), got {params[key]}"
                )
        if self.deepest is not None:
            deepest, how = self.deepest(params)
            if not deepest < num_train_timesteps:
                raise ValueError(
                    f"{self.name}: {how} must be below {num_train_timesteps} (this model's training timesteps), got "
                    f"{deepest}"
                )

    def tolerance(self, params: dict, extras) -> np.ndarray:
        """Per image, how far float32 rounding may move the score at ``params``: :attr:`roundings` times
        float32 epsilon times :attr:`rounding` (the score's first-order move when every operand it
        subtracts moves by one part in one, from the magnitudes in ``extras``: the attack's extras, as a
        dict or the run layer's values table). Another batch size, batch composition, CPU instruction set
        or cache read may move a score this much and no more."""
        if self.rounding is None:
            raise ValueError(f"{self.name} has no rounding tolerance (it never runs a float32 model)")
        return self.roundings * FLOAT32_EPS * np.asarray(self.rounding(params, extras), dtype=np.float64)

    def describe(self, params: dict, direction: int = 1) -> str:
        """``t=100, stride=50, +SSIM``: the parameters and the signed measure that was scored (a flag is
        shown by its name when true, and not at all when false)."""
        signed = self.measure(params)
        if direction == -1:
            signed = ("-" if signed[0] == "+" else "+") + signed[1:]
        shown = [
            k if v is True else f"{k}={v}"
            for k, v in params.items()
            if k not in ("measure", "metric", "recon") and v is not False
        ]
        return ", ".join([*shown, signed])


def within_tolerance(spec: AttackSpec, params: dict, scores, reference, extras) -> np.ndarray:
    """Per image: does ``scores`` equal ``reference`` within ``spec.tolerance(params, extras)``?"""
    gap = np.abs(np.asarray(scores, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    return gap <= spec.tolerance(params, extras)


def assert_within_tolerance(spec: AttackSpec, params: dict, scores, reference, extras) -> float:
    """Raise an AssertionError naming the worst image unless every score is within tolerance; returns
    the largest |difference| / tolerance (below 1 when it holds)."""
    gap = np.abs(np.asarray(scores, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    tolerance = spec.tolerance(params, extras)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(gap == 0, 0.0, gap / tolerance)
    worst = int(np.argmax(ratio))
    if not (ratio <= 1).all():
        raise AssertionError(
            f"{spec.name}: scores differ by {gap[worst]:.3g} at image {worst}, {ratio[worst]:.3g} times the tolerance "
            f"{tolerance[worst]:.3g} ({spec.roundings:g} x float32 eps x "
            f"{tolerance[worst] / spec.roundings / FLOAT32_EPS:.3g})"
        )
    return float(ratio.max(initial=0.0))


def _branches(settings) -> int:
    return settings.unet_branches()


def _path_steps(params) -> int:
    return int(params["t"]) // int(params["stride"])


def _linspace(stop, step=50, start=None):
    return list(range(start or step, stop + 1, step))


_PATH = dict(t=_timestep(), stride=Param("int", low=1))
_PATH_RULES = (_multiple("t", "stride"),)

# The stated factor: how many float32 roundings (relative, in units of float32 epsilon) each element of a
# subtracted operand may carry. Every operand is the output of float32 networks whose kernels accumulate
# in another order for another batch size or CPU instruction set; measured between batches of 1 and 8 on
# the tiny test target (AVX2, root mean square over a tensor's elements, largest image): the VAE latent 13,
# a DDIM latent at t = 100 20, a U-Net prediction 37, decoded pixels 57, and a prediction made on an input
# built from another prediction (PIA's eps_t) 64. ROUNDINGS = 64 covers them all; PIA, whose l4 distance rests
# on few large elements (the bound is nearly tight there) and whose second prediction inherits the
# first's rounding, takes twice that. The bounds themselves assume every element's rounding aligned (a
# worst case), so the measured differences sit far inside for the other attacks.
ROUNDINGS = 64

REGISTRY: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in [
        AttackSpec(
            "structural",
            structural_attack,
            "structural",
            dict(t=100, stride=50, measure="ssim", recon=False),
            {"t": _linspace(950)},
            cost=lambda p, s: _path_steps(p) * _branches(s),
            measure=lambda p: (
                ("+MS-SSIM" if p["measure"] == "ms_ssim" else "+SSIM") + (" to D(E(x))" if p["recon"] else "")
            ),
            flippable=True,
            inverts=True,
            setting_name="paper",
            citation="Li et al., ACM MM 2024",
            schema={**_PATH, "measure": Param("choice", choices=("ssim", "ms_ssim")), "recon": Param("flag")},
            rules=_PATH_RULES,
            # tolerance = 64 eps * ssim_rounding: the mean over the SSIM map of
            # 4 + cov (2 |uxy| + 4 |ux uy| + uxx + uyy + 2 ux^2 + 2 uy^2) / (vx + vy + c2) (its local pixel moments
            # over its local variances; structural.ssim_rounding). MS-SSIM: ms_ssim_rounding, the same per scale
            rounding=lambda p, x: x[f"{p['measure']}_rounding"],
            roundings=ROUNDINGS,
        ),
        AttackSpec(
            "pixel",
            pixel_attack,
            "pixel MSE",
            dict(t=100, stride=50, metric="mse"),
            {"t": _linspace(950)},
            cost=lambda p, s: _path_steps(p) * _branches(s),
            measure=lambda p: "-MSE" if p["metric"] == "mse" else "+PSNR",
            flippable=True,
            inverts=True,
            setting_name="paper",
            citation="the structural attack's pixel-level counterpart",
            schema={**_PATH, "metric": Param("choice", choices=("mse", "psnr"))},
            rules=_PATH_RULES,
            # tolerance = 64 eps * 2 sqrt(mse) (2 pixel_rms + sqrt(mse)) (x - D(z_t)); PSNR: that times 10 / (ln 10 mse)
            rounding=_pixel_rounding,
            roundings=ROUNDINGS,
        ),
        AttackSpec(
            "latent",
            latent_attack,
            "latent distance",
            dict(t=100, stride=50),
            {"t": _linspace(950)},
            cost=lambda p, s: _path_steps(p) * _branches(s),
            measure=lambda p: "-latent MSE",
            flippable=True,
            inverts=True,
            setting_name="paper",
            citation="the structural attack's inversion, scored without the decoder",
            schema=dict(_PATH),
            rules=_PATH_RULES,
            # tolerance = 64 eps * 2 sqrt(latent_mse) (2 latent_rms + sqrt(latent_mse)) (z_t - z_0)
            rounding=lambda p, x: _squared_error(x["latent_mse"], x["latent_rms"]),
            roundings=ROUNDINGS,
        ),
        AttackSpec(
            "backward",
            backward_attack,
            "backward reconstruction",
            dict(t=100, stride=50),
            {"t": _linspace(500)},
            cost=lambda p, s: 2 * _path_steps(p) * _branches(s),
            measure=lambda p: "+SSIM",
            flippable=True,
            inverts=True,
            setting_name="paper",
            citation="Li et al., ACM MM 2024, Table 9",
            schema={"t": _timestep(low=1), "stride": Param("int", low=1)},
            rules=_PATH_RULES,  # t = 0 has no path back
            rounding=lambda p, x: x["ssim_rounding"],
            roundings=ROUNDINGS,  # tolerance = 64 eps * ssim_rounding, as structural
        ),
        AttackSpec(
            "loss",
            loss_attack,
            "loss",
            dict(t=100),
            {"t": [50, 100, 200, 300, 500]},
            cost=lambda p, s: _branches(s),
            measure=lambda p: "-MSE",
            citation="Matsumoto et al. 2023",
            schema={"t": _timestep()},
            # tolerance = 64 eps * 2 sqrt(mse) (2 + sqrt(mse)) (prediction - noise, the noise of unit rms)
            rounding=lambda p, x: _squared_error(x["mse"], 1.0),
            roundings=ROUNDINGS,
        ),
        AttackSpec(
            "secmi",
            secmi_attack,
            "SecMI",
            dict(t_sec=100, interval=10),
            {"t_sec": [50, 100, 200]},
            cost=lambda p, s: (int(p["t_sec"]) // int(p["interval"]) + 2) * _branches(s),
            measure=lambda p: "-error",
            inverts=True,
            citation="Duan et al., ICML 2023",
            schema={"t_sec": _timestep(), "interval": Param("int", low=1)},
            rules=(_multiple("t_sec", "interval"),),
            deepest=lambda p: (
                p["t_sec"] + p["interval"],
                f"t_sec + interval = {p['t_sec']} + {p['interval']} (the inversion goes one interval past t_sec)",
            ),
            # tolerance = 64 eps * 2 sqrt(error) (2 latent_rms + sqrt(error)) (z_{t_sec} - z'_{t_sec}: latents
            # ~4000 times larger than their difference, so about 0.5 % of the score)
            rounding=lambda p, x: _squared_error(x["error"], x["latent_rms"]),
            roundings=ROUNDINGS,
        ),
        AttackSpec(
            "pia",
            pia_attack,
            "PIA",
            dict(t=200, p=4, official_rescale=False),
            {"t": [50, 100, 200, 300]},
            cost=lambda p, s: 2 * _branches(s),
            measure=lambda p: f"-l{p['p']}",
            citation="Kong et al., ICLR 2024",
            schema={"t": _timestep(low=1), "p": Param("real", above=0.0), "official_rescale": Param("flag")},
            # tolerance = 128 eps * p distance^((p - 1) / p) eps_norm (eps_0 - eps_t)
            rounding=_pia_rounding,
            roundings=2 * ROUNDINGS,
        ),
        AttackSpec(
            "clid",
            clid_attack,
            "CLiD",
            dict(t=450, n_noise=1),
            {"t": [200, 300, 450, 600]},
            cost=lambda p, s: 3 * int(p["n_noise"]),
            measure=lambda p: "+loss gap",
            unconditional=True,
            citation="Zhai et al., NeurIPS 2024",
            schema={"t": _timestep(), "n_noise": Param("int", low=1)},
            # tolerance = 64 eps * (g(L_full) + g(L_reduced) / 2 + g(L_null) / 2), g(L) = 2 sqrt(L) (2 + sqrt(L)):
            # a gap of two losses rounds like the losses, not like the gap
            rounding=_clid_rounding,
            roundings=ROUNDINGS,
        ),
        AttackSpec(
            "curve",
            noise_curve_attack,
            "noise-level curve",
            dict(t_min=50, t_max=950, points=11, n_noise=3),
            {},
            cost=lambda p, s: int(p["points"]) * int(p["n_noise"]) * _branches(s),
            measure=lambda p: "-mean log one-step error",
            citation="Sesmat et al., ICML 2026",
            schema={
                "t_min": _timestep(low=1),
                "t_max": _timestep(low=1),
                "points": Param("int", low=2),
                "n_noise": Param("int", low=1),
            },  # fmt: skip
            rules=(_curve_levels_rule,),
            deepest=lambda p: (p["t_max"], f"t_max = {p['t_max']}"),
            features=FEATURE_PREFIX,
            # tolerance = 64 eps * mean_k 2 (2 + sqrt(m_k)) / sqrt(m_k) (each level's log error)
            rounding=_curve_rounding,
            roundings=ROUNDINGS,
        ),
        AttackSpec(
            "vae_control",
            vae_control,
            "VAE-only control",
            {},
            {},
            cost=lambda p, s: 0,
            measure=lambda p: "+SSIM(x, D(E(x)))",
            kind="control",
            citation="a control: the autoencoder never trained on the attacked images",
            rounding=lambda p, x: x["ssim_rounding"],
            roundings=ROUNDINGS,  # tolerance = 64 eps * ssim_rounding
        ),
        AttackSpec(
            "blind_image",
            blind.image_only,
            "blind image-only",
            {},
            {},
            cost=lambda p, s: 0,
            measure=lambda p: "gradient boosting on image statistics",
            kind="blind",
            citation="Das et al. 2024",
            requires=blind.missing_requirement,
        ),
        AttackSpec(
            "blind_caption",
            blind.caption_only,
            "blind caption-only",
            {},
            {},
            cost=lambda p, s: 0,
            measure=lambda p: "char 2-4-gram logistic regression",
            kind="blind",
            citation="Das et al. 2024",
            requires=blind.missing_requirement,
        ),
    ]
}


def get(name: str) -> AttackSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def help_text() -> str:
    """One line per registered attack (for ``--help``)."""
    lines = []
    for spec in REGISTRY.values():
        params = ", ".join(f"{k}={v}" for k, v in spec.defaults.items()) or "no parameters"
        grid = "; calibrates " + ", ".join(spec.grid) if spec.grid else ""
        inverts = "; inverts (trajectory cache)" if spec.inverts else ""
        lines.append(f"  {spec.name:13s} {spec.label} ({spec.citation}): {params}{grid}{inverts}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
@dataclass
class AttackRequest:
    """One attack to score: fixed parameters, a grid chosen on calibration, and the direction rule.

    ``direction``: ``"method"`` scores as the method says (+1); ``"auto"`` lets calibration reverse it
    (the structural family only); ``1`` / ``-1`` fix it. ``run`` is the stable id of the result rows.
    ``calibrate``: ``"none"``, or per-image calibration of every grid point's scores before the choice
    (``"difficulty"``, ``"reference"``: :mod:`mialib.calibration`; attacks that run the model only), or
    ``"fit"``: the attack's per-image curve (:attr:`AttackSpec.features`) classified by a model fitted on
    the calibration split (:func:`mialib.calibration.fitted_summary`).

    Every fixed value and every grid value is checked here, once, against the attack's :attr:`AttackSpec.schema`
    (and normalised: ``100.0`` becomes ``100``), and so is every grid point's combination (``t`` a multiple
    of ``stride``); a bad one is a ValueError naming the attack, the parameter, the value and what is
    allowed. The bound that needs the model (a timestep below its number of training timesteps) is
    :meth:`check_schedule`, to be called once the model is loaded and before anything is computed or written.
    """

    name: str
    fixed: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    direction: object = "method"
    run: str = ""
    label: str = ""  # a display name that overrides the derived one (a replayed calibrated choice keeps its name)
    calibrate: str = "none"

    def __post_init__(self):
        spec = get(self.name)
        if not isinstance(self.calibrate, str) or self.calibrate not in CALIBRATIONS:
            raise ValueError(
                f"{spec.name}: calibrate must be one of {', '.join(CALIBRATIONS)}, got {_shown(self.calibrate)}"
            )
        if self.calibrate != "none" and spec.kind != "model":
            raise ValueError(
                f"{spec.name}: calibrate={self.calibrate} applies to attacks that run the model, not to a {spec.kind} "
                "(a control or blind baseline is itself a measure of the image)"
            )
        if self.calibrate == "fit" and not spec.features:
            with_curves = [s.name for s in REGISTRY.values() if s.features]
            raise ValueError(
                f"{spec.name}: calibrate=fit classifies an attack's per-image curve, which {spec.name} does not have "
                f"(attacks with one: {', '.join(with_curves)})"
            )
        unknown = (set(self.fixed) | set(self.grid)) - set(spec.defaults)
        if unknown:
            raise ValueError(f"{spec.name} takes {sorted(spec.defaults) or 'no parameters'}, not {sorted(unknown)}")
        if isinstance(self.direction, (bool, np.bool_)) or self.direction not in ("method", "auto", 1, -1):
            raise ValueError(f"{spec.name}: direction must be method, auto, 1 or -1, got {_shown(self.direction)}")
        if self.direction in (1, -1):
            self.direction = int(self.direction)  # -1.0 -> -1
        if self.direction in ("auto", -1) and not spec.flippable:
            flippable = [s.name for s in REGISTRY.values() if s.flippable]
            raise ValueError(f"{self.name}'s direction is fixed by its method; only {flippable} may be reversed")
        self.fixed = {key: spec.check(key, value) for key, value in self.fixed.items()}
        grid = {}
        for key, values in self.grid.items():
            if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
                raise ValueError(f"{spec.name}: the calibration grid of {key} must be a list, got {_shown(values)}")
            if not len(values := list(values)):
                raise ValueError(f"the calibration grid of {self.name}'s {key} is empty")
            grid[key] = [spec.check(key, value) for value in values]
        self.grid = grid
        self.points()  # every combination of the grid, checked against the attack's rules
        self.run = self.run or self.text()

    def check_schedule(self, num_train_timesteps: int) -> None:
        """Raise a ValueError (naming the attack, the parameter, the value and the allowed range) unless
        every timestep that every point of this request visits lies in [0, num_train_timesteps): call it
        with the loaded model's ``len(target.scheduler.alphas_cumprod)`` before any compute or write."""
        if (
            isinstance(num_train_timesteps, (bool, np.bool_))
            or not isinstance(num_train_timesteps, (int, np.integer))
            or num_train_timesteps < 1
        ):
            raise ValueError(f"num_train_timesteps must be a positive integer, got {_shown(num_train_timesteps)}")
        for point in self.points():
            self.spec.check_schedule(point, int(num_train_timesteps))

    @property
    def spec(self) -> AttackSpec:
        return get(self.name)

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        if self.calibrate == "fit":
            return self._display() + ", fitted on calibration"
        return self._display() + ("" if self.calibrate == "none" else f" vs {self.calibrate}")

    def _display(self) -> str:
        spec = self.spec
        if self.grid:
            # settings held fixed away from the defaults are named, so two grids of one attack differ
            held = [
                f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in self.fixed.items()
                if spec.defaults.get(k) != v
            ]
            return f"{spec.label} (calibrated{''.join(', ' + h for h in held)})"
        if spec.setting_name and spec.params(self.fixed) == spec.defaults and self.direction in ("method", 1):
            return f"{spec.label} ({spec.setting_name})"
        if not self.fixed:
            return spec.label
        direction = 1 if self.direction in ("method", "auto") else self.direction
        return f"{spec.label} ({spec.describe(spec.params(self.fixed), direction)})"

    def points(self) -> list[dict]:
        """Every parameter combination to score: the defaults, the fixed values and one grid point each."""
        keys = list(self.grid)
        return [
            self.spec.params({**self.fixed, **dict(zip(keys, values))})
            for values in itertools.product(*self.grid.values())
        ]

    def text(self) -> str:
        parts = [f"{k}={v}" for k, v in self.fixed.items()] + [f"{k}={list(v)}" for k, v in self.grid.items()]
        if self.direction != "method" and not (self.direction == "auto" and self.grid):
            parts.append(f"direction={self.direction}")
        if self.calibrate != "none":
            parts.append(f"calibrate={self.calibrate}")
        return self.name + (":" + ",".join(parts) if parts else "")


def _split(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in [*parts, current] if p.strip()]


def _value(text: str):
    text = text.strip()
    pieces = text.split(":")
    if len(pieces) == 3 and all(p.strip().lstrip("-").isdigit() for p in pieces):
        start, stop, step = (int(p) for p in pieces)
        if step <= 0 or stop < start:
            raise ValueError(f"range {text!r} must be start:stop:step with step > 0 and stop >= start")
        return list(range(start, stop + 1, step))
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"cannot read {text!r} as a value or a [list] ({str(error).splitlines()[0]})") from None


def parse_request(text: str, run: str = "") -> AttackRequest:
    """``"structural:t=50:950:50,stride=50"`` -> an :class:`AttackRequest` (see the module docstring)."""
    name, _, rest = str(text).strip().partition(":")
    spec = get(name.strip())
    fixed, grid, direction, calibrate = {}, {}, "method", "none"
    for part in _split(rest):
        if part.strip() == "calibrate":
            if not spec.grid:
                raise ValueError(f"{spec.name} has no calibration grid")
            grid.update(spec.grid)
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"expected key=value in {text!r}, got {part!r}")
        key = key.strip()
        try:
            value = _value(value)
        except ValueError as error:
            raise ValueError(f"{spec.name}: {key}: {error}") from None
        if key == "direction":
            direction = value  # checked by AttackRequest (a boolean, text or another number is refused there)
        elif key == "calibrate":
            calibrate = value  # checked by AttackRequest
        elif isinstance(value, list):
            grid[key] = value
        else:
            fixed[key] = value
    if grid and direction == "method" and spec.flippable:
        direction = "auto"
    return AttackRequest(spec.name, fixed, grid, direction, run, calibrate=calibrate)
