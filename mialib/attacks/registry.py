"""The one place that says which attacks exist, what they take, what calibration searches and what they cost.

Each :class:`AttackSpec` names its function (one file in this package), the method's own setting, the
grid that calibration searches by default, its cost in U-Net evaluations per image, and its direction
convention: the function's score is "higher means member" as the method says; only the structural
family may have that direction reversed by calibration (:func:`mialib.metrics.choose_setting`).

Notebooks, the robustness suite, the tests and the command line iterate :data:`REGISTRY`. Adding an
attack means one file in this package plus one entry below.

A *request* names an attack and its parameters as text, on the command line and in presets:

    structural                         the registry's setting (the paper's: t=100, stride=50)
    structural:t=200,stride=20         fixed parameters
    structural:t=50:950:50             a list (here 50, 100, ..., 950) is a grid chosen on calibration
    loss:t=[50,100,200]                the same, written as a list
    pia:calibrate                      the registry's default grid
    structural:t=100,direction=-1      force a direction (+1: the method's, -1: reversed, auto: calibrate)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import yaml

from .. import blind
from .backward import backward_attack
from .clid import clid_attack
from .latent import latent_attack
from .loss import loss_attack
from .pia import pia_attack
from .pixel import pixel_attack
from .secmi import secmi_attack
from .structural import structural_attack
from .vae_control import vae_control

KINDS = ("model", "control", "blind")


@dataclass(frozen=True)
class AttackSpec:
    name: str  # stable key, used in result files and on the command line
    function: Callable  # model / control: (target, images, captions, ids, **params, **settings) -> AttackOutput;
    # blind: (imageset, size, batch_size, seed) -> DataFrame(id, score), fitted on the calibration split
    label: str  # display name for figures and tables
    defaults: dict  # the method's (or paper's) setting
    grid: dict  # default calibration grid: parameter -> candidates
    cost: Callable  # (params, settings) -> U-Net evaluations per image
    measure: Callable  # params -> "+SSIM", "-MSE": what the score is and which way means member
    flippable: bool = False  # may calibration reverse the direction? (the structural family only)
    kind: str = "model"  # model: runs the U-Net; control: the VAE only; blind: never sees the model
    setting_name: str = ""  # how the defaults are known ("paper": Li et al.'s setting)
    citation: str = ""
    requires: Callable | None = None  # records -> why the attack cannot run on them (None: it can)

    def params(self, overrides: dict | None = None) -> dict:
        """The defaults with ``overrides``; an unknown parameter is an error naming the known ones."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name} takes {sorted(self.defaults) or 'no parameters'}, not {sorted(unknown)}")
        return {**self.defaults, **overrides}

    def describe(self, params: dict, direction: int = 1) -> str:
        """``t=100, stride=50, +SSIM``: the parameters and the signed measure that was scored."""
        signed = self.measure(params)
        if direction == -1:
            signed = ("-" if signed[0] == "+" else "+") + signed[1:]
        shown = [f"{k}={v}" for k, v in params.items() if k not in ("measure", "metric")]
        return ", ".join([*shown, signed])


def _branches(settings) -> int:
    return settings.unet_branches()


def _path_steps(params) -> int:
    return int(params["t"]) // int(params["stride"])


def _linspace(stop, step=50, start=None):
    return list(range(start or step, stop + 1, step))


REGISTRY: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in [
        AttackSpec(
            "structural", structural_attack, "structural", dict(t=100, stride=50, measure="ssim"), {"t": _linspace(950)},
            cost=lambda p, s: _path_steps(p) * _branches(s),
            measure=lambda p: "+MS-SSIM" if p["measure"] == "ms_ssim" else "+SSIM",
            flippable=True, setting_name="paper", citation="Li et al., ACM MM 2024",
        ),
        AttackSpec(
            "pixel", pixel_attack, "pixel MSE", dict(t=100, stride=50, metric="mse"), {"t": _linspace(950)},
            cost=lambda p, s: _path_steps(p) * _branches(s),
            measure=lambda p: "-MSE" if p["metric"] == "mse" else "+PSNR",
            flippable=True, setting_name="paper", citation="the structural attack's pixel-level counterpart",
        ),
        AttackSpec(
            "latent", latent_attack, "latent distance", dict(t=100, stride=50), {"t": _linspace(950)},
            cost=lambda p, s: _path_steps(p) * _branches(s), measure=lambda p: "-latent MSE",
            flippable=True, setting_name="paper", citation="the structural attack's inversion, scored without the decoder",
        ),
        AttackSpec(
            "backward", backward_attack, "backward reconstruction", dict(t=100, stride=50), {"t": _linspace(500)},
            cost=lambda p, s: 2 * _path_steps(p) * _branches(s), measure=lambda p: "+SSIM",
            flippable=True, setting_name="paper", citation="Li et al., ACM MM 2024, Table 9",
        ),
        AttackSpec(
            "loss", loss_attack, "loss", dict(t=100), {"t": [50, 100, 200, 300, 500]},
            cost=lambda p, s: _branches(s), measure=lambda p: "-MSE", citation="Matsumoto et al. 2023",
        ),
        AttackSpec(
            "secmi", secmi_attack, "SecMI", dict(t_sec=100, interval=10), {"t_sec": [50, 100, 200]},
            cost=lambda p, s: (int(p["t_sec"]) // int(p["interval"]) + 2) * _branches(s), measure=lambda p: "-error",
            citation="Duan et al., ICML 2023",
        ),
        AttackSpec(
            "pia", pia_attack, "PIA", dict(t=200, p=4), {"t": [50, 100, 200, 300]},
            cost=lambda p, s: 2 * _branches(s), measure=lambda p: f"-l{p['p']}", citation="Kong et al., ICLR 2024",
        ),
        AttackSpec(
            "clid", clid_attack, "CLiD", dict(t=450, n_noise=1), {"t": [200, 300, 450, 600]},
            cost=lambda p, s: 3 * int(p["n_noise"]), measure=lambda p: "+loss gap", citation="Zhai et al., NeurIPS 2024",
        ),
        AttackSpec(
            "vae_control", vae_control, "VAE-only control", {}, {},
            cost=lambda p, s: 0, measure=lambda p: "+SSIM(x, D(E(x)))", kind="control",
            citation="a control: the autoencoder never trained on the attacked images",
        ),
        AttackSpec(
            "blind_image", blind.image_only, "blind image-only", {}, {},
            cost=lambda p, s: 0, measure=lambda p: "gradient boosting on image statistics", kind="blind",
            citation="Das et al. 2024", requires=blind.missing_requirement,
        ),
        AttackSpec(
            "blind_caption", blind.caption_only, "blind caption-only", {}, {},
            cost=lambda p, s: 0, measure=lambda p: "char 2-4-gram logistic regression", kind="blind",
            citation="Das et al. 2024", requires=blind.missing_requirement,
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
        lines.append(f"  {spec.name:13s} {spec.label} ({spec.citation}): {params}{grid}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
@dataclass
class AttackRequest:
    """One attack to score: fixed parameters, a grid chosen on calibration, and the direction rule.

    ``direction``: ``"method"`` scores as the method says (+1); ``"auto"`` lets calibration reverse it
    (the structural family only); ``1`` / ``-1`` fix it. ``run`` is the stable id of the result rows.
    """

    name: str
    fixed: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    direction: object = "method"
    run: str = ""
    label: str = ""  # a display name that overrides the derived one (a replayed calibrated choice keeps its name)

    def __post_init__(self):
        spec = get(self.name)
        spec.params({**self.fixed, **{k: None for k in self.grid}})  # unknown parameters fail here
        if self.direction not in ("method", "auto", 1, -1):
            raise ValueError(f"direction must be method, auto, 1 or -1, not {self.direction!r}")
        if self.direction in ("auto", -1) and not spec.flippable:
            raise ValueError(f"{self.name}'s direction is fixed by its method; only {[s.name for s in REGISTRY.values() if s.flippable]} may be reversed")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"the calibration grid of {self.name}'s {key} is empty")
        self.run = self.run or self.text()

    @property
    def spec(self) -> AttackSpec:
        return get(self.name)

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        spec = self.spec
        if self.grid:
            return f"{spec.label} (calibrated)"
        if spec.setting_name and spec.params(self.fixed) == spec.defaults and self.direction in ("method", 1):
            return f"{spec.label} ({spec.setting_name})"
        return spec.label if not self.fixed else f"{spec.label} ({spec.describe(spec.params(self.fixed), 1 if self.direction in ('method', 'auto') else self.direction)})"

    def points(self) -> list[dict]:
        """Every parameter combination to score: the defaults, the fixed values and one grid point each."""
        keys = list(self.grid)
        return [self.spec.params({**self.fixed, **dict(zip(keys, values))}) for values in itertools.product(*self.grid.values())]

    def text(self) -> str:
        parts = [f"{k}={v}" for k, v in self.fixed.items()] + [f"{k}={list(v)}" for k, v in self.grid.items()]
        if self.direction != "method" and not (self.direction == "auto" and self.grid):
            parts.append(f"direction={self.direction}")
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
    return yaml.safe_load(text)


def parse_request(text: str, run: str = "") -> AttackRequest:
    """``"structural:t=50:950:50,stride=50"`` -> an :class:`AttackRequest` (see the module docstring)."""
    name, _, rest = str(text).strip().partition(":")
    spec = get(name.strip())
    fixed, grid, direction = {}, {}, "method"
    for part in _split(rest):
        if part.strip() == "calibrate":
            if not spec.grid:
                raise ValueError(f"{spec.name} has no calibration grid")
            grid.update(spec.grid)
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"expected key=value in {text!r}, got {part!r}")
        key, value = key.strip(), _value(value)
        if key == "direction":
            direction = value if value in ("auto", "method") else int(value)
        elif isinstance(value, list):
            grid[key] = value
        else:
            fixed[key] = value
    if grid and direction == "method" and spec.flippable:
        direction = "auto"
    return AttackRequest(spec.name, fixed, grid, direction, run)
