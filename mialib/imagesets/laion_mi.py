"""LAION-mi: the published member / non-member URL lists, and the download that fetches their images.

``laion-mi:FOLDER`` reads the LAION-mi parquet files (Hugging Face dataset ``antoniaaa/laion_mi``, splits
``members`` and ``nonmembers``, columns ``url`` and ``caption``) found anywhere under FOLDER, and what
:func:`download` fetched into ``FOLDER/download/``:

    FOLDER/
      .../members-*.parquet, .../nonmembers-*.parquet     the published lists (any name containing
                                                          "member" / "nonmember")
      download/                                           written by mialib (never a user's folder)
        input.parquet                                     id, url, caption, label of the last run's rows
        images/                                           img2dataset's output (files layout)
        manifest.csv, skipped.csv                         what arrived, and what did not and why

Every row of the lists is one record (``given`` = rows in the parquet files): an image that arrived points
at its downloaded file; a failed download, a repeated URL and a row not yet attempted are skips with their
reason. Ids are ``m-`` / ``n-`` + the first 16 hex digits of sha256(url). LAION-mi has no calibration /
test split, so the core assigns one (a seeded hash, stratified by label).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter, deque
from pathlib import Path
from typing import Callable

import pandas as pd

from ..data import DataError, claim_folder
from ..memo import atomic_write
from .core import MIN_SIDE, Entry, build
from .img2dataset import failure_reason, scan_output

DOWNLOAD = "download"  # FOLDER/download: the folder mialib owns
OUTPUT = "images"  # FOLDER/download/images: img2dataset's output folder
INPUT = "input.parquet"
MANIFEST = "manifest.csv"
SKIPPED = "skipped.csv"
OWN_NAMES = {INPUT, OUTPUT, MANIFEST, SKIPPED, ".mialib-owned"}
PREFIX = {1: "m-", 0: "n-"}


class DownloadError(RuntimeError):
    """The download tool is missing or failed (not a problem with the data)."""


# --------------------------------------------------------------------------------------------------
# The published lists
# --------------------------------------------------------------------------------------------------
def list_files(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """The LAION-mi parquet files under ``folder`` with their label, members first.

    A name containing ``nonmember`` is non-member (checked first: "members" is part of "nonmembers"), any
    other containing ``member`` is member. The download folder and hidden folders are not searched."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"LAION-mi folder {folder} does not exist or is not a folder")
    found = []
    for path in sorted(folder.rglob("*.parquet")):
        relative = path.relative_to(folder)
        if relative.parts[0] == DOWNLOAD or any(part.startswith(".") for part in relative.parts[:-1]):
            continue
        name = path.name.lower()
        if "nonmember" in name or "non-member" in name or "non_member" in name:
            found.append((path, 0))
        elif "member" in name:
            found.append((path, 1))
    if not found:
        raise DataError(
            f"no LAION-mi parquet files under {folder}: expected files whose names contain 'members' and "
            "'nonmembers' (the splits of the Hugging Face dataset antoniaaa/laion_mi), e.g. "
            f"{folder}/members-00000-of-00001.parquet"
        )
    labels = {label for _, label in found}
    if labels != {0, 1}:
        missing = "non-members" if 0 not in labels else "members"
        raise DataError(
            f"LAION-mi folder {folder} has no {missing} parquet file "
            f"(found: {[str(p.relative_to(folder)) for p, _ in found]})"
        )
    return sorted(found, key=lambda item: (-item[1], str(item[0])))


def _read_list(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
    except Exception as error:  # a truncated or foreign file
        raise DataError(f"{path} is not a readable parquet file: {type(error).__name__}: {error}") from None
    missing = [c for c in ("url", "caption") if c not in columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing} (a LAION-mi list has url and caption); columns: {columns}")
    return pd.read_parquet(path, columns=["url", "caption"])


def url_id(url: str, label: int) -> str:
    """``m-`` / ``n-`` + the first 16 hex digits of sha256(url)."""
    return PREFIX[label] + hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


def listing(folder: str | os.PathLike) -> pd.DataFrame:
    """Every row of the LAION-mi lists: ``id, url, caption, label, where, skip``, members first.

    A URL repeated within one label: the first row keeps the id, later rows get ``<id>-dup<n>`` and the skip
    "duplicate URL (same as <first id>)". A URL listed as both member and non-member: every copy is skipped
    (whichever side were kept, the label would be a guess). A row without a URL is skipped."""
    rows = []
    for path, label in list_files(folder):
        table = _read_list(path)
        name = path.relative_to(folder).as_posix()
        for number, (url, caption) in enumerate(zip(table["url"], table["caption"]), start=1):
            url = None if url is None or (isinstance(url, float) and url != url) else str(url).strip()
            rows.append({"url": url or None, "caption": caption, "label": label, "where": f"{name} row {number}"})
    frame = pd.DataFrame(rows, columns=["url", "caption", "label", "where"])
    ids, skips = [], []
    first: dict[str, str] = {}
    copies: Counter = Counter()
    labels_of = frame.dropna(subset=["url"]).groupby("url")["label"].agg(lambda s: set(s)).to_dict()
    for url, label, where in zip(frame["url"], frame["label"], frame["where"]):
        if url is None:
            ids.append(f"{PREFIX[label]}nourl-{len(ids) + 1}")
            skips.append(f"no URL ({where})")
            continue
        image_id = url_id(url, label)
        copies[image_id] += 1
        if copies[image_id] > 1:
            ids.append(f"{image_id}-dup{copies[image_id]}")
            skips.append(f"duplicate URL (same as {first[image_id]})")
            continue
        first[image_id] = image_id
        ids.append(image_id)
        if len(labels_of[url]) > 1:
            skips.append(f"same URL listed as member and as non-member ({url_id(url, 1)} and {url_id(url, 0)})")
        else:
            skips.append(None)
    frame.insert(0, "id", ids)
    frame["skip"] = pd.Series(skips, index=frame.index, dtype=object)
    return frame


# --------------------------------------------------------------------------------------------------
# What the downloads delivered
# --------------------------------------------------------------------------------------------------
def attempts(folder: str | os.PathLike) -> dict:
    """id -> the img2dataset sample of its latest finished attempt under ``FOLDER/download/images``.

    Only shards img2dataset finished (their ``_stats.json`` exists) count; a success is never replaced by a
    later failure. Each sample is matched by the ``id`` img2dataset saved with it (its .json, or its
    shard-parquet row when no file arrived)."""
    output = Path(folder) / DOWNLOAD / OUTPUT
    if not output.is_dir() or not any(output.glob("*_stats.json")):
        return {}  # nothing finished yet
    found: dict = {}
    samples, _ = scan_output(output, listed_only=True)
    for sample in samples:
        image_id = sample.meta.get("id")
        if not sample.complete or image_id is None:
            continue
        previous = found.get(image_id)
        if previous is not None and failure_reason(previous) is None and failure_reason(sample) is not None:
            continue
        found[image_id] = sample
    return found


def laion_mi_entries(arg: str, options: dict) -> tuple[list[Entry], Path, dict]:
    """``laion-mi:FOLDER``: every row of the LAION-mi lists as an Entry (see the module docstring)."""
    folder = Path(arg)
    rows = listing(folder)
    delivered = attempts(folder)
    command = f"mialib download --data laion-mi:{arg}"
    entries = []
    for row in rows.itertuples(index=False):
        sample = delivered.get(row.id)
        location, source = None, row.url or row.where
        skip = row.skip if isinstance(row.skip, str) else None  # pandas may hold "no skip" as NaN
        if skip is None:
            if sample is None:
                skip = f"not downloaded yet: run `{command}`"
            else:
                skip = failure_reason(sample)
                location = sample.location
        entries.append(
            Entry(
                id=row.id,
                caption=row.caption,
                label=row.label,
                source=source,
                location=location,
                where=row.where,
                skip=skip,
            )
        )
    listed = set(rows["id"])
    info = {
        "kind": "laion-mi",
        "folder": str(folder),
        "files": sorted(set(w.rsplit(" row ", 1)[0] for w in rows["where"])),
        "attempted": sum(i in delivered for i in listed),
        "downloaded_not_listed": sum(i not in listed for i in delivered),
    }
    return entries, folder, info


# --------------------------------------------------------------------------------------------------
# The download
# --------------------------------------------------------------------------------------------------
def img2dataset_command() -> list[str]:
    """The img2dataset command line to run: ``$MIALIB_IMG2DATASET``, else the tool environment that
    ``make tools`` builds (``<sys.prefix>/img2dataset/bin/img2dataset``), else ``img2dataset`` on the PATH."""
    configured = os.environ.get("MIALIB_IMG2DATASET")
    if configured:
        command = shlex.split(configured)
        if not command or shutil.which(command[0]) is None:
            raise DownloadError(f"MIALIB_IMG2DATASET={configured!r} is not an executable command")
        return command
    bundled = Path(sys.prefix) / "img2dataset" / "bin" / "img2dataset"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return [str(bundled)]
    found = shutil.which("img2dataset")
    if found:
        return [found]
    raise DownloadError(
        "img2dataset is not installed: run `make tools` (it builds .venv/img2dataset, kept apart because "
        "img2dataset needs pandas < 3), or point MIALIB_IMG2DATASET at an img2dataset executable"
    )


def _limited(wanted: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """At most ``limit`` rows, split as evenly as the labels allow between members and non-members
    (the first rows of each list)."""
    if limit is None:
        return wanted
    if limit < 0:
        raise ValueError(f"limit must be at least 0, not {limit}")
    members, nonmembers = wanted[wanted["label"] == 1], wanted[wanted["label"] == 0]
    take_members = min(len(members), max(limit - limit // 2, limit - len(nonmembers)))
    take_nonmembers = min(len(nonmembers), limit - take_members)
    return pd.concat([members.head(take_members), nonmembers.head(take_nonmembers)])


def _reason_category(reason: str) -> str:
    """A skip reason without the per-record details, for counting (``download failed: HTTP Error 404``)."""
    text = reason.split(" (")[0]
    text = ": ".join(text.split(": ")[:2])
    return re.sub(r" as .*$", "", text).strip()


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` through a uniquely named temporary file, so an interrupted write leaves the
    old file and two writers never rename each other's file."""
    atomic_write(path, lambda partial: frame.to_csv(partial, index=False), int(frame.memory_usage(deep=True).sum()))


def _run(command: list[str], env: dict, log: Callable[[str], None]) -> None:
    """Run ``command``, passing each line of its output to ``log``; a non-zero exit is a DownloadError."""
    tail: deque = deque(maxlen=40)
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, errors="replace", bufsize=1
        )
    except OSError as error:
        raise DownloadError(f"cannot run {command[0]}: {error}") from None
    try:
        for line in process.stdout:  # text mode turns tqdm's carriage returns into lines
            line = line.rstrip()
            if line:
                tail.append(line)
                log(line)
        code = process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if code != 0:
        raise DownloadError(f"img2dataset exited with status {code}; its last output:\n  " + "\n  ".join(tail))


def download(
    folder: str | os.PathLike,
    processes: int = 1,
    threads: int = 16,
    timeout: int = 10,
    retries: int = 0,
    limit: int | None = None,
    retry_failed: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Fetch the images of the LAION-mi lists under ``folder`` with img2dataset, then freeze what arrived.

    Resumable: rows that a finished img2dataset shard already attempted are not asked for again (failed
    ones too, unless ``retry_failed``); a second call with nothing left to fetch only rewrites the
    manifest. ``limit`` caps the rows ever attempted (split evenly between members and non-members; a
    trial run). Bytes are stored exactly as served (no resizing, no re-encoding: the manifest's sha256 is
    that of the served file). Afterwards ``FOLDER/download/manifest.csv`` is the frozen manifest of the
    images that arrived and decode (``laion-mi:FOLDER?manifest=...`` verifies them) and
    ``FOLDER/download/skipped.csv`` says why every other row is missing.

    Returns ``{"given", "arrived", "skipped", "failed": {reason: count}, "requested", "manifest", "skipped_table"}``.
    """
    folder = Path(folder)
    log = log or (lambda line: None)
    rows = listing(folder)
    target = claim_folder(folder / DOWNLOAD, lambda path: path.name in OWN_NAMES)
    output = target / OUTPUT
    done = attempts(folder)
    finished = {i for i, s in done.items() if not retry_failed or failure_reason(s) is None}
    wanted = _limited(rows[rows["skip"].isna()], limit)
    pending = wanted[~wanted["id"].isin(finished)]
    if len(pending):
        command = img2dataset_command()
        pending[["id", "url", "caption", "label"]].astype({"label": "int64"}).to_parquet(target / INPUT, index=False)
        arguments = [
            "--url_list",
            str(target / INPUT),
            "--output_folder",
            str(output),
            "--input_format",
            "parquet",
            "--url_col",
            "url",
            "--caption_col",
            "caption",
            "--save_additional_columns",
            json.dumps(["id", "label"]),
            "--output_format",
            "files",
            "--resize_mode",
            "no",
            "--disable_all_reencoding",
            "True",
            "--enable_wandb",
            "False",
            "--extract_exif",
            "False",
            "--incremental_mode",
            "extend",
            "--processes_count",
            str(int(processes)),
            "--thread_count",
            str(int(threads)),
            "--timeout",
            str(int(timeout)),
            "--retries",
            str(int(retries)),
        ]
        env = dict(os.environ)
        for name in ("NO_PROXY", "no_proxy"):
            env[name] = ",".join(filter(None, [env.get(name, ""), "127.0.0.1,localhost"]))
        env.update(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
        log(f"downloading {len(pending)} of {len(rows)} LAION-mi rows into {output}")
        _run([*command, *arguments], env, log)
    else:
        log(f"nothing to download: every requested row of {folder} was attempted before")
    # what open_imageset(f"laion-mi:{folder}") opens, built here (the package imports this module)
    entries, root, info = laion_mi_entries(str(folder.expanduser()), {"require_labels": True})
    imageset = build(
        entries,
        f"laion-mi:{folder}",
        root=root,
        seed=0,
        min_side=MIN_SIDE,
        manifest=None,
        info=info,
        require_labels=True,
    )
    _write_csv(imageset.manifest(), target / MANIFEST)
    _write_csv(imageset.skipped, target / SKIPPED)
    failed = Counter(_reason_category(r) for r in imageset.skipped["reason"])
    summary = {
        "given": imageset.given,
        "arrived": len(imageset),
        "skipped": len(imageset.skipped),
        "failed": dict(failed.most_common()),
        "requested": len(pending),
        "manifest": str(target / MANIFEST),
        "skipped_table": str(target / SKIPPED),
    }
    log(imageset.summary())
    return summary
