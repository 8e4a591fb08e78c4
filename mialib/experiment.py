"""Presets, the one-call notebook setup, the embedded target's preparation, and the headless runner.

A preset is a flat YAML file of UPPER_CASE papermill parameters (``configs/<name>.yaml``). The same
file drives ``mialib prepare`` and the notebooks, so configuration has one source; every notebook's
parameters cell mirrors ``configs/default.yaml`` (a test checks it). ``DATA`` names the image set
(``emoji``, ``csv:...``, ``imagefolder:...``, ``img2dataset:...``, ``laion-mi:...``) and ``MODEL`` the
target; every notebook runs unchanged on any of them.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from . import data, imagesets, scoring
from .imagesets.local import FILLER_MANIFEST
from .paths import ROOT, resolve
from .settings import Settings

# The runs of `make run` on the default preset; a preset's NOTEBOOKS key chooses others
# (configs/regimes.yaml: 07_regimes).
NOTEBOOKS = (
    "01_data_split",
    "02_observation",
    "03_attack",
    "03_attack_biased",
    "04_robustness",
    "05_ablations",
    "06_set_audit",
)
# Keys read by `prepare` (the embedded target's training) and the runner, not by every notebook.
TARGET_KEYS = {
    "PRESET", "VAE_STEPS", "VAE_LR", "UNET_STEPS", "TRAIN_SEED", "TRAIN_BATCH_SIZE", "BUILD_TINY_TARGET", "NOTEBOOKS",
    "TINY_FAMILY", "EXTRA_NONMEMBERS_RUNS",
}  # fmt: skip


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
# Library notices that say nothing about a run
# --------------------------------------------------------------------------------------------------
class DropMessages(logging.Filter):
    """A logging filter that drops the records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# transformers >= 5 names each image processor's torchvision backend; without torchvision it falls back to the
# PIL one and says so once per process, when diffusers imports a pipeline class. No attack uses an image
# processor (the pipelines' safety-checker feature extractor is never called): the notice is noise on the
# terminal and in the executed notebooks. Only this notice is dropped; the logger's other records pass.
TORCHVISION_FALLBACK = DropMessages("requires torchvision (not installed); falling back to")


def quiet_library_notices() -> None:
    """Drop :data:`TORCHVISION_FALLBACK` (idempotent; transformers need not be imported yet)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if TORCHVISION_FALLBACK not in logger.filters:
        logger.addFilter(TORCHVISION_FALLBACK)


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """Without progress, transformers' own bars (``Writing model shards`` when the target is saved) are off
    too, as mialib's are; the previous state is restored after."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------
# Data and target
# --------------------------------------------------------------------------------------------------
def emoji_options(params: dict) -> dict:
    """The embedded set's options from a preset's emoji keys (used when DATA is emoji)."""
    keys = {
        "N_MEMBERS": "members",
        "N_NONMEMBERS": "nonmembers",
        "N_PUBLIC": "public",
        "MANIFEST": "split",
        "IMAGE_DIR": "images",
        "NONMEMBER_STYLE": "style",
        "EXTRA_NONMEMBERS": "extra_nonmembers",
    }
    return {option: params[key] for key, option in keys.items() if key in params}


def open_data(params: dict) -> imagesets.ImageSet:
    """The image set that ``DATA`` names; preset-relative paths resolve against the repository root."""
    spec = params.get("DATA", "emoji")
    if params.get("NONMEMBER_STYLE", "same") != "same" and data_kind(params) != "emoji":
        raise ValueError(
            f"NONMEMBER_STYLE={params['NONMEMBER_STYLE']!r} (the biased split) exists only for the embedded emoji "
            f"set, not {spec!r}"
        )
    return imagesets.open_imageset(spec, base=ROOT, **emoji_options(params))


def emoji_training_images(params: dict) -> pd.DataFrame:
    """Public, member and non-member rows of the embedded set (rendered), for the target's training."""
    from .imagesets.local import EMOJI_DEFAULTS, emoji_images

    options = {k: v for k, v in emoji_options(params).items() if k not in ("style", "extra_nonmembers")}
    return emoji_images({**EMOJI_DEFAULTS, **options})


TINY_KEYS = {
    "IMAGE_SIZE": "image_size",
    "VAE_STEPS": "vae_steps",
    "VAE_LR": "vae_lr",  # the VAE's peak learning rate (cosine schedule)
    "UNET_STEPS": "unet_steps",
    "CHECKPOINTS": "checkpoints",
    "TRAIN_SEED": "seed",
    "TRAIN_BATCH_SIZE": "batch_size",
    "UNET_LR": "unet_lr",
    "UNET_DATA": "unet_data",
    "PRETRAIN_STEPS": "pretrain_steps",
    "FILLER_IMAGES": "filler_images",
    "SHARED_SEED": "shared_seed",
    "TINY_FAMILY": "family",  # sd (default) or sd3: the flow-matching tiny target (configs/flow.yaml)
    "LORA_RANK": "lora_rank",  # > 0: the fine-tuning trains a LoRA of this rank (07's LoRA regime)
    "LORA_LR": "lora_lr",  # the LoRA's learning rate
}
FILLER = FILLER_MANIFEST  # the catalogue's images outside the split: the regimes' extra training images


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
            raise data.DataError(
                f"{FILLER} has {len(filler)} images, the regime asks for FILLER_IMAGES={filler_images}"
            )
        pool.append(
            data.materialise_images(filler.head(int(filler_images)), resolve(params.get("IMAGE_DIR", "data/images")))
        )
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
    quiet_library_notices()
    with library_progress_bars(progress):
        return _prepare_tiny_target(params, model, progress)


def _prepare_tiny_target(params: dict, model: str, progress: bool) -> str:
    from .tiny import build_tiny_target

    config = tiny_config(params)
    target_dir = resolve(model)
    if (target_dir / "model_index.json").exists():
        return str(build_tiny_target(target_dir, None, None, None, None, config, progress))
    images = emoji_training_images(params)
    public = data.load_tensors(images.loc[images["split"] == "public", "path"], config.image_size)
    attacked = images[images["split"].isin(["member", "nonmember"])]
    held_out = data.load_tensors(attacked["path"], config.image_size)  # never seen by the VAE: its held-out curve
    members = images[images["split"] == "member"]
    if config.unet_data == "stand-ins":
        members = stand_ins(images, len(members), config.seed)
    tensors = data.load_tensors(members["path"], config.image_size)
    pool = {}
    if config.uses_pool:
        rows = emoji_pool(params, images, config.filler_images)
        pool = {
            "pool_images": data.load_tensors(rows["path"], config.image_size),
            "pool_captions": list(rows["caption"]),
        }
    return str(
        build_tiny_target(
            target_dir,
            public,
            tensors,
            list(members["caption"]),
            list(images["caption"]),
            config,
            progress,
            emoji_tokenizer(config),
            shared=target_dir.parent / ".tiny-shared",
            held_out_images=held_out,
            **pool,
        )
    )


def stand_ins(images: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """What a reference model of the from-scratch recipe trains on instead of the members: ``n`` images of the
    public split (never attacked; they also train the VAE), drawn by ``seed``, so references with other seeds
    see other images (LiRA's random subsets)."""
    public = images[images["split"] == "public"]
    if len(public) < n:
        raise data.DataError(f"the public split has {len(public)} images; a stand-in reference needs {n}")
    return public.sample(n=n, random_state=seed)  # numpy's legacy RandomState: the same draw in every release


REGIME_KEYS = {
    "UNET_STEPS",
    "CHECKPOINTS",
    "UNET_LR",
    "UNET_DATA",
    "PRETRAIN_STEPS",
    "FILLER_IMAGES",
    "VAE_STEPS",
    "LORA_RANK",
    "LORA_LR",
    "TINY_FAMILY",
    "SEEDS",  # the regime's own training seeds instead of REGIME_SEEDS (a regime too costly for all of them)
}


def regime_targets(params: dict) -> dict[tuple[str, int], dict]:
    """(regime, seed) -> the preset that builds that target: ``REGIMES`` (regime -> target keys it
    changes) times ``REGIME_SEEDS`` (or the regime's own ``SEEDS``). Every target shares the VAE seeded by
    ``TRAIN_SEED`` (and the fine-tuned seeds share their pretrained base model); the seed changes the U-Net's
    initialisation and its training batches. A regime that changes nothing, at ``TRAIN_SEED``, is ``MODEL`` itself; the
    others are built beside it, ``<MODEL>-<regime>-seed<seed>``."""
    regimes, seeds = params.get("REGIMES") or {}, [int(s) for s in params.get("REGIME_SEEDS") or []]
    if not regimes or not seeds:
        raise ValueError("REGIMES and REGIME_SEEDS must both be set to run the regime study (configs/regimes.yaml)")
    if not params.get("BUILD_TINY_TARGET", False) or data_kind(params) != "emoji":
        raise ValueError(
            "the regimes are recipes of the embedded tiny target: they need DATA=emoji and BUILD_TINY_TARGET=true"
        )
    extra = int(params.get("EXTRA_NONMEMBERS") or 0)
    pooled = [regime for regime, overrides in regimes.items() if (overrides or {}).get("FILLER_IMAGES")]
    if extra and pooled:
        raise ValueError(
            f"EXTRA_NONMEMBERS={extra} adds {FILLER} images to the test split as non-members, but the regimes "
            f"{pooled} train on them (FILLER_IMAGES); the regime study needs EXTRA_NONMEMBERS: 0"
        )
    targets = {}
    base_seed = int(params.get("TRAIN_SEED", 0))
    for regime, overrides in regimes.items():
        overrides = dict(overrides or {})
        unknown = set(overrides) - REGIME_KEYS
        if unknown:
            raise ValueError(f"REGIMES[{regime!r}] sets {sorted(unknown)}; a regime may set {sorted(REGIME_KEYS)}")
        own_seeds = [int(s) for s in overrides.pop("SEEDS", seeds)]
        if not own_seeds:
            raise ValueError(f"REGIMES[{regime!r}] sets SEEDS: []; a regime needs at least one training seed")
        for seed in own_seeds:
            model = (
                params["MODEL"]
                if not overrides and seed == base_seed
                else f"{str(params['MODEL']).rstrip('/')}-{regime}-seed{seed}"
            )
            targets[(regime, seed)] = {
                **params,
                **overrides,
                "TRAIN_SEED": seed,
                "SHARED_SEED": base_seed,
                "MODEL": model,
            }
    return targets


def regime_references(params: dict) -> dict[str, list[dict]]:
    """regime -> the presets of its reference models (``calibrate=reference`` in 07): ``REGIME_REFERENCES``
    (regime -> target keys changed on top of the regime's own, e.g. ``UNET_DATA: stand-ins``) times
    ``REFERENCE_SEEDS``. The references train as the regime's targets do, on data without the members (so
    without any attacked image), and share their VAE and base model. A reference that trains no step
    (``UNET_STEPS: 0`` after ``PRETRAIN_STEPS``: the fine-tune's base model) is one model whatever the seed,
    and is built once. Built beside ``MODEL`` as ``<MODEL>-<regime>-reference<seed>``."""
    recipes = params.get("REGIME_REFERENCES") or {}
    regimes = params.get("REGIMES") or {}
    unknown = set(recipes) - set(regimes)
    if unknown:
        raise ValueError(f"REGIME_REFERENCES names {sorted(unknown)}, which REGIMES does not have ({sorted(regimes)})")
    seeds = [int(s) for s in params.get("REFERENCE_SEEDS") or []]
    if recipes and not seeds:
        raise ValueError("REGIME_REFERENCES needs REFERENCE_SEEDS (the reference models' training seeds)")
    base_seed = int(params.get("TRAIN_SEED", 0))
    references = {}
    for regime, changes in recipes.items():
        changes = dict(changes or {})
        wrong = set(changes) - REGIME_KEYS
        if wrong:
            raise ValueError(f"REGIME_REFERENCES[{regime!r}] sets {sorted(wrong)}; it may set {sorted(REGIME_KEYS)}")
        if "SEEDS" in changes:
            raise ValueError(f"REGIME_REFERENCES[{regime!r}] sets SEEDS; the references' seeds are REFERENCE_SEEDS")
        recipe = {**params, **{k: v for k, v in (regimes[regime] or {}).items() if k != "SEEDS"}, **changes}
        fixed = int(recipe["UNET_STEPS"]) == 0  # no training step: the base model itself, whatever the seed
        if recipe.get("UNET_DATA", "members") in ("members", "members+pool") and not fixed:
            raise ValueError(
                f"REGIME_REFERENCES[{regime!r}] would train on the members (UNET_DATA="
                f"{recipe.get('UNET_DATA', 'members')!r}): a reference must not see the attacked images; use "
                "UNET_DATA: stand-ins or pool, or UNET_STEPS: 0 for a fine-tune's base model"
            )
        references[regime] = [
            {
                **recipe,
                "TRAIN_SEED": seed,
                "SHARED_SEED": base_seed,
                "MODEL": f"{str(params['MODEL']).rstrip('/')}-{regime}-" + ("base" if fixed else f"reference{seed}"),
            }
            for seed in (seeds[:1] if fixed else seeds)
        ]
    return references


def prepare_regimes(params: dict, progress: bool = True) -> dict[tuple[str, int], str]:
    """Build every missing target of the regime study, and its reference models (:func:`regime_references`);
    (regime, seed) -> model folder."""
    targets = regime_targets(params)
    built = {}
    for (regime, seed), target in targets.items():
        if progress:
            print(f"regime {regime}, seed {seed}: {target['MODEL']}", flush=True)
        built[(regime, seed)] = prepare_target(target, progress)
    prepare_regime_references(params, progress)
    return built


def prepare_regime_references(params: dict, progress: bool = True) -> dict[str, list[str]]:
    """Build every missing reference model of the regime study; regime -> model folders (empty when the
    preset names none)."""
    built = {}
    for regime, presets in regime_references(params).items():
        built[regime] = []
        for preset in presets:
            if progress:
                print(f"regime {regime}, reference: {preset['MODEL']}", flush=True)
            built[regime].append(prepare_target(preset, progress))
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

    A string that is not an existing folder is taken as a hub id only by :func:`mialib.target.locate_model`'s
    rule (the hub's form ``owner/name`` and nothing that looks local; offline, only a cached one); anything
    else is a typo'd local path, and the error says so at once instead of failing on the network.
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
    references: list = field(default_factory=list)  # reference models' Targets (REFERENCE_MODELS)

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
            target or self.target,
            imageset if imageset is not None else self.imageset,
            requests,
            settings or self.settings,
            self.cache,
            self.batch_size,
            size or self.size,
            progress,
            references=self.references,
        )

    def skip(self, study: str, reason: str) -> None:
        """Record (and print) that a study does not apply to this set or model (once: a study skipped again
        for the same reason is not recorded twice)."""
        note = {"notebook": self.notebook, "study": study, "reason": reason}
        if note in self.notes:
            return
        self.notes.append(note)
        print(f"skipped {study}: {reason}", flush=True)
        path = self.tables / f"skipped_studies_{self.notebook}.csv"
        pd.DataFrame(self.notes).to_csv(path, index=False)

    def read_chosen(self) -> dict:
        path = self.out / "chosen_settings.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run 03_attack with the same OUTPUT_DIR first")
        return json.loads(path.read_text())


def _own_set_suffix(out: Path, params: dict, notebook: str) -> str:
    """``tables/image_set.csv`` is the run's attacked set (the one ``make run`` writes ``parameters.json``
    for); a notebook run without the preset's extra non-members (``EXTRA_NONMEMBERS_RUNS``) writes its own
    set beside it, ``image_set_<notebook>.csv``, instead of overwriting it."""
    saved = out / "parameters.json"
    if not saved.exists():
        return ""
    preset_extra = int(json.loads(saved.read_text()).get("EXTRA_NONMEMBERS") or 0)
    return "" if preset_extra == int(params.get("EXTRA_NONMEMBERS") or 0) else f"_{notebook}"


def setup(params: dict, notebook: str, load_model: bool = True) -> Study:
    """One call at the top of every notebook: the UPPER_CASE names of ``params`` (a notebook passes
    ``globals()``) are its parameters. Opens the image set (writing its records and skip table), checks
    the model and the image size before any compute, and loads the target."""
    params = {k: v for k, v in params.items() if k.isupper() and not k.startswith("_")}
    quiet_library_notices()
    if "MIALIB_MEMORY_MB" not in os.environ:
        from . import memo

        memo.configure(memo.STUDY_MB)  # a notebook scores the same images many times
    out = claim_output(resolve(params["OUTPUT_DIR"]))
    for folder in (out / "tables", out / "figures"):
        folder.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_parameters(params)
    imageset = open_data(params)
    suffix = _own_set_suffix(out, params, notebook)
    imageset.records.drop(columns=["location"]).to_csv(out / "tables" / f"image_set{suffix}.csv", index=False)
    imageset.skipped.to_csv(out / "tables" / f"skipped_images{suffix}.csv", index=False)
    print(imageset.summary(), flush=True)
    study = Study(params, notebook, out, settings, imageset)
    claim_output(study.cache)
    if load_model:
        check_unseen_extras(params)
        opened = scoring.open_target(
            locate_model(params["MODEL"]),
            imageset.records,
            size=study.size,
            device=params.get("DEVICE", "cpu"),
            dtype=settings.dtype,
            variant=params.get("VARIANT") or None,
            config=params.get("MODEL_CONFIG") or None,
            tables=out / "tables",
            loras=params.get("LORA") or [],
        )
        study.target = opened.target
        study.references = load_references(params, settings)
    return study


def check_unseen_extras(params: dict) -> None:
    """``EXTRA_NONMEMBERS`` labels catalogue images outside the split (``data/emoji_filler.csv``) as test
    non-members, which is true only of a target that never trained on them: an embedded target whose
    recipe put them in its pool (``FILLER_IMAGES``, the fine-tuned and weak regimes) is refused. Any other
    model's training data is the user's to vouch for."""
    extra = int(params.get("EXTRA_NONMEMBERS") or 0)
    if not extra or data_kind(params) != "emoji":
        return
    from .tiny import TinyConfig

    saved = resolve(str(params["MODEL"])) / "tiny_config.json"
    if saved.is_file():
        config = TinyConfig.from_saved(json.loads(saved.read_text()))
        if config.filler_images:
            raise data.DataError(
                f"EXTRA_NONMEMBERS={extra} adds {FILLER} images to the test split as non-members, but "
                f"{params['MODEL']} trained on {config.filler_images} of them (FILLER_IMAGES): they are not "
                "non-members of this target; set EXTRA_NONMEMBERS: 0"
            )


def load_references(params: dict, settings: Settings) -> list:
    """The reference models of ``calibrate=reference`` (``REFERENCE_MODELS``: a list of models in any form
    ``MODEL`` takes), loaded as the target is; a reference must have the target's resolution. Without any,
    a target given with ``LORA`` adapters has its base model (``MODEL`` without them) as its reference."""
    from .target import load_target

    references = []
    models = list(params.get("REFERENCE_MODELS") or [])
    if not models and params.get("LORA"):
        models = [params["MODEL"]]
    for model in models:
        reference = load_target(
            locate_model(model),
            device=params.get("DEVICE", "cpu"),
            dtype=settings.dtype,
            **(
                {"variant": params.get("VARIANT") or None, "config": params.get("MODEL_CONFIG") or None}
                if model == params["MODEL"]
                else {}
            ),
        )
        print(
            f"reference model {reference.name}: {reference.family}, fingerprint {reference.fingerprint()[:12]}",
            flush=True,
        )
        references.append(reference)
    return references


def claim_output(folder: Path) -> Path:
    """An output or cache folder: under the repository's ``outputs/`` it is the project's own; anywhere
    else it must be new, empty, or one that mialib wrote (never a folder holding a user's files)."""
    if folder.resolve().is_relative_to((ROOT / "outputs").resolve()):
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return data.claim_folder(folder)


# --------------------------------------------------------------------------------------------------
# The headless runner
# --------------------------------------------------------------------------------------------------
def notebook_runs(params: dict) -> dict[str, tuple[str, dict] | str]:
    """Run name -> (source notebook, parameter overrides), or the reason the run does not apply.

    ``03_attack_biased`` repeats the comparison on the biased split (non-members from a shifted source);
    it exists only for the embedded emoji set. It shares the fair run's cache: results are keyed per
    image, so the members (the same images) are read back and only the shifted non-members are scored.
    With ``EXTRA_NONMEMBERS_RUNS`` (a list of run names), only those runs get ``EXTRA_NONMEMBERS``; the
    others attack the split without them (sweeps that report AUC, which the split resolves, at a third of
    the cost).
    """
    output_dir = params["OUTPUT_DIR"]
    cache_dir = params.get("CACHE_DIR") or f"{output_dir}/cache"
    biased = (
        (
            "03_attack",
            {
                "NONMEMBER_STYLE": "shifted",
                "OUTPUT_DIR": f"{output_dir}/biased",
                "CACHE_DIR": cache_dir,
                "FAIR_RESULTS": f"{output_dir}/metrics.csv",
                "CAPTION_CONTROLS": [],  # the fair run shows them
            },
        )
        if data_kind(params) == "emoji"
        else f"the biased split exists only for the embedded emoji set (DATA is {params.get('DATA')!r})"
    )
    runs = {
        "01_data_split": ("01_data_split", {}),
        "02_observation": ("02_observation", {}),
        "03_attack": ("03_attack", {}),
        "03_attack_biased": biased,
        "04_robustness": ("04_robustness", {}),
        "05_ablations": ("05_ablations", {}),
        "06_set_audit": ("06_set_audit", {}),
        "07_regimes": ("07_regimes", {})
        if data_kind(params) == "emoji"
        else f"the regimes are trainings of the embedded target on the emoji set (DATA is {params.get('DATA')!r})",
    }
    # EXTRA_NONMEMBERS_RUNS: the runs that attack the extra test non-members; the others attack the split alone
    extra_runs = params.get("EXTRA_NONMEMBERS_RUNS", "all")
    if extra_runs != "all":
        if isinstance(extra_runs, str):
            raise ValueError(f"EXTRA_NONMEMBERS_RUNS: {extra_runs!r}; a list of notebook runs, or all")
        unknown = sorted(set(extra_runs) - set(runs))
        if unknown:
            raise ValueError(f"EXTRA_NONMEMBERS_RUNS names unknown notebook runs {unknown}; known: {list(runs)}")
        if int(params.get("EXTRA_NONMEMBERS") or 0):
            for name, run in runs.items():
                if isinstance(run, tuple) and name not in extra_runs:
                    runs[name] = (run[0], {**run[1], "EXTRA_NONMEMBERS": 0})
    return runs


# --------------------------------------------------------------------------------------------------
# What the notebooks are given, and how their kernels run
# --------------------------------------------------------------------------------------------------
OUTPUT_KEYS = ("OUTPUT_DIR", "CACHE_DIR", "FAIR_RESULTS")  # where a run writes: read back through resolve() only
INPUT_PATH_KEYS = ("MODEL", "MODEL_CONFIG", "MANIFEST", "IMAGE_DIR")


def relative_to_root(path: str | os.PathLike, always: bool = False) -> str | None:
    """An absolute ``path`` relative to the repository root, as :func:`resolve` reads it back: when it lies
    inside the repository, or anywhere (``../..``) with ``always``; else None (also across drives)."""
    path = Path(path).expanduser()
    if not path.is_absolute():
        return None
    inside = os.path.normpath(path) == str(ROOT) or os.path.normpath(path).startswith(str(ROOT) + os.sep)
    if not (inside or always):
        return None
    try:
        return Path(os.path.relpath(path, ROOT)).as_posix()
    except ValueError:  # another drive
        return None


def shown_parameters(values: dict) -> dict:
    """The parameters a notebook receives, with paths relative to the repository root, so that the executed
    notebooks and their HTML copies never hold the absolute location of the output folder or of the
    repository (papermill writes every parameter into the notebook). The output keys are always relative
    (:func:`resolve` reads them back); the inputs (model, manifest, images, an image set's folder) only when
    they lie inside the repository, since a model is also looked up from the notebooks' working directory."""
    shown = dict(values)
    for key in OUTPUT_KEYS + INPUT_PATH_KEYS:
        if isinstance(shown.get(key), str) and shown[key]:
            shown[key] = relative_to_root(shown[key], always=key in OUTPUT_KEYS) or shown[key]
    spec = shown.get("DATA")
    if isinstance(spec, str) and ":" in spec:
        kind, _, rest = spec.partition(":")
        path, sep, query = rest.partition("?")
        relative = relative_to_root(path) if "=" not in path else None  # img2dataset's name=path pairs stay
        if relative:
            shown["DATA"] = f"{kind}:{relative}{sep}{query}"
    return shown


# tqdm (>= 4.66) takes its defaults from TQDM_<ARGUMENT> variables. In the kernels of a headless run: bars whose
# caller leaves `disable` alone (diffusers' and transformers' loading bars) are off; mialib's own bars pass
# `disable=not progress`, which overrides that default, so they get an endless `delay` instead: never drawn,
# nothing to clear, no widget displayed. In Jupyter (ipywidgets installed) the same bars render as widgets.
HEADLESS_ENV = {"TQDM_DISABLE": "1", "TQDM_DELAY": "inf"}
# papermill's own parameter inspector reads a parameters cell one line at a time: it cannot parse a value over
# several lines (ATTACKS = {...}) or some comments, warns, then calls the parameter unknown. The runner has
# already checked every key with ast (declared_parameters), so these two warnings are false alarms.
PAPERMILL_INSPECTOR = DropMessages("Unable to parse line ", "Passed unknown parameter: ")


@contextlib.contextmanager
def headless_kernels():
    """While notebooks run headless: :data:`HEADLESS_ENV` in the environment the kernels inherit, and
    papermill's inspector warnings dropped; both undone after."""
    saved = {key: os.environ.get(key) for key in HEADLESS_ENV}
    loggers = [logging.getLogger(name) for name in ("papermill", "papermill.translators")]
    os.environ.update(HEADLESS_ENV)
    for logger in loggers:
        logger.addFilter(PAPERMILL_INSPECTOR)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(PAPERMILL_INSPECTOR)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def kernel_options() -> dict:
    """papermill options for the notebook client: the kernel manager provisions CurveZMQ keys when the
    kernelspec declares support (ipykernel's do), so the kernel does not warn that it runs over TCP
    without encryption; widget state is not stored (no progress widget is ever displayed headless, and a
    stored state would make every HTML copy load the widget manager's scripts)."""
    import zmq
    from jupyter_client import KernelManager
    from traitlets.config import Config

    options = {"store_widget_state": False}
    if zmq.has("curve") and "transport_encryption" in KernelManager.class_trait_names():
        options["config"] = Config({"KernelManager": {"transport_encryption": "auto"}})
    return options


# --------------------------------------------------------------------------------------------------
# The HTML report
# --------------------------------------------------------------------------------------------------
REPORT_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:84em;margin:2em auto;padding:0 1em;"
    "line-height:1.45;color:#222}"
    "h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
    ".run{color:#555;margin-top:0}.note{color:#555;font-size:.92em}"
    "table{border-collapse:collapse;margin:.6em 0}"
    "th,td{padding:.3em .7em;border-bottom:1px solid #e3e3e3;text-align:left;vertical-align:top}"
    "th{background:#f5f5f5}table.headline{font-size:.9em}"
    "table.headline td{font-variant-numeric:tabular-nums;white-space:nowrap}"
    "table.headline td:nth-child(2){white-space:normal;min-width:12em}"
    "table.headline td:nth-child(n+3){text-align:right}tr.failed td{color:#a00}tr.skipped td{color:#777}"
    "ul.verdicts li{margin:.4em 0}code{background:#f5f5f5;padding:0 .2em}details{margin-top:2em}"
)
HEADLINE_COLUMNS = (
    "attack",
    "setting",
    "AUC [95% CI]",
    "TPR@1%FPR [95% CI]",
    "test FPR at the calibration's 1% threshold",
    "U-Net evals / image",
    "beats blind baselines",
)


def _interval(row, metric: str) -> str:
    return f"{row[metric]:.3f} [{row[metric + '_low']:.3f}, {row[metric + '_high']:.3f}]"


def _number(value) -> str:
    return "" if pd.isna(value) else f"{round(float(value), 1):g}"


def headline_table(output_dir: Path) -> pd.DataFrame | None:
    """03's test metrics (``metrics.csv``), one row per run in its order: AUC and TPR@1%FPR with their 95 %
    bootstrap intervals, the FPR reached on test at the threshold that gave 1 % on calibration, U-Net
    evaluations per image, and whether the AUC interval lies above the best blind baseline
    (``tables/beats_blind.csv``; empty for the controls). None when 03 wrote no metrics."""
    path = output_dir / "metrics.csv"
    if not path.exists():
        return None
    metrics = pd.read_csv(path)
    beats = {}
    verdict_path = output_dir / "tables" / "beats_blind.csv"
    if verdict_path.exists():
        verdict = pd.read_csv(verdict_path)
        beats = {
            run: ("" if pd.isna(value) else "yes" if str(value) == "True" else "no")
            for run, value in zip(verdict["run"], verdict["beats blind baselines"])
        }
    rows = [
        (
            row["display"],
            row["setting"],
            _interval(row, "auc"),
            _interval(row, "tpr_at_1fpr"),
            f"{row['transfer_fpr_at_1fpr']:.3f}",
            _number(row["unet_evals"]),
            beats.get(row["run"], ""),
        )
        for _, row in metrics.iterrows()
    ]
    return pd.DataFrame(rows, columns=list(HEADLINE_COLUMNS), index=metrics["run"])


def _names(frame: pd.DataFrame) -> str:
    return ", ".join(frame["display"]) or "none"


def verdict_sentences(output_dir: Path) -> list[str]:
    """Plain sentences from the files the notebooks wrote: which attacks beat the blind baselines (03), the
    structural attack's direction, the controls, the biased split's inflation (03 biased) and the set
    audit's verdicts (06). Each is left out when its file is missing."""
    sentences = []
    metrics_path = output_dir / "metrics.csv"
    metrics = pd.read_csv(metrics_path) if metrics_path.exists() else None
    verdict_path = output_dir / "tables" / "beats_blind.csv"
    if verdict_path.exists():
        verdict = pd.read_csv(verdict_path)
        if verdict["blind_auc"].isna().all():
            sentences.append("No blind baseline ran on this set, so no attack can be said to beat one.")
        else:
            beats = verdict["beats blind baselines"].astype(str)
            sentences.append(
                f"Best blind baseline (model-free) test AUC: {verdict['blind_auc'].iloc[0]:.3f}. "
                f"Attacks whose AUC 95% interval lies above it: {_names(verdict[beats == 'True'])}. "
                "Attacks that do not clearly beat it (they may measure the split, not membership): "
                f"{_names(verdict[beats == 'False'])}."
            )
    if metrics is not None:
        for row in metrics[metrics["attack"] == "structural"].itertuples():
            direction = "the paper's direction (+SSIM)" if row.direction > 0 else "the REVERSED direction (-SSIM)"
            sentences.append(
                f"{row.display} ({row.setting}): test AUC {row.auc:.3f} [{row.auc_low:.3f}, {row.auc_high:.3f}], "
                f"scored with {direction}."
            )
        controls = metrics[metrics["unet_evals"] == 0]
        if len(controls):
            listed = "; ".join(f"{row.display} {row.auc:.3f}" for row in controls.itertuples())
            sentences.append(
                f"Controls that never run the U-Net reach test AUC {listed}: an attack says something about "
                "membership only above them."
            )
    inflation_path = output_dir / "biased" / "tables" / "bias_inflation.csv"
    if inflation_path.exists():
        inflation = pd.read_csv(inflation_path)
        model_runs = (
            set(metrics.loc[metrics["unet_evals"] > 0, "run"]) if metrics is not None else set(inflation["run"])
        )
        attacks = inflation[inflation["run"].isin(model_runs)]
        blind = inflation[inflation["run"] == "blind_image"]
        text = (
            "On the biased split (non-members from a shifted source, as when members and non-members come from "
            "different datasets)"
        )
        if len(blind):
            text += (
                f" the image-only blind classifier reaches test AUC {blind['auc_biased'].iloc[0]:.3f} "
                f"({blind['auc_fair'].iloc[0]:.3f} on the fair split) without looking at the model"
            )
        if len(attacks):
            largest = attacks.loc[attacks["auc_inflation"].idxmax()]
            text += (
                f"{';' if len(blind) else ''} the attacks' AUCs change by {attacks['auc_inflation'].min():+.3f} "
                f"to {attacks['auc_inflation'].max():+.3f}"
                f" (largest: {largest['display']}, {largest['auc_fair']:.3f} fair, {largest['auc_biased']:.3f} biased)"
            )
        sentences.append(text + ".")
    audit_path = output_dir / "tables" / "audit_examples.csv"
    if audit_path.exists():
        for row in pd.read_csv(audit_path).itertuples():
            sentences.append(f"Set audit, {row.audit}: {row.verdict}")
    needed_path = output_dir / "tables" / "audit_images_needed.csv"
    if needed_path.exists():
        needed = pd.read_csv(needed_path)
        combined = needed[(needed["feature_set"] == "combined") & (needed["member_fraction"] == 1.0)]
        if len(combined):
            row = combined.iloc[0]
            sentences.append(
                (
                    f"Every attack combined, the set audit detects a suspect set of {int(row['images'])} members "
                    f"with {row['power']:.0%} power."
                )
                if pd.notna(row["images"])
                else (
                    "Every attack combined, the set audit does not reach 80 % power on members-only suspect sets: "
                    f"{row['note']}."
                )
            )
    return sentences


def run_description(output_dir: Path, params: dict, outcomes: dict) -> str:
    """One line: preset, target, image set and its counts, attack size, notebooks' statuses."""
    shown = shown_parameters(params)
    parts = [
        f"Preset <b>{html.escape(str(params.get('PRESET', '')))}</b>",
        f"target <code>{html.escape(str(shown.get('MODEL', '')))}</code>",
    ]
    images = f"images <code>{html.escape(str(shown.get('DATA', 'emoji')))}</code>"
    records = output_dir / "tables" / "image_set.csv"
    if records.exists():
        frame = pd.read_csv(records, usecols=lambda c: c in ("label", "subset"))
        test = frame[frame["subset"] == "test"] if "subset" in frame else frame.iloc[:0]
        images += (
            f": {int((frame['label'] == 1).sum())} members and {int((frame['label'] == 0).sum())} non-members"
            f" ({int((test['label'] == 1).sum())} and {int((test['label'] == 0).sum())} on the test split)"
        )
    parts.append(images)
    if params.get("IMAGE_SIZE"):
        parts.append(f"attacked at {int(params['IMAGE_SIZE'])} px")
    statuses = pd.Series([o["status"] for o in outcomes.values()]).value_counts()
    parts.append(f"{len(outcomes)} notebooks: " + ", ".join(f"{n} {status}" for status, n in statuses.items()))
    return " · ".join(parts) + "."


def _duration(seconds) -> str:
    seconds = float(seconds or 0)
    return f"{seconds:.0f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def _notebook_rows(outcomes: dict, pages: set) -> str:
    rows = []
    for name, outcome in outcomes.items():
        link = f'<a href="{html.escape(name)}.html">{html.escape(name)}</a>' if name in pages else html.escape(name)
        time_taken = _duration(outcome["seconds"]) if "seconds" in outcome else ""
        detail = outcome.get("reason") or outcome.get("error") or ""
        if outcome.get("no_page"):
            detail = (
                f"{detail}; no HTML copy: {outcome['no_page']}" if detail else f"no HTML copy: {outcome['no_page']}"
            )
        rows.append(
            f'<tr class="{html.escape(outcome["status"])}"><td>{link}</td><td>{html.escape(outcome["status"])}</td>'
            f"<td>{time_taken}</td><td>{html.escape(str(detail))}</td></tr>"
        )
    return (
        "<table><tr><th>notebook</th><th>status</th><th>time</th><th>reason or error</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _hide_locations(text: str, output_dir: Path) -> str:
    """The HTML copy of an executed notebook without the absolute location of the output folder or the
    repository (a traceback or a message may print one): each is written relative to the repository root."""
    for folder in sorted({str(output_dir), str(output_dir.resolve()), str(ROOT)}, key=len, reverse=True):
        relative = relative_to_root(folder, always=True) or folder
        inside = "" if relative == "." else relative + "/"
        start = r"(?<![\w.~-])" + re.escape(folder)  # where an absolute path starts, not inside a relative one
        text = re.sub(start + re.escape(os.sep), lambda _: inside, text)
        text = re.sub(start + r"(?![\w.-])", lambda _: relative, text)  # the folder itself, not a longer name
    return text


def write_html_report(output_dir: Path, outcomes: dict, params: dict) -> Path:
    """HTML copies of the executed notebooks (``html/<run>.html``, code and figures inline) and an index page,
    ``html/index.html``, so that a whole run can be read and shared without Jupyter. The index opens with the
    run's headline (03's test metrics and the verdicts of 03 and 06, read from the files they wrote), then
    links every notebook with its status and time; no script, no absolute path."""
    from nbconvert import HTMLExporter

    folder = output_dir / "html"
    folder.mkdir(exist_ok=True)
    exporter = HTMLExporter()
    pages, outcomes = set(), {name: dict(outcome) for name, outcome in outcomes.items()}
    for name, outcome in outcomes.items():
        executed = output_dir / "notebooks" / f"{name}.ipynb"
        if outcome["status"] != "skipped" and executed.exists():
            try:
                body, _ = exporter.from_filename(str(executed))
                (folder / f"{name}.html").write_text(_hide_locations(body, output_dir), encoding="utf-8")
                pages.add(name)
            except Exception as error:  # a notebook that cannot be rendered is reported, never stops the report
                outcome["no_page"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    preset = html.escape(str(params.get("PRESET", "")))
    try:
        description, headline, sentences = (
            run_description(output_dir, params, outcomes),
            headline_table(output_dir),
            verdict_sentences(output_dir),
        )
    except Exception as error:  # a file the notebooks wrote in another layout: said, never stops the report
        description, headline = f"Preset <b>{preset}</b>.", None
        sentences = [f"The headline could not be read from the notebooks' files: {type(error).__name__}: {error}"]
    if headline is not None:
        top = (
            "<h2>Membership inference on the test split</h2>"
            + headline.to_html(index=False, border=0, classes="headline", na_rep="")
            + '<p class="note">Settings, score directions and thresholds are chosen on the calibration split and '
            "applied once to the test split; "
            "intervals are 95 % bootstrap intervals over the test images (03_attack, <code>metrics.csv</code>).</p>"
        )
    else:
        top = '<p class="note">No headline: 03_attack wrote no <code>metrics.csv</code> in this run.</p>'
    verdicts = (
        ('<h2>Verdicts</h2><ul class="verdicts">' + "".join(f"<li>{html.escape(s)}</li>" for s in sentences) + "</ul>")
        if sentences
        else ""
    )
    shown = shown_parameters(params)
    settings = pd.DataFrame({"parameter": list(shown), "value": [json.dumps(v) for v in shown.values()]}).to_html(
        index=False, border=0
    )
    location = relative_to_root(output_dir, always=True) or output_dir.name
    index = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mialib run: {preset}</title>'
        f"<style>{REPORT_CSS}</style></head><body>"
        f'<h1>mialib run: {preset}</h1><p class="run">{description}</p>'
        + top
        + verdicts
        + "<h2>Notebooks</h2>"
        + _notebook_rows(outcomes, pages)
        + f'<p class="note">Output folder <code>{html.escape(location)}</code> (relative to the repository root), '
        f"written {time.strftime('%Y-%m-%d %H:%M')}; "
        "figures and tables are also in <code>figures/</code> and <code>tables/</code> beside this page's folder.</p>"
        + f"<details><summary>Parameters</summary>{settings}</details></body></html>"
    )
    (folder / "index.html").write_text(
        _hide_locations(index, output_dir), encoding="utf-8"
    )  # a failure's message may name them
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


def run_notebooks(
    preset_path: str | os.PathLike, notebooks: tuple[str, ...] | None = None, kernel: str = "python3"
) -> Path:
    """Execute notebooks headlessly with papermill, each receiving the preset keys it declares.

    Executed copies go to ``<OUTPUT_DIR>/notebooks/``; the resolved parameters to
    ``<OUTPUT_DIR>/parameters.json``; times and outcomes to ``notebook_runs.json``. A preset key that no
    notebook declares is an error (a typo would otherwise be ignored silently). A failing notebook does
    not stop the others; :class:`NotebookFailures` lists every failure at the end. The notebooks receive
    their paths relative to the repository root (:func:`shown_parameters`) and run in quiet kernels
    (:func:`headless_kernels`, :func:`kernel_options`): no progress bar, widget or transport warning in the
    executed copies; the terminal shows each notebook's status.
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
    sources = {run[0] for run in runs.values() if isinstance(run, tuple)} | {
        name for name in runs if (ROOT / "notebooks" / f"{name}.ipynb").exists()
    }
    declared = {name: declared_parameters(ROOT / "notebooks" / f"{name}.ipynb") for name in sources}
    unused = set(params) - set().union(*declared.values()) - TARGET_KEYS
    if unused:
        raise ValueError(f"preset keys that no notebook declares: {sorted(unused)}")
    (output_dir / "parameters.json").write_text(json.dumps(params, indent=2))
    outcomes, failures = {}, []
    options = kernel_options()
    for name in notebooks:
        if isinstance(runs[name], str):
            outcomes[name] = {"status": "skipped", "reason": runs[name]}
            print(f"{name}: skipped ({runs[name]})", flush=True)
            continue
        source, overrides = runs[name]
        values = shown_parameters({**params, **overrides})
        start = time.time()
        try:
            with headless_kernels():
                papermill.execute_notebook(
                    str(ROOT / "notebooks" / f"{source}.ipynb"),
                    str(output_dir / "notebooks" / f"{name}.ipynb"),
                    parameters={k: v for k, v in values.items() if k in declared[source]},
                    kernel_name=kernel,
                    cwd=str(ROOT / "notebooks"),
                    progress_bar=False,
                    log_output=True,
                    **options,
                )
            outcomes[name] = {"status": "ok", "seconds": round(time.time() - start, 1)}
        except Exception as error:  # papermill raises PapermillExecutionError with the cell's traceback
            outcomes[name] = {
                "status": "failed",
                "seconds": round(time.time() - start, 1),
                "error": str(error).strip().splitlines()[-1][:500],
            }
            failures.append(name)
            traceback.print_exc()
        print(f"{name}: {outcomes[name]['status']} ({outcomes[name].get('seconds', 0)} s)", flush=True)
    (output_dir / "notebook_runs.json").write_text(json.dumps(outcomes, indent=2))
    write_html_report(output_dir, outcomes, params)
    if failures:
        details = "; ".join(f"{n}: {outcomes[n]['error']}" for n in failures)
        raise NotebookFailures(
            f"{len(failures)} of {len(notebooks)} notebooks failed ({details}); executed copies in "
            f"{output_dir / 'notebooks'}"
        )
    return output_dir
