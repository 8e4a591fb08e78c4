"""The img2dataset and LAION-mi adapters, on fixtures built here: hand-made img2dataset outputs (files
layout and webdataset shards) and a real img2dataset download from a local HTTP server (no internet)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mialib.data import DataError, preprocess
from mialib.imagesets import laion_mi, open_imageset

SIZE = 32


def image_bytes(seed: int, size=(48, 40), fmt="PNG", mode="RGB") -> bytes:
    """A noise image (distinct for each seed) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    channels = len(mode)
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels if channels > 1 else pixels[..., 0], mode).save(
        buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {})
    )
    return buffer.getvalue()


def manual_pixels(payload: bytes, size: int) -> torch.Tensor:
    """Centre crop, bicubic resize and [-1, 1] scaling written out by hand (the reference for load())."""
    image = Image.open(io.BytesIO(payload)).convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------------
# Hand-built img2dataset outputs
# --------------------------------------------------------------------------------------------------
# key: (image bytes or None when the download failed, caption bytes, label, uid, error)
SAMPLES = {
    "000000000": (image_bytes(0, fmt="JPEG"), b"a noisy photo", 1, "img-a", None),
    "000000001": (image_bytes(1, (40, 56)), "un caf\u00e9 bruyant".encode(), "nonmember", "img-b", None),
    "000000002": (None, b"never arrived", 1, "img-c", "HTTP Error 404: Not Found"),
    "000000003": (image_bytes(3), b"caf\xe9 in latin-1", 0, "img-d", None),
    "000000004": (image_bytes(4, (64, 33)), b"a wide one", "member", "img-e", None),
}


def sample_meta(key: str, as_key: str | None = None) -> dict:
    """img2dataset's metadata of one sample (``as_key``: the key it has in this output)."""
    payload, caption, label, uid, error = SAMPLES[key]
    return {
        "uid": uid,
        "label": label,
        "caption": caption.decode("latin-1"),
        "url": f"http://example.invalid/{uid}",
        "key": as_key or key,
        "status": "success" if payload else "failed_to_download",
        "error_message": error,
    }


def write_shard_parquet(path: Path, keys, rekey=None) -> None:
    frame = pd.DataFrame([sample_meta(k, (rekey or {}).get(k)) for k in keys])
    frame["label"] = frame["label"].astype(str)  # one column type, as a parquet column must have
    frame.to_parquet(path, index=False)


def extension(payload: bytes) -> str:
    return ".jpg" if payload[:2] == b"\xff\xd8" else ".png"


def files_output(folder: Path, keys=tuple(SAMPLES), parquet=True, rekey=None) -> Path:
    """An img2dataset ``files`` output: 00000/<key>.<ext> + .txt + .json, 00000.parquet, 00000_stats.json.
    ``rekey`` gives samples another key in this output."""
    shard = folder / "00000"
    shard.mkdir(parents=True)
    for key in keys:
        payload, caption, *_ = SAMPLES[key]
        if payload is None:
            continue
        name = (rekey or {}).get(key, key)
        (shard / f"{name}{extension(payload)}").write_bytes(payload)
        (shard / f"{name}.txt").write_bytes(caption)
        (shard / f"{name}.json").write_text(json.dumps(sample_meta(key, name), indent=4))
    if parquet:
        write_shard_parquet(folder / "00000.parquet", keys, rekey)
    (folder / "00000_stats.json").write_text(json.dumps({"count": len(keys)}))
    return folder


def tar_output(folder: Path) -> Path:
    """An img2dataset ``webdataset`` output: 00000.tar with <key>.<ext> / .txt / .json members."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "00000.tar", "w") as archive:
        for key, (payload, caption, *_) in SAMPLES.items():
            if payload is None:
                continue
            for name, data in (
                (f"{key}{extension(payload)}", payload),
                (f"{key}.txt", caption),
                (f"{key}.json", json.dumps(sample_meta(key)).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    write_shard_parquet(folder / "00000.parquet", SAMPLES)
    (folder / "00000_stats.json").write_text("{}")
    return folder


def check_img2dataset_set(imageset, id_of=lambda key: key) -> None:
    """What both layouts must give for SAMPLES."""
    records = imageset.records.set_index("id")
    skipped = imageset.skipped.set_index("id")
    assert imageset.given == len(SAMPLES) == len(records) + len(skipped)
    assert sorted(records.index) == sorted(id_of(k) for k in ("000000000", "000000001", "000000004"))
    assert skipped.loc[id_of("000000002"), "reason"] == "download failed: HTTP Error 404: Not Found"
    assert skipped.loc[id_of("000000003"), "reason"].startswith("caption is not valid UTF-8")
    assert records.loc[id_of("000000000"), "caption"] == "a noisy photo"
    assert records.loc[id_of("000000001"), "caption"] == "un caf\u00e9 bruyant"
    assert records.loc[id_of("000000000"), "label"] == 1
    assert records.loc[id_of("000000001"), "label"] == 0
    assert records.loc[id_of("000000004"), "label"] == 1
    for key in ("000000000", "000000001", "000000004"):
        payload = SAMPLES[key][0]
        assert records.loc[id_of(key), "sha256"] == hashlib.sha256(payload).hexdigest()
    loaded = imageset.load(SIZE)
    for position, image_id in enumerate(imageset.records["id"]):
        payload = SAMPLES[next(k for k in SAMPLES if id_of(k) == image_id)][0]
        expected = preprocess(Image.open(io.BytesIO(payload)), SIZE)
        assert torch.equal(loaded[position], expected)
        assert torch.allclose(loaded[position], manual_pixels(payload, SIZE), atol=1e-6)


def test_img2dataset_files_layout(tmp_path):
    output = files_output(tmp_path / "out")
    imageset = open_imageset("img2dataset:out?label=label", base=tmp_path)
    check_img2dataset_set(imageset)
    assert imageset.records.set_index("id").loc["000000001", "source"] == "00000/000000001.png"
    # the id taken from another key of each sample's .json (and of the parquet row of the failed one)
    by_uid = open_imageset(f"img2dataset:{output}?label=label&id=uid")
    check_img2dataset_set(by_uid, id_of=lambda key: SAMPLES[key][3])


def test_img2dataset_tar_layout(tmp_path):
    tar_output(tmp_path / "shards")
    imageset = open_imageset(f"img2dataset:{tmp_path / 'shards'}?label=label")
    check_img2dataset_set(imageset)
    assert all(location.startswith("tar://") for location in imageset.records["location"])
    assert imageset.info["layout"] == {"output": "webdataset"}
    batches = list(imageset.batches(SIZE, 2))
    assert [len(rows) for rows, _ in batches] == [2, 1]


def test_img2dataset_one_output_per_class(tmp_path):
    # both outputs hold key 000000000; the members one has no shard parquet (what is on disk is listed)
    files_output(tmp_path / "m", keys=("000000000", "000000004"), parquet=False)
    files_output(tmp_path / "n", keys=("000000001", "000000002"), rekey={"000000001": "000000000"})

    imageset = open_imageset("img2dataset:members=m,nonmembers=n", base=tmp_path)
    records = imageset.records.set_index("id")
    assert sorted(records.index) == ["members/000000000", "members/000000004", "nonmembers/000000000"]
    assert list(records.loc[["members/000000000", "members/000000004", "nonmembers/000000000"], "label"]) == [1, 1, 0]
    assert records.loc["nonmembers/000000000", "caption"] == "un caf\u00e9 bruyant"
    assert records.loc["nonmembers/000000000", "source"] == "nonmembers/00000/000000000.png"
    assert list(imageset.skipped["id"]) == ["nonmembers/000000002"]
    assert imageset.skipped["reason"].iloc[0] == "download failed: HTTP Error 404: Not Found"
    assert imageset.given == 4


def test_img2dataset_refusals(tmp_path):
    files_output(tmp_path / "out")
    with pytest.raises(DataError, match=r"needs the label"):
        open_imageset(f"img2dataset:{tmp_path / 'out'}")
    with pytest.raises(DataError, match=r"00000/000000000.json: no key 'group'"):
        open_imageset(f"img2dataset:{tmp_path / 'out'}?label=group")
    with pytest.raises(DataError, match="holds no img2dataset shards"):
        open_imageset(f"img2dataset:{tmp_path}?label=label")
    with pytest.raises(DataError, match="not a class name"):
        open_imageset(f"img2dataset:people={tmp_path / 'out'}")


# --------------------------------------------------------------------------------------------------
# LAION-mi: lists, duplicate URLs, and a real img2dataset download from 127.0.0.1
# --------------------------------------------------------------------------------------------------
def write_lists(folder: Path, base: str) -> None:
    data = folder / "data"
    data.mkdir(parents=True)
    members = [
        (f"{base}/m1.png", "member one"),
        (f"{base}/m2.jpg", "member two"),
        (f"{base}/gone-a.png", "a dead link"),
        (f"{base}/page.html", "a web page, not an image"),
        (f"{base}/m1.png", "member one again"),
    ]
    nonmembers = [
        (f"{base}/n1.png", "non-member one"),
        (f"{base}/n2.jpg", "non-member two"),
        (f"{base}/gone-b.jpg", "another dead link"),
        (f"{base}/n3.png", "a transparent non-member"),
    ]
    for name, rows in (("members-00000-of-00001.parquet", members), ("nonmembers-00000-of-00001.parquet", nonmembers)):
        pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(data / name, index=False)


@pytest.fixture
def server():
    """A local HTTP server (ephemeral port) serving fixture images, an HTML page, and 404 for the rest."""
    served = {
        "/m1.png": (image_bytes(10), "image/png"),
        "/m2.jpg": (image_bytes(11, (64, 48), "JPEG"), "image/jpeg"),
        "/n1.png": (image_bytes(12, (40, 40)), "image/png"),
        "/n2.jpg": (image_bytes(13, (50, 70), "JPEG"), "image/jpeg"),
        "/n3.png": (image_bytes(14, (36, 48), mode="RGBA"), "image/png"),
        "/page.html": (b"<html><body>not an image</body></html>", "text/html"),
    }
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            requests.append(self.path)
            if self.path not in served:
                self.send_error(404, "Not Found")
                return
            body, kind = served[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, requests
    httpd.shutdown()
    httpd.server_close()


def test_laion_mi_listing_ids_and_duplicates(tmp_path):
    write_lists(tmp_path, "http://127.0.0.1:9")
    # a URL on both sides of the split, in a nested folder; the download folder's parquet files are ignored
    pd.DataFrame([("http://127.0.0.1:9/n1.png", "both")], columns=["url", "caption"]).to_parquet(
        tmp_path / "data" / "members-extra.parquet"
    )
    (tmp_path / "download").mkdir()
    pd.DataFrame([("http://x/y", "z")], columns=["url", "caption"]).to_parquet(
        tmp_path / "download" / "members-stray.parquet"
    )
    rows = laion_mi.listing(tmp_path).set_index("id")
    assert len(rows) == 10
    first = laion_mi.url_id("http://127.0.0.1:9/m1.png", 1)
    assert first == "m-" + hashlib.sha256(b"http://127.0.0.1:9/m1.png").hexdigest()[:16]
    assert rows.loc[f"{first}-dup2", "skip"] == f"duplicate URL (same as {first})"
    assert pd.isna(rows.loc[first, "skip"])
    both_m, both_n = laion_mi.url_id("http://127.0.0.1:9/n1.png", 1), laion_mi.url_id("http://127.0.0.1:9/n1.png", 0)
    assert rows.loc[both_m, "skip"].startswith("same URL listed as member and as non-member")
    assert rows.loc[both_n, "skip"].startswith("same URL listed as member and as non-member")
    assert (rows["label"] == 1).sum() == 6
    imageset = open_imageset(f"laion-mi:{tmp_path}")
    assert len(imageset) == 0 and imageset.given == 10
    reasons = imageset.skipped.set_index("id")["reason"]
    assert (
        reasons[laion_mi.url_id("http://127.0.0.1:9/m2.jpg", 1)]
        == f"not downloaded yet: run `mialib download --data laion-mi:{tmp_path}`"
    )

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no LAION-mi parquet files"):
        open_imageset(f"laion-mi:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="has no non-members parquet file"):
        open_imageset(f"laion-mi:{tmp_path / 'download'}")


def test_laion_mi_download_refuses_foreign_folder_and_missing_tool(tmp_path, monkeypatch):
    write_lists(tmp_path, "http://127.0.0.1:9")
    (tmp_path / "download").mkdir()
    (tmp_path / "download" / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(DataError, match="refusing to write into it"):
        laion_mi.download(tmp_path, log=None)
    monkeypatch.setenv("MIALIB_IMG2DATASET", str(tmp_path / "no-such-tool"))
    with pytest.raises(laion_mi.DownloadError, match="not an executable"):
        laion_mi.img2dataset_command()


def test_laion_mi_download_end_to_end(tmp_path, server):
    try:
        laion_mi.img2dataset_command()
    except laion_mi.DownloadError as error:
        pytest.skip(str(error))
    base, served, requests = server
    write_lists(tmp_path, base)
    ids = {
        name: laion_mi.url_id(f"{base}/{name}", 1 if name.startswith(("m", "gone-a", "page")) else 0)
        for name in ("m1.png", "m2.jpg", "gone-a.png", "page.html", "n1.png", "n2.jpg", "gone-b.jpg", "n3.png")
    }
    arrived = {
        "m1.png": ("member one", 1),
        "m2.jpg": ("member two", 1),
        "n1.png": ("non-member one", 0),
        "n2.jpg": ("non-member two", 0),
        "n3.png": ("a transparent non-member", 0),
    }

    # a trial run: at most 4 rows (2 members, 2 non-members); the rest is listed as not downloaded yet
    lines = []
    trial = laion_mi.download(tmp_path, threads=4, timeout=5, limit=4, log=lines.append)
    assert trial["given"] == 9 and trial["requested"] == 4 and trial["arrived"] == 4
    assert any("success" in line for line in lines)  # img2dataset's progress reached the log
    assert trial["failed"]["not downloaded yet: run `mialib download --data laion-mi:" + str(tmp_path) + "`"] == 4

    # the rest (resumes: the 4 rows already attempted are not asked for again)
    before = len(requests)
    summary = laion_mi.download(tmp_path, threads=4, timeout=5, log=None)
    assert summary["requested"] == 4  # gone-a, page.html, gone-b, n3 (the duplicate URL is never requested)
    assert sorted(requests[before:]) == ["/gone-a.png", "/gone-b.jpg", "/n3.png", "/page.html"]
    assert summary["given"] == 9 and summary["arrived"] == 5 and summary["skipped"] == 4
    failed = dict(summary["failed"])
    assert failed.pop("download failed: HTTP Error 404") == 2 and failed.pop("duplicate URL") == 1
    assert list(failed.values()) == [1] and next(iter(failed)).startswith("not a readable image")

    manifest = pd.read_csv(summary["manifest"], dtype=str, keep_default_na=False).set_index("id")
    assert sorted(manifest.index) == sorted(ids[name] for name in arrived)
    for name, (caption, label) in arrived.items():
        row = manifest.loc[ids[name]]
        assert row["sha256"] == hashlib.sha256(served[f"/{name}"][0]).hexdigest()  # stored exactly as served
        assert (row["caption"], int(row["label"]), row["source"]) == (caption, label, f"{base}/{name}")
    assert set(manifest["subset"]) == {"calibration", "test"}

    skipped = pd.read_csv(summary["skipped_table"], dtype=str).set_index("id")["reason"]
    assert skipped[ids["gone-a.png"]] == "download failed: HTTP Error 404: Not Found"
    assert skipped[ids["gone-b.jpg"]] == "download failed: HTTP Error 404: Not Found"
    assert skipped[ids["page.html"]].startswith("not a readable image")
    assert skipped[ids["m1.png"] + "-dup2"] == f"duplicate URL (same as {ids['m1.png']})"
    assert len(manifest) + len(skipped) == summary["given"]

    # the frozen manifest verifies every image that arrived
    verified = open_imageset(f"laion-mi:{tmp_path}?manifest={summary['manifest']}")
    assert verified.info["manifest"]["counts"]["verified"] == 5
    assert verified.info["manifest"]["missing"] == [] and verified.info["manifest"]["changed"] == []
    assert len(verified) + len(verified.skipped) == verified.given == 9
    pixels = verified.load(SIZE)
    assert pixels.shape == (5, 3, SIZE, SIZE) and pixels.min() >= -1 and pixels.max() <= 1

    # a second call: nothing requested, the same manifest
    text = Path(summary["manifest"]).read_text()
    before = len(requests)
    again = laion_mi.download(tmp_path, threads=4, timeout=5, log=None)
    assert again["requested"] == 0 and len(requests) == before
    assert {k: v for k, v in again.items() if k != "requested"} == {
        k: v for k, v in summary.items() if k != "requested"
    }
    assert Path(again["manifest"]).read_text() == text
