"""Image sets: one contract for every source of images, chosen by one ``DATA`` string.

    emoji                                   the embedded OpenMoji set (the default)
    csv:path/to/set.csv                     id, path, caption, label[, subset][, group]; paths relative to the CSV
    imagefolder:path/to/folder              Hugging Face imagefolder: metadata.csv / metadata.jsonl with
                                            file_name, caption (or text), label; or members/ and nonmembers/
    img2dataset:path/to/output?label=KEY    img2dataset output (files or webdataset .tar shards), the label
                                            from a key of each sample's .json ...
    img2dataset:members=DIR,nonmembers=DIR  ... or one output folder per class
    laion-mi:path/to/folder                 the LAION-mi members / non-members parquet files (url, caption)
                                            and what ``mialib download`` fetched into the folder

Every form takes options after ``?``, joined by ``&``: ``seed=N`` (seed of the calibration / test
assignment when the source has none), ``manifest=path.csv`` (verify every image against a frozen
manifest and take its split), ``min_side=N`` (skip images whose shorter side is below N px).

Every set gives records ``id, caption, label, subset, source, sha256`` (see :mod:`.core` for what
happens to bad input) and loads pixels lazily, batch by batch. Every file under a folder form's folder
is used or listed in the skip table with its reason, except the form's own files (metadata, captions,
img2dataset's .json / .parquet) and hidden ones; an image is recognised by its content, not its suffix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from ..data import DataError
from .core import (
    MANIFEST_COLUMNS,
    MIN_SIDE,
    OPTIONS,
    RECORD_COLUMNS,
    SKIP_COLUMNS,
    Entry,
    ImageProblem,
    ImageSet,
    build,
    decode_image,
    parse_label,
    read_bytes,
    read_manifest,
    tar_location,
)
from .local import csv_entries, emoji_entries, imagefolder_entries

Adapter = Callable[[str, dict], tuple[list[Entry], Path, dict]]
ADAPTERS: dict[str, Adapter] = {
    "emoji": emoji_entries,
    "csv": csv_entries,
    "imagefolder": imagefolder_entries,
}
ADAPTER_OPTIONS: dict[str, dict] = {
    "emoji": {
        "members": int,
        "nonmembers": int,
        "public": int,
        "style": str,
        "split": str,
        "images": str,
        "extra_nonmembers": int,
    }
}


def register_adapter(kind: str, adapter: Adapter, options: dict | None = None) -> None:
    ADAPTERS[kind] = adapter
    ADAPTER_OPTIONS[kind] = dict(options or {})


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``"imagefolder:sets/a?seed=1"`` -> ``("imagefolder", "sets/a", {"seed": 1})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"an image set is named by a string such as 'imagefolder:path', not {spec!r}")
    body, _, query = spec.strip().partition("?")
    kind, _, arg = body.partition(":")
    kind = kind.strip().lower()
    if kind not in ADAPTERS:
        raise DataError(f"unknown image set kind {kind!r} in {spec!r}; known: {sorted(ADAPTERS)}")
    known = {**OPTIONS, **ADAPTER_OPTIONS.get(kind, {})}
    options = {}
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        if not sep or key not in known:
            raise DataError(f"unknown option {part!r} in {spec!r}; {kind} takes {sorted(known)}")
        try:
            options[key] = known[key](value)
        except ValueError:
            raise DataError(f"option {key}={value!r} in {spec!r} is not a {known[key].__name__}") from None
    if kind != "emoji" and not arg:
        raise DataError(f"{kind} needs a path: '{kind}:path/to/set'")
    return kind, arg, options


def _resolve(path: str, base: Path | None) -> str:
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() or base is None else Path(base) / expanded)


def open_imageset(
    spec: str, base: str | os.PathLike | None = None, require_labels: bool = True, **defaults
) -> ImageSet:
    """Open an image set named by ``spec``; relative paths are relative to ``base`` (default: the
    working directory). ``defaults`` fill options the spec does not give (e.g. the emoji set's sizes).
    ``require_labels=False`` (the set-level audit) opens a set whose records carry no membership label
    (a csv without the column, an imagefolder's metadata without it): their ``label`` is missing (<NA>),
    never guessed; a label that is given must still be valid."""
    kind, arg, options = parse_spec(spec)
    allowed = {**OPTIONS, **ADAPTER_OPTIONS.get(kind, {})}
    options = {**{k: v for k, v in defaults.items() if k in allowed and v is not None}, **options}
    if kind == "img2dataset" and re.match(r"^[\w-]+=", arg):  # name=path pairs: one output folder per class
        arg = ",".join(f"{k}={_resolve(v, base)}" for k, v in (p.split("=", 1) for p in arg.split(",")))
    elif kind != "emoji":
        arg = _resolve(arg, base)
    manifest = options.get("manifest")
    if manifest is not None:
        manifest = _resolve(manifest, base)
        if not Path(manifest).is_file():
            raise DataError(f"manifest {manifest} does not exist")
    entries, root, info = ADAPTERS[kind](arg, {**options, "require_labels": require_labels})
    return build(
        entries,
        spec,
        root=root,
        seed=options.get("seed", 0),
        min_side=options.get("min_side", MIN_SIDE),
        manifest=manifest,
        info=info,
        require_labels=require_labels,
    )


def freeze(imageset: ImageSet, path: str | os.PathLike) -> Path:
    """Write the set's manifest (``id, caption, label, subset, sha256, source, subset_rule``) and, beside it,
    its skip table (``<name>.skipped.csv``). Never overwrites a file."""
    path = Path(path)
    skipped = path.with_name(path.stem + ".skipped.csv")
    for target in (path, skipped):
        if target.exists():
            raise FileExistsError(f"{target} exists; mialib never overwrites a file (choose another name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    imageset.manifest().to_csv(path, index=False)
    imageset.skipped.to_csv(skipped, index=False)
    return path


__all__ = [
    "ADAPTERS",
    "DataError",
    "Entry",
    "ImageProblem",
    "ImageSet",
    "MANIFEST_COLUMNS",
    "RECORD_COLUMNS",
    "SKIP_COLUMNS",
    "decode_image",
    "freeze",
    "open_imageset",
    "parse_label",
    "parse_spec",
    "read_bytes",
    "read_manifest",
    "register_adapter",
    "tar_location",
]

from .img2dataset import OPTIONS as _IMG2DATASET_OPTIONS  # noqa: E402  (adapters for remote sources)
from .img2dataset import img2dataset_entries  # noqa: E402
from .laion_mi import laion_mi_entries  # noqa: E402

register_adapter("img2dataset", img2dataset_entries, options=_IMG2DATASET_OPTIONS)
register_adapter("laion-mi", laion_mi_entries)
