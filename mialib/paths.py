"""Where the repository is: preset paths are relative to its root (notebooks run from notebooks/).

Imports nothing of mialib, so the image sets and the experiment runner both resolve paths from here.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def resolve(path: str | os.PathLike) -> Path:
    """Paths in presets are relative to the repository root (notebooks run from notebooks/)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else ROOT / path
