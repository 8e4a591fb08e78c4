"""The image-set contract, shared by every adapter: records, defined outcomes for bad input, lazy batches.

An adapter only *lists* what a source holds (:class:`Entry`: id, caption, label, subset, where the bytes
are). Everything else happens here, once, so every adapter gives the same outcome for the same problem:

- **refused** (``DataError`` naming the file and row): a label other than 0 / 1 / member / non-member,
  an unknown subset, a subset given for some rows only, a missing or duplicate id (in the source or in a
  frozen manifest), a path outside the set's folder (``..``, an absolute path, a link leading out);
- **skipped** (one row in :attr:`ImageSet.skipped` with its reason): an empty or non-UTF-8 caption, a
  missing, unreadable, empty, truncated or undecodable file (whatever Pillow raises on it, EXIF metadata
  too corrupt to tell the orientation included), a decompression bomb, an image whose shorter side is
  below ``min_side``, a file whose bytes repeat another image's (the later copy within one label; every
  copy when the labels disagree), an image missing from or changed since a frozen manifest;
- **converted as documented** (:func:`decode_image`): EXIF orientation applied, 16-bit greyscale scaled
  to 8 bits, transparency composited on white, palette / CMYK / greyscale to RGB, the first frame of an
  animation.

Counts reconcile: ``len(records) + len(skipped) == given``. Images are decoded once when the set is
opened (so every skip is known before any compute) and then lazily, batch by batch; a file that changes
after opening (or is deleted) is a ``DataError`` naming the image, never a silent substitute.

**Every file is accounted for.** A folder form (members/ and nonmembers/, an imagefolder with metadata,
a plain folder with ``.txt`` captions, an img2dataset output) lists every file under its folder: each is a
record (used, or skipped with its reason) unless it is one of

- the form's own files, which are not images: ``metadata.csv`` / ``metadata.jsonl`` at the top of an
  imagefolder; a ``.txt`` beside a file of the same name (its caption: read by the folder forms, not
  needed by the metadata form); img2dataset's per-sample ``.json`` / ``.txt`` and its shard ``.parquet``,
  ``.tar`` and ``*_stats.json`` files;
- hidden files and folders (a name starting with ``.``: ``.DS_Store``, ``._photo.jpg``, ``.ipynb_checkpoints/``)
  and the operating systems' own ``Thumbs.db``, ``desktop.ini`` and ``__MACOSX/``;
- a file that a used link in the set points to (it is used through the link).

A file the source itself does not list (not in ``metadata.csv``, outside ``members/`` / ``nonmembers/``,
not part of an img2dataset sample) is a *stray*: a skip row whose reason says why and what to do; its label,
subset and group are never read. A ``csv:`` set lists only the files its rows name (its folder may hold
anything else). Whether a file is an image is decided by its content, never its suffix: a JPEG named
``.jfif`` or a PNG named ``.img`` is used; a file Pillow cannot decode (a HEIC photo without a plugin, a PDF,
text, a truncated download) is skipped with a reason naming the file, what it is, and what to do.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import memo
from ..data import DataError, preprocess
from ..hashing import pixel_digests, vouch_digests

RECORD_COLUMNS = ["id", "caption", "label", "subset", "source", "sha256"]
MANIFEST_COLUMNS = [*RECORD_COLUMNS, "subset_rule"]
SKIP_COLUMNS = ["id", "source", "reason"]
SUBSETS = ("calibration", "test")
MIN_SIDE = 32  # px: a shorter side below this is skipped rather than blown up
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit (about 89 M pixels)
LABEL_WORDS = {"member": 1, "nonmember": 0, "non-member": 0}
OPTIONS = {"seed": int, "manifest": str, "min_side": int}  # options every spec takes after "?"


@dataclass
class Entry:
    """One record as a source lists it, before any check (raw values; the core validates them)."""

    id: object
    caption: object  # str, or bytes when the source's bytes are not valid UTF-8
    label: object
    source: str  # provenance shown to users: a path relative to the set, a shard member, a URL
    location: str | None  # where the bytes are: a file path, or "tar://<shard path>#<member>"; None: absent
    where: str  # for messages: "metadata.csv row 7", "00000/000000012.json"
    subset: object = None  # None: the source has no subset for this record
    group: object = None  # records of one group always share a subset (near-duplicates, one person)
    skip: str | None = None  # a reason the adapter already knows (a failed download, an unreadable caption file)
    extra: dict = field(default_factory=dict)
    caption_problem: str | None = None  # the caption is missing (no .txt): a skip, unless the image has a worse problem
    stray: bool = (
        False  # a file in the set's folder that the source does not list: always skipped (``skip``), never validated
    )


class ImageProblem(Exception):
    """Why one image cannot be used (becomes a skip reason)."""


# --------------------------------------------------------------------------------------------------
# Reading and decoding one image
# --------------------------------------------------------------------------------------------------
class _Shards:
    """Random access into webdataset ``.tar`` shards: each shard's member offsets are indexed once."""

    def __init__(self):
        self._index: dict[str, dict[str, tuple[int, int]]] = {}

    def read(self, shard: str, member: str) -> bytes:
        if shard not in self._index:
            with tarfile.open(shard) as archive:
                self._index[shard] = {m.name: (m.offset_data, m.size) for m in archive.getmembers() if m.isfile()}
        if member not in self._index[shard]:
            raise FileNotFoundError(f"{member} is not in {shard}")
        offset, size = self._index[shard][member]
        with open(shard, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)


_SHARDS = _Shards()


def tar_location(shard: str | os.PathLike, member: str) -> str:
    return f"tar://{Path(shard)}#{member}"


def _memo_key(location: str | None, sha256: str, min_side: int, size: int) -> tuple | None:
    """What a preprocessed image is remembered by: the file's place, its size and modification time
    (a changed or deleted file misses, is read again and fails its sha256 check), the hash and the size."""
    if location is None:
        return None
    path = location[len("tar://") :].split("#", 1)[0] if location.startswith("tar://") else location
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (location, stat.st_mtime_ns, stat.st_size, sha256, min_side, size)


def _hashed(pixels: torch.Tensor) -> torch.Tensor:
    """The batch, its images' pixel digests computed here in the reader thread and vouched for, so the
    caller's result store and trajectory cache find them instead of hashing the pixels again."""
    vouch_digests(pixels, pixel_digests(pixels))
    return pixels


def read_threads(device=None) -> int:
    """How many threads read and decode images ahead of the model (``ImageSet.batches``).

    ``MIALIB_READ_THREADS`` when set (``mialib score --read-threads``); otherwise 1 beside a model on the
    CPU, whose own threads already use the cores (more readers only slow it: ``make benchmark``), and up
    to 8 beside a GPU, whose host cores are otherwise idle (a 512 px PNG takes about 20 ms of one core).
    """
    value = os.environ.get("MIALIB_READ_THREADS", "")
    if value.strip():
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"MIALIB_READ_THREADS must be a whole number of at least 1, not {value!r}")
        return int(value)
    if device is None or torch.device(device).type == "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores - 1))


def read_bytes(location: str) -> bytes:
    """The bytes of an image: a plain file, or a member of a webdataset shard."""
    if location.startswith("tar://"):
        shard, member = location[len("tar://") :].split("#", 1)
        return _SHARDS.read(shard, member)
    return Path(location).read_bytes()


HIDDEN_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}  # besides names starting with "."


def is_hidden(relative: Path) -> bool:
    """A hidden file or a file in a hidden folder (``.DS_Store``, ``._x.jpg``, ``.git/``, ``Thumbs.db``,
    ``__MACOSX/``)."""
    return any(part.startswith(".") or part.lower() in HIDDEN_NAMES for part in relative.parts)


def walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (a broken link too), sorted, hidden ones left out (:func:`is_hidden`)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and not p.is_dir() and not is_hidden(p.relative_to(folder))
    )


HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"mif2"}
CONVERT = "convert it to PNG or JPEG"
MOVE = "move it out of the set's folder"


def sniff(payload: bytes) -> tuple[str, str] | None:
    """(what the bytes are, what to do) for common files Pillow does not decode; None when not recognised."""
    head = payload[:1024]
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in HEIF_BRANDS:
            return "HEIC/HEIF photo, which Pillow cannot read here", f"{CONVERT} (or install pillow-heif)"
        if brand in (b"avif", b"avis"):
            return "AVIF image, which this Pillow cannot read", CONVERT
        return "video or other ISO media file, not an image", f"extract a frame as PNG, or {MOVE}"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JPEG XL image, which Pillow cannot read", CONVERT
    if head.startswith(b"%PDF"):
        return "PDF document, not an image", f"export the picture as PNG, or {MOVE}"
    lower = head.lstrip().lower()
    if b"<svg" in lower:
        return "SVG drawing, which Pillow cannot render", "render it to PNG (e.g. with cairosvg or Inkscape)"
    if lower.startswith((b"<!doctype html", b"<html")):
        return "web page, not an image (a failed download?)", f"download the image itself, or {MOVE}"
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return "archive, not an image", f"extract its images into the set, or {MOVE}"
    if b"\0" not in head and any(
        _is_utf8(head[: len(head) - cut]) for cut in range(4)
    ):  # a character cut at 1 KB is still text
        return "text, not image data", MOVE
    return None


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_PLUGINS_TRIED = False


def _register_plugins() -> bool:
    """Register Pillow plugins that are installed but not loaded by default (pillow-heif); True if any was."""
    global _PLUGINS_TRIED
    if _PLUGINS_TRIED:
        return False
    _PLUGINS_TRIED = True
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def decode_image(
    payload: bytes, min_side: int = MIN_SIDE, max_pixels: int | None = MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Bytes -> an RGB PIL image, with the documented conversions; raises :class:`ImageProblem`.

    The format is told by the content, never by a file name. ``name`` (the file, for messages): an
    undecodable file's reason names it, says what it is when the bytes tell (HEIC, PDF, text, ...) and
    what to do.

    - EXIF orientation is applied (a phone photo stored sideways is turned upright).
    - 16-bit greyscale (modes ``I;16*`` and ``I``) is scaled to 8 bits (value / 257, rounded), never clipped.
    - Transparent images are composited on white; palette, CMYK and greyscale images become RGB.
    - Of an animated image, the first frame is used.
    - Skipped: an empty or undecodable file (whatever Pillow raises on it), more than ``max_pixels`` pixels
      (a decompression bomb: the header alone is read), a shorter side below ``min_side`` px (it would be
      blown up), EXIF metadata too corrupt to read the orientation from, floating-point pixels.
    """
    file = name or "the file"
    if not payload:
        raise ImageProblem(f"empty file (0 bytes): {file}; re-download or re-export it")
    try:
        image = _open(payload, max_pixels)
    except UnidentifiedImageError:  # its message holds the buffer's address, which differs on every run
        kind, advice = sniff(payload) or ("no format Pillow knows", f"{CONVERT}, or {MOVE}")
        if kind.startswith("HEIC") and _register_plugins():  # pillow-heif is installed: read it after all
            return decode_image(payload, min_side, max_pixels, name)
        raise ImageProblem(f"not a readable image: {kind} ({file}); {advice}") from None
    except ImageProblem:
        raise
    except Exception as error:  # malformed bytes make Pillow raise many types (OSError, SyntaxError, struct.error ...)
        raise ImageProblem(
            f"not a readable image: truncated or damaged ({file}: {type(error).__name__}: {error}); re-download or "
            "re-export it"
        ) from None
    if min(image.size) < min_side:
        raise ImageProblem(
            f"image is {image.size[0]}x{image.size[1]} px; its shorter side is below min_side={min_side} px"
        )
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:
        raise ImageProblem(
            f"unreadable EXIF metadata, so the orientation is unknown: {type(error).__name__}: {error}"
        ) from None
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ImageProblem("floating-point pixels (mode F) have no defined range")
    if image.mode in ("RGBA", "LA", "PA", "P", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _open(payload: bytes, max_pixels: int | None) -> Image.Image:
    """Pillow's image of the bytes, its pixels loaded; a decompression bomb is an :class:`ImageProblem`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload))
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageProblem(
                    f"decompression bomb: {width} x {height} = {width * height:,} pixels exceed the limit of "
                    f"{max_pixels:,}"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageProblem(f"decompression bomb: {error}") from None
    return image


# --------------------------------------------------------------------------------------------------
# The image set
# --------------------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """Records of usable images (``RECORD_COLUMNS`` plus ``group, subset_rule, width, height, location``),
    the skip table, and lazy access to the pixels.

    ``given`` counts what the source listed; ``len(records) + len(skipped) == given`` always holds for a
    set as opened. ``select`` and ``with_captions`` derive sets for a study (they keep the skip table).
    """

    records: pd.DataFrame
    skipped: pd.DataFrame
    spec: str
    given: int
    info: dict = field(default_factory=dict)
    transform: Callable | None = None  # (batch tensor, ids) -> batch tensor, applied after preprocessing
    min_side: int = MIN_SIDE

    def __len__(self) -> int:
        return len(self.records)

    def select(self, mask) -> "ImageSet":
        """The records where ``mask`` holds (a boolean array, or a list of ids), in this set's order."""
        if isinstance(mask, (list, tuple, set, pd.Index)) and not (
            len(mask) and isinstance(next(iter(mask)), (bool, np.bool_))
        ):
            keep = self.records["id"].isin(list(mask)).to_numpy()
        else:
            keep = np.asarray(mask, dtype=bool)
        return replace(self, records=self.records[keep].reset_index(drop=True))

    def subset(self, name: str) -> "ImageSet":
        return self.select((self.records["subset"] == name).to_numpy())

    def with_captions(self, captions) -> "ImageSet":
        """The same images with other captions (a prompt study); the caption keys every cache."""
        return replace(self, records=self.records.assign(caption=list(captions)))

    def map(self, transform: Callable) -> "ImageSet":
        """The same set, every batch passed through ``transform(batch, ids)`` after preprocessing."""
        previous = self.transform
        if previous is None:
            return replace(self, transform=transform)
        return replace(self, transform=lambda x, ids: transform(previous(x, ids), ids))

    def load(self, size: int, rows: pd.DataFrame | None = None) -> torch.Tensor:
        """Preprocessed pixels (n, 3, size, size) in [-1, 1] of ``rows`` (default: every record).

        Each file is read again and checked against the sha256 taken when the set was opened, unless this
        process already holds its pixels for an unchanged file (same size and modification time; ``mialib.memo``).
        """
        rows = self.records if rows is None else rows
        return self._transformed(self._decoded(size, rows), rows)

    def _transformed(self, batch: torch.Tensor, rows: pd.DataFrame) -> torch.Tensor:
        if self.transform is None or not len(batch):
            return batch
        return self.transform(batch, list(rows["id"]))

    def _joined(self, parts: list, rows: pd.DataFrame) -> torch.Tensor:
        """One batch from the parts that several reader threads decoded, then the set's transform."""
        return _hashed(self._transformed(torch.cat([part.result() for part in parts]), rows))

    def _decoded(self, size: int, rows: pd.DataFrame) -> torch.Tensor:
        """``load`` without the set's transform."""
        tensors = []
        remembering = memo.PIXELS.budget > 0  # the key stats the file: not when nothing is remembered
        for row in rows.itertuples(index=False):
            key = _memo_key(row.location, row.sha256, self.min_side, size) if remembering else None
            remembered = memo.PIXELS.get(key) if key is not None else None
            if remembered is not None:
                tensors.append(remembered)
                continue
            try:
                payload = read_bytes(row.location)
            except (OSError, tarfile.TarError) as error:
                raise DataError(
                    f"image {row.id!r} ({row.source}) can no longer be read: {type(error).__name__}: {error}"
                ) from None
            if hashlib.sha256(payload).hexdigest() != row.sha256:
                raise DataError(
                    f"image {row.id!r} ({row.source}) changed after the set was opened; rerun to pick it up"
                )
            try:
                image = decode_image(payload, self.min_side, None)
            except ImageProblem as problem:
                raise DataError(f"image {row.id!r} ({row.source}) can no longer be read: {problem}") from None
            tensors.append(preprocess(image, size))
            if key is not None:
                memo.PIXELS.put(key, tensors[-1])
        if not tensors:
            return torch.empty(0, 3, size, size)
        return torch.stack(tensors)

    def batches(self, size: int, batch_size: int, threads: int = 1) -> Iterator[tuple[pd.DataFrame, torch.Tensor]]:
        """``(rows, pixels)`` for consecutive batches of at most ``batch_size`` records; at most two batches
        of pixels are in memory at a time.

        The next batch is read, decoded and hashed (its pixel digests, vouched for: ``hashing.vouch_digests``)
        in the background while the caller works on this one, by ``threads`` threads that split it (Pillow's
        decoding and resizing, file reads and hashing release the GIL; :func:`read_threads` chooses for a
        device). The pixels are the same bits whatever ``threads`` is.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        from concurrent.futures import ThreadPoolExecutor

        chunks = [
            self.records.iloc[start : start + batch_size].reset_index(drop=True)
            for start in range(0, len(self.records), batch_size)
        ]
        if not chunks:
            return
        # The first batch is read before the model has anything to do, so it is split between at least two
        # threads even beside a CPU model: nothing else runs yet.
        with ThreadPoolExecutor(max_workers=max(threads, 2), thread_name_prefix="mialib-images") as reader:

            def submit(rows: pd.DataFrame, parts: int = threads):
                if parts == 1 or len(rows) == 1:
                    return reader.submit(lambda: _hashed(self.load(size, rows)))
                step = -(-len(rows) // parts)
                parts = [
                    reader.submit(self._decoded, size, rows.iloc[start : start + step])
                    for start in range(0, len(rows), step)
                ]
                # queued after its parts, so when a thread runs it every part is running or done
                return reader.submit(self._joined, parts, rows)

            pending = submit(chunks[0], max(threads, 2))
            for k, rows in enumerate(chunks):
                pixels = pending.result()
                if k + 1 < len(chunks):
                    pending = submit(chunks[k + 1])
                yield rows, pixels

    def manifest(self) -> pd.DataFrame:
        """The frozen form of this set: ``id, caption, label, subset, sha256, source, subset_rule`` (+ group)."""
        columns = MANIFEST_COLUMNS + (["group"] if self.records["group"].ne(self.records["id"]).any() else [])
        return self.records[columns].copy()

    def summary(self) -> str:
        members, unlabelled = int((self.records["label"] == 1).sum()), int(self.records["label"].isna().sum())
        reasons = (
            self.skipped["reason"].str.split(":").str[0].value_counts() if len(self.skipped) else pd.Series(dtype=int)
        )
        skipped = "; ".join(f"{n} {r}" for r, n in reasons.items())
        return (
            f"{self.spec}: {len(self.records)} images ({members} members, "
            f"{len(self.records) - members - unlabelled} non-members"
            f"{f', {unlabelled} unlabelled' if unlabelled else ''}) "
            f"of {self.given} given, {len(self.skipped)} skipped{' (' + skipped + ')' if skipped else ''}"
        )

    def check_reconciles(self) -> None:
        if len(self.records) + len(self.skipped) != self.given:
            raise AssertionError(f"{len(self.records)} kept + {len(self.skipped)} skipped != {self.given} given")


# --------------------------------------------------------------------------------------------------
# From entries to a set: every check, in one place
# --------------------------------------------------------------------------------------------------
def parse_label(value) -> int | None:
    """0 / 1 (as numbers or text, ``1.0`` too), ``member`` / ``non-member`` / ``nonmember``; None otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return int(value)
    if isinstance(value, (float, np.floating)) and value in (0.0, 1.0):
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in LABEL_WORDS:
            return LABEL_WORDS[text]
        try:
            number = float(text)
        except ValueError:
            return None
        return int(number) if number in (0.0, 1.0) else None
    return None


def is_blank(value) -> bool:
    """None, NaN (a key that some JSON lines lack) or empty / whitespace-only text: the source gives no value."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return True
    return isinstance(value, str) and not value.strip()


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataError(f"{what}:\n  " + "\n  ".join(problems[:10]) + more)


def _caption(value) -> tuple[str | None, str | None]:
    """(caption, skip reason); the same reason for the same bytes whether read strictly or leniently."""
    if isinstance(value, str) and any("\ud800" <= ch <= "\udfff" for ch in value):
        try:  # bytes a CSV / JSON reader kept as surrogates ("surrogateescape"): back to those bytes
            value = value.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            return None, "caption is not valid UTF-8 (it holds a lone surrogate)"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            return None, f"caption is not valid UTF-8 ({error.reason} at byte {error.start})"
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None, "empty caption"
    text = str(value).strip()
    if not text:
        return None, "empty caption"
    return text, None


def assign_subsets(frame: pd.DataFrame, seed: int) -> pd.Series:
    """Calibration / test for records without one, deterministic for a seed and the listed records.

    A group goes whole to one subset. Groups are stratified by their label (the majority label of the
    group's images; ties count as member): within a label, groups ordered by sha256(seed, group) fill
    calibration up to ceil(n / 2) of that label's images; the rest are test.
    """
    subsets = pd.Series("test", index=frame.index, dtype=object)
    by_group = frame.groupby("group")["label"]
    primary = (by_group.mean() >= 0.5).astype(int)  # the group's majority label
    sizes = by_group.size()
    for label in (1, 0):
        groups = primary.index[primary == label]
        order = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        wanted, taken, calibration = int(sizes[groups].sum()) - int(sizes[groups].sum()) // 2, 0, []
        for group in order:
            if taken >= wanted:
                break
            calibration.append(group)
            taken += sizes[group]
        subsets[frame.index[frame["group"].isin(calibration)]] = "calibration"
    return subsets


def build(
    entries: list[Entry],
    spec: str,
    root: Path | None = None,
    seed: int = 0,
    min_side: int = MIN_SIDE,
    manifest: str | os.PathLike | None = None,
    info: dict | None = None,
    require_labels: bool = True,
) -> ImageSet:
    """Validate listed entries into an :class:`ImageSet` (the one place where bad input gets its outcome).
    Without ``require_labels``, a record may lack its label (kept as <NA>); a label given must be valid."""
    given = len(entries)
    # strays (files the source does not list) are skips with their reason: nothing of theirs is validated
    entries = [
        replace(e, label=None, subset=None, group=None, location=None, skip=e.skip or "not listed by the source")
        if e.stray
        else e
        for e in entries
    ]
    listed = sum(not e.stray for e in entries)
    # 1. refusals: what would silently change results if guessed
    bad_labels = [
        f"{e.where} (id {e.id!r}): label {e.label!r} is not 0, 1, member or non-member"
        for e in entries
        if e.skip is None and parse_label(e.label) is None and (require_labels or not is_blank(e.label))
    ]
    _refuse(bad_labels, "labels must be 0 / 1 (or member / non-member); refusing to guess")
    raw_subsets = [None if is_blank(e.subset) else str(e.subset).strip().lower() for e in entries]
    _refuse(
        [
            f"{e.where} (id {e.id!r}): subset {s!r} is not calibration or test"
            for e, s in zip(entries, raw_subsets)
            if s is not None and s not in SUBSETS
        ],
        "unknown subsets",
    )
    given_subsets = sum(s is not None for s in raw_subsets)
    if 0 < given_subsets < listed:
        missing = [e.where for e, s in zip(entries, raw_subsets) if s is None and not e.stray]
        _refuse(
            [f"{w}: no subset" for w in missing],
            f"{given_subsets} of {listed} records name a subset, the others do not; give it for all or none",
        )
    ids = pd.Series([None if is_blank(e.id) else str(e.id).strip() for e in entries], dtype=object)
    _refuse([f"{e.where}: no id" for e, i in zip(entries, ids) if not i], "records without an id")
    duplicated = ids[ids.duplicated(keep=False)]
    _refuse([f"{entries[i].where}: id {ids[i]!r} appears more than once" for i in duplicated.index], "duplicate ids")
    if root is not None:
        outside = []
        for e in entries:
            if e.location and not e.location.startswith("tar://"):
                resolved = Path(e.location).resolve()
                if not resolved.is_relative_to(Path(root).resolve()):
                    outside.append(
                        f"{e.where} (id {e.id!r}): {e.source} resolves to {resolved}, outside {Path(root).resolve()}"
                    )
        _refuse(outside, "paths must stay inside the set's folder")

    frame = pd.DataFrame(
        {
            "id": ids,
            # every listed record with a readable label takes part in the subset assignment, skipped or
            # not, so an image's subset does not move when others arrive (a resumed download) or break
            "label": [parse_label(e.label) for e in entries],
            "group": [i if is_blank(e.group) else str(e.group).strip() for e, i in zip(entries, ids)],
            "source": [e.source for e in entries],
            "location": [e.location for e in entries],
        }
    )
    # 2. subsets: given, or a seeded hash of the group stratified by label (over every labelled record)
    labelled = frame["label"].notna()
    if given_subsets:
        frame["subset"] = raw_subsets
        frame["subset_rule"] = "given"
    else:
        frame["subset"] = None
        frame.loc[labelled, "subset"] = assign_subsets(frame[labelled], seed)
        frame["subset_rule"] = f"hash(seed={seed})"
    # 3. per-record skips: the adapter's reason, the file and its pixels, the caption (a problem with the
    #    image outranks one with its caption: a PDF without a caption file is not an image, first of all)
    skips: dict[int, str] = {}
    captions, hashes, widths, heights = [], [], [], []
    for i, e in enumerate(entries):
        caption, caption_reason = _caption(e.caption)
        if e.caption_problem is not None:
            caption, caption_reason = None, e.caption_problem
        captions.append(caption)
        digest = width = height = reason = None
        if e.skip is not None:
            reason = e.skip
        else:
            try:
                if e.location is None:
                    raise ImageProblem("no image file")
                payload = read_bytes(e.location)
                digest = hashlib.sha256(payload).hexdigest()
                image = decode_image(payload, min_side, name=e.source)
                width, height = image.size
            except FileNotFoundError:
                reason = f"file not found: {e.source}"
            except IsADirectoryError:
                reason = f"not a file: {e.source}"
            except (OSError, tarfile.TarError) as error:  # permission denied, a file used as a folder, a bad shard
                reason = f"cannot read {e.source}: {type(error).__name__}: {getattr(error, 'strerror', None) or error}"
            except ImageProblem as problem:
                reason = str(problem)
            reason = reason or caption_reason
        if reason is not None:
            skips[i] = reason
        hashes.append(digest)
        widths.append(width)
        heights.append(height)
    frame["caption"], frame["sha256"], frame["width"], frame["height"] = captions, hashes, widths, heights
    # 4. the same bytes twice: a later copy within one label is a duplicate; across labels every copy goes
    usable = frame.index[~frame.index.isin(list(skips))]
    for digest, part in frame.loc[usable].groupby("sha256"):
        if len(part) < 2:
            continue
        if part["label"].nunique() > 1:
            members = list(part.loc[part["label"] == 1, "id"])
            others = list(part.loc[part["label"] == 0, "id"])
            for i in part.index:
                skips[i] = (
                    f"same image on both sides of the split: identical bytes as member(s) {members} and "
                    f"non-member(s) {others}"
                )
        else:
            first = part["id"].iloc[0]
            for i in part.index[1:]:
                skips[i] = f"duplicate: identical bytes as {first!r}"
    # 5. a frozen manifest: verify every hash, take the frozen caption, label and subset
    manifest_summary = None
    if manifest is not None:
        strays = {i for i, e in enumerate(entries) if e.stray}
        frame, skips, extra, manifest_summary = _apply_manifest(frame, skips, Path(manifest), strays)
        given += extra
    skipped = pd.DataFrame(
        [(frame.at[i, "id"], frame.at[i, "source"], reason) for i, reason in sorted(skips.items())],
        columns=SKIP_COLUMNS,
    )
    records = frame.drop(index=list(skips)).reset_index(drop=True)
    records["label"] = records["label"].astype(int if require_labels else "Int64")
    records = records[[*RECORD_COLUMNS, "subset_rule", "group", "width", "height", "location"]]
    details = dict(info or {}, seed=seed, min_side=min_side)
    if manifest_summary is not None:
        details["manifest"] = manifest_summary
    result = ImageSet(records, skipped, spec, given, details, min_side=min_side)
    result.check_reconciles()
    return result


def read_manifest(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in RECORD_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path} is not a manifest: it lacks columns {missing}")
    return frame


def _apply_manifest(frame: pd.DataFrame, skips: dict, path: Path, strays: set = frozenset()):
    """Check a set against a frozen manifest; returns (frame, skips, records added for missing ids, summary).
    ``strays`` (indices of files the source does not list) keep their skip and are no manifest records."""
    table = read_manifest(path)
    repeated = table["id"].duplicated(keep=False)
    _refuse(
        [f"{path} row {n + 2}: id {v!r} appears more than once" for n, v in table.loc[repeated, "id"].items()],
        "duplicate ids in the manifest",
    )
    frozen = table.set_index("id")
    problems = [f"{path} row {n + 2}: label {v!r}" for n, v in enumerate(frozen["label"]) if parse_label(v) is None]
    _refuse(problems, "manifest labels must be 0 or 1")
    problems = [
        f"{path} row {n + 2}: subset {v!r}" for n, v in enumerate(frozen["subset"]) if v.strip().lower() not in SUBSETS
    ]
    _refuse(problems, "manifest subsets must be calibration or test")
    status = {}
    for i, row in frame.iterrows():
        if i in strays:
            continue
        if row["id"] not in frozen.index:
            skips.setdefault(i, "not in the manifest")
            status[row["id"]] = "not in manifest"
            continue
        expected = frozen.loc[row["id"]]
        if i in skips:
            status[row["id"]] = "unusable"
            continue
        if row["sha256"] != expected["sha256"]:
            skips[i] = (
                f"changed since the manifest: sha256 {row['sha256'][:12]}... instead of {expected['sha256'][:12]}..."
            )
            status[row["id"]] = "changed"
            continue
        frame.loc[i, ["caption", "subset"]] = [expected["caption"], expected["subset"].strip().lower()]
        frame.loc[i, "label"] = parse_label(expected["label"])
        frame.loc[i, "subset_rule"] = expected.get("subset_rule", "manifest") or "manifest"
        status[row["id"]] = "verified"
    present = set(frame["id"])
    absent = [i for i in frozen.index if i not in present]
    if absent:
        start = len(frame)
        added = pd.DataFrame(
            {"id": absent, "source": list(frozen.loc[absent, "source"])}, index=range(start, start + len(absent))
        )
        frame = pd.concat([frame, added])
        for n, image_id in enumerate(absent):
            skips[start + n] = "in the manifest but missing from the set"
            status[image_id] = "missing"
    counts = pd.Series(status).value_counts().to_dict()
    summary = {
        "path": str(path),
        "counts": counts,
        "missing": [i for i, s in status.items() if s == "missing"],
        "changed": [i for i, s in status.items() if s == "changed"],
    }
    return frame, skips, len(absent), summary
