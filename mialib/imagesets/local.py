"""Adapters for image sets on local disk: the embedded emoji set, a CSV, a Hugging Face imagefolder.

Each adapter lists :class:`~mialib.imagesets.core.Entry` records; validation, decoding and skips are
the core's, identical for every adapter. Messages name a CSV row as a spreadsheet shows it (the header is
row 1, the first record row 2) and a JSON line by its line number in the file.

What a folder holds is accounted for file by file (the rule is in :mod:`.core`):

- ``imagefolder`` with ``members/`` / ``nonmembers/`` (or, unlabelled, the whole folder): every file under
  the class folders is a record, whatever its suffix (the content decides whether it is an image); a
  ``.txt`` with the same name is its caption. A ``.txt`` with no file of its name beside it, and any file
  outside the class folders, is a stray (a skip row saying why).
- ``imagefolder`` with ``metadata.csv`` / ``metadata.jsonl``: the rows are the records; any other file
  under the folder that no row names is a stray ("not listed in metadata.csv"), except a ``.txt`` beside
  a file of the same name (a caption of the folder form, not needed here).
- ``csv``: the rows are the records; the CSV's folder is not searched (it may hold anything else).

Ids of the folder form are paths without the suffix (``members/cat``); a file that shares its name with
another non-caption file (``cat.png`` and ``cat.xmp``) keeps its suffix unless it is the one with an image
suffix (``members/cat`` and ``members/cat.xmp``). Hidden files (``.DS_Store``) are never listed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pandas as pd

from .. import data
from ..data import DataError
from ..paths import resolve
from .core import Entry, is_blank, walk_files

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_COLUMNS = ("caption", "text")
MEMBER_FOLDERS = {"members": 1, "member": 1, "nonmembers": 0, "nonmember": 0, "non-members": 0, "non-member": 0}


def read_table(path: Path) -> pd.DataFrame:
    """A CSV of strings, read leniently: bytes that are not UTF-8 survive as surrogates, so the row that
    holds them is skipped with its reason instead of the whole file failing. (Python strings, ``dtype=object``:
    pandas' own string dtype is stored by pyarrow, which cannot hold surrogates.)"""
    try:
        return pd.read_csv(
            path, dtype=object, keep_default_na=False, encoding="utf-8", encoding_errors="surrogateescape"
        )
    except pd.errors.ParserError as error:
        raise DataError(f"{path} is not a readable CSV: {error}") from None


def read_jsonl(path: Path) -> pd.DataFrame:
    """One row per JSON object (values kept as given: a key a line lacks is NaN); bytes that are not UTF-8
    survive as surrogates, as in :func:`read_table`. ``frame.attrs["lines"]``: each row's line in the file."""
    rows, lines = [], []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number} is not JSON: {error}") from None
        if not isinstance(row, dict):
            raise DataError(
                f'{path} line {number} is not a JSON object ({{"file_name": ...}}) but a {type(row).__name__}'
            )
        rows.append(row)
        lines.append(number)
    frame = pd.DataFrame(rows, dtype=object)
    frame.attrs["lines"] = lines
    return frame


def _caption_column(table: pd.DataFrame, path: Path) -> str:
    found = [c for c in CAPTION_COLUMNS if c in table.columns]
    if not found:
        raise DataError(
            f"{path} has no caption column (one of {list(CAPTION_COLUMNS)}); columns: {list(table.columns)}"
        )
    return found[0]


def _value(row, column):
    return row.get(column) if column in row else None


# --------------------------------------------------------------------------------------------------
def csv_entries(arg: str, options: dict) -> tuple[list[Entry], Path, dict]:
    """``csv:path/to/set.csv`` with columns ``id, path, caption, label[, subset][, group]``; paths are
    relative to the CSV and must stay inside its folder."""
    path = Path(arg)
    if not path.is_file():
        raise DataError(f"CSV image set {path} does not exist")
    table = read_table(path)
    missing = [
        c
        for c in ("id", "path", "caption", "label")
        if c not in table.columns and (c != "label" or options.get("require_labels", True))
    ]
    if missing:
        raise DataError(f"{path} lacks columns {missing} (needs id, path, caption, label[, subset][, group])")
    root = path.parent
    entries = []
    for number, row in enumerate(table.to_dict("records"), start=2):
        relative = row["path"].strip()
        entries.append(
            Entry(
                id=row["id"],
                caption=row["caption"],
                label=_value(row, "label"),
                source=relative,
                location=str(root / relative) if relative else None,
                where=f"{path.name} row {number}",
                subset=_value(row, "subset"),
                group=_value(row, "group"),
                skip=None if relative else "no path given",
            )
        )
    return entries, root, {"kind": "csv", "file": str(path)}


# --------------------------------------------------------------------------------------------------
def caption_files(files: list[Path]) -> set[Path]:
    """The ``.txt`` files among ``files`` that have a file of the same name (another suffix) beside them."""
    stems = {(p.parent, p.stem) for p in files if p.suffix != ".txt"}
    return {p for p in files if p.suffix == ".txt" and (p.parent, p.stem) in stems}


def _file_id(path: Path, relative: Path, names: Counter) -> str:
    """The path without its suffix, unless another non-caption file shares the name and this one has no
    image suffix (``cat.png`` -> ``cat``, ``cat.xmp`` -> ``cat.xmp``). ``names``: (folder, stem) -> how many
    non-caption files have it."""
    if names[(path.parent, path.stem)] == 1 or path.suffix.lower() in IMAGE_SUFFIXES:
        return relative.with_suffix("").as_posix()
    return relative.as_posix()


def stray_entries(strays: list[tuple[Path, str]], root: Path, taken: set) -> list[Entry]:
    """Skip rows for files the source does not list, ids ``relative/path.ext`` (made unique against ``taken``)."""
    entries = []
    for path, reason in strays:
        relative = path.relative_to(root).as_posix()
        image_id = relative if relative not in taken else f"{relative} (stray)"
        taken.add(image_id)
        entries.append(
            Entry(
                id=image_id,
                caption=None,
                label=None,
                source=relative,
                location=None,
                where=relative,
                skip=reason,
                stray=True,
            )
        )
    return entries


def unlisted_entries(root: Path, listed: list[Entry], exclude: set, table: str) -> list[Entry]:
    """Stray rows for the files under ``root`` that no listed entry names (nor points to through a link),
    other than ``exclude`` (the table itself) and captions of the folder form."""
    named = {os.path.normpath(e.location) for e in listed if e.location}
    resolved = {Path(e.location).resolve() for e in listed if e.location}
    files = walk_files(root)
    captions = caption_files(files)
    strays = []
    for path in files:
        if path in exclude or path in captions or os.path.normpath(path) in named or path.resolve() in resolved:
            continue
        relative = path.relative_to(root).as_posix()
        strays.append(
            (
                path,
                (
                    f"not listed in {table}: {relative} is in the set's folder but no row names it; add a row for it "
                    "or move it out of the folder"
                ),
            )
        )
    return stray_entries(strays, root, {str(e.id).strip() for e in listed if e.id is not None})


def _folder_label(relative: Path):
    """member / non-member from the first folder of a path (``members/a.png``), or None."""
    return MEMBER_FOLDERS.get(relative.parts[0].lower()) if len(relative.parts) > 1 else None


def imagefolder_entries(arg: str, options: dict) -> tuple[list[Entry], Path, dict]:
    """``imagefolder:path``: the Hugging Face convention.

    Either ``metadata.csv`` or ``metadata.jsonl`` at the top with ``file_name``, a caption column
    (``caption`` or ``text``) and ``label`` (or ``file_name`` under ``members/`` / ``nonmembers/``), and
    optionally ``id``, ``subset``, ``group``; or ``members/`` and ``nonmembers/`` subfolders of images,
    each with its caption in a ``.txt`` file of the same name.
    """
    root = Path(arg)
    if not root.is_dir():
        raise DataError(f"imagefolder {root} does not exist or is not a folder")
    metadata = [p for p in (root / "metadata.csv", root / "metadata.jsonl") if p.exists()]
    if len(metadata) > 1:
        raise DataError(f"{root} has both metadata.csv and metadata.jsonl; keep one")
    if metadata:
        path = metadata[0]
        table = read_table(path) if path.suffix == ".csv" else read_jsonl(path)
        if "file_name" not in table.columns:
            raise DataError(f"{path} has no file_name column; columns: {list(table.columns)}")
        caption = _caption_column(table, path)
        numbers = table.attrs["lines"] if path.suffix == ".jsonl" else range(2, len(table) + 2)
        entries = []
        for number, row in zip(numbers, table.to_dict("records")):
            given = not is_blank(row["file_name"])
            relative = Path(str(row["file_name"]).strip()) if given else Path()
            label = _value(row, "label")
            if is_blank(label):
                label = _folder_label(relative)
            if label is None and "label" not in table.columns and options.get("require_labels", True):
                raise DataError(f"{path} has no label column and {relative} is not under members/ or nonmembers/")
            entries.append(
                Entry(
                    id=_value(row, "id")
                    if "id" in table.columns
                    else relative.with_suffix("").as_posix()
                    if given
                    else None,
                    caption=row[caption],
                    label=label,
                    source=relative.as_posix(),
                    location=str(root / relative) if given else None,
                    where=f"{path.name} {'row' if path.suffix == '.csv' else 'line'} {number}",
                    subset=_value(row, "subset"),
                    group=_value(row, "group"),
                    skip=None if given else "no path given",
                )
            )
        entries += unlisted_entries(root, entries, exclude={path}, table=path.name)
        return entries, root, {"kind": "imagefolder", "metadata": path.name}
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name.lower() in MEMBER_FOLDERS]
    if not folders and not options.get("require_labels", True):
        folders = [root]  # an unlabelled set: every image under the folder, its caption in a .txt beside it
    if not folders:
        raise DataError(f"{root} has neither metadata.csv / metadata.jsonl nor members/ and nonmembers/ subfolders")
    entries, strays = [], []
    files = walk_files(root)
    captions = caption_files(files)
    names = Counter((p.parent, p.stem) for p in files if p.suffix != ".txt")
    for folder in folders:
        for path in (p for p in files if p.parent == folder or folder in p.parents):
            relative = path.relative_to(root)
            if path in captions:
                continue
            if path.suffix == ".txt":  # nothing of its name beside it: a caption file without its image
                strays.append(
                    (
                        path,
                        (
                            f"caption file without an image: {relative.as_posix()} has no file of the same name "
                            "beside it; add the image or move the caption out of the set's folder"
                        ),
                    )
                )
                continue
            text_file = path.with_suffix(".txt")
            caption, problem = None, None
            if text_file in captions:
                caption = text_file.read_bytes()
            else:
                problem = f"no caption: {relative.with_suffix('.txt').as_posix()} does not exist"
            # a broken link is listed too (and skipped as not found): nothing under the folders is dropped unseen
            entries.append(
                Entry(
                    id=_file_id(path, relative, names),
                    caption=caption,
                    label=MEMBER_FOLDERS.get(folder.name.lower()) if folder != root else None,
                    source=relative.as_posix(),
                    location=str(path),
                    where=relative.as_posix(),
                    caption_problem=problem,
                )
            )
    if entries and all(e.caption_problem for e in entries):
        raise DataError(
            f"no image under {root} has a caption: add metadata.csv (file_name, caption, label) or a .txt beside "
            "each image"
        )
    inside = {path for folder in folders for path in files if path.parent == folder or folder in path.parents}
    used = {Path(e.location).resolve() for e in entries}
    class_names = " or ".join(f"{f.name}/" for f in folders)
    for path in files:
        if path in inside or path in captions or path.resolve() in used:
            continue
        relative = path.relative_to(root).as_posix()
        strays.append(
            (
                path,
                (
                    f"not under {class_names}: {relative} has no label; move it into one of them or out of the "
                    "set's folder"
                ),
            )
        )
    entries += stray_entries(strays, root, {e.id for e in entries})
    return entries, root, {"kind": "imagefolder", "metadata": None}


# --------------------------------------------------------------------------------------------------
EMOJI_DEFAULTS = {
    "split": "data/emoji_split.csv",  # the committed split manifest
    "images": "data/images",  # where renders are written (a folder the project owns)
    "members": 128,
    "nonmembers": 256,
    "public": 600,
    "style": "same",  # same: the fair split; shifted: non-members from a shifted source (biased split)
    "extra_nonmembers": 0,  # catalogue images outside the split (data/emoji_filler.csv) added as test non-members
}
FILLER_MANIFEST = "data/emoji_filler.csv"  # the catalogue's images outside the split


def emoji_entries(arg: str, options: dict) -> tuple[list[Entry], Path, dict]:
    """``emoji``: the embedded OpenMoji set (members and non-members of the committed split, rendered
    and hash-checked). Options: members, nonmembers, public (sizes), style (same / shifted), split, images."""
    settings = {**EMOJI_DEFAULTS, **{k: v for k, v in options.items() if k in EMOJI_DEFAULTS}}
    images = emoji_images(settings)
    attacked = images[images["split"] != "public"]
    attacked = data.with_nonmember_style(attacked, settings["style"], resolve(settings["images"]))
    root = resolve(settings["images"])
    entries = [
        Entry(
            id=row.id,
            caption=row.caption,
            label=row.label,
            source=f"openmoji:{row.id}"
            + ("" if row.split == "member" or settings["style"] == "same" else f" ({settings['style']})"),
            location=row.path,
            where=f"{settings['split']} ({row.id})",
            subset=row.subset,
            group=row.group,
        )
        for row in attacked.itertuples(index=False)
    ]
    info = {k: settings[k] for k in ("members", "nonmembers", "public", "style")}
    if int(settings.get("extra_nonmembers") or 0):
        info["extra_nonmembers"] = int(settings["extra_nonmembers"])
    return entries, root, {"kind": "emoji", **info}


def emoji_images(settings: dict) -> pd.DataFrame:
    """The preset's emoji rows (public, members, non-members) rendered into the project's image folder."""
    split = resolve(settings["split"])
    if split.exists():
        full = data.read_manifest(split)
    else:
        full = data.build_emoji_manifest(int(settings["public"]), int(settings["members"]), int(settings["nonmembers"]))
        split.parent.mkdir(parents=True, exist_ok=True)
        full.to_csv(split, index=False)
    chosen = data.subsample_manifest(
        full, int(settings["public"]), int(settings["members"]), int(settings["nonmembers"])
    )
    extra = int(settings.get("extra_nonmembers") or 0)
    if extra < 0:
        raise DataError(f"extra_nonmembers={extra}: a count of images, 0 or more")
    if extra:
        # Non-members for the test split alone, to resolve low false-positive rates: the catalogue's images that
        # the split left out (no variant group or pixel hash shared with it), the first ``extra`` in its order.
        # Only for a target that never trained on them (the regimes' pool holds them: experiment checks).
        filler = data.read_manifest(resolve(FILLER_MANIFEST))
        if len(filler) < extra:
            raise DataError(f"{FILLER_MANIFEST} has {len(filler)} images; extra_nonmembers asks for {extra}")
        chosen = pd.concat([chosen, filler.head(extra).assign(split="nonmember", subset="test")], ignore_index=True)
        data.validate_manifest(chosen)
    return data.materialise_images(chosen, resolve(settings["images"]))
