"""Presets, the one-call notebook setup, the embedded target's preparation, and the headless runner.

A preset is a flat YAML file of UPPER_CASE papermill parameters (``configs/<name>.yaml``). The same
file drives ``mialib prepare`` and the notebooks, so configuration has one source; every notebook's
parameters cell mirrors ``configs/default.yaml`` (a test checks it). ``DATA`` names the image set
(``emoji``, ``csv:...``, ``imagefolder:...``, ``img2dataset:...``, ``laion-mi:...``) and ``MODEL`` the
target; every notebook runs unchanged on any of them.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from . import data, imagesets
from .settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# The runs of `make run` on the default preset; a preset's NOTEBOOKS key chooses others (configs/regimes.yaml: 07_regimes).
NOTEBOOKS = ("01_data_split", "02_observation", "03_attack", "03_attack_biased", "04_robustness", "05_ablations", "06_set_audit")
# Keys read by `prepare` (the embedded target's training) and the runner, not by every notebook.
TARGET_KEYS = {"PRESET", "VAE_STEPS", "UNET_STEPS", "TRAIN_SEED", "TRAIN_BATCH_SIZE", "BUILD_TINY_TARGET", "NOTEBOOKS"}


def resolve(path: str | os.PathLike) -> Path:
    """Paths in presets are relative to the repository root (notebooks run from notebooks/)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else ROOT / path


def load_preset(path: str | os.PathLike) -> dict:
    with open(path) as handle:
        params = yaml.safe_load(handle) or {}
    bad = [k for k in params if k != k.upper()]
    if bad:
        raise ValueError(f"preset keys must be UPPER_CASE papermill parameters: {bad}")
    return params


def preset_notebooks(params: dict) -> tuple[str, ...]:
    """The notebook runs a preset asks for (``NOTEBOOKS``), else :data:`NOTEBOOKS`."""
    return tuple(params.get("NOTEBOOKS") or NOTEBOOKS)


def data_kind(params: dict) -> str:
    return imagesets.parse_spec(params.get("DATA", "emoji"))[0]


# --------------------------------------------------------------------------------------------------
# Data and target
# --------------------------------------------------------------------------------------------------
def emoji_options(params: dict) -> dict:
    """The embedded set's options from a preset's emoji keys (used when DATA is emoji)."""
    keys = {"N_MEMBERS": "members", "N_NONMEMBERS": "nonmembers", "N_PUBLIC": "public", "MANIFEST": "split", "IMAGE_DIR": "images", "NONMEMBER_STYLE": "style"}
    return {option: params[key] for key, option in keys.items() if key in params}


def open_data(params: dict) -> imagesets.ImageSet:
    """The image set that ``DATA`` names; preset-relative paths resolve against the repository root."""
    spec = params.get("DATA", "emoji")
    if params.get("NONMEMBER_STYLE", "same") != "same" and data_kind(params) != "emoji":
        raise ValueError(f"NONMEMBER_STYLE={params['NONMEMBER_STYLE']!r} (the biased split) exists only for the embedded emoji set, not {spec!r}")
    return imagesets.open_imageset(spec, base=ROOT, **emoji_options(params))


def emoji_training_images(params: dict) -> pd.DataFrame:
    """Public, member and non-member rows of the embedded set (rendered), for the target's training."""
    from .imagesets.local import EMOJI_DEFAULTS, emoji_images

    options = {k: v for k, v in emoji_options(params).items() if k != "style"}
    return emoji_images({**EMOJI_DEFAULTS, **options})


TINY_KEYS = {
    "IMAGE_SIZE": "image_size",
    "VAE_STEPS": "vae_steps",
    "UNET_STEPS": "unet_steps",
    "CHECKPOINTS": "checkpoints",
    "TRAIN_SEED": "seed",
    "TRAIN_BATCH_SIZE": "batch_size",
    "UNET_LR": "unet_lr",
    "UNET_DATA": "unet_data",
    "PRETRAIN_STEPS": "pretrain_steps",
    "FILLER_IMAGES": "filler_images",
    "SHARED_SEED": "shared_seed",
}
FILLER = "data/emoji_filler.csv"  # the catalogue's images outside the split: the regimes' extra training images


def tiny_config(params: dict):
    from .tiny import TinyConfig

    return TinyConfig(**{field: params[key] for key, field in TINY_KEYS.items() if key in params})


def emoji_pool(params: dict, images: pd.DataFrame, filler_images: int) -> pd.DataFrame:
    """The pool that the regimes' U-Nets train on besides the members: the public split of ``images``
    (:func:`emoji_training_images`) and the first ``filler_images`` rows of ``data/emoji_filler.csv``
    (rendered and hash-checked like the split)."""
    pool = [images[images["split"] == "public"]]
    if filler_images:
        filler = data.read_manifest(ROOT / FILLER)
        if len(filler) < filler_images:
            raise data.DataError(f"{FILLER} has {len(filler)} images, the regime asks for FILLER_IMAGES={filler_images}")
        pool.append(data.materialise_images(filler.head(int(filler_images)), resolve(params.get("IMAGE_DIR", "data/images"))))
    return pd.concat(pool, ignore_index=True)


def prepare_target(params: dict, progress: bool = True) -> str:
    """Build the embedded tiny target if the preset asks for it and it is missing; return the model.

    The tiny target always trains on the embedded emoji set (VAE on the public split, U-Net on the
    members, or on the pool as well in the memorisation regimes), whatever ``DATA`` is attacked with it.
    VAEs and pretrained U-Nets are shared between targets through ``.tiny-shared/`` beside the target.
    """
    model = params["MODEL"]
    if not params.get("BUILD_TINY_TARGET", False):
        return model
    from .tiny import build_tiny_target

    config = tiny_config(params)
    target_dir = resolve(model)
    if (target_dir / "model_index.json").exists():
        return str(build_tiny_target(target_dir, None, None, None, None, config, progress))
    images = emoji_training_images(params)
    public = data.load_tensors(images.loc[images["split"] == "public", "path"], config.image_size)
    members = images[images["split"] == "member"]
    tensors = data.load_tensors(members["path"], config.image_size)
    pool = {}
    if config.uses_pool:
        rows = emoji_pool(params, images, config.filler_images)
        pool = {"pool_images": data.load_tensors(rows["path"], config.image_size), "pool_captions": list(rows["caption"])}
    return str(build_tiny_target(
        target_dir, public, tensors, list(members["caption"]), list(images["caption"]), config, progress, emoji_tokenizer(config),
        shared=target_dir.parent / ".tiny-shared", **pool,
    ))


REGIME_KEYS = {"UNET_STEPS", "CHECKPOINTS", "UNET_LR", "UNET_DATA", "PRETRAIN_STEPS", "FILLER_IMAGES", "VAE_STEPS"}


def regime_targets(params: dict) -> dict[tuple[str, int], dict]:
    """(regime, seed) -> the preset that builds that target: ``REGIMES`` (regime -> target keys it
    changes) times ``REGIME_SEEDS``. Every target shares the VAE seeded by ``TRAIN_SEED`` (and the
    fine-tuned seeds share their pretrained base model); the seed changes the U-Net's initialisation and
    its training batches. A regime that changes nothing, at ``TRAIN_SEED``, is ``MODEL`` itself; the
    others are built beside it, ``<MODEL>-<regime>-seed<seed>``."""
    regimes, seeds = params.get("REGIMES") or {}, [int(s) for s in params.get("REGIME_SEEDS") or []]
    if not regimes or not seeds:
        raise ValueError("REGIMES and REGIME_SEEDS must both be set to run the regime study (configs/regimes.yaml)")
    if not params.get("BUILD_TINY_TARGET", False) or data_kind(params) != "emoji":
        raise ValueError("the regimes are recipes of the embedded tiny target: they need DATA=emoji and BUILD_TINY_TARGET=true")
    targets = {}
    base_seed = int(params.get("TRAIN_SEED", 0))
    for regime, overrides in regimes.items():
        overrides = dict(overrides or {})
        unknown = set(overrides) - REGIME_KEYS
        if unknown:
            raise ValueError(f"REGIMES[{regime!r}] sets {sorted(unknown)}; a regime may set {sorted(REGIME_KEYS)}")
        for seed in seeds:
            model = params["MODEL"] if not overrides and seed == base_seed else f"{str(params['MODEL']).rstrip('/')}-{regime}-seed{seed}"
            targets[(regime, seed)] = {**params, **overrides, "TRAIN_SEED": seed, "SHARED_SEED": base_seed, "MODEL": model}
    return targets


def prepare_regimes(params: dict, progress: bool = True) -> dict[tuple[str, int], str]:
    """Build every missing target of the regime study; (regime, seed) -> model folder."""
    targets = regime_targets(params)
    built = {}
    for (regime, seed), target in targets.items():
        if progress:
            print(f"regime {regime}, seed {seed}: {target['MODEL']}", flush=True)
        built[(regime, seed)] = prepare_target(target, progress)
    return built


EMOJI_TOKENIZER = ROOT / "data" / "emoji_tokenizer"


def emoji_tokenizer(config, folder: Path = EMOJI_TOKENIZER):
    """The embedded target's tokenizer: a byte-level BPE trained once on every caption of the emoji
    manifest and committed (``data/emoji_tokenizer``), so that every build of the target starts from the
    same token ids (``tiny.build_tiny_target`` explains why a fresh training would not). Missing, it is
    trained and saved there."""
    from transformers import CLIPTokenizer

    from .tiny import build_tokenizer

    if not (folder / "tokenizer_config.json").exists():
        captions = list(pd.read_csv(ROOT / "data" / "emoji_split.csv")["caption"])
        build_tokenizer(captions, config.max_tokens).save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = config.max_tokens
    return tokenizer


def locate_model(model: str | os.PathLike) -> str:
    """A local model folder (relative to the repository root or the working directory), or a hub id.

    A string that is not an existing folder is taken as a hub id only if it has the hub's form
    ``owner/name`` and its first part is not a local folder; anything else is a typo'd local path, and
    the error says so instead of failing on the network.
    """
    from .target import locate_model as _locate

    text = str(model)
    for candidate in (Path(text).expanduser(), resolve(text)):
        if candidate.exists():
            return str(candidate)
    return _locate(text)


# --------------------------------------------------------------------------------------------------
# The one-call setup of every notebook
# --------------------------------------------------------------------------------------------------
@dataclass
class Study:
    """What a notebook works with: its parameters, output folders, settings, image set and target."""

    params: dict
    notebook: str
    out: Path
    settings: Settings
    imageset: imagesets.ImageSet
    target: object = None
    notes: list = field(default_factory=list)

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    @property
    def tables(self) -> Path:
        return self.out / "tables"

    @property
    def cache(self) -> Path:
        return resolve(self.params["CACHE_DIR"]) if self.params.get("CACHE_DIR") else self.out / "cache"

    @property
    def size(self) -> int:
        return int(self.params["IMAGE_SIZE"])

    @property
    def batch_size(self) -> int:
        return int(self.params.get("BATCH_SIZE", 64))

    @property
    def is_emoji(self) -> bool:
        return data_kind(self.params) == "emoji"

    def score(self, requests, imageset=None, settings=None, target=None, size=None, progress=True):
        """Score requests (run id -> request text) on this study's set, or another derived from it."""
        from . import runs

        return runs.score(
            target or self.target, imageset if imageset is not None else self.imageset, requests, settings or self.settings,
            self.cache, self.batch_size, size or self.size, progress,
        )

    def skip(self, study: str, reason: str) -> None:
        """Record (and print) that a study does not apply to this set or model."""
        self.notes.append({"notebook": self.notebook, "study": study, "reason": reason})
        print(f"skipped {study}: {reason}", flush=True)
        path = self.tables / f"skipped_studies_{self.notebook}.csv"
        pd.DataFrame(self.notes).to_csv(path, index=False)

    def read_chosen(self) -> dict:
        path = self.out / "chosen_settings.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run 03_attack with the same OUTPUT_DIR first")
        return json.loads(path.read_text())


def setup(params: dict, notebook: str, load_model: bool = True) -> Study:
    """One call at the top of every notebook: the UPPER_CASE names of ``params`` (a notebook passes
    ``globals()``) are its parameters. Opens the image set (writing its records and skip table), checks
    the model and the image size before any compute, and loads the target."""
    params = {k: v for k, v in params.items() if k.isupper() and not k.startswith("_")}
    if "MIALIB_MEMORY_MB" not in os.environ:
        from . import memo

        memo.configure(memo.STUDY_MB)  # a notebook scores the same images many times
    out = claim_output(resolve(params["OUTPUT_DIR"]))
    for folder in (out / "tables", out / "figures"):
        folder.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_parameters(params)
    imageset = open_data(params)
    imageset.records.drop(columns=["location"]).to_csv(out / "tables" / "image_set.csv", index=False)
    imageset.skipped.to_csv(out / "tables" / "skipped_images.csv", index=False)
    print(imageset.summary(), flush=True)
    study = Study(params, notebook, out, settings, imageset)
    claim_output(study.cache)
    if load_model:
        import torch

        from .target import load_target

        study.target = load_target(
            locate_model(params["MODEL"]), device=params.get("DEVICE", "cpu"), dtype=settings.dtype,
            variant=params.get("VARIANT") or None, config=params.get("MODEL_CONFIG") or None,
        )
        check_size(study.target, study.size)
        truncated = study.target.truncated_captions(list(imageset.records["caption"]))
        if truncated:
            frame = pd.DataFrame(truncated, columns=["index", "tokens"]).assign(id=lambda d: imageset.records["id"].to_numpy()[d["index"]])
            frame[["id", "tokens"]].assign(limit=study.target.tokenizer.model_max_length).to_csv(out / "tables" / "captions_truncated.csv", index=False)
            print(f"{len(truncated)} captions are longer than the text encoder's {study.target.tokenizer.model_max_length} tokens and are cut there (tables/captions_truncated.csv)", flush=True)
        target = study.target
        print(f"{target.name}: {target.family}, predicts {target.prediction_type}, {settings.dtype} (VAE {str(target.vae.dtype).split('.')[-1]}), native {target.resolution} px, attacked at {study.size} px", flush=True)
    return study


def claim_output(folder: Path) -> Path:
    """An output or cache folder: under the repository's ``outputs/`` it is the project's own; anywhere
    else it must be new, empty, or one that mialib wrote (never a folder holding a user's files)."""
    if folder.resolve().is_relative_to((ROOT / "outputs").resolve()):
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return data.claim_folder(folder)


def check_size(target, size: int) -> None:
    """The attack size must be a multiple of the VAE's downscale factor; another size than the model's
    native one is allowed (a study) but said."""
    factor = 2 ** (len(target.vae.config.block_out_channels) - 1)
    if size % factor:
        raise ValueError(f"IMAGE_SIZE={size} is not a multiple of the VAE's downscale factor {factor}")
    if size != target.resolution:
        print(f"note: IMAGE_SIZE={size} differs from the model's native {target.resolution} px", flush=True)


# --------------------------------------------------------------------------------------------------
# The headless runner
# --------------------------------------------------------------------------------------------------
def notebook_runs(params: dict) -> dict[str, tuple[str, dict] | str]:
    """Run name -> (source notebook, parameter overrides), or the reason the run does not apply.

    ``03_attack_biased`` repeats the comparison on the biased split (non-members from a shifted source);
    it exists only for the embedded emoji set. It shares the fair run's cache: results are keyed per
    image, so the members (the same images) are read back and only the shifted non-members are scored.
    """
    output_dir = params["OUTPUT_DIR"]
    cache_dir = params.get("CACHE_DIR") or f"{output_dir}/cache"
    biased = (
        ("03_attack", {"NONMEMBER_STYLE": "shifted", "OUTPUT_DIR": f"{output_dir}/biased", "CACHE_DIR": cache_dir, "FAIR_RESULTS": f"{output_dir}/metrics.csv"})
        if data_kind(params) == "emoji"
        else f"the biased split exists only for the embedded emoji set (DATA is {params.get('DATA')!r})"
    )
    return {
        "01_data_split": ("01_data_split", {}),
        "02_observation": ("02_observation", {}),
        "03_attack": ("03_attack", {}),
        "03_attack_biased": biased,
        "04_robustness": ("04_robustness", {}),
        "05_ablations": ("05_ablations", {}),
        "06_set_audit": ("06_set_audit", {}),
        "07_regimes": ("07_regimes", {}) if data_kind(params) == "emoji" else f"the regimes are trainings of the embedded target on the emoji set (DATA is {params.get('DATA')!r})",
    }


def write_html_report(output_dir: Path, outcomes: dict, params: dict) -> Path:
    """HTML copies of the executed notebooks (``html/<run>.html``, code and figures inline) and an index page,
    ``html/index.html``, so that a whole run can be read and shared without Jupyter."""
    import html

    from nbconvert import HTMLExporter

    folder = output_dir / "html"
    folder.mkdir(exist_ok=True)
    exporter = HTMLExporter()
    rows = []
    for name, outcome in outcomes.items():
        executed = output_dir / "notebooks" / f"{name}.ipynb"
        link = html.escape(name)
        detail = outcome.get("reason") or outcome.get("error") or f"{outcome.get('seconds', 0)} s"
        if outcome["status"] != "skipped" and executed.exists():
            try:
                body, _ = exporter.from_filename(str(executed))
                (folder / f"{name}.html").write_text(body, encoding="utf-8")
                link = f'<a href="{html.escape(name)}.html">{html.escape(name)}</a>'
            except Exception as error:  # a notebook that cannot be rendered is reported, never stops the report
                detail = f"{detail}; no HTML copy: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        rows.append(f"<tr><td>{link}</td><td>{html.escape(outcome['status'])}</td><td>{html.escape(str(detail))}</td></tr>")
    settings = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(json.dumps(v))}</code></td></tr>" for k, v in params.items())
    index = (
        "<!doctype html><html><head><meta charset='utf-8'><title>mialib run: " + html.escape(str(params.get("PRESET", ""))) + "</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:.2em .8em;vertical-align:top}</style></head><body>"
        f"<h1>mialib run: preset {html.escape(str(params.get('PRESET', '')))}</h1>"
        f"<p>Executed notebooks of <code>{html.escape(str(output_dir))}</code>, written {time.strftime('%Y-%m-%d %H:%M')}. "
        "Figures and tables are also in <code>figures/</code> and <code>tables/</code> beside this folder.</p>"
        "<table><tr><th>notebook</th><th>status</th><th>time or reason</th></tr>" + "".join(rows) + "</table>"
        "<h2>Parameters</h2><table>" + settings + "</table></body></html>"
    )
    (folder / "index.html").write_text(index, encoding="utf-8")
    return folder / "index.html"


def declared_parameters(path: str | os.PathLike) -> dict:
    """The names a notebook's ``parameters`` cell assigns, with their values (read with ``ast``, which,
    unlike papermill's inspector, takes multi-line dicts and any comment)."""
    import ast

    import nbformat

    notebook = nbformat.read(str(path), as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path} must have exactly one cell tagged 'parameters', has {len(cells)}")
    values = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


class NotebookFailures(RuntimeError):
    """One or more notebooks failed; the others ran."""


def run_notebooks(preset_path: str | os.PathLike, notebooks: tuple[str, ...] | None = None, kernel: str = "python3") -> Path:
    """Execute notebooks headlessly with papermill, each receiving the preset keys it declares.

    Executed copies go to ``<OUTPUT_DIR>/notebooks/``; the resolved parameters to
    ``<OUTPUT_DIR>/parameters.json``; times and outcomes to ``notebook_runs.json``. A preset key that no
    notebook declares is an error (a typo would otherwise be ignored silently). A failing notebook does
    not stop the others; :class:`NotebookFailures` lists every failure at the end.
    """
    import papermill

    params = load_preset(preset_path)
    notebooks = preset_notebooks(params) if notebooks is None else tuple(notebooks)
    output_dir = claim_output(resolve(params["OUTPUT_DIR"]))  # before anything is written there
    (output_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    runs = notebook_runs(params)
    unknown = [name for name in notebooks if name not in runs]
    if unknown:
        raise ValueError(f"unknown notebook runs {unknown}; known: {list(runs)}")
    # every notebook's keys count as declared, also those of runs that do not apply to this preset's data
    sources = {run[0] for run in runs.values() if isinstance(run, tuple)} | {name for name in runs if (ROOT / "notebooks" / f"{name}.ipynb").exists()}
    declared = {name: declared_parameters(ROOT / "notebooks" / f"{name}.ipynb") for name in sources}
    unused = set(params) - set().union(*declared.values()) - TARGET_KEYS
    if unused:
        raise ValueError(f"preset keys that no notebook declares: {sorted(unused)}")
    (output_dir / "parameters.json").write_text(json.dumps(params, indent=2))
    outcomes, failures = {}, []
    for name in notebooks:
        if isinstance(runs[name], str):
            outcomes[name] = {"status": "skipped", "reason": runs[name]}
            print(f"{name}: skipped ({runs[name]})", flush=True)
            continue
        source, overrides = runs[name]
        values = {**params, **overrides}
        start = time.time()
        try:
            papermill.execute_notebook(
                str(ROOT / "notebooks" / f"{source}.ipynb"),
                str(output_dir / "notebooks" / f"{name}.ipynb"),
                parameters={k: v for k, v in values.items() if k in declared[source]},
                kernel_name=kernel,
                cwd=str(ROOT / "notebooks"),
                progress_bar=False,
                log_output=True,
            )
            outcomes[name] = {"status": "ok", "seconds": round(time.time() - start, 1)}
        except Exception as error:  # papermill raises PapermillExecutionError with the cell's traceback
            outcomes[name] = {"status": "failed", "seconds": round(time.time() - start, 1), "error": str(error).strip().splitlines()[-1][:500]}
            failures.append(name)
            traceback.print_exc()
        print(f"{name}: {outcomes[name]['status']} ({outcomes[name].get('seconds', 0)} s)", flush=True)
    (output_dir / "notebook_runs.json").write_text(json.dumps(outcomes, indent=2))
    write_html_report(output_dir, outcomes, params)
    if failures:
        details = "; ".join(f"{n}: {outcomes[n]['error']}" for n in failures)
        raise NotebookFailures(f"{len(failures)} of {len(notebooks)} notebooks failed ({details}); executed copies in {output_dir / 'notebooks'}")
    return output_dir
