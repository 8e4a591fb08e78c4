"""Scoring an image set with registered attacks: batched, cached, resumable; and the scores table.

The flow for one :class:`~mialib.attacks.registry.AttackRequest`:

1. :func:`attack_values` streams the set batch by batch through the attack function at one parameter
   point. Results are cached per image (:class:`ResultStore`: the folder key hashes the model
   fingerprint, the attack, its parameters, the settings and the size; each row's key the image's id,
   caption and pixels), so an interrupted run resumes, and another batch size reuses every result. Attacks
   that invert read and write the per-image trajectory cache (``<cache_dir>/trajectory/``), so every attack
   and study shares inversions.
2. :func:`run_request` does that for every point of the request's grid, then chooses the point (and,
   for the structural family, the direction) on the calibration split (:func:`mialib.metrics.choose_setting`).
3. :func:`score_rows` applies the direction, once, and writes the scores table rows with the settings
   as structured columns.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import calibration, memo, metrics
from .attacks.registry import AttackRequest, AttackSpec, get, parse_request
from .hashing import digest, pixel_digests, vouch_digests
from .imagesets.core import read_threads
from .inversion import prompt_texts
from .memo import set_aside
from .settings import Settings
from .target import UnsupportedModel
from .trajectories import TrajectoryCache

PARAMETER_COLUMNS = ["t", "stride", "measure", "metric", "t_sec", "interval", "p", "n_noise"]
SETTING_COLUMNS = ["guidance", "prompt", "encode_mode", "schedule", "seed", "data_range", "dtype"]
SCORE_COLUMNS = [
    "id", "label", "subset", "run", "attack", "display", "setting", "direction", "score", "value",
    "calibrate", "raw_value",
    *PARAMETER_COLUMNS, "params", *SETTING_COLUMNS, "size", "model",
    "unet_evals", "unet_evals_run", "seconds_per_image", "peak_memory_mb",
]  # fmt: skip


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak memory since the last :func:`reset_peak_memory`: ``torch.cuda.max_memory_allocated`` on GPU, the
    process's resident high-water mark (``VmHWM``) on CPU (the lifetime ``ru_maxrss`` where /proc is absent)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: str = "cpu") -> None:
    """Start a new peak: before each attack, so its figure is its own (not the process's lifetime peak)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current resident size
    except OSError:
        pass


CHECKSUM_KEY = b"mialib.sha256"  # a result shard's digest of its values, in the parquet's key-value metadata


def table_digest(table) -> str:
    """sha256 of an Arrow table's column names, types and values (what a reader gets back, not the file's
    bytes): stored with a result shard and checked when it is read."""
    import hashlib

    import pyarrow as pa

    digest = hashlib.sha256()
    for name, column in zip(table.column_names, table.columns):
        digest.update(json.dumps([name, str(column.type), len(column)]).encode())
        kind = column.type
        if column.null_count == 0 and (
            pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
        ):
            digest.update(np.ascontiguousarray(column.to_numpy()).tobytes())
        else:
            digest.update(json.dumps(column.to_pylist(), default=str).encode())
    return digest.hexdigest()


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    """A result shard with the digest of its values in its metadata, written atomically (a killed run never
    leaves a half-written file behind; a full disk is said in one sentence, :class:`mialib.memo.DiskFullError`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), CHECKSUM_KEY: table_digest(table).encode()})
    memo.atomic_write(path, lambda partial: pq.write_table(table, partial), int(frame.memory_usage(deep=True).sum()))


class ChecksumError(ValueError):
    """A cache file whose values do not match the digest stored with them."""


def read_checked_parquet(path: Path) -> pd.DataFrame:
    """A result shard, its values checked against the stored digest (shards written before digests were
    stored are read as they are). Raises for a damaged file: truncated, undecodable or changed."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = Path(path).read_bytes()
    table = pq.read_table(pa.BufferReader(data))
    stored = (table.schema.metadata or {}).get(CHECKSUM_KEY)
    if stored is not None and stored.decode() != table_digest(table):
        raise ChecksumError("its values do not match the checksum stored with them")
    return pd.read_parquet(io.BytesIO(data))


class ResultStore:
    """Per-image results of one attack at one parameter point (for one model, settings and size): parquet
    shards in one folder, each row keyed by the image (id, caption, pixels), each shard holding the digest
    of its values. Any batch size, any order and any interruption reuse every row already written; a
    damaged shard (truncated, or values that do not match the digest) is set aside and its rows recomputed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def read(self) -> pd.DataFrame:
        """Every stored row, indexed by image key."""
        frames = []
        for path in sorted(self.folder.glob("*.parquet")):
            try:
                frames.append(read_checked_parquet(path))
            except Exception as error:  # ArrowInvalid / OSError for truncated files, ChecksumError for changed values
                set_aside(path, error)
        if not frames:
            return pd.DataFrame(columns=["key"]).set_index("key")
        return pd.concat(frames, ignore_index=True).drop_duplicates("key", keep="last").set_index("key")

    def write(self, frame: pd.DataFrame) -> None:
        """Store rows (in the background writer: :func:`mialib.memo.WRITER.flush` waits for it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        memo.WRITER.submit(_atomic_parquet, frame, self.folder / f"{digest(list(frame['key']))}.parquet")


def attack_values(
    target,
    imageset,
    spec: AttackSpec,
    params: dict,
    settings: Settings,
    cache_dir,
    batch_size: int,
    size: int,
    progress: bool = True,
) -> pd.DataFrame:
    """One attack at one parameter point over a set: ``id, score`` (the method's direction), the
    attack's per-image extras, ``unet_evals`` (the registry's cost formula), and what computing the row
    cost, in whichever run or process computed it: ``unet_evals_run`` (counted here, from
    ``target.unet_evals`` around each call: an attack function reports no cost of its own),
    ``seconds_per_image`` (wall time per image of its batch) and ``peak_memory_mb`` (peak since the
    attack started). The function gets the parameters, the shared settings it names (keyword-only:
    :meth:`Settings.for_function`) and, when the registry says it inverts (:attr:`AttackSpec.inverts`),
    the trajectory cache.

    Results are stored per image in ``<cache_dir>/<attack>/<point key>/`` (the point key hashes the model
    fingerprint, the parameters, the settings and the size), so a rerun with another batch size, a resumed
    run or a run over a subset or superset computes only the images it has not seen.
    """
    if spec.kind == "blind":
        began = time.perf_counter()
        frame = spec.function(imageset, size, batch_size, settings.seed)
        return frame.assign(
            unet_evals=0,
            unet_evals_run=0,
            seconds_per_image=(time.perf_counter() - began) / max(len(frame), 1),
            peak_memory_mb=np.nan,
        )
    imageset = prompted(imageset, settings.prompt)  # the caption control: every attack sees the same texts
    cache_dir = Path(cache_dir)
    fingerprint = target.fingerprint()
    trajectories = TrajectoryCache(cache_dir / "trajectory", fingerprint)
    keywords = {**params, **settings.for_function(spec.function)}
    if spec.inverts:
        keywords["cache"] = trajectories
    cost = spec.cost(params, settings)
    reset_peak_memory(str(target.device))
    store = ResultStore(cache_dir / spec.name / digest(fingerprint, spec.name, params, settings.columns(), size))
    known = store.read()
    have, computed, order = set(known.index), [], []
    batches = imageset.batches(size, batch_size, threads=read_threads(target.device))
    total = -(-len(imageset) // batch_size)
    label = f"{spec.name} " + ", ".join(f"{k}={v}" for k, v in params.items())
    for rows, pixels in tqdm(batches, desc=label, total=total, disable=not progress, leave=False):
        ids, captions = list(rows["id"]), list(rows["caption"])
        # one key per image: its id, caption and exact pixels (a distorted copy is another image); the
        # pixels' digests were computed by the reader thread
        digests = pixel_digests(pixels)
        keys = [digest(i, c, p) for i, c, p in zip(ids, captions, digests)]
        order += keys
        missing = [j for j, key in enumerate(keys) if key not in have]
        if not missing:
            continue
        sub_ids, sub_captions = [ids[j] for j in missing], [captions[j] for j in missing]
        before, began = target.unet_evals, time.perf_counter()
        images = pixels[missing].to(target.device)
        vouch_digests(images, [digests[j] for j in missing])  # the trajectory cache's keys need them too
        output = spec.function(target, images, sub_captions, sub_ids, **keywords)
        n = len(missing)
        frame = pd.DataFrame(
            {
                "key": [keys[j] for j in missing],
                "id": sub_ids,
                "score": np.asarray(output.scores, dtype=np.float64),
                **{k: np.asarray(v) for k, v in output.extras.items()},
                "unet_evals": np.full(n, cost),
                "unet_evals_run": np.full(n, (target.unet_evals - before) / n),
                "seconds_per_image": np.full(n, (time.perf_counter() - began) / n),
                "peak_memory_mb": np.full(n, peak_memory_mb(str(target.device))),
            }
        )
        store.write(frame)
        computed.append(frame)
        have.update(frame["key"])
    memo.WRITER.flush()  # every result and trajectory of this call is on disk when it returns
    if not order:
        return pd.DataFrame(
            columns=["id", "score", "unet_evals", "unet_evals_run", "seconds_per_image", "peak_memory_mb"]
        )
    stored = [known.reset_index()] if len(known) else []
    table = pd.concat(stored + computed, ignore_index=True).drop_duplicates("key", keep="last").set_index("key")
    values = table.loc[order].reset_index(drop=True)
    columns = ["id", "score"] + [
        c
        for c in values.columns
        if c not in ("id", "score", "unet_evals", "unet_evals_run", "seconds_per_image", "peak_memory_mb")
    ]
    return values[columns + ["unet_evals", "unet_evals_run", "seconds_per_image", "peak_memory_mb"]]


def prompted(imageset, prompt: str):
    """The set as an attack sees it under the caption control ``prompt`` (:data:`mialib.settings.PROMPTS`):
    its own captions; the empty or the neutral prompt for every image; or (``other``) each image with the
    caption of the next image in id order whose caption differs (deterministic, whatever the batches)."""
    if prompt == "caption":
        return imageset
    captions = imageset.records["caption"].astype(str).to_numpy()
    if prompt != "other":
        return imageset.with_captions(prompt_texts(list(captions), prompt))
    order = np.argsort(imageset.records["id"].astype(str).to_numpy(), kind="stable")
    swapped = captions.copy()
    for k, i in enumerate(order):
        for step in range(1, len(order)):
            j = order[(k + step) % len(order)]
            if captions[j] != captions[i]:
                swapped[i] = captions[j]
                break
        else:
            raise ValueError(
                "prompt=other gives each image another image's caption: the set needs two different captions"
            )
    return imageset.with_captions(swapped)


@dataclass
class RequestResult:
    """What one request gave: every grid point's per-image values, the chosen point and direction, and
    the scores table rows at that choice."""

    request: AttackRequest
    values: pd.DataFrame  # id, the grid's parameters, score, extras, costs (every point)
    chosen: dict  # the parameters scored in ``rows``
    direction: int
    calibration_auc: float
    rows: pd.DataFrame  # SCORE_COLUMNS

    def chosen_record(self) -> dict:
        """The choice in a form that another notebook can replay with a fixed request."""
        return {
            "attack": self.request.name,
            "params": self.chosen,
            "direction": self.direction,
            "display": self.request.display,
            "calibrate": self.request.calibrate,
        }


def run_request(
    target,
    imageset,
    request: AttackRequest | str,
    settings: Settings,
    cache_dir,
    batch_size: int,
    size: int,
    progress: bool = True,
    *,
    references: tuple = (),
) -> RequestResult:
    """Score every point of the request, calibrate each image's score when the request says so
    (:func:`calibrated_values`; ``references``: the reference models' Targets), choose on calibration
    (when there is a choice), build the rows."""
    request = parse_request(request) if isinstance(request, str) else request
    spec = request.spec
    values = grid_values(target, imageset, request, settings, cache_dir, batch_size, size, progress)
    values = calibrated_values(
        target, imageset, request, values, settings, cache_dir, batch_size, size, progress, references
    )
    records = imageset.records[["id", "label", "subset"]]
    labelled = values.merge(records, on="id", how="inner", validate="many_to_one")
    if request.grid or request.direction == "auto":
        classes = labelled.loc[labelled["subset"] == "calibration", "label"].nunique()
        if classes < 2:
            raise ValueError(
                f"{request.run}: choosing a setting needs members and non-members in the calibration split"
            )
        chosen_grid, direction, cal_auc = metrics.choose_setting(
            labelled, list(request.grid), flip=request.direction == "auto"
        )
    else:
        chosen_grid, direction = {}, 1 if request.direction == "method" else int(request.direction)
        calibration = labelled[labelled["subset"] == "calibration"]
        cal_auc = (
            metrics.auc(calibration["label"], direction * calibration["score"])
            if calibration["label"].nunique() == 2
            else float("nan")
        )
    chosen = spec.params({**request.fixed, **chosen_grid})
    at_choice = values
    for key, value in chosen_grid.items():
        at_choice = at_choice[at_choice[key] == value]
    rows = score_rows(imageset.records, at_choice, request, chosen, direction, settings, size, model=target.name)
    return RequestResult(request, values, chosen, direction, cal_auc, rows)


def grid_values(
    target,
    imageset,
    request: AttackRequest | str,
    settings: Settings,
    cache_dir,
    batch_size: int,
    size: int,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-image values at every point of the request's grid (the grid's parameters as columns); no
    choice is made (a descriptive curve, or the input of :func:`run_request`'s choice)."""
    request = parse_request(request) if isinstance(request, str) else request
    points = request.points()
    order = list(range(len(points)))
    if "t" in request.grid and request.spec.inverts:
        # Deepest t first: one inversion reaches it, and every shallower point reads a prefix of that
        # cached path (instead of extending and rewriting the path once per point).
        order.sort(key=lambda i: -int(points[i].get("t", 0)))
    frames = [None] * len(points)
    for i in order:
        values = attack_values(
            target, imageset, request.spec, points[i], settings, cache_dir, batch_size, size, progress
        )
        frames[i] = values.assign(**{k: points[i][k] for k in request.grid})
    return pd.concat(frames, ignore_index=True)


def difficulty_features(
    target, imageset, settings: Settings, cache_dir, batch_size: int, size: int, progress: bool = True
):
    """Per image, the difficulty features of :mod:`mialib.calibration`: the image-only ones
    (:data:`~mialib.calibration.FEATURES`, from the pixels at the attack size) and the target autoencoder's
    reconstruction SSIM (``vae_ssim``: the vae_control attack's values, cached like every attack's)."""
    vae = attack_values(target, imageset, get("vae_control"), {}, settings, cache_dir, batch_size, size, progress)
    images = [calibration.feature_frame(rows["id"], pixels) for rows, pixels in imageset.batches(size, batch_size)]
    features = pd.concat(images, ignore_index=True)
    return features.merge(vae[["id", "score"]].rename(columns={"score": "vae_ssim"}), on="id", validate="one_to_one")


def calibrated_values(
    target,
    imageset,
    request: AttackRequest,
    values: pd.DataFrame,
    settings: Settings,
    cache_dir,
    batch_size: int,
    size: int,
    progress: bool = True,
    references: tuple = (),
) -> pd.DataFrame:
    """``values`` (:func:`grid_values`) with every grid point's ``score`` calibrated per image as
    ``request.calibrate`` says, and the attack's own value kept as ``raw_value``:

    - ``difficulty``: minus the expected score of a calibration non-member with the image's difficulty
      features (:func:`mialib.calibration.difficulty_calibrated`, fitted per grid point on the calibration
      non-members only, cross-fitted there; :func:`difficulty_features`);
    - ``reference``: against the same attack at the same point on each reference model, with the same
      seeds and noise per image (:func:`mialib.calibration.reference_calibrated`; their values are kept as
      ``reference_value_<i>``);
    - ``fit``: the attack's per-image curve classified by a logistic regression fitted on the calibration
      split only, cross-fitted there (:func:`mialib.calibration.fitted_summary`)."""
    values = values.assign(raw_value=values["score"])
    if request.calibrate == "none":
        return values
    grid = list(request.grid)
    keys = ["id", *grid]
    groups = values.groupby(grid, sort=False).indices.values() if grid else [np.arange(len(values))]
    calibrated = np.full(len(values), np.nan)
    if request.calibrate == "reference":
        if not references:
            raise ValueError(
                f"{request.run}: calibrate=reference needs reference models (--reference-model, REFERENCE_MODELS)"
            )
        columns = [f"reference_value_{i}" for i in range(len(references))]
        for column, reference in zip(columns, references):
            theirs = grid_values(reference, imageset, request, settings, cache_dir, batch_size, size, progress)
            values = values.merge(
                theirs[[*keys, "score"]].rename(columns={"score": column}), on=keys, how="left", validate="one_to_one"
            )
        for rows in groups:
            part = values.iloc[rows]
            calibrated[rows] = calibration.reference_calibrated(
                part["raw_value"].to_numpy(), part[columns].to_numpy().T
            )
    elif request.calibrate == "fit":
        names = [c for c in values.columns if c.startswith(request.spec.features)]
        labelled = values[["id"]].merge(
            imageset.records[["id", "label", "subset"]], on="id", how="left", validate="many_to_one"
        )
        fit = (labelled["subset"] == "calibration").to_numpy()
        folds = calibration.id_folds(labelled["id"], settings.seed)  # by id: the same folds in any row order
        for rows in groups:
            calibrated[rows] = calibration.fitted_summary(
                values[names].to_numpy()[rows], labelled["label"].to_numpy()[rows], fit[rows], folds[rows]
            )
    else:
        features = difficulty_features(target, imageset, settings, cache_dir, batch_size, size, progress)
        names = [c for c in features.columns if c != "id"]
        labelled = values[["id"]].merge(
            imageset.records[["id", "label", "subset"]], on="id", how="left", validate="many_to_one"
        )
        labelled = labelled.merge(features, on="id", how="left", validate="many_to_one")
        fit = ((labelled["subset"] == "calibration") & (labelled["label"] == 0)).to_numpy()
        folds = calibration.id_folds(labelled["id"], settings.seed)  # by id: the same folds in any row order
        for rows in groups:
            calibrated[rows] = calibration.difficulty_calibrated(
                values["raw_value"].to_numpy()[rows], labelled[names].to_numpy()[rows], fit[rows], folds=folds[rows]
            )
    return values.assign(score=calibrated)


def score_rows(
    records: pd.DataFrame,
    values: pd.DataFrame,
    request: AttackRequest,
    params: dict,
    direction: int,
    settings: Settings,
    size: int,
    model: str = "",
) -> pd.DataFrame:
    """Scores-table rows for one request at one parameter point: ``score = direction * value``, applied
    here and nowhere else; parameters, settings and the model's name (with its LoRA adapters and scales) as
    columns. Every record must have a value."""
    spec = request.spec
    merged = records[["id", "label", "subset"]].merge(
        values.rename(columns={"score": "value"}), on="id", how="left", validate="one_to_one"
    )
    missing = merged["id"][merged["value"].isna()]
    if len(missing):
        raise ValueError(f"{request.run} has no score for {len(missing)} images, e.g. {list(missing)[:5]}")
    merged["score"] = direction * merged["value"].astype(np.float64)
    merged["direction"] = direction
    merged["calibrate"] = request.calibrate
    merged["raw_value"] = merged["raw_value"].astype(np.float64) if "raw_value" in merged else merged["value"]
    merged["run"] = request.run
    merged["attack"] = spec.name
    merged["display"] = request.display
    merged["setting"] = spec.describe(params, direction) if spec.kind != "blind" else spec.measure(params)
    merged["params"] = json.dumps(params, sort_keys=True)
    for column in PARAMETER_COLUMNS:
        merged[column] = params.get(column)
    for column, value in settings.columns().items():
        merged[column] = value
    merged["size"] = size
    merged["model"] = model
    return merged[SCORE_COLUMNS]


def score(
    target,
    imageset,
    requests: dict | list,
    settings: Settings,
    cache_dir,
    batch_size: int,
    size: int,
    progress: bool = True,
    *,
    references: tuple = (),
) -> tuple[pd.DataFrame, dict[str, RequestResult]]:
    """Every request over one set: (the scores table, the result of each run by its id).

    ``requests`` maps run ids to request texts or :class:`AttackRequest` objects (a list uses each
    request's own text as its id). ``references``: the reference models' Targets, for requests with
    ``calibrate=reference``. Requirements are checked before any compute.
    """
    requests = as_requests(requests)
    check_requirements(imageset, requests.values(), metrics=False)
    if any(r.calibrate == "reference" for r in requests.values()) and not references:
        needing = [run for run, r in requests.items() if r.calibrate == "reference"]
        raise ValueError(
            f"{needing} ask for calibrate=reference but no reference model was given (--reference-model, "
            "REFERENCE_MODELS)"
        )
    for model in (target, *references):
        check_schedule(model, requests.values())
    results = {}
    for run, request in requests.items():
        results[run] = run_request(
            target, imageset, request, settings, cache_dir, batch_size, size, progress, references=tuple(references)
        )
        if progress:
            result = results[run]
            chosen = "fitted on calibration"
            if request.spec.kind != "blind":
                chosen = result.request.spec.describe(result.chosen, result.direction)
            print(f"{run}: {request.display} -> {chosen}", flush=True)
    table = pd.concat([r.rows for r in results.values()], ignore_index=True)
    return table, results


def as_requests(requests: dict | list) -> dict[str, AttackRequest]:
    if isinstance(requests, dict):
        items = requests.items()
    else:
        items = [((r.run if isinstance(r, AttackRequest) else str(r)), r) for r in requests]
    out = {}
    for run, request in items:
        request = parse_request(request, run=run) if isinstance(request, str) else request
        request.run = run
        if run in out:
            raise ValueError(f"two requests share the run id {run!r}")
        out[run] = request
    return out


def check_requirements(imageset, requests, metrics: bool = True) -> None:
    """Raise before any compute when a request cannot run on this set; say why. With ``metrics``, the
    calibration -> test protocol's own needs are checked too (both classes in both subsets)."""
    problems = []
    counts = imageset.records.groupby(["subset", "label"]).size()
    needs = (
        {"calibration", "test"}
        if metrics
        else (
            {"calibration"}
            if any(r.grid or r.direction == "auto" or r.spec.kind == "blind" for r in requests)
            else set()
        )
    )
    for subset in ("calibration", "test"):
        for label, name in ((1, "members"), (0, "non-members")):
            if subset in needs and counts.get((subset, label), 0) == 0:
                problems.append(
                    f"the {subset} split has no {name}; the protocol needs both classes in calibration and test"
                )
    for request in requests:
        if request.spec.requires is not None:
            reason = request.spec.requires(imageset.records)
            if reason:
                problems.append(f"{request.run} ({request.spec.label}) {reason}")
        shortfall = _difficulty_shortfall(request, imageset.records)
        if shortfall:
            problems.append(f"{request.run}: {shortfall}")
    if problems:
        raise ValueError("cannot score this set:\n  " + "\n  ".join(problems))


def num_train_timesteps(target) -> int:
    """The length of the model's training schedule (its scheduler's ``num_train_timesteps``)."""
    config = target.scheduler.config
    steps = (
        config.get("num_train_timesteps") if hasattr(config, "get") else getattr(config, "num_train_timesteps", None)
    )
    return int(steps) if steps is not None else len(target.scheduler.alphas_cumprod)


def check_schedule(target, requests) -> None:
    """Raise before any compute (and before anything is written) when a request's timesteps fall outside
    the model's schedule, or when it contrasts a caption with the unconditional branch of a model that has none
    (FLUX.1: :attr:`Target.unconditional`); the message names the attack and the parameter or the reason."""
    steps = num_train_timesteps(target)
    for request in requests:
        request.check_schedule(steps)
        if request.spec.unconditional and target.unconditional:
            raise UnsupportedModel(
                f"{request.run} ({request.spec.label}) does not apply to {target.name}: {target.unconditional}"
            )


def _difficulty_shortfall(request, records) -> str | None:
    """Why ``calibrate=difficulty`` (``fit``) cannot fit on this set (too few calibration non-members, or of
    either class), or None."""
    if request.calibrate == "fit":
        counts = records.loc[records["subset"] == "calibration", "label"].value_counts()
        least = min(int(counts.get(0, 0)), int(counts.get(1, 0)))
        if least >= calibration.MIN_NONMEMBERS:
            return None
        return (
            f"calibrate=fit fits on the calibration split; this set has {int(counts.get(1, 0))} members and "
            f"{int(counts.get(0, 0))} non-members there (at least {calibration.MIN_NONMEMBERS} of each)"
        )
    if request.calibrate != "difficulty":
        return None
    fitted_on = int(((records["subset"] == "calibration") & (records["label"] == 0)).sum())
    if fitted_on >= calibration.MIN_NONMEMBERS:
        return None
    return (
        f"calibrate=difficulty fits on the calibration non-members; this set has {fitted_on} "
        f"(at least {calibration.MIN_NONMEMBERS})"
    )


def runnable(imageset, requests: dict) -> tuple[dict, dict]:
    """Split requests into those that can run on this set and those that cannot, with the reason."""
    keep, skipped = {}, {}
    records = imageset.records
    for run, request in as_requests(requests).items():
        reason = request.spec.requires(records) if request.spec.requires is not None else None
        reason = reason or _difficulty_shortfall(request, records)
        if reason:
            skipped[run] = reason
        else:
            keep[run] = request
    return keep, skipped
