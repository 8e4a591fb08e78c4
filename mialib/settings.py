"""The settings every attack shares, validated once and written into every result row."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .ddim import SCHEDULES
from .inversion import PROMPT_MODES as PROMPTS

ENCODE_MODES = ("mode", "sample")
DTYPES = ("float32", "bfloat16", "float16")
# preset / notebook parameter -> field
PARAMETERS = {
    "GUIDANCE": "guidance",
    "PROMPT": "prompt",
    "ENCODE_MODE": "encode_mode",
    "SCHEDULE": "schedule",
    "SEED": "seed",
    "SSIM_DATA_RANGE": "data_range",
    "DTYPE": "dtype",
}


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


def _number(name: str, value, allowed: str, ok) -> float:
    """``value`` as a float, or a ValueError naming the setting: booleans, text and non-finite numbers are refused."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"{name} must be {allowed}, got {_shown(value)}")
    return float(value)


@dataclass(frozen=True)
class Settings:
    """What all attacks share. An attack receives only the fields its function takes (:meth:`for_function`).

    - ``guidance``: classifier-free guidance scale (1: the conditional branch only, as the paper);
    - ``prompt``: the caption control: ``caption`` (each image's own), ``empty``, ``neutral`` (one neutral
      prompt for every image) or ``other`` (another image's caption); every attack sees it, CLiD included;
    - ``encode_mode``: VAE posterior ``mode`` (deterministic) or a seeded ``sample``;
    - ``schedule``: ``model`` (the model's alphas_cumprod) or ``official_linear`` (the official code's rebuild);
    - ``seed``: per-image noise and posterior samples derive from it and the image id;
    - ``data_range``: SSIM's data range (2 for images in [-1, 1]; the official code passes 1);
    - ``dtype``: the weights' dtype (float32, bfloat16, float16).
    """

    guidance: float = 1.0
    prompt: str = "caption"
    encode_mode: str = "mode"
    schedule: str = "model"
    seed: int = 0
    data_range: float = 2.0
    dtype: str = "float32"

    def __post_init__(self):
        """Each setting checked once; a bad one is a ValueError naming the setting, the value and what is
        allowed. guidance: a finite number >= 0; seed: an integer >= 0; data_range: a finite number > 0
        (integral floats such as ``3.0`` are accepted for the seed and normalised to ``3``; booleans are
        refused everywhere); prompt, encode_mode, schedule, dtype: one of their choices."""
        object.__setattr__(
            self, "guidance", _number("guidance", self.guidance, "a finite number >= 0", lambda v: v >= 0)
        )
        object.__setattr__(
            self, "data_range", _number("data_range", self.data_range, "a finite number > 0", lambda v: v > 0)
        )
        seed = self.seed
        if (
            isinstance(seed, (bool, np.bool_))
            or not isinstance(seed, (int, float, np.integer, np.floating))
            or not math.isfinite(seed)
            or int(seed) != seed
            or seed < 0
        ):
            raise ValueError(f"seed must be an integer >= 0, got {_shown(seed)}")
        object.__setattr__(self, "seed", int(seed))
        checks = {"prompt": PROMPTS, "encode_mode": ENCODE_MODES, "schedule": SCHEDULES, "dtype": DTYPES}
        for name, allowed in checks.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {_shown(value)}")

    @classmethod
    def from_parameters(cls, params: dict) -> "Settings":
        """From preset / notebook parameters (``GUIDANCE``, ``PROMPT``, ...); absent keys keep their defaults."""
        return cls(**{field: params[key] for key, field in PARAMETERS.items() if key in params})

    def replace(self, **changes) -> "Settings":
        return replace(self, **changes)

    def for_function(self, function) -> dict:
        """The fields that ``function`` names as parameters, to pass by keyword (the attacks and the
        inversion take them keyword-only, after a ``*``; a function is given only the settings it names)."""
        accepted = inspect.signature(function).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            raise TypeError(f"{function.__name__} takes **kwargs; an attack names the settings it uses")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in accepted}

    def columns(self) -> dict:
        return asdict(self)

    def unet_branches(self) -> int:
        """U-Net evaluations per noise prediction: 1 at guidance 0 or 1, 2 otherwise."""
        return 1 if self.guidance in (0.0, 1.0) else 2
