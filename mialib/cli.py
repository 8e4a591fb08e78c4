"""The ``mialib`` command line: score any image set with any registered attack, report, download, freeze,
and run the notebooks.

    mialib score --model M --data SPEC --attack NAME[:key=value,...] [--attack ...] --out DIR
    mialib audit --model M --suspect SPEC --reference SPEC --out DIR [--attack NAME ...]
    mialib report DIR
    mialib download --data laion-mi:FOLDER
    mialib freeze --data SPEC --out manifest.csv
    mialib prepare | notebooks | all [--preset configs/default.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DATA_HELP = (
    "the image set: emoji | csv:set.csv | imagefolder:DIR | img2dataset:DIR?label=KEY | "
    "img2dataset:members=DIR,nonmembers=DIR | laion-mi:DIR; options after '?': seed=N, manifest=FILE, min_side=N"
)


# --------------------------------------------------------------------------------------------------
# Option values, checked by argparse (``mialib score: error: argument --batch-size: ...``, exit 2)
# before anything is read, computed or written
# --------------------------------------------------------------------------------------------------
def _number(kind, low=None, high=None, low_open=False, high_open=False, rule=""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if (
            value != value
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))
        ):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text}")
        return value

    parse.__name__ = "integer" if kind is int else "number"
    return parse


POSITIVE = _number(int, 1, rule="1 or more")
NONNEGATIVE = _number(int, 0, rule="0 or more")
NONNEGATIVE_NUMBER = _number(float, 0.0, rule="0 or more")
FRACTION = _number(float, 0.0, 1.0, low_open=True, high_open=True, rule="between 0 and 1 (both excluded)")


def _check_out(out: str) -> None:
    """``--out`` names a folder: refuse a file (or a path through a file) before anything is read."""
    path = Path(out)
    for above in (path, *path.parents):
        if above.exists() and not above.is_dir():
            raise ValueError(
                f"--out {out}: {above} is a file, not a folder; --out names a folder (new, empty or an earlier run's)"
            )


def _attacks_epilog() -> str:
    from .attacks.registry import help_text

    return (
        "attacks (--attack NAME[:key=value,...]; a list [a,b] or a start:stop:step range is a grid chosen on "
        "calibration; NAME:calibrate uses the grid below; direction=auto lets calibration reverse the structural "
        "family):\n" + help_text()
    )


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options that `score` and `audit` share."""
    parser.add_argument(
        "--model",
        required=True,
        help="a local pipeline folder (safetensors), a hub id owner/name, or a single .safetensors checkpoint",
    )
    parser.add_argument(
        "--variant", default=None, help="weight files variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)"
    )
    parser.add_argument(
        "--model-config",
        default=None,
        help="single-file --model only: its family's pipeline folder or hub id (configs, tokenizer, scheduler)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA adapter (.safetensors; diffusers', kohya's and the other formats diffusers reads) fused into "
        "the model at SCALE (default 1; repeatable); the base model without it is the default reference of "
        "calibrate=reference",
    )


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    """The device, batching and attack settings that `score` and `audit` share."""
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=POSITIVE, default=16, help="images per batch")
    parser.add_argument(
        "--size", type=POSITIVE, default=None, help="attack resolution in px (default: the model's native size)"
    )
    parser.add_argument(
        "--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: conditional only)"
    )
    parser.add_argument("--prompt", default="caption", choices=["caption", "empty", "neutral", "other"])
    parser.add_argument("--encode-mode", default="mode", choices=["mode", "sample"])
    parser.add_argument("--schedule", default="model", choices=["model", "official_linear"])
    parser.add_argument("--data-range", type=float, default=2.0, help="SSIM data range (2 for images in [-1, 1])")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of per-image noise, posterior samples and the subset assignment"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-tf32",
        action="store_true",
        help="on a GPU, full float32 convolutions (PyTorch lets cuDNN use TF32 by default; "
        "then scores depend on the batch size up to about 2e-4, without it about 3e-6; measured on an H200)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mialib",
        description=__doc__,
        epilog=_attacks_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser(
        "score",
        help="score an image set with registered attacks",
        epilog=_attacks_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_arguments(score)
    score.add_argument("--data", required=True, help=DATA_HELP)
    score.add_argument(
        "--attack",
        action="append",
        required=True,
        metavar="NAME[:key=value,...]",
        help="an attack to run (repeatable); see the list below",
    )
    score.add_argument(
        "--reference-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="a reference model for NAME:calibrate=reference (repeatable; any form of --model, loaded the same way): "
        "one gives the score difference, several a LiRA-style (offline) standardised score",
    )
    score.add_argument("--out", required=True, help="output folder (created; a rerun resumes from its cache)")
    _run_arguments(score)
    score.add_argument(
        "--bootstrap", type=POSITIVE, default=1000, help="bootstrap resamples for the metrics' intervals"
    )
    score.add_argument(
        "--trajectory-cache-gb",
        type=NONNEGATIVE_NUMBER,
        default=0,
        help=(
            "cap of the trajectory cache in GB (0: no cap); past it the least recently written trajectories are removed"
        ),
    )
    score.add_argument(
        "--read-threads",
        type=NONNEGATIVE,
        default=0,
        help="threads that read and decode images ahead of the model (0: 1 beside a CPU model, up to 8 beside a GPU)",
    )

    audit = commands.add_parser(
        "audit",
        help="set-level audit: was the suspect set (or part of it) used to train the model?",
        description=(
            "CDI-style dataset inference (Dubinski et al., CVPR 2025): per-image features from registry attacks at "
            "fixed settings, a logistic regression fitted on a random part of both sets, a one-sided Welch t-test and "
            "a permutation test on the held-out parts. The reference set must hold images known NOT to be training "
            "members, from the suspect set's distribution; labels are never read."
        ),
    )
    _model_arguments(audit)
    audit.add_argument(
        "--suspect",
        required=True,
        help="the suspect image set (any form of --data; labels are not needed and never read)",
    )
    audit.add_argument("--reference", required=True, help="images known not to be members, from the same distribution")
    audit.add_argument(
        "--attack",
        action="append",
        default=None,
        metavar="NAME[:key=value,...]",
        help="a feature (repeatable; fixed settings, no grids); default: structural, pixel, loss, secmi, pia, clid",
    )
    audit.add_argument(
        "--reference-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="a reference model for features NAME:calibrate=reference (repeatable; as in `mialib score`)",
    )
    audit.add_argument(
        "--out", required=True, help="output folder (created; a rerun reads the per-image features back from its cache)"
    )
    audit.add_argument("--level", type=FRACTION, default=0.01, help="significance level of the decision")
    audit.add_argument(
        "--fit-fraction", type=FRACTION, default=0.5, help="share of each set that fits the scorer (the rest is tested)"
    )
    audit.add_argument("--permutations", type=POSITIVE, default=9999, help="resamples of the permutation test")
    _run_arguments(audit)

    report = commands.add_parser("report", help="print the metrics table of a scored folder")
    report.add_argument("folder")

    download = commands.add_parser(
        "download", help="fetch the images of a LAION-mi folder with img2dataset and write the manifest of what arrived"
    )
    download.add_argument(
        "--data", required=True, help="laion-mi:FOLDER (holding the members / non-members parquet files)"
    )
    download.add_argument("--processes", type=POSITIVE, default=1)
    download.add_argument("--threads", type=POSITIVE, default=16)
    download.add_argument("--timeout", type=POSITIVE, default=10, help="seconds per request")
    download.add_argument("--retries", type=NONNEGATIVE, default=0)
    download.add_argument(
        "--limit",
        type=POSITIVE,
        default=None,
        help="attempt at most N rows in all, split evenly between members and non-members (a trial run)",
    )

    freeze = commands.add_parser(
        "freeze", help="write the manifest (id, caption, label, subset, sha256, source) that defines a set"
    )
    freeze.add_argument("--data", required=True, help=DATA_HELP)
    freeze.add_argument("--out", required=True, help="manifest CSV to write (never overwritten)")

    for name, text in (
        ("prepare", "build the embedded data and tiny target"),
        ("notebooks", "execute the notebooks with papermill"),
        ("all", "prepare, then notebooks"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--preset", default="configs/default.yaml", help="YAML preset of papermill parameters")
        if name != "prepare":
            from .experiment import NOTEBOOKS

            sub.add_argument(
                "--notebooks",
                nargs="*",
                default=None,
                help=(
                    f"notebook runs to execute (default: the preset's NOTEBOOKS, else {' '.join(NOTEBOOKS)}; "
                    "07_regimes runs in configs/regimes.yaml)"
                ),
            )
            sub.add_argument("--kernel", default="python3", help="Jupyter kernel name for papermill")
    return parser


def main(argv: list[str] | None = None) -> None:
    from .memo import DISK_FULL, DiskFullError, disk_full

    args = build_parser().parse_args(argv)
    try:
        {"score": score, "audit": audit, "report": report, "download": download, "freeze": freeze}.get(
            args.command, run_preset
        )(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # DataError is a ValueError
        print(f"mialib {args.command}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a full disk (or quota): one sentence, no traceback
        if error.errno not in DISK_FULL:
            raise
        if not isinstance(error, DiskFullError):
            error = disk_full(error, error.filename or getattr(args, "out", None) or ".")
        print(f"mialib {args.command}: error: {error.strerror}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------------------
# One run per --out: a lock while it writes, its identity, and a manifest written last
# --------------------------------------------------------------------------------------------------
LOCK_NAME = ".mialib-lock"
MANIFEST = "run.json"
# what `score` writes beside its cache: removed once a run is accepted, rewritten, then listed in run.json
SCORE_TABLES = (
    "parameters.json",
    "image_set.csv",
    "skipped.csv",
    "captions_truncated.csv",
    "scores.parquet",
    "chosen_settings.json",
    "metrics.csv",
    "metrics.json",
)


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``<out>/.mialib-lock`` for as long as a run writes there: a
    second run on the same folder is refused at once, naming the first one's pid. Released on exit (and by
    the system when the process dies)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.handle = None

    def __enter__(self):
        import fcntl

        handle = open(self.folder / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "unknown"
            handle.close()
            raise ValueError(
                f"another mialib run (pid {pid}) is writing to {self.folder}; wait for it to finish or choose "
                "another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc):
        import fcntl

        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def locked_by(folder: Path) -> str | None:
    """The pid of a run that holds ``folder``'s lock now, else None."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def run_identity(target, imageset, settings, size: int) -> dict:
    """What makes two runs the same run (so that one folder's tables belong together): the images (id,
    caption, label, subset, bytes), the model's fingerprint, the settings and the size. The attacks are not
    part of it: a rerun may add attacks to the same run."""
    from .hashing import digest

    columns = [c for c in ("id", "caption", "label", "subset", "sha256") if c in imageset.records]
    rows = sorted(imageset.records[columns].astype(str).values.tolist())
    return {
        "images": digest(rows),
        "image_ids": digest(sorted(imageset.records["id"].astype(str))),
        "n_images": len(rows),
        "fingerprint": target.fingerprint(),
        "settings": settings.columns(),
        "size": size,
    }


def _previous_identity(out: Path) -> dict | None:
    """The identity of the run whose tables ``out`` holds: from run.json, else parameters.json (a run that was
    interrupted), else what a run written before identities were recorded left (its parameters and ids)."""
    import pandas as pd

    for name in (MANIFEST, "parameters.json"):
        try:
            identity = json.loads((out / name).read_text()).get("identity")
        except (OSError, ValueError, AttributeError):
            continue
        if identity:
            return identity
    try:
        parameters = json.loads((out / "parameters.json").read_text())
    except (OSError, ValueError):
        parameters = {}
    legacy = {k: parameters[k] for k in ("fingerprint", "settings", "size") if k in parameters}
    if (out / "image_set.csv").exists():
        from .hashing import digest

        ids = pd.read_csv(out / "image_set.csv", dtype=str, usecols=["id"])["id"]
        legacy["image_ids"] = digest(sorted(ids.astype(str)))
    return legacy or None


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two run identities, in words (only what both record)."""
    found = []
    if "images" in old and "images" in new and old["images"] != new["images"]:
        found.append(
            f"the images ({old.get('n_images', '?')} before, {new['n_images']} now, or their ids, captions, labels, "
            "splits or bytes)"
        )
    elif "images" not in old and old.get("image_ids") not in (None, new.get("image_ids")):
        found.append("the images (their ids)")
    if "fingerprint" in old and old["fingerprint"] != new["fingerprint"]:
        found.append(f"the model fingerprint ({str(old['fingerprint'])[:12]} before, {new['fingerprint'][:12]} now)")
    if "settings" in old and old["settings"] != new["settings"]:
        changed = [
            f"{k} {old['settings'].get(k)!r} -> {v!r}"
            for k, v in new["settings"].items()
            if old["settings"].get(k) != v
        ]
        found.append("the settings (" + ", ".join(changed or ["their keys"]) + ")")
    if "size" in old and old["size"] != new["size"]:
        found.append(f"the size ({old['size']} px before, {new['size']} px now)")
    return found


def check_same_run(out: Path, identity: dict) -> None:
    """Refuse a run into a folder that holds another run's tables (resuming the same run is fine)."""
    previous = _previous_identity(out)
    if not previous:
        return
    differences = _differences(previous, identity)
    if differences:
        raise ValueError(
            f"{out} holds another run: {'; '.join(differences)} differ; choose a new --out for this run "
            "(the same images, model, settings and size resume there, and may add attacks)"
        )


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(out: Path, identity: dict, names) -> None:
    """``run.json``, written last: the run's identity and the sha256 of every table it wrote. Its presence
    says the run finished; ``mialib report`` checks the tables against it."""
    from .memo import write_text

    files = {name: _file_sha256(out / name) for name in names if (out / name).exists()}
    write_text(
        out / MANIFEST,
        json.dumps(
            {"identity": identity, "files": files, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            indent=2,
            default=str,
        ),
    )


def _cache_entry(path: Path) -> bool:
    """What the run layer keeps in a run's ``cache/`` (for runs written before it held its own marker)."""
    from .attacks import REGISTRY

    return path.is_dir() and (path.name == "trajectory" or path.name in REGISTRY)


# --------------------------------------------------------------------------------------------------
def score(args) -> None:
    import contextlib

    import torch

    from . import imagesets, runs, scoring
    from .attacks.registry import parse_request
    from .data import claim_folder
    from .experiment import quiet_library_notices
    from .settings import Settings
    from .target import check_source

    started = time.time()
    _check_out(args.out)
    _precision(args)
    quiet_library_notices()  # no torchvision fall-back notice: no attack uses an image processor
    if args.trajectory_cache_gb:
        os.environ["MIALIB_TRAJECTORY_CACHE_GB"] = str(args.trajectory_cache_gb)
    if args.read_threads:
        os.environ["MIALIB_READ_THREADS"] = str(args.read_threads)
    settings = Settings(
        args.guidance, args.prompt, args.encode_mode, args.schedule, args.seed, args.data_range, args.dtype
    )
    requests = runs.as_requests([parse_request(text) for text in args.attack])
    model = check_source(
        args.model, args.model_config
    )  # a typo'd path or a bad file form fails here, before anything is read or written
    reference_sources, loras = _sources(args, requests, "an attack")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")
    processes = _processes(cpu=args.device == "cpu")
    main_process = processes is None or processes.is_main_process
    device = args.device
    if processes is not None and device == "cuda":
        device = f"cuda:{processes.local_process_index}"
    imageset = imagesets.open_imageset(args.data if "seed=" in args.data else _with_seed(args.data, args.seed))
    if main_process:
        print(imageset.summary(), flush=True)
    runs.check_requirements(imageset, requests.values())  # before any compute
    opened = scoring.open_target(
        model,
        imageset.records,
        size=args.size,
        device=device,
        dtype=args.dtype,
        variant=args.variant,
        config=args.model_config,
        loras=loras,
    )
    target, size = opened.target, opened.size
    references = _references(args, model, reference_sources, loras, requests, device)
    for model_ in (target, *references):
        runs.check_schedule(
            model_, requests.values()
        )  # every t within each model's schedule: before anything is written
    out, identity = Path(args.out), None
    with contextlib.ExitStack() as held:
        if main_process:
            out = claim_folder(args.out)
            held.enter_context(FolderLock(out))  # a second run on this --out is refused at once
            if (out / "audit.json").exists() or (out / "features.parquet").exists():
                raise ValueError(
                    f"{out} holds a `mialib audit`; choose another --out for this run (one folder, one run)"
                )
            identity = run_identity(target, imageset, settings, size)
            if references:
                identity["references"] = [reference.fingerprint() for reference in references]
            check_same_run(out, identity)  # another run's tables are never mixed with this one's
            claim_folder(out / "cache", _cache_entry)
            # from here on the folder's tables are this run's: none is trusted until run.json is written last
            for name in (MANIFEST, *SCORE_TABLES):
                (out / name).unlink(missing_ok=True)
        if processes is not None:
            processes.wait_for_everyone()
            # each process scores its share of the images into the shared per-image cache; the main process then
            # builds the tables from it (computing nothing more)
            ids = list(imageset.records["id"])
            share = imageset.select(ids[processes.process_index :: processes.num_processes])
            for request in requests.values():
                if request.spec.kind != "blind":
                    runs.grid_values(
                        target,
                        share,
                        request,
                        settings,
                        out / "cache",
                        args.batch_size,
                        size,
                        progress=not args.quiet and main_process,
                    )
            processes.wait_for_everyone()
            if not main_process:
                return
        _score_tables(args, out, model, opened, references, imageset, requests, settings, identity, processes, started)


def _score_tables(
    args, out, model, opened, references, imageset, requests, settings, identity, processes, started
) -> None:
    from . import scoring
    from .memo import write_text

    target, size = opened.target, opened.size
    scoring.write_table(out / "image_set.csv", imageset.records.drop(columns=["location"]))
    scoring.write_table(out / "skipped.csv", imageset.skipped)
    if len(opened.truncated):
        scoring.write_table(out / "captions_truncated.csv", opened.truncated)
        print(
            f"{len(opened.truncated)} captions exceed the text encoder's {target.tokenizer.model_max_length} tokens "
            "and are cut there (captions_truncated.csv)"
        )
    parameters = {
        "model": model,
        "variant": args.variant,
        "model_config": args.model_config,
        "family": target.family,
        "prediction_type": target.prediction_type,
        "vae_dtype": str(target.vae.dtype),
        "no_tf32": args.no_tf32,
        "data": args.data,
        "attacks": {run: r.text() for run, r in requests.items()},
        "device": args.device,
        "processes": 1 if processes is None else processes.num_processes,
        "batch_size": args.batch_size,
        "size": size,
        "settings": settings.columns(),
        "bootstrap": args.bootstrap,
        "images": len(imageset),
        "given": imageset.given,
        "skipped": len(imageset.skipped),
        "fingerprint": target.fingerprint(),
        "loras": [[path, scale] for path, scale in target.loras],
        "reference_models": args.reference_model,
        "reference_fingerprints": [reference.fingerprint() for reference in references],
        "image_set": imageset.info,
        "identity": identity,
    }
    write_text(out / "parameters.json", json.dumps(parameters, indent=2, default=str))
    run = scoring.score_run(
        target,
        imageset,
        requests,
        settings,
        out,
        cache=out / "cache",
        batch_size=args.batch_size,
        size=size,
        n_bootstrap=args.bootstrap,
        progress=not args.quiet,
        references=references,
    )
    write_manifest(out, identity, SCORE_TABLES)  # last: the tables above belong together
    print(format_metrics(run.metrics))
    print(
        f"{len(run.scores)} scores of {len(imageset)} images ({len(imageset.skipped)} skipped) in "
        f"{time.time() - started:.1f} s -> {out}"
    )


AUDIT_DEFAULT = ("structural", "pixel", "loss", "secmi", "pia", "clid")
AUDIT_OUTPUTS = (
    "audit.json",
    "features.parquet",
    "audit.csv",
    "verdict.txt",
    "held_out_scores.png",
    "held_out_scores.pdf",
)


def _sources(args, requests: dict, what: str) -> tuple[list, list]:
    """The reference models and LoRA adapters the options name, checked before anything loads: a request
    with calibrate=reference needs a reference model or a LoRA (whose base is then the reference)."""
    from .target import check_source, parse_lora

    sources = [check_source(reference) for reference in args.reference_model]
    loras = [parse_lora(text) for text in args.lora]
    if any(r.calibrate == "reference" for r in requests.values()) and not sources and not loras:
        raise ValueError(
            f"{what} asks for calibrate=reference: give its reference models with --reference-model (with --lora, "
            "the base model is the default)"
        )
    return sources, loras


def _references(args, model: str, sources: list, loras: list, requests: dict, device: str) -> list:
    """The reference models of calibrate=reference: those of --reference-model, else, for a model given with
    --lora, the base model without its adapters (loaded as the target is)."""
    from .target import load_target

    if sources:
        return [load_target(source, device=device, dtype=args.dtype) for source in sources]
    if loras and any(r.calibrate == "reference" for r in requests.values()):
        base = load_target(model, device=device, dtype=args.dtype, variant=args.variant, config=args.model_config)
        print(f"reference model: {base.name}, the base model without its LoRA adapters", flush=True)
        return [base]
    return []


def audit(args) -> None:
    import pandas as pd
    import torch

    from . import audit as set_audit
    from . import imagesets, plots, runs, scoring, studies
    from .data import claim_folder
    from .experiment import quiet_library_notices
    from .memo import write_text
    from .settings import Settings
    from .target import check_source

    started = time.time()
    _check_out(args.out)
    _precision(args)
    quiet_library_notices()  # no torchvision fall-back notice: no attack uses an image processor
    settings = Settings(
        args.guidance, args.prompt, args.encode_mode, args.schedule, args.seed, args.data_range, args.dtype
    )
    requests = studies.audit_requests(
        args.attack or list(AUDIT_DEFAULT)
    )  # fixed settings only: checked before any compute
    model = check_source(args.model, args.model_config)
    reference_sources, loras = _sources(args, requests, "a feature")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")
    sets = {
        name: imagesets.open_imageset(spec, require_labels=False)
        for name, spec in (("suspect", args.suspect), ("reference", args.reference))
    }
    for name, imageset in sets.items():
        print(f"{name}: {imageset.summary()}", flush=True)
    shared = set(sets["suspect"].records["sha256"]) & set(sets["reference"].records["sha256"])
    if shared:
        ids = sets["suspect"].records.loc[sets["suspect"].records["sha256"].isin(shared), "id"]
        raise ValueError(
            f"{len(shared)} images are in both the suspect and the reference set (same bytes), e.g. suspect ids "
            f"{list(ids)[:5]}; the reference must hold other images"
        )
    records = pd.concat([imageset.records for imageset in sets.values()], ignore_index=True)
    opened = scoring.open_target(
        model,
        records,
        size=args.size,
        device=args.device,
        dtype=args.dtype,
        variant=args.variant,
        config=args.model_config,
        loras=loras,
    )
    target, size = opened.target, opened.size
    references = tuple(_references(args, model, reference_sources, loras, requests, args.device))
    for model_ in (target, *references):
        runs.check_schedule(model_, requests.values())  # before anything is written
    out = claim_folder(args.out)
    with FolderLock(out):
        if any((out / name).exists() for name in (MANIFEST, "scores.parquet")):
            raise ValueError(
                f"{out} holds a `mialib score` run; choose another --out for the audit (one folder, one run)"
            )
        claim_folder(out / "cache", _cache_entry)
        # an earlier audit's outputs are removed first: an interrupted audit never leaves two audits' files;
        # audit.json, written last, says the audit finished
        for name in AUDIT_OUTPUTS:
            (out / name).unlink(missing_ok=True)
        tables = {}
        for name, imageset in sets.items():
            table = studies.feature_table(
                target,
                imageset,
                requests,
                settings,
                out / "cache",
                args.batch_size,
                size,
                progress=not args.quiet,
                references=references,
            )
            tables[name] = table.drop(columns="label", errors="ignore").assign(
                id=lambda d, n=name: n + "/" + d["id"].astype(str)
            )  # the sets' ids may repeat
        features = list(requests)
        scoring.write_table(
            out / "features.parquet", pd.concat([t.assign(set=n) for n, t in tables.items()], ignore_index=True)
        )
        keywords = dict(
            fit_fraction=args.fit_fraction, seed=args.seed, permutations=args.permutations, level=args.level
        )
        rows = []
        for name, columns in {"combined": features, **{run: [run] for run in features}}.items():
            result = set_audit.set_audit(tables["suspect"], tables["reference"], columns, **keywords)
            rows.append({"feature_set": name, **result.as_dict()})
            if name == "combined":
                combined = result
        scoring.write_table(out / "audit.csv", pd.DataFrame(rows))
        write_text(out / "verdict.txt", combined.verdict + "\n")
        parameters = {
            "model": model,
            "suspect": args.suspect,
            "reference": args.reference,
            "reference_models": args.reference_model,
            "loras": [[path, scale] for path, scale in loras],
            "attacks": {run: r.text() for run, r in requests.items()},
            "settings": settings.columns(),
            "size": size,
            "device": args.device,
            "no_tf32": args.no_tf32,
            "fingerprint": target.fingerprint(),
            **keywords,
        }
        held_out = set_audit.held_out_scores(
            tables["suspect"], tables["reference"], features, fit_fraction=args.fit_fraction, seed=args.seed
        )
        plots.save(plots.audit_scores(held_out, combined), out, "held_out_scores")
        write_text(
            out / "audit.json",
            json.dumps({"parameters": parameters, "result": combined.as_dict()}, indent=2, default=str),
        )
    print(
        pd.DataFrame(rows)[
            ["feature_set", "p_value_t", "p_value_permutation", "effect_size", "auc", "detected"]
        ].to_string(index=False)
    )
    print(f"\n{combined.verdict}\n({time.time() - started:.1f} s) -> {out}")


def _precision(args) -> None:
    """``--no-tf32``: full float32 matrix products and convolutions on the GPU (no effect on the CPU)."""
    if args.no_tf32:
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def _processes(cpu: bool):
    """accelerate's process state when launched as several processes (``accelerate launch`` or ``torchrun``
    set WORLD_SIZE), else None: the single-process path stays as it is. On the CPU the processes talk over
    gloo (accelerate needs ``cpu=True`` to see them)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if state.num_processes <= 1:
        raise ValueError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but accelerate sees one process; launch with torchrun or "
            "accelerate launch"
        )
    return state


def _with_seed(spec: str, seed: int) -> str:
    return spec if not seed else spec + ("&" if "?" in spec else "?") + f"seed={seed}"


def format_metrics(metrics) -> str:
    """The metrics table as text: test AUC and TPR@1%FPR with 95 % intervals, setting and cost."""
    lines = [f"{'run':28s} {'setting':34s} {'AUC [95%]':22s} {'TPR@1%FPR [95%]':22s} {'U-Net/img':>9s}"]
    for row in metrics.itertuples():
        lines.append(
            f"{row.run[:28]:28s} {str(row.setting)[:34]:34s} {row.auc:.3f} [{row.auc_low:.3f}, {row.auc_high:.3f}]   "
            f"{row.tpr_at_1fpr:.3f} [{row.tpr_at_1fpr_low:.3f}, {row.tpr_at_1fpr_high:.3f}]   {row.unet_evals:9.1f}"
        )
    n = metrics.iloc[0]
    lines.append(
        f"test split: {int(n.n_test_members)} members, {int(n.n_test_nonmembers)} non-members; thresholds and "
        "settings from calibration"
    )
    return "\n".join(lines)


def report(args) -> None:
    """Print the metrics table of a finished run, after checking that the folder's tables belong together
    (run.json present, every listed file's sha256 as written, one run identity); otherwise say why."""
    import pandas as pd

    folder = Path(args.folder)
    rerun = f"rerun the same mialib score ... --out {folder} to finish it (it resumes from its cache)"
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        if not any((folder / name).exists() for name in SCORE_TABLES):
            raise FileNotFoundError(
                f"{folder / 'metrics.csv'} does not exist: score the set first (mialib score ... --out {args.folder})"
            )
        pid = locked_by(folder) if folder.is_dir() else None
        if pid is not None:
            raise ValueError(
                f"a mialib run (pid {pid}) is still writing to {folder}; its tables are incomplete until it finishes"
            )
        raise ValueError(
            f"the run in {folder} is incomplete (it has no {MANIFEST}: it was interrupted, or written by a mialib "
            f"before run manifests), so its tables are not reported; {rerun}"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files, identity = dict(manifest["files"]), manifest["identity"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path} cannot be read ({type(error).__name__}); {rerun}") from None
    for name in ("metrics.csv", "parameters.json"):
        if name not in files:
            raise ValueError(
                f"{manifest_path} does not list {name}, so the tables in {folder} cannot be checked; {rerun}"
            )
    for name, expected in files.items():
        path = folder / name
        if not path.exists():
            raise ValueError(
                f"the tables in {folder} do not belong together: {name} is missing since the run wrote {MANIFEST}; "
                f"{rerun}"
            )
        if _file_sha256(path) != expected:
            raise ValueError(
                f"the tables in {folder} do not belong together: {name} changed after the run wrote {MANIFEST} "
                f"(another run or an edit); {rerun}"
            )
    for name in SCORE_TABLES:
        if name not in files and (folder / name).exists():
            raise ValueError(
                f"the tables in {folder} do not belong together: {name} is not part of the run {MANIFEST} records; "
                f"{rerun}"
            )
    written = json.loads((folder / "parameters.json").read_text()).get("identity")
    if written != identity:
        raise ValueError(
            f"the tables in {folder} do not belong together: parameters.json describes another run than "
            f"{MANIFEST}; {rerun}"
        )
    print(format_metrics(pd.read_csv(folder / "metrics.csv")))


def download(args) -> None:
    from .imagesets import parse_spec
    from .imagesets.laion_mi import DownloadError
    from .imagesets.laion_mi import download as fetch

    kind, folder, _ = parse_spec(args.data)
    if kind != "laion-mi":
        raise ValueError(f"mialib download fetches laion-mi sets; {args.data!r} is {kind}")
    try:
        summary = fetch(
            folder,
            processes=args.processes,
            threads=args.threads,
            timeout=args.timeout,
            retries=args.retries,
            limit=args.limit,
        )
    except DownloadError as error:  # the tool is missing or failed: say so without a traceback
        raise ValueError(str(error)) from None
    print(json.dumps(summary, indent=2, default=str))


def freeze(args) -> None:
    from .imagesets import freeze as write_manifest
    from .imagesets import open_imageset

    imageset = open_imageset(args.data)
    print(imageset.summary())
    path = write_manifest(imageset, args.out)
    print(f"manifest of {len(imageset)} images -> {path} (skipped: {path.with_name(path.stem + '.skipped.csv')})")


def run_preset(args) -> None:
    from . import experiment

    params = experiment.load_preset(args.preset)
    chosen = getattr(args, "notebooks", None)  # `prepare` takes no --notebooks: the preset's decide what it builds
    notebooks = tuple(chosen) if chosen is not None else experiment.preset_notebooks(params)
    if args.command in ("prepare", "all"):
        start = time.time()
        model = experiment.prepare_target(params)
        print(f"target: {model} ready ({time.time() - start:.1f} s)", flush=True)
        if "07_regimes" in notebooks:
            targets = experiment.prepare_regimes(params)
            print(f"{len(targets)} regime targets ready ({time.time() - start:.1f} s)", flush=True)
    if args.command in ("notebooks", "all"):
        output_dir = experiment.run_notebooks(args.preset, notebooks, args.kernel)
        print(f"results in {output_dir}", flush=True)


if __name__ == "__main__":
    main()
