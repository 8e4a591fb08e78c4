"""Adapter for img2dataset output folders (``files`` layout or webdataset ``.tar`` shards).

    img2dataset:DIR?label=KEY[&id=KEY]          one output folder; the label is a key of each sample's .json
                                                (saved by img2dataset's --save_additional_columns)
    img2dataset:members=DIR,nonmembers=DIR      one output folder per class; ids are prefixed with the class
                                                name (``members/000000001``) so the two outputs' keys never collide

What img2dataset writes, and how it is read here:

- ``files`` layout: ``00000/000000001.jpg`` + ``.txt`` (caption) + ``.json`` (the sample's metadata) per sample;
- ``webdataset`` layout: ``00000.tar`` with members ``000000001.jpg`` / ``.txt`` / ``.json``; pixels are read
  lazily from the shard by offset (:func:`~mialib.imagesets.core.tar_location`);
- beside each shard, ``00000.parquet`` lists *every* sample it was asked for, with ``status`` and
  ``error_message``, and ``00000_stats.json`` marks the shard as finished.

Every sample a shard parquet lists becomes one :class:`~mialib.imagesets.core.Entry`; a sample img2dataset
recorded as failed is a skip (``download failed: <its error message>``), so the counts reconcile with what
was asked for. Without a shard parquet, what is on disk is listed. Captions are handed to the core as bytes,
so a caption that is not valid UTF-8 becomes a recorded skip. This module only lists; the core validates.

Every file of the output is accounted for (the rule is in :mod:`.core`). A sample's image is its file
that is not the ``.txt`` / ``.json``, whatever the suffix (the content decides whether it is an image;
when several are there, the one with an image suffix). img2dataset's own files (``.txt``, ``.json``,
``.parquet``, ``.tar`` shards, ``*_stats.json``) and hidden files are not records; any other file is a
stray skip row: an extra file beside a sample, a file of a sample recorded as failed, a file that belongs
to no sample, a file outside the shards.
"""

from __future__ import annotations

import json
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataError
from .core import Entry, is_hidden, tar_location, walk_files
from .local import IMAGE_SUFFIXES, MEMBER_FOLDERS

SHARD_NAME = re.compile(r"^\d+$")  # img2dataset names shards 00000, 00001, ...
OPTIONS = {"label": str, "id": str}


@dataclass
class Sample:
    """One sample of an img2dataset output, as the output records it (nothing validated yet)."""

    key: str  # img2dataset's sample key, e.g. "000000001"
    shard: str  # "00000"
    meta: dict  # the sample's .json, or its shard-parquet row when no .json is on disk
    status: str | None  # "success", "failed_to_download", "failed_to_resize"; None when nothing says
    error: str | None  # img2dataset's error_message
    location: str | None  # where the image bytes are (a path or tar://shard#member); None when absent
    source: str  # the image relative to the output folder, for messages ("00000/000000001.jpg")
    caption: bytes | None  # the .txt bytes; None when there is no .txt
    caption_source: str  # where the caption would be ("00000/000000001.txt")
    where: str  # for messages: "00000/000000001.json", "00000.tar:000000001.json", "00000.parquet row 3"
    complete: bool  # the shard's _stats.json exists (img2dataset finished the shard)
    problems: list = field(default_factory=list)  # what is inconsistent about this sample (becomes a skip)


# --------------------------------------------------------------------------------------------------
# Reading one output folder
# --------------------------------------------------------------------------------------------------
def _none(value):
    """Parquet / JSON nulls (None, NaN) -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _json(payload: bytes, where: str) -> dict:
    try:
        value = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise DataError(f"{where} holds a JSON {type(value).__name__}, not an object of sample metadata")
    return value


def _split_member(name: str) -> tuple[str, str]:
    """``"000000001.jpg"`` -> ``("000000001", ".jpg")``: the webdataset convention (the extension starts at
    the first dot of the file name)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + extension).lower()


def _group_files(shard_dir: Path) -> dict[str, dict[str, Path]]:
    """key -> {extension: path} for the files of one ``files``-layout shard folder."""
    grouped: dict[str, dict[str, Path]] = {}
    for path in sorted(shard_dir.iterdir()):
        if (path.is_file() or path.is_symlink()) and not path.is_dir() and not is_hidden(Path(path.name)):
            key, extension = _split_member(path.name)
            grouped.setdefault(key, {})[extension] = path
    return grouped


def _group_tar(shard: Path) -> dict[str, dict[str, tuple[str, bytes | None]]]:
    """key -> {extension: (member name, bytes of .txt / .json members)} for one webdataset shard.

    Image members are not read here (the core reads them lazily by offset)."""
    grouped: dict[str, dict[str, tuple[str, bytes | None]]] = {}
    try:
        with tarfile.open(shard) as archive:
            for member in archive:
                if not member.isfile() or is_hidden(Path(member.name)):
                    continue
                key, extension = _split_member(member.name)
                payload = archive.extractfile(member).read() if extension in (".txt", ".json") else None
                grouped.setdefault(key, {})[extension] = (member.name, payload)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"{shard} is not a readable tar shard: {error}") from None
    return grouped


OWN_EXTENSIONS = (".txt", ".json")  # a sample's caption and metadata


def _image_extension(extensions, where: str) -> str | None:
    """The extension of a sample's image: its one file that is not ``.txt`` / ``.json``, or among several
    the one with an image suffix; None when there is none."""
    candidates = sorted(e for e in extensions if e not in OWN_EXTENSIONS)
    found = [e for e in candidates if e in IMAGE_SUFFIXES]
    if len(found) > 1:
        raise DataError(f"{where}: more than one image for one sample ({found}); cannot tell which is the sample")
    if not found and len(candidates) > 1:
        raise DataError(
            f"{where}: several files that may be the sample's image ({candidates}); cannot tell which is the sample"
        )
    return (found or candidates or [None])[0]


def _read_shard_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for a truncated or foreign file
        raise DataError(
            f"{path} is not a readable shard parquet ({type(error).__name__}: {error}); if an img2dataset run was "
            "interrupted, run it again on the same output folder to finish the shard"
        ) from None
    if rows and "key" not in rows[0]:
        raise DataError(f"{path} has no 'key' column; is it an img2dataset shard parquet? columns: {sorted(rows[0])}")
    return rows


def scan_output(folder: str | os.PathLike, listed_only: bool = False) -> tuple[list[Sample], dict]:
    """Every sample of one img2dataset output folder, shard by shard, in the order the shards list them.

    A shard's ``.parquet`` (when present) is the record of what was asked: each of its rows is a sample,
    with the image, caption and ``.json`` from disk when img2dataset wrote them. Files on disk that the
    parquet does not list follow (unless ``listed_only``: a re-run of a crashed shard may leave them
    behind). Returns (samples, {"layout": "files" | "webdataset", "shards": n, "strays": [(file, reason)]}):
    ``strays`` are the files that are neither a sample's nor img2dataset's own (paths relative to ``folder``,
    ``00000.tar:member`` for a shard member).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"img2dataset output {folder} does not exist or is not a folder")
    folders = sorted(p for p in folder.iterdir() if p.is_dir() and SHARD_NAME.match(p.name))
    tars = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".tar" and SHARD_NAME.match(p.stem))
    parquets = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix == ".parquet" and SHARD_NAME.match(p.stem)
    )
    if folders and tars:
        raise DataError(
            f"{folder} holds both shard folders ({folders[0].name}/) and .tar shards ({tars[0].name}); keep one "
            "output per folder"
        )
    layout = "webdataset" if tars else "files"
    shards = {p.stem: p for p in tars} if tars else {p.name: p for p in folders}
    names = sorted(set(shards) | {p.stem for p in parquets})
    if not names:
        raise DataError(
            f"{folder} holds no img2dataset shards (00000/ folders, 00000.tar files or 00000.parquet files)"
        )
    samples: list[Sample] = []
    strays: list[tuple[str, str]] = []
    move = "move it out of the output folder"
    for top in sorted(folder.iterdir()):
        if is_hidden(Path(top.name)) or top in tars:
            continue  # the shards (their files are accounted for below)
        if top in folders and layout == "files":  # a shard folder: its files below, anything deeper is a stray
            found = [f.relative_to(folder).as_posix() for f in walk_files(top) if f.parent != top]
        elif top.is_dir():
            found = [f.relative_to(folder).as_posix() for f in walk_files(top)]
        elif top.suffix in (".parquet", ".json"):
            continue  # img2dataset's own: shard parquets, *_stats.json
        else:
            found = [top.name]
        strays += [(f, f"not part of an img2dataset output: {f} is not in a shard; {move}") for f in found]
    for name in names:
        complete = (folder / f"{name}_stats.json").is_file()
        shard = shards.get(name)
        if shard is None:
            on_disk = {}
        elif layout == "files":
            on_disk = {k: {e: (p.name, None) for e, p in v.items()} for k, v in _group_files(shard).items()}
        else:
            on_disk = _group_tar(shard)
        prefix = f"{name}.tar:" if layout == "webdataset" else f"{name}/"

        def payload(key: str, extension: str) -> bytes | None:
            found = on_disk.get(key, {}).get(extension)
            if found is None:
                return None
            return found[1] if layout == "webdataset" else (shard / found[0]).read_bytes()

        used: set[tuple[str, str]] = set()  # (key, extension) of the files samples take

        def from_disk(key: str) -> tuple[str | None, str, bytes | None, dict | None]:
            """(image location, image source, caption bytes, json) of one key."""
            files = on_disk.get(key, {})
            extension = _image_extension(files, f"{prefix}{key}.*")
            used.update((key, e) for e in files if e in OWN_EXTENSIONS or e == extension)
            location, source = None, f"{name}/{key}.<image>"
            if extension is not None:
                member = files[extension][0]
                location = tar_location(shard, member) if layout == "webdataset" else str(shard / member)
                source = f"{prefix}{member}"
            raw = payload(key, ".json")
            meta = _json(raw, f"{folder.name}/{prefix}{key}.json") if raw is not None else None
            return location, source, payload(key, ".txt"), meta

        listed: set[str] = set()
        failed: dict[str, str] = {}  # key -> status of the samples the parquet records as not delivered
        parquet = folder / f"{name}.parquet"
        if parquet.is_file():
            for number, row in enumerate(_read_shard_parquet(parquet), start=1):
                row = {k: _none(v) for k, v in row.items()}
                key = str(row["key"])
                listed.add(key)
                status, error = row.get("status"), row.get("error_message")
                sample = Sample(
                    key=key,
                    shard=name,
                    meta=row,
                    status=status,
                    error=error,
                    location=None,
                    source=f"{name}/{key}",
                    caption=None,
                    caption_source=f"{prefix}{key}.txt",
                    where=f"{name}.parquet row {number}",
                    complete=complete,
                )
                if status != "success":
                    failed[key] = str(status)
                if status == "success":
                    location, source, caption, meta = from_disk(key)
                    sample.location, sample.source, sample.caption = location, source, caption
                    if meta is not None:
                        sample.meta, sample.where = meta, f"{prefix}{key}.json"
                    if location is None:
                        sample.problems.append(
                            f"image missing: {name}.parquet records {key} as downloaded, but "
                            f"{prefix}{key}.<image> is not there"
                        )
                samples.append(sample)
        if not (listed_only and parquet.is_file()):
            samples += [
                _unlisted(key, name, from_disk, prefix, complete)
                for key in sorted(set(on_disk) - listed)
                if _is_sample(on_disk[key])
            ]
        sample_keys = {k for k, _ in used}
        for key, files in sorted(on_disk.items()):
            for extension, (member, _) in sorted(files.items()):
                if (key, extension) in used:
                    continue
                if key in failed:
                    reason = (
                        f"not used: {name}.parquet records sample {key} as {failed[key]} ({prefix}{member}); "
                        "run img2dataset again on the output or delete the file"
                    )
                elif key in sample_keys:
                    reason = (
                        f"extra file beside a sample: {prefix}{member} is not the image, caption or metadata of "
                        f"sample {key}; {move}"
                    )
                else:
                    reason = (
                        f"not an img2dataset sample: {prefix}{member} has no .json or .txt beside it and no shard "
                        f"parquet lists it; {move}"
                    )
                strays.append((f"{prefix}{member}", reason))
    return samples, {"layout": layout, "shards": len(names), "strays": strays}


def _is_sample(files: dict) -> bool:
    """Whether the files of one key not listed by a shard parquet are a sample: a .json, a .txt or a file
    with an image suffix (a lone file of another kind, ``notes.pdf``, is a stray)."""
    return any(e in IMAGE_SUFFIXES or e in OWN_EXTENSIONS for e in files)


def _unlisted(key: str, name: str, from_disk, prefix: str, complete: bool) -> Sample:
    """A sample on disk that no shard parquet lists."""
    location, source, caption, meta = from_disk(key)
    sample = Sample(
        key=key,
        shard=name,
        meta=meta or {},
        status=(meta or {}).get("status"),
        error=(meta or {}).get("error_message"),
        location=location,
        source=source,
        caption=caption,
        caption_source=f"{prefix}{key}.txt",
        where=f"{prefix}{key}.json" if meta is not None else source,
        complete=complete,
    )
    if location is None:
        sample.problems.append(f"no image file: {prefix}{key}.<image> is not there")
    return sample


def failure_reason(sample: Sample) -> str | None:
    """The skip reason of a sample img2dataset did not deliver (None when it did)."""
    if sample.status in (None, "success"):
        return sample.problems[0] if sample.problems else None
    message = sample.error or "no error message recorded"
    if sample.status == "failed_to_download":
        return f"download failed: {message}"
    return f"download failed: img2dataset could not decode or resize it ({sample.status}: {message})"


# --------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------
def _pairs(arg: str) -> list[tuple[str, Path]]:
    pairs, seen = [], set()
    for part in arg.split(","):
        name, sep, path = part.partition("=")
        name = name.strip()
        if not sep or not path.strip():
            raise DataError(
                f"img2dataset:{arg}: {part!r} is not name=DIR (e.g. members=out/members,nonmembers=out/nonmembers)"
            )
        if name.lower() not in MEMBER_FOLDERS:
            raise DataError(f"img2dataset:{arg}: {name!r} is not a class name; use members=DIR,nonmembers=DIR")
        if name.lower() in seen:
            raise DataError(f"img2dataset:{arg}: {name!r} is given twice")
        seen.add(name.lower())
        pairs.append((name, Path(path.strip())))
    return pairs


def img2dataset_entries(arg: str, options: dict) -> tuple[list[Entry], Path, dict]:
    """``img2dataset:DIR?label=KEY[&id=KEY]`` or ``img2dataset:members=DIR,nonmembers=DIR``: every sample of
    the output(s) as an Entry; samples img2dataset recorded as failed are skips with its error message.

    Ids are img2dataset's sample keys (or the ``id=KEY`` key of each .json), prefixed with the class name in
    the one-folder-per-class form when they are img2dataset's keys."""
    label_key, id_key = options.get("label"), options.get("id")
    if "=" in arg:
        if label_key is not None:
            raise DataError(
                f"img2dataset:{arg}?label={label_key}: with one folder per class the folder gives the label; "
                "drop label="
            )
        outputs = [(name, folder, MEMBER_FOLDERS[name.lower()]) for name, folder in _pairs(arg)]
    else:
        if label_key is None:
            raise DataError(
                f"img2dataset:{arg} needs the label: img2dataset:{arg}?label=KEY (KEY a field of each sample's .json, "
                "saved with --save_additional_columns) or img2dataset:members=DIR,nonmembers=DIR"
            )
        outputs = [(None, Path(arg), None)]
    entries, problems, layouts, shard_counts, strays = [], [], {}, {}, []
    for name, folder, folder_label in outputs:
        samples, details = scan_output(folder)
        layouts[name or "output"], shard_counts[name or "output"] = details["layout"], details["shards"]
        label_name = f"{name}/" if name else ""
        strays += [(f"{label_name}{file}", reason) for file, reason in details["strays"]]
        for sample in samples:
            where = f"{label_name}{sample.where}"
            skip = failure_reason(sample)
            if id_key is not None:
                if id_key not in sample.meta:
                    problems.append(f"{where}: no key {id_key!r} (keys: {sorted(sample.meta)})")
                    continue
                image_id = sample.meta[id_key]
            else:
                image_id = f"{label_name}{sample.key}"
            if folder_label is not None:
                label = folder_label
            elif label_key in sample.meta:
                label = sample.meta[label_key]
            elif skip is None:
                problems.append(f"{where}: no key {label_key!r} (keys: {sorted(sample.meta)})")
                continue
            else:
                label = None  # a failed sample: its label is never used
            missing = (
                f"no caption: {label_name}{sample.caption_source} does not exist" if sample.caption is None else None
            )
            entries.append(
                Entry(
                    id=image_id,
                    caption=sample.caption,
                    label=label,
                    source=f"{label_name}{sample.source}",
                    location=sample.location,
                    where=where,
                    skip=skip,
                    caption_problem=missing,
                )
            )
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataError(
            "img2dataset samples lack a key the spec names (save it with img2dataset's --save_additional_columns):\n  "
            + "\n  ".join(problems[:10])
            + more
        )
    taken = {str(e.id).strip() for e in entries}
    for file, reason in strays:  # files of the outputs that are no sample's: skip rows of their own
        image_id = file if file not in taken else f"{file} (stray)"
        taken.add(image_id)
        entries.append(
            Entry(
                id=image_id, caption=None, label=None, source=file, location=None, where=file, skip=reason, stray=True
            )
        )
    roots = [folder.resolve() for _, folder, _ in outputs]
    root = Path(os.path.commonpath(roots)) if len(roots) > 1 else roots[0]
    info = {
        "kind": "img2dataset",
        "folders": {name or "output": str(folder) for name, folder, _ in outputs},
        "layout": layouts,
        "shards": shard_counts,
        "label": label_key or "folder",
    }
    return entries, root, info
