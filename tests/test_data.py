"""mialib.data: preprocessing against manual PIL / numpy computations, manifest checks, loading with skips."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mialib import data
from mialib.data import DataError

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "data" / "emoji_split.csv"


def _to_tensor(array_uint8: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (3, h, w) float in [-1, 1], written out by hand."""
    return np.transpose(array_uint8.astype(np.float64) / 127.5 - 1.0, (2, 0, 1))


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width, height", [(61, 40), (40, 61), (60, 40)])
def test_preprocess_centre_crops_a_non_square_image(width, height):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2  # 61 px -> offset 10, the extra pixel at the end
    out = data.preprocess(Image.fromarray(array), side)  # same size: no resampling at all
    assert out.dtype == torch.float32 and out.shape == (3, side, side)
    expected = _to_tensor(array[top : top + side, left : left + side])
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)


def test_preprocess_drops_the_side_bands():
    # red | green | blue bands, 10 + 40 + 10 px wide: the 40 x 40 centre is all green
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    array[:, :10, 0] = 255
    array[:, 10:50, 1] = 255
    array[:, 50:, 2] = 255
    out = data.preprocess(Image.fromarray(array), 16)
    np.testing.assert_array_equal(out[0].numpy(), -1.0)
    np.testing.assert_array_equal(out[1].numpy(), 1.0)
    np.testing.assert_array_equal(out[2].numpy(), -1.0)


def test_preprocess_bicubic_resize_matches_manual_pil():
    rng = np.random.default_rng(1)
    smooth = np.cumsum(rng.integers(-8, 9, (50, 70, 3)), axis=1)
    array = np.clip(smooth - smooth.min() + 20, 0, 255).astype(np.uint8)
    out = data.preprocess(Image.fromarray(array), 24).numpy()
    crop = array[:, 10:60]  # 50 x 50 centre of a 70 px wide image
    expected = _to_tensor(np.asarray(Image.fromarray(crop).resize((24, 24), Image.Resampling.BICUBIC)))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    other = _to_tensor(np.asarray(Image.fromarray(crop).resize((24, 24), Image.Resampling.BILINEAR)))
    assert np.abs(out - other).max() > 0.01  # the comparison can tell the filter apart
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_preprocess_range_is_minus_one_to_one():
    out_black = data.preprocess(Image.new("RGB", (8, 8), (0, 0, 0)), 8)
    out_white = data.preprocess(Image.new("RGB", (8, 8), (255, 255, 255)), 8)
    assert torch.all(out_black == -1.0) and torch.all(out_white == 1.0)
    grey = data.preprocess(Image.new("L", (8, 8), 51), 8)  # greyscale becomes three equal channels
    np.testing.assert_allclose(grey.numpy(), 51 / 127.5 - 1, atol=1e-7)


def test_preprocess_composites_rgba_on_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # transparent black
    rgba[:4, :, :] = (255, 0, 0, 255)  # opaque red top half
    rgba[4:6, :, :] = (0, 0, 255, 128)  # half-transparent blue
    out = data.preprocess(Image.fromarray(rgba, "RGBA"), 8).numpy()
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    composite = rgba[..., :3] * alpha + 255 * (1 - alpha)  # "over" a white background, by hand
    np.testing.assert_allclose(out, _to_tensor(composite), rtol=0, atol=1.01 / 127.5)  # PIL rounds to uint8
    np.testing.assert_array_equal(out[:, 6:, :], 1.0)  # fully transparent -> white, not black
    np.testing.assert_array_equal(out[:, :4, :], np.array([1.0, -1.0, -1.0])[:, None, None] * np.ones((1, 4, 8)))
    # "LA" and palette images with a transparent index are composited too
    la = Image.fromarray(np.stack([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)], -1), "LA")
    assert torch.all(data.preprocess(la, 8) == 1.0)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0
    assert torch.all(data.preprocess(palette, 8) == 1.0)


def test_preprocess_composites_colour_key_transparency_on_white():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 0)).save(buffer, "PNG", transparency=(0, 0, 0))
    buffer.seek(0)
    image = Image.open(buffer)
    assert image.mode == "RGB" and image.info["transparency"] == (0, 0, 0)
    assert torch.all(data.preprocess(image, 8) == 1.0)


# --------------------------------------------------------------------------------------------------
# Manifest checks
# --------------------------------------------------------------------------------------------------
def _manifest() -> pd.DataFrame:
    return pd.DataFrame(
        [
            ("A1", "red apple", "A", "public", "", "h1"),
            ("B1", "banana", "B", "public", "", "h2"),
            ("C1", "grinning face", "C", "member", "calibration", "h3"),
            ("D1", "man farmer", "D", "member", "test", "h4"),
            ("E1", "tongue", "E", "nonmember", "calibration", "h5"),
            ("F1", "leo", "F", "nonmember", "test", "h6"),
        ],
        columns=data.MANIFEST_COLUMNS,
    )


def test_validate_manifest_accepts_a_clean_manifest():
    data.validate_manifest(_manifest())
    same_split_group = _manifest()
    same_split_group.loc[1, "group"] = "A"  # a group repeated inside one split is no leak
    data.validate_manifest(same_split_group)


def _mutate(column, row, value):
    manifest = _manifest()
    manifest.loc[row, column] = value
    return manifest


@pytest.mark.parametrize(
    "manifest, message",
    [
        (_mutate("id", 4, "C1"), "duplicate"),  # duplicate id
        (_mutate("caption", 2, "   "), "caption"),  # blank caption
        (_mutate("caption", 3, ""), "caption"),  # empty caption
        (_mutate("group", 4, "C"), "group"),  # member and non-member share a variant group
        (_mutate("group", 0, "D"), "group"),  # public and member share a group
        (_mutate("pixel_sha256", 5, "h3"), "pixel_sha256"),  # member and non-member share a pixel hash
        (_mutate("split", 0, "train"), "split"),  # unknown split
        (_mutate("subset", 2, ""), "subset"),  # member without calibration / test
        (_manifest().drop(columns="pixel_sha256"), "lacks"),  # missing column
    ],
)
def test_validate_manifest_rejects(manifest, message):
    with pytest.raises(DataError, match=message):
        data.validate_manifest(manifest)
    assert issubclass(DataError, ValueError)


def test_committed_manifest_is_valid_and_disjoint():
    manifest = data.read_manifest(MANIFEST)  # validates
    raw = pd.read_csv(MANIFEST, dtype=str, keep_default_na=False)
    assert list(raw.columns) == data.MANIFEST_COLUMNS
    counts = raw.groupby(["split", "subset"]).size().to_dict()
    # The committed manifest is exactly the default preset's split.
    import yaml

    preset = yaml.safe_load((MANIFEST.parent.parent / "configs" / "default.yaml").read_text())
    assert counts == {
        ("public", ""): preset["N_PUBLIC"],
        ("member", "calibration"): preset["N_MEMBERS"] - preset["N_MEMBERS"] // 2,
        ("member", "test"): preset["N_MEMBERS"] // 2,
        ("nonmember", "calibration"): preset["N_NONMEMBERS"] - preset["N_NONMEMBERS"] // 2,
        ("nonmember", "test"): preset["N_NONMEMBERS"] // 2,
    }
    assert (preset["N_PUBLIC"], preset["N_MEMBERS"], preset["N_NONMEMBERS"]) == (600, 128, 256)
    assert raw["id"].is_unique
    for key in ("id", "group", "pixel_sha256"):
        values = {split: set(raw.loc[raw["split"] == split, key]) for split in data.SPLITS}
        assert not values["member"] & values["nonmember"], key
        assert not values["public"] & (values["member"] | values["nonmember"]), key
    assert raw["pixel_sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert len(manifest) == 600 + 128 + 256


# --------------------------------------------------------------------------------------------------
# Rendering the embedded images
# --------------------------------------------------------------------------------------------------
def _reference_pixel_hash(path) -> str:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()


def _five_rows() -> pd.DataFrame:
    manifest = data.read_manifest(MANIFEST)
    rows = [
        manifest[manifest["split"] == "public"].head(2),
        manifest[manifest["split"] == "member"].head(2),
        manifest[manifest["split"] == "nonmember"].head(1),
    ]
    return pd.concat(rows).reset_index(drop=True)


def test_materialise_images_reproduces_the_manifest_hashes(tmp_path):
    rows = _five_rows()
    images = data.materialise_images(rows, tmp_path / "images")
    assert list(images["id"]) == list(rows["id"])
    assert list(images["label"]) == [0, 0, 1, 1, 0]
    for path, expected in zip(images["path"], rows["pixel_sha256"]):
        assert Path(path).parent == tmp_path / "images"
        assert _reference_pixel_hash(path) == expected
    # a corrupt cached render is replaced, not used
    broken = Path(images["path"][0])
    broken.write_bytes(b"not a png")
    again = data.materialise_images(rows, tmp_path / "images")
    assert _reference_pixel_hash(again["path"][0]) == rows["pixel_sha256"][0]


def test_materialise_images_rejects_an_altered_hash(tmp_path):
    rows = _five_rows()
    rows.loc[3, "pixel_sha256"] = "0" * 64
    with pytest.raises(DataError, match=rows["id"][3]):
        data.materialise_images(rows, tmp_path / "images")


def test_subsample_manifest_takes_prefixes():
    manifest = data.read_manifest(MANIFEST)
    small = data.subsample_manifest(manifest, 3, 5, 4)
    expected = pd.concat(
        [
            manifest[manifest["split"] == "public"].head(3),
            manifest[(manifest["split"] == "member") & (manifest["subset"] == "calibration")].head(3),
            manifest[(manifest["split"] == "member") & (manifest["subset"] == "test")].head(2),
            manifest[(manifest["split"] == "nonmember") & (manifest["subset"] == "calibration")].head(2),
            manifest[(manifest["split"] == "nonmember") & (manifest["subset"] == "test")].head(2),
        ]
    )
    assert list(small["id"]) == list(expected["id"])
    assert len(small) == 3 + 5 + 4
    data.validate_manifest(small)


def test_subsample_manifest_raises_when_too_many_members_are_asked():
    manifest = data.read_manifest(MANIFEST)
    with pytest.raises(DataError):
        data.subsample_manifest(manifest, 10, 130, 4)  # 65 member / calibration images, 64 exist
    with pytest.raises(DataError):
        data.subsample_manifest(manifest, 10, 4, 260)  # 130 non-member / calibration images, 128 exist


def test_subsample_manifest_raises_when_too_many_public_images_are_asked():
    manifest = data.read_manifest(MANIFEST)
    with pytest.raises(DataError):
        data.subsample_manifest(manifest, 601, 4, 4)


@pytest.mark.parametrize(
    "emoji_id, group",
    [
        ("1F44D", "1F44D"),  # thumbs up
        ("1F44D-1F3FB", "1F44D"),  # ... light skin tone
        ("1F44D-1F3FF", "1F44D"),  # ... dark skin tone
        ("1F468-200D-1F33E", "1F9D1-1F33E"),  # man farmer
        ("1F468-1F3FD-200D-1F33E", "1F9D1-1F33E"),  # man farmer, medium skin tone
        ("1F469-1F3FB-200D-1F33E", "1F9D1-1F33E"),  # woman farmer, light skin tone
        ("1F9D1-200D-1F33E", "1F9D1-1F33E"),  # farmer
        ("1F3C3-200D-2640-FE0F", "1F3C3"),  # woman running
        ("2764-FE0F", "2764"),  # red heart with variation selector
        ("2640", "2640"),  # the female sign alone keeps its own id
        ("1F34E", "1F34E"),  # red apple
    ],
)
def test_variant_group(emoji_id, group):
    assert data.variant_group(emoji_id) == group


def test_caption_from_name():
    assert data.caption_from_name(":man_farmer:") == "man farmer"


# --------------------------------------------------------------------------------------------------
# Loading: user image sets are tested in test_imagesets.py; the project's own renders load strictly
# --------------------------------------------------------------------------------------------------
def test_load_tensors_refuses_an_unreadable_render(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert data.load_tensors([tmp_path / "ok.png"], 8).shape == (1, 3, 8, 8)
    with pytest.raises(DataError, match="bad.png"):
        data.load_tensors([tmp_path / "ok.png", tmp_path / "bad.png"], 8)
