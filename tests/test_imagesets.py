"""Image sets (``mialib.imagesets``): the defined outcome of every kind of bad input, in every local adapter.

Every fixture file is written here, under ``tmp_path``. :func:`write_set` writes one logical set (a list
of :class:`Row`) in each local layout, so a case runs unchanged through all of them and must give the
same outcome in each:

- ``csv``: ``set.csv`` with ``id, path, caption, label[, subset][, group]``;
- ``imagefolder-csv`` / ``imagefolder-jsonl``: ``metadata.csv`` / ``metadata.jsonl`` with ``file_name``;
- ``folders``: ``members/`` and ``nonmembers/`` with a ``.txt`` caption beside each image.

Images live at ``members/<name>.png`` / ``nonmembers/<name>.png`` in every layout, and the CSV's ids are
those paths without the suffix (the ids the other layouts derive), so ids, sources and skip reasons can be
compared across layouts. The JSON-lines file starts with a blank line, so its line numbers equal the CSV
row numbers (header = row 1): the n-th row of a set is named ``row n + 1`` / ``line n + 1``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from mialib import data
from mialib.data import DataError, claim_folder, preprocess
from mialib.imagesets import MANIFEST_COLUMNS, RECORD_COLUMNS, SKIP_COLUMNS, freeze, open_imageset, parse_spec
from mialib.imagesets.core import read_threads

LAYOUTS = ("csv", "imagefolder-csv", "imagefolder-jsonl", "folders")
TABLE_LAYOUTS = LAYOUTS[:3]  # the layouts that can state a label, a path, a subset or a group per row
TABLE_FILE = {"csv": "set.csv", "imagefolder-csv": "metadata.csv", "imagefolder-jsonl": "metadata.jsonl"}
AUTO = "<auto>"  # a Row field left to its default
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# Image bytes
# --------------------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pixels(seed, size=(48, 40)) -> np.ndarray:
    """A seeded RGB array of ``size`` = (width, height)."""
    number = int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:8], "little")
    return np.random.default_rng(number).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def png(seed, size=(48, 40)) -> bytes:
    return encode(Image.fromarray(pixels(seed, size)))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming ``width x height`` RGB pixels, with a few bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + _chunk(b"IEND", b"")
    )


def with_chunk(png_bytes: bytes, kind: bytes, body: bytes) -> bytes:
    """``png_bytes`` with one more chunk right after IHDR."""
    end_of_header = 8 + 25
    return png_bytes[:end_of_header] + _chunk(kind, body) + png_bytes[end_of_header:]


def sixteen_bit() -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale PNG whose values span 0..65535, and those values."""
    values = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)
    return encode(Image.fromarray(values)), values


def oriented(fmt: str, orientation: int) -> bytes:
    """A 60 x 40 image stored sideways, with the EXIF orientation tag that says so."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {}
    return encode(Image.fromarray(pixels(f"exif {fmt} {orientation}", (60, 40))), fmt, exif=exif, **options)


# --------------------------------------------------------------------------------------------------
# One logical set, written in every layout
# --------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One image of a set. In a table a ``None`` value is an empty cell (CSV) or an absent key (JSON)."""

    name: str
    member: bool = True
    caption: object = AUTO  # str or raw bytes; None: no caption (no .txt file in the folders layout)
    image: object = AUTO  # bytes; None: no file is written
    label: object = AUTO  # the label as written in a table (default 1 / 0)
    path: str | None = None  # the path written in a table instead of the image's own
    link: object = None  # the image is a symbolic link to this path
    subset: str | None = None
    group: str | None = None

    @property
    def rel(self) -> str:
        return f"{'members' if self.member else 'nonmembers'}/{self.name}.png"

    @property
    def id(self) -> str:
        return self.rel[: -len(".png")]

    def caption_value(self):
        return f"a picture of {self.name}" if self.caption == AUTO else self.caption

    def label_value(self):
        return int(self.member) if isinstance(self.label, str) and self.label == AUTO else self.label

    def image_value(self):
        return png(self.name) if isinstance(self.image, str) and self.image == AUTO else self.image


def _csv_cell(value) -> bytes:
    raw = value if isinstance(value, bytes) else b"" if value is None else str(value).encode("utf-8")
    return b'"' + raw.replace(b'"', b'""') + b'"'


def _json_value(value) -> bytes:
    if isinstance(value, bytes):  # raw bytes inside a JSON string (the test's bytes hold no quote or backslash)
        return b'"' + value + b'"'
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def write_set(root: Path, layout: str, rows: list[Row]) -> str:
    """Write ``rows`` under ``root`` in ``layout``; returns the spec that opens them."""
    root.mkdir(parents=True, exist_ok=True)
    for row in rows:
        file = root / row.rel
        file.parent.mkdir(parents=True, exist_ok=True)
        if row.link is not None:
            file.symlink_to(row.link)
        elif row.image_value() is not None:
            file.write_bytes(row.image_value())
        caption = row.caption_value()
        if layout == "folders" and caption is not None:
            file.with_suffix(".txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode("utf-8"))
    if layout == "folders":
        assert all(r.path is None and r.label == AUTO and r.subset is None and r.group is None for r in rows), (
            "not expressible in folders"
        )
        return f"imagefolder:{root}"
    key = "path" if layout == "csv" else "file_name"
    columns = (["id"] if layout == "csv" else []) + [key, "caption", "label"]
    columns += [c for c in ("subset", "group") if any(getattr(r, c) is not None for r in rows)]
    records = []
    for row in rows:
        record = {
            "id": row.id,
            key: row.path or row.rel,
            "caption": row.caption_value(),
            "label": row.label_value(),
            "subset": row.subset,
            "group": row.group,
        }
        records.append({c: record[c] for c in columns})
    table = root / TABLE_FILE[layout]
    if layout == "imagefolder-jsonl":
        lines = [
            b"{"
            + b", ".join(json.dumps(c).encode() + b": " + _json_value(v) for c, v in r.items() if v is not None)
            + b"}"
            for r in records
        ]
        table.write_bytes(b"\n" + b"\n".join(lines) + b"\n")  # a leading blank line: line numbers = CSV row numbers
    else:
        lines = [b",".join(c.encode() for c in columns)] + [
            b",".join(_csv_cell(v) for v in r.values()) for r in records
        ]
        table.write_bytes(b"\n".join(lines) + b"\n")
    return f"csv:{table}" if layout == "csv" else f"imagefolder:{root}"


def where(layout: str, index: int, row: Row) -> str:
    """How messages name the ``index``-th row of a set (0-based)."""
    if layout == "folders":
        return row.rel
    return f"{TABLE_FILE[layout]} {'line' if layout.endswith('jsonl') else 'row'} {index + 2}"


def opened(root: Path, layout: str, rows: list[Row], options: str = ""):
    """Write, open and check that the counts reconcile."""
    imageset = open_imageset(write_set(root, layout, rows) + options)
    reconciles(imageset)
    return imageset


def reconciles(imageset) -> None:
    assert len(imageset.records) + len(imageset.skipped) == imageset.given
    assert list(imageset.skipped.columns) == SKIP_COLUMNS
    assert not set(imageset.records["id"]) & set(imageset.skipped["id"])


def reasons(imageset) -> dict[str, str]:
    return dict(zip(imageset.skipped["id"], imageset.skipped["reason"]))


def kept(imageset) -> list[str]:
    """The ids of the usable records, sorted (tables list rows in their order, folders sorted by path)."""
    return sorted(imageset.records["id"])


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """[-1, 1] pixels back to 0..255 (exact for preprocessed 8-bit images)."""
    return np.round((tensor.numpy() + 1.0) * 127.5).astype(np.int64)


@pytest.fixture(params=LAYOUTS)
def layout(request) -> str:
    return request.param


def good(*names: str, member: bool = True) -> list[Row]:
    return [Row(n, member=member) for n in names]


# --------------------------------------------------------------------------------------------------
# 1. decompression bombs
# --------------------------------------------------------------------------------------------------
def test_decompression_bomb_is_skipped_and_the_rest_loads(tmp_path, layout):
    huge, above_limit = bomb_png(30000, 30000), bomb_png(10000, 10000)  # 900 M pixels; 100 M (Pillow warns)
    assert len(huge) < 100  # the header alone: nothing is decompressed to find out
    rows = [Row("m1"), Row("bomb", image=huge), Row("nearbomb", image=above_limit), *good("n1", "n2", member=False)]
    imageset = opened(tmp_path / "set", layout, rows)
    assert kept(imageset) == ["members/m1", "nonmembers/n1", "nonmembers/n2"]
    skipped = reasons(imageset)
    assert set(skipped) == {"members/bomb", "members/nearbomb"}
    assert all(r.startswith("decompression bomb") for r in skipped.values()), skipped
    assert imageset.given == 5
    assert imageset.load(16).shape == (3, 3, 16, 16)


# --------------------------------------------------------------------------------------------------
# 2. 16-bit greyscale, 3. EXIF orientation
# --------------------------------------------------------------------------------------------------
def test_sixteen_bit_greyscale_is_scaled_by_257_not_clipped(tmp_path, layout):
    payload, values = sixteen_bit()
    assert Image.open(io.BytesIO(payload)).mode == "I;16"
    imageset = opened(tmp_path / "set", layout, [Row("deep", image=payload), *good("n1", member=False)])
    assert kept(imageset) == ["members/deep", "nonmembers/n1"]
    record = imageset.records.iloc[0]
    assert (record["width"], record["height"]) == (64, 48)
    # size 48: the centre 48 x 48 crop, resized to its own size (no resampling)
    loaded = as_bytes(imageset.load(48, imageset.records.iloc[:1])[0])
    expected = np.round(values[:, 8:56] / 257.0)
    for channel in loaded:
        np.testing.assert_array_equal(channel, expected)
    assert len(np.unique(loaded)) > 200  # a ramp of grey, not black and white


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path, layout, fmt, orientation):
    payload = oriented(fmt, orientation)
    stored = Image.open(io.BytesIO(payload))
    assert stored.size == (60, 40) and stored.getexif()[0x0112] == orientation
    upright = ImageOps.exif_transpose(stored).convert("RGB")
    if fmt == "PNG":  # lossless: the upright image is the stored array turned a quarter
        raw = pixels(f"exif {fmt} {orientation}", (60, 40))
        np.testing.assert_array_equal(np.asarray(upright), np.rot90(raw, -1 if orientation == 6 else 1))
    imageset = opened(tmp_path / "set", layout, [Row("sideways", image=payload), *good("n1", member=False)])
    record = imageset.records.set_index("id").loc["members/sideways"]
    assert (record["width"], record["height"]) == (40, 60)
    loaded = imageset.load(40, imageset.records[imageset.records["id"] == "members/sideways"])
    assert torch.equal(loaded[0], preprocess(upright, 40))


# --------------------------------------------------------------------------------------------------
# 4. tiny images, 5. empty captions, 6. captions that are not UTF-8
# --------------------------------------------------------------------------------------------------
def test_tiny_image_is_skipped_below_min_side_and_allowed_by_the_option(tmp_path, layout):
    rows = [Row("dot", image=encode(Image.new("RGB", (1, 1), (200, 10, 10)))), Row("m1"), *good("n1", member=False)]
    imageset = opened(tmp_path / "set", layout, rows)
    assert kept(imageset) == ["members/m1", "nonmembers/n1"]
    assert "shorter side is below min_side=32" in reasons(imageset)["members/dot"]
    allowed = open_imageset(imageset.spec + "?min_side=1")
    reconciles(allowed)
    assert kept(allowed) == ["members/dot", "members/m1", "nonmembers/n1"] and allowed.skipped.empty
    assert allowed.info["min_side"] == 1
    dot = allowed.load(8, allowed.records[allowed.records["id"] == "members/dot"])
    assert dot.shape == (1, 3, 8, 8) and torch.allclose(dot[0, :, 0, 0], torch.tensor([200, 10, 10]) / 127.5 - 1)


def test_empty_and_whitespace_captions_are_skipped(tmp_path, layout):
    rows = [Row("empty", caption=""), Row("blank", caption="  \t  "), Row("m1"), *good("n1", member=False)]
    imageset = opened(tmp_path / "set", layout, rows)
    assert kept(imageset) == ["members/m1", "nonmembers/n1"]
    assert reasons(imageset) == {"members/empty": "empty caption", "members/blank": "empty caption"}


def test_caption_that_is_not_utf8_skips_only_its_row(tmp_path, layout):
    rows = [
        Row("broken", caption=b"caf\xff\xfe bytes"),
        Row("accent", caption="caf\u00e9 au lait \u2615"),
        Row("m1"),
        *good("n1", member=False),
    ]
    imageset = opened(tmp_path / "set", layout, rows)  # never a UnicodeDecodeError
    assert kept(imageset) == ["members/accent", "members/m1", "nonmembers/n1"]
    assert "not valid UTF-8" in reasons(imageset)["members/broken"]
    assert imageset.records.set_index("id").loc["members/accent", "caption"] == "caf\u00e9 au lait \u2615"


def test_folder_image_without_caption_file_is_skipped(tmp_path):
    imageset = opened(tmp_path / "set", "folders", [Row("mute", caption=None), Row("m1"), *good("n1", member=False)])
    assert kept(imageset) == ["members/m1", "nonmembers/n1"]
    assert reasons(imageset)["members/mute"].startswith("no caption")


# --------------------------------------------------------------------------------------------------
# 7. labels
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
@pytest.mark.parametrize("bad", ["yes", 0.5, 1.9, 2, "-1", True])
def test_label_other_than_0_or_1_is_refused_naming_file_and_row(tmp_path, layout, bad):
    rows = [Row("m1"), Row("n1", member=False), Row("odd", label=bad), Row("m2")]
    spec = write_set(tmp_path / "set", layout, rows)
    with pytest.raises(DataError) as caught:
        open_imageset(spec)
    message = str(caught.value)
    assert where(layout, 2, rows[2]) in message and repr(bad) in message and "members/odd" in message
    assert where(layout, 0, rows[0]) not in message


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
def test_accepted_label_forms(tmp_path, layout):
    forms = {
        "a": 1,
        "b": 0,
        "c": "1.0",
        "d": "0.0",
        "e": "member",
        "f": "non-member",
        "g": " Member ",
        "h": "nonmember",
        "i": 1.0,
    }
    expected = {"a": 1, "b": 0, "c": 1, "d": 0, "e": 1, "f": 0, "g": 1, "h": 0, "i": 1}
    rows = [Row(name, member=bool(expected[name]), label=value) for name, value in forms.items()]
    imageset = opened(tmp_path / "set", layout, rows)
    assert imageset.skipped.empty
    assert dict(zip(imageset.records["id"], imageset.records["label"])) == {r.id: expected[r.name] for r in rows}
    assert imageset.records["label"].dtype.kind == "i"


@pytest.mark.parametrize("layout", ["imagefolder-csv", "imagefolder-jsonl"])
def test_metadata_without_a_label_takes_the_folder(tmp_path, layout):
    """An empty label cell (CSV) and an absent label key (JSON) mean the same: the folder decides."""
    rows = [Row("m1"), Row("m2", label=None), Row("n1", member=False, label=None), Row("n2", member=False)]
    imageset = opened(tmp_path / "set", layout, rows)
    assert dict(zip(imageset.records["id"], imageset.records["label"])) == {
        "members/m1": 1,
        "members/m2": 1,
        "nonmembers/n1": 0,
        "nonmembers/n2": 0,
    }


# --------------------------------------------------------------------------------------------------
# 8. the same bytes twice
# --------------------------------------------------------------------------------------------------
def test_same_bytes_across_the_split_skips_every_copy_and_within_a_label_the_later(tmp_path, layout):
    shared, twice = png("shared"), png("twice")
    rows = [
        Row("m1"),
        Row("leak", image=shared),
        Row("first", image=twice),
        Row("second", image=twice),
        Row("n1", member=False),
        Row("leak2", member=False, image=shared),
    ]
    imageset = opened(tmp_path / "set", layout, rows)
    assert kept(imageset) == ["members/first", "members/m1", "nonmembers/n1"]
    skipped = reasons(imageset)
    assert set(skipped) == {"members/leak", "nonmembers/leak2", "members/second"}
    for copy in ("members/leak", "nonmembers/leak2"):
        assert "both sides of the split" in skipped[copy]
        assert "members/leak" in skipped[copy] and "nonmembers/leak2" in skipped[copy]
    assert skipped["members/second"].startswith("duplicate") and "members/first" in skipped["members/second"]


# --------------------------------------------------------------------------------------------------
# 9. paths leaving the set's folder
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
@pytest.mark.parametrize("escape", ["dotdot", "absolute", "deep-dotdot"])
def test_path_outside_the_set_is_refused_naming_the_row(tmp_path, layout, escape):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png("outside"))
    path = {"dotdot": "../outside.png", "absolute": str(outside), "deep-dotdot": "members/../../outside.png"}[escape]
    rows = [Row("m1"), Row("escape", path=path), *good("n1", member=False)]
    with pytest.raises(DataError) as caught:
        open_imageset(write_set(tmp_path / "set", layout, rows))
    message = str(caught.value)
    assert where(layout, 1, rows[1]) in message and "outside" in message
    assert where(layout, 0, rows[0]) not in message


def test_symlink_leading_out_of_the_set_is_refused_naming_the_row(tmp_path, layout):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png("outside"))
    rows = [Row("m1"), Row("link", link=outside), *good("n1", member=False)]
    with pytest.raises(DataError) as caught:
        open_imageset(write_set(tmp_path / "set", layout, rows))
    assert where(layout, 1, rows[1]) in str(caught.value) and "outside" in str(caught.value)


def test_symlink_inside_the_set_is_followed(tmp_path, layout):
    (tmp_path / "set" / "pool").mkdir(parents=True)
    (tmp_path / "set" / "pool" / "x.png").write_bytes(png("pooled"))
    imageset = opened(tmp_path / "set", layout, [Row("m1", link=Path("../pool/x.png")), *good("n1", member=False)])
    assert kept(imageset) == ["members/m1", "nonmembers/n1"]
    assert imageset.records["sha256"].iloc[0] == hashlib.sha256(png("pooled")).hexdigest()


# --------------------------------------------------------------------------------------------------
# 10. unreadable files, 11. counts and repeatability
# --------------------------------------------------------------------------------------------------
def problem_rows() -> list[Row]:
    """One row per kind of unusable file (expressible in every layout), among usable ones."""
    whole = png("whole")
    return [
        Row("m1"),
        Row("missing", link=Path("gone.png")),  # a link to nothing: listed by every layout, file not found
        Row("empty", image=b""),
        Row("truncated", image=whole[: len(whole) // 2]),
        Row("garbage", image=b"this is not an image " * 8),
        Row("badexif", image=with_chunk(png("badexif"), b"eXIf", b"garbage that is not a TIFF header")),
        Row("m2", image=whole),
        *good("n1", "n2", member=False),
    ]


EXPECTED_PROBLEMS = {
    "members/missing": "file not found: members/missing.png",
    "members/empty": "empty file (0 bytes)",
    "members/truncated": "not a readable image",
    "members/garbage": "not a readable image",
    "members/badexif": "unreadable EXIF metadata",
}


def test_unreadable_files_are_skipped_with_reasons(tmp_path, layout):
    imageset = opened(tmp_path / "set", layout, problem_rows())
    assert kept(imageset) == ["members/m1", "members/m2", "nonmembers/n1", "nonmembers/n2"]
    skipped = reasons(imageset)
    assert set(skipped) == set(EXPECTED_PROBLEMS)  # nothing dropped unseen
    for image_id, start in EXPECTED_PROBLEMS.items():
        assert skipped[image_id].startswith(start), (image_id, skipped[image_id])
    assert "truncated" in skipped["members/truncated"]
    for image_id in ("members/empty", "members/truncated", "members/garbage"):  # the file, and what to do
        assert f"{image_id}.png" in skipped[image_id] and (
            "re-download" in skipped[image_id] or "move it out" in skipped[image_id]
        )
    assert imageset.given == len(problem_rows())


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
def test_unreadable_paths_in_a_table_are_skipped(tmp_path, layout):
    (tmp_path / "set" / "members" / "folder.png").mkdir(parents=True)
    rows = [
        Row("m1"),
        Row("absent", image=None),
        Row("folder", image=None),
        Row("through", path="members/m1.png/inner.png"),
        Row("nopath", path=" "),
        *good("n1", member=False),
    ]
    if layout != "csv":  # without an id column the id comes from the path: keep it
        rows[-2] = Row("m2")
    imageset = opened(tmp_path / "set", layout, rows)
    assert (
        kept(imageset) == ["members/m1", "members/m2", "nonmembers/n1"]
        if layout != "csv"
        else ["members/m1", "nonmembers/n1"]
    )
    by_source = dict(zip(imageset.skipped["source"], imageset.skipped["reason"]))
    assert by_source["members/absent.png"] == "file not found: members/absent.png"
    assert by_source["members/folder.png"] == "not a file: members/folder.png"
    assert by_source["members/m1.png/inner.png"].startswith("cannot read members/m1.png/inner.png: NotADirectoryError")
    if layout == "csv":
        assert reasons(imageset)["members/nopath"] == "no path given"


def test_same_outcome_in_every_layout_and_on_every_opening(tmp_path):
    """The mixed set of problems gives identical records and skips in all four layouts; opening a set
    again (after opening others) gives the same again."""
    rows = problem_rows() + [
        Row("bomb", image=bomb_png()),
        Row("dot", image=encode(Image.new("RGB", (1, 1)))),
        Row("blank", caption=" "),
        Row("broken", caption=b"\xff\xfe"),
        Row("zcopy", image=png("m1")),
        Row("leak", image=png("n1")),
        Row("deep", image=sixteen_bit()[0]),
        Row("sideways", image=oriented("PNG", 6)),
        *good("n3", "n4", "n5", member=False),
    ]
    columns = ["id", "caption", "label", "subset", "source", "sha256", "subset_rule", "group", "width", "height"]
    outcomes = {}
    specs = {}
    for layout in LAYOUTS:
        imageset = opened(tmp_path / layout, layout, rows)
        assert list(imageset.records.columns[: len(RECORD_COLUMNS)]) == RECORD_COLUMNS
        outcomes[layout] = (
            imageset.records[columns].sort_values("id", ignore_index=True),
            imageset.skipped[["id", "reason"]].sort_values("id", ignore_index=True),
            imageset.given,
        )
        specs[layout] = imageset.spec
    for layout in LAYOUTS:
        again = open_imageset(specs[layout])
        reconciles(again)
        pd.testing.assert_frame_equal(again.records[columns].sort_values("id", ignore_index=True), outcomes[layout][0])
        pd.testing.assert_frame_equal(
            again.skipped[["id", "reason"]].sort_values("id", ignore_index=True), outcomes[layout][1]
        )
        assert again.given == outcomes[layout][2] == len(rows)
    first = outcomes["csv"]
    for layout in LAYOUTS[1:]:
        pd.testing.assert_frame_equal(outcomes[layout][0], first[0], obj=layout)
        pd.testing.assert_frame_equal(outcomes[layout][1], first[1], obj=layout)
    skipped = dict(zip(first[1]["id"], first[1]["reason"]))
    assert set(skipped) == set(EXPECTED_PROBLEMS) | {
        "members/bomb",
        "members/dot",
        "members/blank",
        "members/broken",
        "members/zcopy",
        "members/leak",
        "nonmembers/n1",
    }
    assert list(first[0]["id"]) == [
        "members/deep",
        "members/m1",
        "members/m2",
        "members/sideways",
        "nonmembers/n2",
        "nonmembers/n3",
        "nonmembers/n4",
        "nonmembers/n5",
    ]


# --------------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------------
def balanced(members: int = 7, nonmembers: int = 5) -> list[Row]:
    return [Row(f"m{i}") for i in range(members)] + [Row(f"n{i}", member=False) for i in range(nonmembers)]


def test_subsets_assigned_when_the_source_has_none(tmp_path, layout):
    rows = balanced(7, 5)
    zero = opened(tmp_path / "set", layout, rows)
    assert set(zero.records["subset_rule"]) == {"hash(seed=0)"}
    counts = zero.records.groupby("label")["subset"].apply(lambda s: int((s == "calibration").sum())).to_dict()
    assert counts == {1: math.ceil(7 / 2), 0: math.ceil(5 / 2)}
    assert set(zero.records["subset"]) == {"calibration", "test"}
    again = open_imageset(zero.spec)
    assert list(again.records["subset"]) == list(zero.records["subset"])
    other = open_imageset(zero.spec + "?seed=1")
    assert set(other.records["subset_rule"]) == {"hash(seed=1)"}
    assert other.records.groupby("label")["subset"].apply(lambda s: int((s == "calibration").sum())).to_dict() == counts
    assert list(other.records["subset"]) != list(zero.records["subset"])


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
def test_groups_never_straddle_subsets(tmp_path, layout):
    groups = ["g1", "g1", "g1", "g2", "g2", None, None, None]
    rows = [Row(f"m{i}", group=g) for i, g in enumerate(groups)] + [
        Row(f"n{i}", member=False, group="g3" if i < 2 else None) for i in range(6)
    ]
    spec = write_set(tmp_path / "set", layout, rows)
    for seed in range(8):
        imageset = open_imageset(f"{spec}?seed={seed}")
        reconciles(imageset)
        records = imageset.records
        for group in ("g1", "g2", "g3"):
            assert records.loc[records["group"] == group, "subset"].nunique() == 1, (seed, group)
        # a record without a group is a group of its own (an absent JSON key is no group "nan")
        assert set(records.loc[records["id"] == "members/m5", "group"]) == {"members/m5"}
        for label, part in records.groupby("label"):
            assert (part["subset"] == "calibration").sum() >= math.ceil(len(part) / 2)


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
def test_rows_without_a_group_each_form_their_own(tmp_path, layout):
    rows = (
        [Row("m0", group="solo")] + [Row(f"m{i}") for i in range(1, 6)] + [Row(f"n{i}", member=False) for i in range(4)]
    )
    for seed in range(6):
        imageset = opened(tmp_path / f"set{seed}", layout, rows, f"?seed={seed}")
        calibration = (
            imageset.records.groupby("label")["subset"].apply(lambda s: int((s == "calibration").sum())).to_dict()
        )
        assert calibration == {1: 3, 0: 2}, seed


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
def test_given_subsets_are_kept(tmp_path, layout):
    given = ["test", " Calibration ", "TEST", "calibration", "test", "test"]
    rows = [Row(f"m{i}", subset=s) for i, s in enumerate(given[:3])] + [
        Row(f"n{i}", member=False, subset=s) for i, s in enumerate(given[3:])
    ]
    imageset = opened(tmp_path / "set", layout, rows, "?seed=3")
    assert list(imageset.records["subset"]) == ["test", "calibration", "test", "calibration", "test", "test"]
    assert set(imageset.records["subset_rule"]) == {"given"}


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
def test_subsets_given_for_some_rows_only_are_refused(tmp_path, layout):
    rows = [Row("m0", subset="test"), Row("m1"), Row("n0", member=False, subset="calibration"), Row("n1", member=False)]
    with pytest.raises(DataError, match="2 of 4 records name a subset") as caught:
        open_imageset(write_set(tmp_path / "set", layout, rows))
    assert where(layout, 1, rows[1]) in str(caught.value) and where(layout, 3, rows[3]) in str(caught.value)


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
def test_unknown_subset_is_refused(tmp_path, layout):
    rows = [Row("m0", subset="test"), Row("m1", subset="train"), Row("n0", member=False, subset="test")]
    with pytest.raises(DataError, match="'train' is not calibration or test") as caught:
        open_imageset(write_set(tmp_path / "set", layout, rows))
    assert where(layout, 1, rows[1]) in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Frozen manifests
# --------------------------------------------------------------------------------------------------
def test_freeze_writes_the_manifest_and_never_overwrites(tmp_path, layout):
    imageset = opened(tmp_path / "set", layout, [*balanced(3, 3), Row("blank", caption="")])
    path = freeze(imageset, tmp_path / "frozen" / "set.csv")
    frozen = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(frozen.columns) == MANIFEST_COLUMNS
    assert list(frozen["id"]) == kept(imageset) and list(frozen["sha256"]) == list(imageset.records["sha256"])
    beside = pd.read_csv(tmp_path / "frozen" / "set.skipped.csv")
    assert list(beside["id"]) == ["members/blank"]
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        freeze(imageset, path)
    assert path.read_bytes() == before
    (tmp_path / "frozen" / "other.skipped.csv").write_text("mine\n")
    with pytest.raises(FileExistsError):
        freeze(imageset, tmp_path / "frozen" / "other.csv")
    assert (
        not (tmp_path / "frozen" / "other.csv").exists()
        and (tmp_path / "frozen" / "other.skipped.csv").read_text() == "mine\n"
    )


def test_manifest_verifies_and_reports_changed_missing_and_extra_files(tmp_path, layout):
    rows = balanced(4, 4)
    original = opened(tmp_path / "v1", layout, rows, "?seed=7")
    manifest = freeze(original, tmp_path / "manifest.csv")
    same = open_imageset(f"{original.spec}&manifest={manifest}")
    reconciles(same)
    assert same.skipped.empty and same.info["manifest"]["counts"] == {"verified": 8}
    assert list(same.records["subset"]) == list(original.records["subset"]) and set(same.records["subset_rule"]) == {
        "hash(seed=7)"
    }

    # the set changes: m0's bytes, n0 deleted from the listing, n1's file gone, a new image, m1's caption
    changed = [
        Row("m0", image=png("something else")),
        Row("m1", caption="a new caption"),
        Row("m2"),
        Row("m3"),
        Row("n1", member=False, link=Path("gone.png")),
        Row("n2", member=False),
        Row("n3", member=False),
        Row("m9"),
    ]
    spec = write_set(tmp_path / "v2", layout, changed)
    reopened = open_imageset(f"{spec}?seed=99&manifest={manifest}")
    reconciles(reopened)
    assert reopened.given == len(changed) + 1  # the manifest's n0, listed nowhere, is a skip row of its own
    skipped = reasons(reopened)
    assert skipped["members/m0"].startswith("changed since the manifest")
    assert skipped["nonmembers/n0"] == "in the manifest but missing from the set"
    assert skipped["nonmembers/n1"] == "file not found: nonmembers/n1.png"
    assert skipped["members/m9"] == "not in the manifest"
    assert set(skipped) == {"members/m0", "nonmembers/n0", "nonmembers/n1", "members/m9"}
    summary = reopened.info["manifest"]
    assert summary["changed"] == ["members/m0"] and summary["missing"] == ["nonmembers/n0"]
    assert summary["counts"] == {"verified": 5, "changed": 1, "unusable": 1, "not in manifest": 1, "missing": 1}
    # caption, label and subset come from the manifest, not from the source or the new seed
    fields = ["caption", "label", "subset", "subset_rule"]
    expected = original.records.set_index("id").loc[kept(reopened), fields]
    pd.testing.assert_frame_equal(reopened.records.set_index("id")[fields].sort_index(), expected.sort_index())
    assert reopened.records.set_index("id").loc["members/m1", "caption"] == "a picture of m1"


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
def test_manifest_label_wins_over_the_source(tmp_path, layout):
    rows = balanced(2, 2)
    manifest = freeze(opened(tmp_path / "v1", layout, rows), tmp_path / "manifest.csv")
    relabelled = [Row("m0", label=0), *rows[1:]]
    imageset = opened(tmp_path / "v2", layout, relabelled, f"?manifest={manifest}")
    assert imageset.records.set_index("id").loc["members/m0", "label"] == 1


def test_broken_manifests_are_refused(tmp_path):
    rows = balanced(2, 2)
    spec = write_set(tmp_path / "set", "csv", rows)
    manifest = open_imageset(spec).manifest()
    with pytest.raises(DataError, match="does not exist"):
        open_imageset(f"{spec}?manifest={tmp_path / 'nowhere.csv'}")
    for name, edit, message in [
        ("dup.csv", lambda m: pd.concat([m, m.iloc[:1]]), "appears more than once"),
        ("label.csv", lambda m: m.assign(label=["1", "maybe", "0", "0"]), "manifest labels"),
        ("subset.csv", lambda m: m.assign(subset=["train", "test", "test", "test"]), "manifest subsets"),
        ("columns.csv", lambda m: m.drop(columns="sha256"), "not a manifest"),
    ]:
        edit(manifest).to_csv(tmp_path / name, index=False)
        with pytest.raises(DataError, match=message):
            open_imageset(f"{spec}?manifest={tmp_path / name}")


# --------------------------------------------------------------------------------------------------
# Lazy pixels
# --------------------------------------------------------------------------------------------------
def test_batches_and_load_give_the_preprocessed_original_files(tmp_path, layout):
    rgba = np.dstack([pixels("alpha", (40, 56)), np.linspace(0, 255, 40 * 56).astype(np.uint8).reshape(56, 40)])
    rows = [
        Row("m0"),
        Row("m1", image=png("wide", (80, 36))),
        Row("m2", image=encode(Image.fromarray(rgba, "RGBA"))),
        Row("n0", member=False, image=encode(Image.fromarray(pixels("grey")[..., 0], "L"))),
        Row("n1", member=False),
    ]
    root = tmp_path / "set"
    imageset = opened(root, layout, rows)
    assert len(imageset) == 5
    expected = {r.id: preprocess(Image.open(root / r.rel), 24) for r in rows}
    seen = []
    for records, batch in imageset.batches(24, 2):
        assert len(records) <= 2 and batch.shape == (len(records), 3, 24, 24) and batch.dtype == torch.float32
        for image_id, tensor in zip(records["id"], batch):
            assert torch.equal(tensor, expected[image_id]), image_id
        seen += list(records["id"])
    assert seen == kept(imageset)
    assert [len(r) for r, _ in imageset.batches(24, 2)] == [2, 2, 1]
    assert torch.equal(imageset.load(24), torch.stack([expected[i] for i in kept(imageset)]))
    with pytest.raises(ValueError):
        next(imageset.batches(24, 0))
    # a file changed after opening: an error naming it, never its new pixels
    (root / "members/m1.png").write_bytes(png("swapped", (80, 36)))
    with pytest.raises(DataError, match="'members/m1'.*changed after the set was opened"):
        imageset.load(24)
    with pytest.raises(DataError, match="members/m1"):
        list(imageset.batches(24, 2))
    first = imageset.records.iloc[:1]
    assert torch.equal(imageset.load(24, first)[0], expected[first["id"].iloc[0]])
    # deleted after opening: also an error naming it
    (root / "nonmembers/n1.png").unlink()
    with pytest.raises(DataError, match="'nonmembers/n1'.*can no longer be read"):
        imageset.load(24, imageset.records[imageset.records["id"] == "nonmembers/n1"])


# --------------------------------------------------------------------------------------------------
# Specs, ids
# --------------------------------------------------------------------------------------------------
def test_spec_errors_are_clear(tmp_path):
    spec = write_set(tmp_path / "set", "csv", balanced(2, 2))
    assert parse_spec("imagefolder:sets/a?seed=1&min_side=8") == ("imagefolder", "sets/a", {"seed": 1, "min_side": 8})
    for bad, message in [
        ("", "not ''"),
        ("parquet:x", "unknown image set kind 'parquet'"),
        ("csv", "csv needs a path"),
        (f"{spec}?bogus=1", "unknown option 'bogus=1'"),
        (f"{spec}?seed", "unknown option 'seed'"),
        (f"{spec}?seed=abc", "option seed='abc'"),
        (f"{spec}?members=2", "unknown option 'members=2'"),
        ("emoji?members=many", "option members='many'"),
        (f"csv:{tmp_path / 'none.csv'}", "does not exist"),
        (f"imagefolder:{tmp_path / 'none'}", "does not exist"),
        (f"imagefolder:{tmp_path}", "neither metadata.csv"),
    ]:
        with pytest.raises(DataError, match=re.escape(message)):
            open_imageset(bad)
    (tmp_path / "cols.csv").write_text("id,file,caption\n")
    with pytest.raises(DataError, match=r"lacks columns \['path', 'label'\]"):
        open_imageset(f"csv:{tmp_path / 'cols.csv'}")
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "metadata.csv").write_text("file_name,caption,label\n")
    (tmp_path / "both" / "metadata.jsonl").write_text("")
    with pytest.raises(DataError, match="both metadata.csv and metadata.jsonl"):
        open_imageset(f"imagefolder:{tmp_path / 'both'}")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "a", "label": 1}\n\n[1, 2]\n')
    with pytest.raises(DataError, match="line 3 is not a JSON object"):
        open_imageset(f"imagefolder:{tmp_path / 'json'}")
    (tmp_path / "json" / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "caption": "a", "label": 1}\n{"file_name": \n'
    )
    with pytest.raises(DataError, match="line 2 is not JSON"):
        open_imageset(f"imagefolder:{tmp_path / 'json'}")


def test_relative_specs_resolve_against_base(tmp_path):
    write_set(tmp_path / "set", "imagefolder-csv", balanced(2, 2))
    imageset = open_imageset("imagefolder:set", base=tmp_path)
    assert len(imageset) == 4 and imageset.info["metadata"] == "metadata.csv"


def test_duplicate_ids_are_refused_naming_the_rows(tmp_path, layout):
    root = tmp_path / "set"
    if layout == "folders":
        write_set(root, layout, balanced(2, 1))
        (root / "members" / "m0.jpg").write_bytes(encode(Image.fromarray(pixels("jpeg")), "JPEG"))
        expected = ["members/m0.jpg", "members/m0.png"]
        spec = f"imagefolder:{root}"
    else:
        rows = [Row("m0"), Row("m1"), Row("n0", member=False)]
        spec = write_set(root, layout, rows)
        table = root / TABLE_FILE[layout]
        text = table.read_text()
        if layout == "csv":  # the third row takes the first row's id
            text = text.replace('"nonmembers/n0",', '"members/m0",', 1)
        else:  # the third row names the first row's file (its id, derived from the file name, repeats)
            text = text.replace("nonmembers/n0.png", "members/m0.png")
        table.write_text(text)
        expected = [where(layout, 0, rows[0]), where(layout, 2, rows[2])]
    with pytest.raises(DataError, match="duplicate ids") as caught:
        open_imageset(spec)
    for named in expected:
        assert named in str(caught.value)
    assert "appears more than once" in str(caught.value)


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
def test_rows_without_an_id_are_refused(tmp_path, layout):
    rows = [Row("m0"), Row("m1"), Row("n0", member=False)]
    spec = write_set(tmp_path / "set", layout, rows)
    table = tmp_path / "set" / TABLE_FILE[layout]
    if layout == "csv":
        table.write_text(table.read_text().replace('"members/m1",', '"",', 1))
    else:
        table.write_text(table.read_text().replace("members/m1.png", ""))
    with pytest.raises(DataError, match="without an id") as caught:
        open_imageset(spec)
    assert where(layout, 1, rows[1]) in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Folders the project writes into
# --------------------------------------------------------------------------------------------------
def test_claim_folder_refuses_a_users_folder(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "holiday.png").write_bytes(b"my photo")
    with pytest.raises(DataError, match="refusing to write into it"):
        claim_folder(user)
    assert (
        sorted(p.name for p in user.iterdir()) == ["holiday.png"] and (user / "holiday.png").read_bytes() == b"my photo"
    )
    assert claim_folder(tmp_path / "new" / "renders") == tmp_path / "new" / "renders"
    assert (tmp_path / "new" / "renders" / data.OWNED_MARKER).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_folder(empty)
    (empty / "render.png").write_bytes(b"ours")
    assert claim_folder(empty) == empty  # the project's own folder, reused


EMOJI = "emoji?members=2&nonmembers=2&public=2"


def test_emoji_never_overwrites_a_users_folder(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    mine = encode(Image.new("RGB", (72, 72), (1, 2, 3)))
    (user / "1F600.png").write_bytes(mine)
    with pytest.raises(DataError, match="refusing to write into it"):
        open_imageset(f"{EMOJI}&images={user}")
    assert sorted(p.name for p in user.iterdir()) == ["1F600.png"]
    assert (user / "1F600.png").read_bytes() == mine


def test_emoji_renders_into_a_new_folder(tmp_path):
    renders = tmp_path / "renders"
    imageset = open_imageset(f"{EMOJI}&images={renders}")
    reconciles(imageset)
    assert imageset.given == 4 and imageset.skipped.empty
    assert sorted(imageset.records["label"]) == [0, 0, 1, 1]
    assert (renders / data.OWNED_MARKER).exists()
    again = open_imageset(f"{EMOJI}&images={renders}")
    pd.testing.assert_frame_equal(again.records, imageset.records)
    assert again.load(16).shape == (4, 3, 16, 16)


def test_emoji_never_overwrites_a_users_file_named_like_a_render(tmp_path):
    split = data.read_manifest(ROOT / "data" / "emoji_split.csv")
    chosen = data.subsample_manifest(split, 2, 2, 2)["id"].iloc[0]
    user = tmp_path / "mine"
    user.mkdir()
    mine = encode(Image.new("RGB", (72, 72), (1, 2, 3)))
    (user / f"{chosen}.png").write_bytes(mine)
    try:
        open_imageset(f"{EMOJI}&images={user}")
    except DataError:
        pass
    assert (user / f"{chosen}.png").read_bytes() == mine


def test_an_unlabelled_set_opens_for_the_audit_with_its_labels_missing_never_guessed(tmp_path):
    """The set-level audit takes sets without membership labels: a csv without the column, an imagefolder
    whose metadata lacks it, a plain folder of images with .txt captions. A given label must still be valid."""
    folder = tmp_path / "set"
    folder.mkdir()
    for i, value in enumerate((40, 120, 200)):
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text("file_name,caption\n0.png,a\n1.png,b\n2.png,c\n")
    with pytest.raises(DataError, match="no label column"):
        open_imageset(f"imagefolder:{folder}")
    opened = open_imageset(f"imagefolder:{folder}", require_labels=False)
    assert len(opened) == 3 and opened.records["label"].isna().all() and "3 unlabelled" in opened.summary()
    assert opened.load(32).shape == (3, 3, 32, 32)
    (folder / "set.csv").write_text("id,path,caption\na,0.png,x\nb,1.png,y\n")
    assert open_imageset(f"csv:{folder / 'set.csv'}", require_labels=False).records["label"].isna().all()
    (folder / "bad.csv").write_text("id,path,caption,label\na,0.png,x,maybe\nb,1.png,y,\n")
    with pytest.raises(DataError, match="maybe"):
        open_imageset(f"csv:{folder / 'bad.csv'}", require_labels=False)
    (folder / "metadata.csv").unlink()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"caption {i}")
    plain = open_imageset(f"imagefolder:{folder}", require_labels=False)
    assert sorted(plain.records["id"]) == ["0", "1", "2"] and list(plain.records.sort_values("id")["caption"]) == [
        "caption 0",
        "caption 1",
        "caption 2",
    ]


@pytest.mark.parametrize("threads", [2, 3])
def test_several_reader_threads_give_the_same_batches_and_errors(tmp_path, layout, threads):
    """Beside a GPU several threads split each batch; the batches, their pixels (transform included) and
    the errors are those of one reader."""
    rows = good("m0", "m1", "m2", "m3") + [Row("wide", image=png("wide", (80, 36)))] + good("n0", "n1", member=False)
    root = tmp_path / "set"
    imageset = opened(root, layout, rows).map(lambda x, ids: torch.flip(x, dims=[-1]) * 0.5)
    one = [(list(r["id"]), p) for r, p in imageset.batches(24, 3)]
    many = [(list(r["id"]), p) for r, p in imageset.batches(24, 3, threads=threads)]
    assert [ids for ids, _ in many] == [ids for ids, _ in one] and [len(ids) for ids, _ in one] == [3, 3, 1]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(one, many))
    assert torch.equal(torch.cat([p for _, p in many]), imageset.load(24))
    with pytest.raises(ValueError, match="threads"):
        next(imageset.batches(24, 3, threads=0))
    (root / "members/m2.png").write_bytes(png("swapped"))
    with pytest.raises(DataError, match="'members/m2'.*changed after the set was opened"):
        list(imageset.batches(24, 3, threads=threads))


def test_read_threads_one_beside_a_cpu_model_more_beside_a_gpu(monkeypatch):
    monkeypatch.delenv("MIALIB_READ_THREADS", raising=False)
    assert read_threads("cpu") == read_threads(torch.device("cpu")) == read_threads(None) == 1
    assert 1 <= read_threads("cuda") <= 8 and read_threads("cuda:1") == read_threads("cuda")
    monkeypatch.setenv("MIALIB_READ_THREADS", "5")
    assert read_threads("cpu") == read_threads("cuda") == 5
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MIALIB_READ_THREADS", bad)
        with pytest.raises(ValueError, match="MIALIB_READ_THREADS"):
            read_threads("cpu")


# --------------------------------------------------------------------------------------------------
# 12. every file of a folder form is used or listed as skipped (images told by content, not suffix)
# --------------------------------------------------------------------------------------------------
def jpeg(seed) -> bytes:
    return encode(Image.fromarray(pixels(seed)), "JPEG", quality=90)


HEIC = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(range(256)) * 2  # an ISO-media header of brand heic, no pixels
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"

# what the odd files of a set are, and what their skip reasons must say (besides naming the file)
ODD_FILES = {  # name -> (bytes, used?, words of the reason)
    "photo.jfif": (jpeg("jfif"), True, ()),  # a JPEG with an unusual suffix
    "renamed.img": (png("renamed"), True, ()),  # a PNG renamed
    "iphone.heic": (HEIC, False, ("not a readable image", "HEIC", "convert it to PNG or JPEG")),
    "scan.pdf": (PDF, False, ("not a readable image", "PDF", "move it out")),
    "cut.jpg": (jpeg("cut")[:300], False, ("not a readable image", "truncated", "re-download or re-export")),
}


def hidden_and_system_files(folder: Path) -> None:
    """Files no form lists: they must be neither used nor skipped."""
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(32))
    (folder / "._photo.jfif").write_bytes(b"\0\5\26\7 AppleDouble")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "x.png").write_bytes(png("checkpoint"))


def check_accounted(
    imageset, expected_used: set[str], expected_skipped: dict[str, tuple], unnamed=()
) -> dict[str, str]:
    """Counts reconcile, exactly the expected sources are used / skipped, and each reason names its file
    (or, for a missing caption, the caption file; not for ``unnamed``) and holds the expected words.
    Returns source -> reason."""
    reconciles(imageset)
    by_source = dict(zip(imageset.skipped["source"], imageset.skipped["reason"]))
    assert set(imageset.records["source"]) == expected_used
    assert set(by_source) == set(expected_skipped), by_source
    for source, words in expected_skipped.items():
        named = Path(source).with_suffix(".txt").as_posix() if by_source[source].startswith("no caption") else source
        assert source in unnamed or named in by_source[source], (source, by_source[source])
        for word in words:
            assert word in by_source[source], (source, word, by_source[source])
    assert imageset.given == len(expected_used) + len(expected_skipped)
    assert f"of {imageset.given} given, {len(expected_skipped)} skipped" in imageset.summary()
    return by_source


def test_every_file_of_a_members_nonmembers_folder_is_used_or_skipped(tmp_path):
    root = tmp_path / "set"
    write_set(root, "folders", good("m1", "m2") + good("n1", "n2", member=False))
    for name, (payload, _, _) in ODD_FILES.items():
        (root / "members" / name).write_bytes(payload)
        (root / "members" / name).with_suffix(".txt").write_text(f"a caption of {name}")
    (root / "nonmembers" / "report.pdf").write_bytes(PDF)  # no caption either: what it is comes first
    (root / "nonmembers" / "notes.txt").write_text("a note, beside no image")
    (root / "README.md").write_text("my set")  # outside the class folders
    (root / "extra").mkdir()
    (root / "extra" / "loose.png").write_bytes(png("loose"))
    hidden_and_system_files(root / "members")
    hidden_and_system_files(root)
    imageset = open_imageset(f"imagefolder:{root}")
    used = {r.rel for r in good("m1", "m2") + good("n1", "n2", member=False)} | {
        f"members/{n}" for n, (_, ok, _) in ODD_FILES.items() if ok
    }
    skipped = {f"members/{n}": words for n, (_, ok, words) in ODD_FILES.items() if not ok}
    skipped["nonmembers/report.pdf"] = ("not a readable image", "PDF")
    skipped["nonmembers/notes.txt"] = ("caption file without an image",)
    skipped["README.md"] = ("not under members/ or nonmembers/", "move it")
    skipped["extra/loose.png"] = ("not under members/ or nonmembers/",)
    check_accounted(imageset, used, skipped)
    ids = dict(zip(imageset.records["source"], imageset.records["id"]))
    assert ids["members/photo.jfif"] == "members/photo" and ids["nonmembers/n1.png"] == "nonmembers/n1"
    photo = imageset.records.set_index("id").loc["members/photo"]
    assert photo["caption"] == "a caption of photo.jfif" and photo["label"] == 1
    assert photo["sha256"] == hashlib.sha256(ODD_FILES["photo.jfif"][0]).hexdigest()
    assert imageset.select(["members/photo"]).load(32).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("layout", ["imagefolder-csv", "imagefolder-jsonl"])
def test_every_file_of_a_metadata_imagefolder_is_used_or_skipped(tmp_path, layout):
    """Rows name the odd files (their suffixes do not matter); files no row names are strays, even with a
    subset column (which strays never need)."""
    root = tmp_path / "set"
    rows = [Row("m1", subset="test"), Row("n1", member=False, subset="calibration")]
    rows += [Row(Path(n).stem, path=f"members/{n}", subset="test", image=None) for n in ODD_FILES]
    write_set(root, layout, rows)
    for name, (payload, _, _) in ODD_FILES.items():
        (root / "members" / name).write_bytes(payload)
    (root / "members" / "forgotten.png").write_bytes(png("forgotten"))  # an image no row names
    (root / "members" / "m1.txt").write_text(
        "a caption of the folder form"
    )  # a caption beside an image: the other form's
    (root / "notes.pdf").write_bytes(PDF)
    hidden_and_system_files(root)
    imageset = open_imageset(f"imagefolder:{root}")
    table = TABLE_FILE[layout]
    used = {"members/m1.png", "nonmembers/n1.png"} | {f"members/{n}" for n, (_, ok, _) in ODD_FILES.items() if ok}
    skipped = {f"members/{n}": words for n, (_, ok, words) in ODD_FILES.items() if not ok}
    skipped["members/forgotten.png"] = (f"not listed in {table}", "add a row")
    skipped["notes.pdf"] = (f"not listed in {table}",)
    check_accounted(imageset, used, skipped)
    assert set(imageset.records["subset_rule"]) == {"given"}


def test_every_file_of_a_plain_unlabelled_folder_is_used_or_skipped(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    for i in range(2):
        (root / f"{i}.png").write_bytes(png(f"plain {i}"))
        (root / f"{i}.txt").write_text(f"caption {i}")
    for name, (payload, _, _) in ODD_FILES.items():
        (root / "odd" / name).parent.mkdir(exist_ok=True)
        (root / "odd" / name).write_bytes(payload)
        (root / "odd" / name).with_suffix(".txt").write_text(f"a caption of {name}")
    (root / "orphan.txt").write_text("no image of this name")
    (root / "set.csv").write_text("id,path,caption\na,0.png,x\n")  # not this form's file: a stray of its own
    hidden_and_system_files(root)
    imageset = open_imageset(f"imagefolder:{root}", require_labels=False)
    used = {"0.png", "1.png"} | {f"odd/{n}" for n, (_, ok, _) in ODD_FILES.items() if ok}
    skipped = {f"odd/{n}": words for n, (_, ok, words) in ODD_FILES.items() if not ok}
    skipped["orphan.txt"] = ("caption file without an image",)
    skipped["set.csv"] = ("not a readable image", "text")
    check_accounted(imageset, used, skipped)
    assert imageset.records["label"].isna().all()


def test_a_csv_set_reads_its_files_by_content_and_names_the_unreadable_ones(tmp_path):
    """A csv set lists only its rows (its folder may hold anything else); each row's file is used or skipped."""
    root = tmp_path / "set"
    root.mkdir()
    lines = ["id,path,caption,label", "m1,m1.png,one,1", "n1,n1.png,two,0"]
    (root / "m1.png").write_bytes(png("csv m1"))
    (root / "n1.png").write_bytes(png("csv n1"))
    for i, (name, (payload, _, _)) in enumerate(ODD_FILES.items()):
        (root / name).write_bytes(payload)
        lines.append(f"odd{i},{name},a caption,{i % 2}")
    (root / "set.csv").write_text("\n".join(lines) + "\n")
    (root / "unrelated.txt").write_text("not part of the set")
    imageset = open_imageset(f"csv:{root / 'set.csv'}")
    used = {"m1.png", "n1.png"} | {n for n, (_, ok, _) in ODD_FILES.items() if ok}
    check_accounted(imageset, used, {n: words for n, (_, ok, words) in ODD_FILES.items() if not ok})


def _img2dataset_sample(
    files: dict, key: str, image: tuple[str, bytes] | None, label: int, caption: bool = True
) -> None:
    """One sample's files (name -> bytes) as img2dataset writes them."""
    if image is not None:
        files[f"{key}{image[0]}"] = image[1]
    if caption:
        files[f"{key}.txt"] = f"caption {key}".encode()
    files[f"{key}.json"] = json.dumps({"key": key, "status": "success", "label": label}).encode()


@pytest.mark.parametrize("kind", ["files", "webdataset"])
def test_every_file_of_an_img2dataset_output_is_used_or_skipped(tmp_path, kind):
    import tarfile

    out = tmp_path / "out"
    out.mkdir()
    files: dict[str, bytes] = {}
    _img2dataset_sample(files, "000000000", (".jpg", jpeg("i2d 0")), 1)
    _img2dataset_sample(files, "000000001", (".jfif", jpeg("i2d 1")), 0)  # an unusual suffix: the content decides
    _img2dataset_sample(files, "000000002", (".heic", HEIC), 1)
    _img2dataset_sample(files, "000000003", (".png", png("i2d 3")), 0)
    files["000000003.xmp"] = b"<x:xmpmeta/>"  # an extra file beside a sample's image
    _img2dataset_sample(files, "000000004", (".img", png("i2d 4")), 1, caption=False)  # no caption
    files["notes.pdf"] = PDF  # belongs to no sample
    files[".DS_Store"] = b"\0\0\0\1Bud1"
    files["000000005.jpg"] = jpeg("left over")  # a sample the shard parquet records as failed
    if kind == "files":
        (out / "00000").mkdir()
        for name, payload in files.items():
            (out / "00000" / name).write_bytes(payload)
        prefix = "00000/"
    else:
        with tarfile.open(out / "00000.tar", "w") as archive:
            for name, payload in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
        prefix = "00000.tar:"
    keys = [f"00000000{i}" for i in range(6)]
    pd.DataFrame(
        {
            "key": keys,
            "status": ["success"] * 5 + ["failed_to_download"],
            "error_message": [None] * 5 + ["HTTP Error 404"],
            "label": ["1", "0", "1", "0", "1", "0"],
        }
    ).to_parquet(out / "00000.parquet", index=False)
    (out / "00000_stats.json").write_text("{}")
    (out / "urls.csv").write_text("url\nhttp://example.invalid/a.jpg\n")  # not img2dataset's: a stray
    imageset = open_imageset(f"img2dataset:{out}?label=label")
    used = {f"{prefix}000000000.jpg", f"{prefix}000000001.jfif", f"{prefix}000000003.png"}
    skipped = {
        f"{prefix}000000002.heic": ("not a readable image", "HEIC", "convert it to PNG or JPEG"),
        f"{prefix}000000004.img": ("no caption",),
        f"{prefix}000000003.xmp": ("extra file beside a sample", "of sample 000000003"),
        f"{prefix}notes.pdf": ("not an img2dataset sample",),
        f"{prefix}000000005.jpg": ("records sample 000000005 as failed_to_download",),
        "urls.csv": ("not part of an img2dataset output",),
        "00000/000000005": ("download failed: HTTP Error 404",),  # the failed sample itself, as the parquet lists it
    }
    check_accounted(imageset, used, skipped, unnamed={"00000/000000005"})
