"""mialib.experiment and mialib.cli: presets and notebook parameters, checks before compute, the runner
that goes on past a failure, and the command line on a user's imagefolder."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

import helpers
from mialib import cli, experiment, imagesets, studies
from mialib.attacks import REGISTRY
from mialib.attacks.registry import assert_within_tolerance
from mialib.settings import Settings
from mialib.target import load_target

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    {"01_data_split", "02_observation", "03_attack", "04_robustness", "05_ablations", "06_set_audit", "07_regimes"}
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with helpers.one_thread():
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_cli") / "model"
    helpers.save_tiny_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def user_set(tmp_path_factory) -> Path:
    return helpers.write_imagefolder(tmp_path_factory.mktemp("cli_set") / "set", n=12)


# --------------------------------------------------------------------------------------------------
# Presets and notebooks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SOURCES)
def test_notebook_defaults_are_the_default_preset(name):
    """Every default lives in a preset: each notebook's parameters cell equals configs/default.yaml."""
    preset = experiment.load_preset(ROOT / "configs" / "default.yaml")
    declared = experiment.declared_parameters(ROOT / "notebooks" / f"{name}.ipynb")
    assert declared, name
    for key, value in declared.items():
        assert key in preset, f"{name} declares {key}, which configs/default.yaml lacks"
        assert value == preset[key], f"{name}: {key} = {value!r}, the preset says {preset[key]!r}"


def _sync_parameters():
    """scripts/sync_parameters.py, which writes the comments this test compares (one parser for both)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_parameters", ROOT / "scripts" / "sync_parameters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell_comments(source: str, sync) -> dict[str, str]:
    """The parameters cell's comments by key, read as the script reads the preset (``KEY = value  # ...``,
    ``'entry': value,  # ...`` and indented continuation lines)."""
    yaml_like = "\n".join(
        sync.CELL_KEY.sub(r"\1: \2", line) if sync.CELL_KEY.match(line) else sync.CELL_ENTRY.sub(r"  \1: \2", line)
        for line in source.splitlines()
    )
    return sync.preset_comments(yaml_like)


@pytest.mark.parametrize("name", SOURCES)
def test_notebook_parameter_comments_are_the_default_presets_verbatim(name):
    """The parameters cell's comments are configs/default.yaml's, character for character (quotes,
    apostrophes and backticks included), for every key and every entry of a mapping."""
    sync = _sync_parameters()
    preset = sync.preset_comments((ROOT / "configs" / "default.yaml").read_text())
    notebook = nbformat.read(str(ROOT / "notebooks" / f"{name}.ipynb"), as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    comments = _cell_comments(cell.source, sync)
    assert comments, name
    for key, comment in comments.items():
        assert comment == preset.get(key), (
            f"{name}: {key}'s comment is {comment!r}; configs/default.yaml says {preset.get(key)!r}"
        )
    assert {k for k in preset if k.split(".")[0] in comments} == set(comments), f"{name}: entries without their comment"


def _uncommented_keys(path: Path) -> list[str]:
    """Lines of a YAML file that hold a key (at any depth) but no ``#`` comment after the key's value."""
    text = path.read_text()
    lines = text.splitlines()
    missing = []

    def walk(node):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                row = key.start_mark.line
                after = value.end_mark.column if value.end_mark.line == row else key.end_mark.column
                if "#" not in lines[row][after:]:
                    missing.append(f"{path.name}:{row + 1}: {lines[row].strip()}")
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    walk(yaml.compose(text, Loader=yaml.SafeLoader))
    return missing


@pytest.mark.parametrize("preset", sorted(path.stem for path in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_key_is_used_and_its_attacks_parse(preset):
    path = ROOT / "configs" / f"{preset}.yaml"
    params = experiment.load_preset(path)
    declared = set().union(*(experiment.declared_parameters(ROOT / "notebooks" / f"{n}.ipynb") for n in SOURCES))
    assert set(params) - declared - experiment.TARGET_KEYS == set()
    # complete: a key left out would silently take the notebooks' default (the tiny target's 32 px, CPU, ...)
    assert set(experiment.load_preset(ROOT / "configs" / "default.yaml")) - set(params) == set()
    uncommented = _uncommented_keys(path)
    assert not uncommented, "every key of a preset says what it is in a # comment; these do not:\n" + "\n".join(
        uncommented
    )
    imagesets.parse_spec(params["DATA"])  # kind and ?options are known (the files themselves may not exist yet)
    from mialib import runs

    requests = runs.as_requests(params["ATTACKS"])
    assert set(r.name for r in requests.values()) <= set(REGISTRY)
    Settings.from_parameters(params)


def test_notebooks_are_thin():
    """No function or class is defined in a notebook cell: logic belongs in mialib."""
    import ast

    import nbformat

    for name in SOURCES:
        notebook = nbformat.read(str(ROOT / "notebooks" / f"{name}.ipynb"), as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                nodes = ast.walk(ast.parse(cell.source))
                defined = [
                    n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
                ]
                assert not defined, (name, cell.source)
                assert not cell.get("outputs"), f"{name} is committed with outputs"


def _study_params(tmp_path, data, model, **extra):
    params = experiment.load_preset(ROOT / "configs" / "smoke.yaml")
    params.update(DATA=data, MODEL=str(model), OUTPUT_DIR=str(tmp_path / "out"), BATCH_SIZE=4, **extra)
    return params


def test_setup_writes_the_set_and_checks_the_size_before_compute(tmp_path, model, user_set):
    study = experiment.setup(_study_params(tmp_path, f"imagefolder:{user_set}", model), "x")
    assert len(study.imageset) == 12 and study.target.resolution == 32
    written = pd.read_csv(study.tables / "image_set.csv")
    assert list(written.columns) == [c for c in study.imageset.records.columns if c != "location"]
    assert (study.tables / "skipped_images.csv").exists()
    with pytest.raises(ValueError, match="multiple of the VAE's downscale factor"):
        experiment.setup(_study_params(tmp_path, f"imagefolder:{user_set}", model, IMAGE_SIZE=33), "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        experiment.setup(_study_params(tmp_path, f"imagefolder:{user_set}", tmp_path / "no" / "such-model"), "x")
    with pytest.raises(ValueError, match="only for the embedded emoji set"):
        experiment.setup(_study_params(tmp_path, f"imagefolder:{user_set}", model, NONMEMBER_STYLE="shifted"), "x")


def test_a_small_set_runs_the_attacks_and_skips_the_blind_baselines_with_a_reason(tmp_path, model):
    """8 images: the blind baselines cannot cross-validate; they are skipped before any compute and the
    attacks still run (the old notebook failed after all the attack compute)."""
    small = helpers.write_imagefolder(tmp_path / "small", n=8)
    study = experiment.setup(_study_params(tmp_path, f"imagefolder:{small}", model), "03_attack")
    comparison = studies.compare(
        study, {"paper": "structural", "loss": "loss:t=[50,100]", "blind_image": "blind_image"}, n_bootstrap=20
    )
    assert list(comparison.table["run"]) == ["paper", "loss"]
    assert "at least 5 calibration images" in comparison.skipped["blind_image"]
    notes = pd.read_csv(study.tables / "skipped_studies_03_attack.csv")
    assert list(notes["study"]) == ["blind_image"]
    assert comparison.verdict["beats blind baselines"].isna().all()  # nothing to beat: no verdict is invented
    # a model without checkpoints: training dynamics is skipped with its reason, not a crash
    assert studies.training_dynamics(study, [200, 400]) is None
    assert "no training checkpoints" in pd.read_csv(study.tables / "skipped_studies_03_attack.csv")["reason"].iloc[-1]


def test_the_runner_goes_on_after_a_failure_and_reports_it(tmp_path, monkeypatch):
    import papermill

    executed = []

    def fake_execute(source, output, parameters, **kwargs):
        name = Path(output).stem
        executed.append((name, parameters))
        if name == "02_observation":
            raise RuntimeError("boom in 02")
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {name} ran")]), output)

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    params = experiment.load_preset(ROOT / "configs" / "smoke.yaml")
    params.update(OUTPUT_DIR=str(tmp_path / "out"), DATA="imagefolder:somewhere")
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(params))
    with pytest.raises(experiment.NotebookFailures, match="02_observation: boom in 02"):
        experiment.run_notebooks(preset)
    assert [n for n, _ in executed] == [
        "01_data_split",
        "02_observation",
        "03_attack",
        "04_robustness",
        "05_ablations",
        "06_set_audit",
    ]
    outcomes = json.loads((tmp_path / "out" / "notebook_runs.json").read_text())
    assert outcomes["02_observation"]["status"] == "failed" and outcomes["05_ablations"]["status"] == "ok"
    assert outcomes["03_attack_biased"]["status"] == "skipped"
    # the HTML report lists every run: a page for each executed notebook, the failure and the skip with their reasons
    index = (tmp_path / "out" / "html" / "index.html").read_text()
    assert (
        'href="05_ablations.html"' in index
        and "05_ablations ran" in (tmp_path / "out" / "html" / "05_ablations.html").read_text()
    )
    assert (
        "boom in 02" in index
        and 'href="02_observation.html"' not in index
        and "only for the embedded emoji set" in index
    )
    # each notebook received exactly the keys its parameters cell declares
    for name, parameters in executed:
        assert set(parameters) <= set(experiment.declared_parameters(ROOT / "notebooks" / f"{name}.ipynb"))
    # ... with the output folder relative to the repository root, read back to the same folder; no metrics: no headline
    for name, parameters in executed:
        assert not Path(parameters["OUTPUT_DIR"]).is_absolute()
        assert experiment.resolve(parameters["OUTPUT_DIR"]).resolve() in (tmp_path / "out", tmp_path / "out" / "biased")
    assert "No headline" in index and str(tmp_path) not in index.replace(f"..{tmp_path}", "")


def test_notebooks_receive_paths_relative_to_the_repository(tmp_path):
    params = {
        "OUTPUT_DIR": str(tmp_path / "out"),
        "CACHE_DIR": "",
        "FAIR_RESULTS": str(tmp_path / "out" / "metrics.csv"),
        "MODEL": str(ROOT / "data" / "targets" / "tiny"),
        "MANIFEST": "data/emoji_split.csv",
        "IMAGE_DIR": str(ROOT / "data" / "images"),
        "DATA": f"imagefolder:{ROOT / 'data' / 'mine'}?seed=1",
        "MODEL_CONFIG": "owner/name",
        "SEED": 0,
    }
    shown = experiment.shown_parameters(params)
    for key in (
        "OUTPUT_DIR",
        "FAIR_RESULTS",
    ):  # the output folder: relative wherever it is, read back to the same place
        assert (
            not Path(shown[key]).is_absolute()
            and experiment.resolve(shown[key]).resolve() == Path(params[key]).resolve()
        )
    assert (
        shown["MODEL"] == "data/targets/tiny"
        and shown["IMAGE_DIR"] == "data/images"
        and shown["DATA"] == "imagefolder:data/mine?seed=1"
    )
    assert {k: shown[k] for k in ("CACHE_DIR", "MANIFEST", "MODEL_CONFIG", "SEED")} == {
        k: params[k] for k in ("CACHE_DIR", "MANIFEST", "MODEL_CONFIG", "SEED")
    }
    elsewhere = experiment.shown_parameters(
        {"MODEL": str(tmp_path / "model"), "DATA": f"imagefolder:{tmp_path / 'set'}"}
    )
    assert elsewhere == {
        "MODEL": str(tmp_path / "model"),
        "DATA": f"imagefolder:{tmp_path / 'set'}",
    }  # a user's inputs outside the repository stay


def test_headless_kernels_leave_no_progress_bar_widget_or_warning(tmp_path, capfd, caplog):
    """A notebook run the runner's way: mialib's bars (disable=False given) and a library's (nothing given)
    leave nothing in the executed notebook, no widget state is stored, the kernel does not warn about plain
    TCP, and papermill does not warn about a parameter it cannot parse (a dict over several lines)."""
    import os

    import papermill

    source, executed = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    parameters = nbformat.v4.new_code_cell(
        "X = {  # as ATTACKS: name: attack[:param=value,...] (see --help)\n    'a': 1,\n}",
        metadata={"tags": ["parameters"]},
    )
    code = (
        "from tqdm.auto import tqdm\nlist(tqdm(range(3), disable=False, leave=False))\n"
        "list(tqdm(range(3)))\nprint('done', X)"
    )
    notebook = nbformat.v4.new_notebook(cells=[parameters, nbformat.v4.new_code_cell(code)])
    notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, source)
    before = {key: os.environ.get(key) for key in experiment.HEADLESS_ENV}
    with experiment.headless_kernels():
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters={"X": {"a": 2}},
            kernel_name="python3",
            progress_bar=False,
            **experiment.kernel_options(),
        )
    assert {key: os.environ.get(key) for key in experiment.HEADLESS_ENV} == before
    result = nbformat.read(str(executed), as_version=4)
    outputs = [output for cell in result.cells for output in cell.get("outputs", [])]
    assert [(o.output_type, o.get("name"), o.get("text")) for o in outputs] == [("stream", "stdout", "done {'a': 2}\n")]
    assert "widgets" not in result.metadata
    assert "without encryption" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name.startswith("papermill") and r.levelno >= 30]


def test_a_typo_in_a_preset_key_is_refused(tmp_path):
    params = experiment.load_preset(ROOT / "configs" / "smoke.yaml")
    params.update(OUTPUT_DIR=str(tmp_path / "out"), GUIDANCEE=2.0)
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="GUIDANCEE"):
        experiment.run_notebooks(preset)


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------
def test_score_on_a_users_imagefolder_equals_the_attack_functions(tmp_path, model, user_set, capsys):
    out = tmp_path / "scored"
    argv = [
        "score",
        "--model",
        str(model),
        "--data",
        f"imagefolder:{user_set}",
        "--out",
        str(out),
        "--batch-size",
        "5",
        "--attack",
        "structural",
        "--attack",
        "structural:t=50:150:50",
        "--attack",
        "loss:t=[50,100]",
        "--attack",
        "clid",
        "--quiet",
        "--bootstrap",
        "50",
    ]
    cli.main(argv)
    printed = capsys.readouterr().out
    assert "structural:t=[50, 100, 150]" in printed and "AUC" in printed
    for name in (
        "scores.parquet",
        "metrics.csv",
        "skipped.csv",
        "parameters.json",
        "image_set.csv",
        "chosen_settings.json",
    ):
        assert (out / name).exists(), name
    scores = pd.read_parquet(out / "scores.parquet")
    imageset = imagesets.open_imageset(f"imagefolder:{user_set}")
    target = load_target(model)
    pixels, captions, ids = imageset.load(32), list(imageset.records["caption"]), list(imageset.records["id"])
    chosen = json.loads((out / "chosen_settings.json").read_text())
    for run, record in chosen.items():
        spec = REGISTRY[record["attack"]]
        direct = spec.function(
            target, pixels, captions, ids, **record["params"], **Settings().for_function(spec.function)
        )
        got = scores[scores["run"] == run].set_index("id").loc[ids]
        # batches of 5 against one of 12: float32 rounding differs by batch size, within the registry's tolerance
        assert_within_tolerance(
            spec, record["params"], got["score"].to_numpy(), record["direction"] * direct.scores, direct.extras
        )
    parameters = json.loads((out / "parameters.json").read_text())
    assert parameters["images"] == 12 and parameters["settings"]["guidance"] == 1.0
    # a rerun resumes from the cache: no U-Net evaluation, the same table
    before = sorted(p.name for p in (out / "cache").rglob("*.parquet"))
    cli.main(argv)
    assert sorted(p.name for p in (out / "cache").rglob("*.parquet")) == before
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "scores.parquet").drop(columns=["seconds_per_image", "peak_memory_mb", "unet_evals_run"]),
        scores.drop(columns=["seconds_per_image", "peak_memory_mb", "unet_evals_run"]),
    )
    capsys.readouterr()
    cli.main(["report", str(out)])
    report = capsys.readouterr().out
    assert "loss:t=[50, 100]" in report and "test split: 3 members, 3 non-members" in report


def test_the_command_line_and_the_notebooks_write_the_same_run(tmp_path, model, user_set, capsys):
    """One scoring path (mialib.scoring): `mialib score` and 03's studies.compare on the same images, model,
    attacks and settings write the same scores, chosen settings and metrics, bit for bit (timings aside)."""
    attacks = ["structural", "loss:t=[50, 100]", "vae_control"]  # as the command line names its runs
    out = tmp_path / "cli"
    cli.main(
        [
            "score",
            "--model",
            str(model),
            "--data",
            f"imagefolder:{user_set}",
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--quiet",
            "--bootstrap",
            "50",
            *[a for attack in attacks for a in ("--attack", attack)],
        ]
    )
    params = _study_params(tmp_path, f"imagefolder:{user_set}", model, N_BOOTSTRAP=50)
    assert params["SEED"] == 0 and params["IMAGE_SIZE"] == 32  # what the command line used
    study = experiment.setup(params, "03_attack")
    comparison = studies.compare(study, {a: a for a in attacks}, 50)
    timings = ["seconds_per_image", "peak_memory_mb", "unet_evals_run"]
    for name in ("scores.parquet", "metrics.csv"):
        read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        ours, theirs = read(out / name), read(study.out / name)
        assert len(ours) and list(ours.columns) == list(theirs.columns), name
        pd.testing.assert_frame_equal(
            ours.drop(columns=timings, errors="ignore"), theirs.drop(columns=timings, errors="ignore"), check_exact=True
        )
    assert json.loads((out / "chosen_settings.json").read_text()) == json.loads(
        (study.out / "chosen_settings.json").read_text()
    )
    for folder in (out, study.out):
        as_json, as_csv = pd.read_json(folder / "metrics.json"), pd.read_csv(folder / "metrics.csv")
        assert list(as_json["run"]) == list(as_csv["run"]) and as_json["auc"].to_numpy() == pytest.approx(
            as_csv["auc"].to_numpy(), abs=1e-9
        )  # JSON keeps 10 digits
    assert set(comparison.table["run"]) == set(attacks)
    printed = capsys.readouterr().out
    assert (
        printed.count("predicts epsilon") == 2 and printed.count("attacked at 32 px") == 2
    )  # one target line each way


def test_score_with_reference_models(tmp_path, model, user_set, capsys):
    """--reference-model: a copy of the target as its reference scores exactly 0 (the same seeds and noise per
    image); the references are recorded; calibrate=reference without one is refused before anything is written."""
    import shutil

    base = ["score", "--model", str(model), "--data", f"imagefolder:{user_set}", "--quiet", "--bootstrap", "20"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--attack", "loss:calibrate=reference", "--out", str(tmp_path / "none")])
    assert exit_info.value.code == 2 and "give its reference models with --reference-model" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    copy = tmp_path / "reference"
    shutil.copytree(model, copy)
    out = tmp_path / "scored"
    cli.main([*base, "--attack", "loss:calibrate=reference", "--attack", "loss", "--reference-model", str(copy),
              "--out", str(out)])  # fmt: skip
    scores = pd.read_parquet(out / "scores.parquet")
    calibrated = scores[scores["run"] == "loss:calibrate=reference"].set_index("id")
    raw = scores[scores["run"] == "loss"].set_index("id").loc[calibrated.index]
    assert (calibrated["score"] == 0).all() and (calibrated["calibrate"] == "reference").all()
    np.testing.assert_array_equal(calibrated["raw_value"], raw["value"])
    parameters = json.loads((out / "parameters.json").read_text())
    assert parameters["reference_models"] == [str(copy)]
    assert parameters["reference_fingerprints"] == [parameters["fingerprint"]]
    assert json.loads((out / "run.json").read_text())["identity"]["references"] == [parameters["fingerprint"]]


def test_score_refuses_before_reading_or_writing(tmp_path, model, user_set, capsys):
    base = ["score", "--data", f"imagefolder:{user_set}", "--attack", "structural"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--model", str(tmp_path / "models" / "sd-typo"), "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "does not exist" in error and "sd-typo" in error
    assert not (tmp_path / "a").exists()
    users = tmp_path / "my-results"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli.main([*base, "--model", str(model), "--out", str(users)])
    assert "refusing to write" in capsys.readouterr().err and (users / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        cli.main(
            [
                "score",
                "--data",
                f"imagefolder:{user_set}",
                "--attack",
                "nope",
                "--model",
                str(model),
                "--out",
                str(tmp_path / "b"),
            ]
        )
    assert "unknown attack 'nope'" in capsys.readouterr().err


def test_prepare_builds_what_the_preset_names_and_says_so(smoke_preset, smoke_target_dir, capsys):
    """`mialib prepare` (`make prepare`): the preset's target, here already built, is left as it is."""
    cli.main(["prepare", "--preset", str(smoke_preset)])
    assert f"target: {experiment.load_preset(smoke_preset)['MODEL']} ready" in capsys.readouterr().out


def test_help_lists_the_registry(capsys):
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    text = capsys.readouterr().out
    for name in REGISTRY:
        assert name in text


def test_freeze_then_verify(tmp_path, user_set, capsys):
    manifest = tmp_path / "frozen.csv"
    cli.main(["freeze", "--data", f"imagefolder:{user_set}?seed=3", "--out", str(manifest)])
    frozen = pd.read_csv(manifest, dtype=str)
    assert (
        list(frozen.columns)[:7] == ["id", "caption", "label", "subset", "source", "sha256", "subset_rule"]
        and len(frozen) == 12
    )
    with pytest.raises(SystemExit):
        cli.main(["freeze", "--data", f"imagefolder:{user_set}", "--out", str(manifest)])
    assert "never overwrites" in capsys.readouterr().err
    verified = imagesets.open_imageset(f"imagefolder:{user_set}?manifest={manifest}")
    assert verified.info["manifest"]["counts"] == {"verified": 12}
    assert list(verified.records["subset"]) == list(frozen["subset"])


def test_captions_longer_than_the_text_encoder_are_recorded(tmp_path, model):
    """The tiny tokenizer keeps 16 tokens: a longer caption is cut as the model cuts it, and listed."""
    long = " ".join(["red apple on a wooden table"] * 6)
    folder = helpers.write_imagefolder(tmp_path / "long", n=8, captions=[long] + [f"cat {i}" for i in range(7)])
    study = experiment.setup(_study_params(tmp_path, f"imagefolder:{folder}", model), "x")
    truncated = pd.read_csv(study.tables / "captions_truncated.csv")
    assert list(truncated["id"]) == ["img000"] and (truncated["tokens"] > truncated["limit"]).all()
    assert truncated["limit"].iloc[0] == helpers.MAX_TOKENS
    out = tmp_path / "scored"
    cli.main(
        [
            "score",
            "--model",
            str(model),
            "--data",
            f"imagefolder:{folder}",
            "--out",
            str(out),
            "--attack",
            "vae_control",
            "--quiet",
            "--bootstrap",
            "10",
        ]
    )
    assert list(pd.read_csv(out / "captions_truncated.csv")["id"]) == ["img000"]


def test_a_users_output_folder_is_never_written_into(tmp_path, model, user_set):
    users = tmp_path / "my-results"
    users.mkdir()
    (users / "metrics.csv").write_text("my own numbers")
    with pytest.raises(ValueError, match="refusing to write"):
        experiment.setup(dict(_study_params(tmp_path, f"imagefolder:{user_set}", model), OUTPUT_DIR=str(users)), "x")
    assert (users / "metrics.csv").read_text() == "my own numbers"


def test_download_takes_only_laion_mi_sets_and_names_what_is_missing(tmp_path, user_set, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["download", "--data", f"imagefolder:{user_set}"])
    assert exit_info.value.code == 2 and "fetches laion-mi sets" in capsys.readouterr().err
    empty = tmp_path / "laion_mi"
    empty.mkdir()
    with pytest.raises(SystemExit):
        cli.main(["download", "--data", f"laion-mi:{empty}"])
    assert "parquet" in capsys.readouterr().err


def test_the_runner_refuses_a_users_output_folder_before_executing(tmp_path, monkeypatch):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("nothing may run"))
    users = tmp_path / "mine"
    users.mkdir()
    (users / "parameters.json").write_text("{}")
    params = dict(experiment.load_preset(ROOT / "configs" / "smoke.yaml"), OUTPUT_DIR=str(users))
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="refusing to write"):
        experiment.run_notebooks(preset)
    assert (users / "parameters.json").read_text() == "{}" and not (users / "notebooks").exists()


def test_a_folder_inside_one_mialib_wrote_is_its_own(tmp_path):
    from mialib.data import DataError, claim_folder

    out = claim_folder(tmp_path / "run")  # as `mialib score --out` does
    (out / "cache" / "loss").mkdir(parents=True)  # as the run layer then does, without a marker
    assert claim_folder(out / "cache") == out / "cache"  # a notebook's CACHE_DIR may point there
    other = tmp_path / "users"
    (other / "cache").mkdir(parents=True)
    (other / "cache" / "x.txt").write_text("mine")
    with pytest.raises(DataError):
        claim_folder(other / "cache")


def test_a_killed_run_resumes_and_two_processes_give_the_one_process_tables(tmp_path, model, user_set):
    """One uninterrupted run is the reference for two others. (1) A run killed with SIGKILL part-way, then
    rerun: bit-identical tables. (2) `torchrun` (or `accelerate launch` on GPUs) with two CPU processes: each
    scores half of the images into the shared per-image cache and the main process builds the tables. At
    batch size 1 no image's arithmetic depends on which images share its batch, so both equal the reference."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(out):
        return [
            "score",
            "--model",
            str(model),
            "--data",
            f"imagefolder:{user_set}",
            "--out",
            str(out),
            "--batch-size",
            "1",
            "--bootstrap",
            "20",
            "--quiet",
            "--attack",
            "structural:t=50:150:50",
            "--attack",
            "secmi",
            "--attack",
            "loss",
        ]

    def tables(name):
        scores = pd.read_parquet(tmp_path / name / "scores.parquet").drop(
            columns=["seconds_per_image", "peak_memory_mb"]
        )
        metrics = pd.read_csv(tmp_path / name / "metrics.csv").drop(columns=["seconds_per_image", "peak_memory_mb"])
        return scores, metrics, (tmp_path / name / "chosen_settings.json").read_text()

    cli.main(command(tmp_path / "whole"))  # in this process, one thread, like the others
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen(
        [sys.executable, "-m", "mialib", *command(tmp_path / "killed")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "killed" / "cache").rglob("*.parquet"))) < 8:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "scores.parquet").exists()  # killed part-way
    cli.main(command(tmp_path / "killed"))
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mialib", *command(tmp_path / "two")],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert json.loads((tmp_path / "two" / "parameters.json").read_text())["processes"] == 2
    shards = [pd.read_parquet(p) for p in (tmp_path / "two" / "cache" / "secmi").rglob("*.parquet")]
    assert sum(len(s) for s in shards) == len(shards) == 12  # every image computed once, by one of the processes
    whole = tables("whole")
    for name in ("killed", "two"):
        scores, metrics, chosen = tables(name)
        pd.testing.assert_frame_equal(scores, whole[0])  # scores and counted U-Net evaluations, bit for bit
        pd.testing.assert_frame_equal(metrics, whole[1])
        assert chosen == whole[2], name
