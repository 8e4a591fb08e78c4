"""Faults a run meets outside the happy path: a user's files inside an earlier run's folder, two runs
mixing in one --out, damaged cache files, a full disk, two runs at once, and option values that used to
fail with a traceback (or after something was written)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import helpers
from mialib import cli, memo, runs
from mialib.attacks import REGISTRY
from mialib.data import OWNED_MARKER, DataError, claim_folder
from mialib.settings import Settings


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_faults") / "model"
    helpers.save_tiny_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def target(model):
    from mialib.target import load_target

    return load_target(model)


@pytest.fixture(scope="module")
def user_set(tmp_path_factory) -> Path:
    return helpers.write_imagefolder(tmp_path_factory.mktemp("faults_set") / "set", n=8)


@pytest.fixture(scope="module")
def other_set(tmp_path_factory) -> Path:
    return helpers.write_imagefolder(tmp_path_factory.mktemp("faults_other") / "set", n=8, seed=1)


@pytest.fixture(scope="module")
def imageset(user_set):
    from mialib import imagesets

    return imagesets.open_imageset(f"imagefolder:{user_set}")


def _score(model, data, out, *extra, attacks=("loss",)):
    argv = [
        "score",
        "--model",
        str(model),
        "--data",
        f"imagefolder:{data}",
        "--out",
        str(out),
        "--quiet",
        "--bootstrap",
        "10",
    ]
    for attack in attacks:
        argv += ["--attack", attack]
    return [*argv, *extra]


def _refused(argv, capsys) -> str:
    """Run the command line, expect exit 2 with one error line and no traceback; return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------------------------------
# 1 · a marker above a folder does not vouch for a user's files in it
# --------------------------------------------------------------------------------------------------
def test_a_users_file_inside_an_earlier_runs_folder_is_never_written_over(tmp_path):
    run = claim_folder(tmp_path / "run")  # as `mialib score --out run` did
    mine = run / "my-notes"
    mine.mkdir()
    (mine / "scores.parquet").write_text("my own table")
    with pytest.raises(DataError, match="refusing to write into it"):
        claim_folder(mine)  # as `mialib score --out run/my-notes` does
    assert (mine / "scores.parquet").read_text() == "my own table" and not (mine / OWNED_MARKER).exists()
    # mialib's own subfolder holds its own marker; an empty one (only empty folders) is free to claim
    assert claim_folder(claim_folder(run / "cache")) == run / "cache"
    (run / "empty" / "deeper").mkdir(parents=True)
    assert claim_folder(run / "empty") == run / "empty"
    with pytest.raises(DataError, match="is a file"):
        claim_folder(mine / "scores.parquet")


# --------------------------------------------------------------------------------------------------
# 2 · one run per folder; tables that belong together
# --------------------------------------------------------------------------------------------------
def test_another_run_into_an_existing_out_is_refused_and_report_checks_the_tables(
    tmp_path, model, user_set, other_set, capsys, monkeypatch
):
    out = tmp_path / "run"
    cli.main(_score(model, user_set, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()

    err = _refused(_score(model, other_set, out), capsys)  # another image set
    assert "holds another run" in err and "the images" in err and "new --out" in err
    err = _refused(_score(model, user_set, out, "--size", "16"), capsys)  # another size
    assert "the size (32 px before, 16 px now)" in err
    err = _refused(_score(model, user_set, out, "--guidance", "3"), capsys)  # other settings
    assert "the settings (guidance 1.0 -> 3.0)" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched
    assert json.loads((out / "run.json").read_text())["files"].keys() >= {
        "scores.parquet",
        "metrics.csv",
        "parameters.json",
        "image_set.csv",
    }

    cli.main(_score(model, user_set, out, attacks=("loss", "vae_control")))  # the same run, one attack more
    capsys.readouterr()
    cli.main(["report", str(out)])
    assert "vae_control" in capsys.readouterr().out

    # a table changed after the run: report says so in one sentence instead of printing it
    metrics = (out / "metrics.csv").read_text()
    (out / "metrics.csv").write_text(metrics.replace("loss", "lost"))
    err = _refused(["report", str(out)], capsys)
    assert "do not belong together" in err and "metrics.csv changed" in err
    (out / "metrics.csv").write_text(metrics)

    # a rerun interrupted part-way leaves no earlier table beside its own, and report calls it incomplete
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(_score(model, user_set, out))
    monkeypatch.undo()
    assert (
        (out / "parameters.json").exists() and not (out / "scores.parquet").exists() and not (out / "run.json").exists()
    )
    err = _refused(["report", str(out)], capsys)
    assert "incomplete" in err
    cli.main(_score(model, user_set, out))  # the same run resumes and finishes
    capsys.readouterr()
    cli.main(["report", str(out)])
    assert "AUC" in capsys.readouterr().out


def test_report_refuses_a_folder_without_a_manifest(tmp_path, capsys):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    pd.DataFrame({"run": ["x"]}).to_csv(legacy / "metrics.csv", index=False)
    (legacy / "parameters.json").write_text("{}")
    assert "incomplete" in _refused(["report", str(legacy)], capsys)
    assert "score the set first" in _refused(["report", str(tmp_path / "none")], capsys)


# --------------------------------------------------------------------------------------------------
# 3 · checksums of the per-image result cache and of the trajectory cache
# --------------------------------------------------------------------------------------------------
def _values(target, imageset, cache, name="loss", batch_size=8, **params):
    spec = REGISTRY[name]
    return runs.attack_values(
        target, imageset, spec, spec.params(params), Settings(), cache, batch_size, 32, progress=False
    )


def test_a_result_shard_with_one_changed_byte_is_set_aside_and_recomputed(target, imageset, tmp_path, capfd):
    first = _values(target, imageset, tmp_path)
    shard = next((tmp_path / "loss").rglob("*.parquet"))
    original = shard.read_bytes()
    stored = pd.read_parquet(shard)
    for offset in range(4, len(original) - 8):  # the first byte whose flip still decodes with other values
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        shard.write_bytes(bytes(damaged))
        try:
            read = pd.read_parquet(shard)  # what the cache read before it stored a checksum
        except Exception:
            continue
        if read.shape == stored.shape and not read["score"].equals(stored["score"]):
            break
    else:
        pytest.fail("no single-byte change decodes to other scores")
    assert (read["score"] != stored["score"]).sum() >= 1  # the old reader took it as it was
    capfd.readouterr()
    before = target.unet_evals
    again = _values(target, imageset, tmp_path)
    assert "damaged cache file" in capfd.readouterr().err and shard.with_name(shard.name + ".damaged").exists()
    assert target.unet_evals - before == len(imageset)  # recomputed
    np.testing.assert_array_equal(again["score"], first["score"])
    pd.testing.assert_frame_equal(
        again.drop(columns=["unet_evals_run", "seconds_per_image", "peak_memory_mb"]),
        first.drop(columns=["unet_evals_run", "seconds_per_image", "peak_memory_mb"]),
    )


def test_a_trajectory_with_one_changed_byte_is_set_aside_and_recomputed(target, imageset, tmp_path, capfd):
    from safetensors import safe_open

    # at batch size 1 the image recomputed alone rounds as it did in the first run (see test_runs)
    first = _values(target, imageset, tmp_path, "structural", batch_size=1, t=100)
    victim = sorted((tmp_path / "trajectory").glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    header = int.from_bytes(data[:8], "little")
    with safe_open(str(victim), framework="pt") as handle:
        stored = {k: handle.get_tensor(k).clone() for k in handle.keys()}
    data[8 + header + 37] ^= 0x40  # a byte of the latents
    victim.write_bytes(bytes(data))
    with safe_open(str(victim), framework="pt") as handle:  # it still decodes, to other latents
        changed = {k: handle.get_tensor(k) for k in handle.keys()}
    assert any(not changed[k].equal(stored[k]) for k in stored)
    for shard in (tmp_path / "structural").rglob("*.parquet"):
        shard.unlink()  # the scores are computed again from the trajectories
    capfd.readouterr()
    before = target.unet_evals
    again = _values(target, imageset, tmp_path, "structural", batch_size=1, t=100)
    assert (
        capfd.readouterr().err.count("damaged cache file") == 1 and victim.with_name(victim.name + ".damaged").exists()
    )
    assert target.unet_evals - before == 2  # that image's two inversion steps, no other
    np.testing.assert_array_equal(again["score"], first["score"])


# --------------------------------------------------------------------------------------------------
# 4 · a full disk: one sentence, nothing half-written kept
# --------------------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    for value in [*args, *kwargs.values()]:
        if isinstance(value, (str, os.PathLike)) and str(value).endswith(".partial"):
            Path(value).write_bytes(b"half")  # what a full disk leaves
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_on_a_full_disk_says_so_and_removes_the_partial_file(tmp_path):
    path = tmp_path / "table.csv"
    with pytest.raises(memo.DiskFullError) as caught:
        memo.atomic_write(path, lambda partial: _enospc(str(partial)), needed=3 * 2**20)
    message = caught.value.strerror
    assert str(tmp_path) in message and "3.0 MB" in message and "free" in message and message.count(". ") == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["result cache", "trajectory cache", "tables"])
def test_a_full_disk_is_one_sentence_and_nothing_half_written_is_trusted(
    tmp_path, model, user_set, capsys, monkeypatch, where
):
    import pyarrow.parquet
    import safetensors.torch

    out = tmp_path / "run"
    if where == "result cache":
        monkeypatch.setattr(pyarrow.parquet, "write_table", _enospc)
    elif where == "trajectory cache":
        monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
    else:
        monkeypatch.setattr(pd.DataFrame, "to_parquet", _enospc)  # scores.parquet
    err = _refused(_score(model, user_set, out, attacks=("structural",)), capsys)
    said = [line for line in err.splitlines() if line.startswith("mialib score: error:")]
    assert (
        len(said) == 1
        and "no space left on the disk" in said[0]
        and "needs about" in said[0]
        and "free there" in said[0]
    )
    assert not list(out.rglob("*.partial")) and not (out / "run.json").exists()
    monkeypatch.undo()
    cli.main(_score(model, user_set, out, attacks=("structural",)))
    assert (out / "run.json").exists()


# --------------------------------------------------------------------------------------------------
# 5 · two runs at once
# --------------------------------------------------------------------------------------------------
def test_concurrent_atomic_writes_of_one_shard_never_collide(tmp_path):
    frame = pd.DataFrame({"key": ["a", "b"], "id": ["1", "2"], "score": [0.5, 0.25]})
    path = tmp_path / "shard.parquet"
    errors = []

    def write():
        try:
            for _ in range(25):
                runs._atomic_parquet(frame, path)
        except Exception as error:  # a fixed partial name: one writer renames the other's file away
            errors.append(error)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    pd.testing.assert_frame_equal(runs.read_checked_parquet(path), frame)
    assert [p.name for p in tmp_path.iterdir()] == ["shard.parquet"]


def test_a_second_run_on_the_same_out_is_refused_at_once(tmp_path, model, user_set, capsys):
    out = tmp_path / "run"
    argv = _score(model, user_set, out, "--batch-size", "1", attacks=("structural:t=300", "secmi", "pia"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "mialib", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list((out / "cache").rglob("*.parquet")) and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        err = _refused(argv, capsys)
        assert f"another mialib run (pid {first.pid}) is writing to {out}" in err
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first_err
    cli.main(["report", str(out)])  # the first run's tables, whole
    assert "AUC" in capsys.readouterr().out
    cli.main(argv)  # and the folder is free again


# --------------------------------------------------------------------------------------------------
# 6 · option values checked before anything is read, computed or written
# --------------------------------------------------------------------------------------------------
BAD_SCORE = [
    (["--batch-size", "0"], "argument --batch-size"),
    (["--batch-size", "-2"], "argument --batch-size"),
    (["--size", "-32"], "argument --size"),
    (["--size", "0"], "argument --size"),
    (["--bootstrap", "0"], "argument --bootstrap"),
    (["--read-threads", "-1"], "argument --read-threads"),
    (["--trajectory-cache-gb", "-1"], "argument --trajectory-cache-gb"),
]


@pytest.mark.parametrize("extra, message", BAD_SCORE)
def test_bad_score_options_are_refused_before_anything_is_written(tmp_path, user_set, capsys, extra, message):
    out = tmp_path / "run"
    err = _refused(_score(tmp_path / "no-model", user_set, out, *extra), capsys)
    assert message in err and "mialib score: error:" in err
    assert not out.exists()


BAD_OTHERS = [
    (["--level", "0"], "argument --level"),
    (["--level", "1.5"], "argument --level"),
    (["--fit-fraction", "1"], "argument --fit-fraction"),
    (["--fit-fraction", "-0.1"], "argument --fit-fraction"),
    (["--permutations", "0"], "argument --permutations"),
]


@pytest.mark.parametrize("extra, message", BAD_OTHERS)
def test_bad_audit_options_are_refused(tmp_path, user_set, capsys, extra, message):
    argv = [
        "audit",
        "--model",
        "m",
        "--suspect",
        f"imagefolder:{user_set}",
        "--reference",
        f"imagefolder:{user_set}",
        "--out",
        str(tmp_path / "a"),
        *extra,
    ]
    assert message in _refused(argv, capsys)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("extra, message", [
    (["--processes", "0"], "argument --processes"), (["--threads", "0"], "argument --threads"),
    (["--timeout", "0"], "argument --timeout"), (["--timeout", "-5"], "argument --timeout"),
    (["--retries", "-1"], "argument --retries"), (["--limit", "0"], "argument --limit"),
])  # fmt: skip
def test_bad_download_options_are_refused(tmp_path, capsys, extra, message):
    assert message in _refused(["download", "--data", f"laion-mi:{tmp_path}", *extra], capsys)


def test_an_out_that_is_a_file_is_refused(tmp_path, model, user_set, capsys):
    taken = tmp_path / "results.txt"
    taken.write_text("mine")
    for out in (taken, taken / "run"):
        err = _refused(_score(model, user_set, out), capsys)
        assert "is a file" in err and "--out" in err
    assert taken.read_text() == "mine"


def test_a_timestep_outside_the_schedule_is_refused_before_anything_is_written(
    tmp_path, model, user_set, target, imageset, capsys
):
    out = tmp_path / "run"
    err = _refused(_score(model, user_set, out, attacks=("loss:t=1000",)), capsys)
    assert "loss" in err and "1000" in err
    assert not out.exists()
    before = target.unet_evals
    with pytest.raises(ValueError, match="1000"):
        runs.score(
            target, imageset, ["structural", "loss:t=1000"], Settings(), tmp_path / "cache", 4, 32, progress=False
        )
    assert target.unet_evals == before and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------------
# an audit and a score run never share a folder; an interrupted audit leaves no earlier audit's files
# --------------------------------------------------------------------------------------------------
def test_an_audit_and_a_score_run_never_share_a_folder_and_an_interrupted_audit_leaves_nothing_stale(
    tmp_path, model, user_set, other_set, capsys, monkeypatch
):
    from mialib import plots

    scored, audited = tmp_path / "scored", tmp_path / "audited"
    cli.main(_score(model, user_set, scored))
    audit = [
        "audit",
        "--model",
        str(model),
        "--suspect",
        f"imagefolder:{user_set}",
        "--reference",
        f"imagefolder:{other_set}",
        "--attack",
        "loss",
        "--permutations",
        "99",
        "--quiet",
    ]
    assert "holds a `mialib score` run" in _refused([*audit, "--out", str(scored)], capsys)
    assert not (scored / "audit.json").exists()
    cli.main([*audit, "--out", str(audited)])
    outputs = {name for name in cli.AUDIT_OUTPUTS if (audited / name).exists()}
    assert outputs == set(cli.AUDIT_OUTPUTS)
    assert "holds a `mialib audit`" in _refused(_score(model, user_set, audited), capsys)
    assert not (audited / "scores.parquet").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "save", interrupted)  # stopped after the tables, before the figure and audit.json
    with pytest.raises(KeyboardInterrupt):
        cli.main([*audit, "--out", str(audited)])
    assert not (audited / "audit.json").exists()  # the finished marker is written last
    for name in ("held_out_scores.png", "held_out_scores.pdf"):  # nothing of the earlier audit remains
        assert not (audited / name).exists()
