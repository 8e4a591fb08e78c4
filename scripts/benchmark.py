"""Speed and memory figures of every registered attack (CPU or GPU); prints tables, writes one CSV.

    python scripts/benchmark.py --preset configs/default.yaml          # make benchmark
    python scripts/benchmark.py --device cuda --sd15-images 32              # on a GPU (the preset's target)
    python scripts/benchmark.py --studies sd15 --attacks loss structural    # some studies, some attacks

The production path reads images with ``read_threads(device)`` threads (``MIALIB_READ_THREADS`` overrides);
the attack table records how many.

1. **Attacks** (``study=attacks``): each at its registry setting, on the preset's target and images, two
   ways: the attack function alone on batches already in memory, and the production path
   (``runs.attack_values``: reading and checking images, the result store, the trajectory cache),
   cold (empty caches, nothing remembered in memory); the median of ``--repeats`` runs. Figures: seconds
   per image, images per second, U-Net evaluations per image (counted, and the registry's formula), the
   overhead ratio (wall time over the time inside the model's own forward passes: U-Net, VAE encoder,
   decoder and quant convs, text encoders) and peak memory, reset before each run (resident high-water
   mark on CPU, ``torch.cuda.max_memory_allocated`` on GPU). The same on random weights in SD 1.5's
   shapes (``--sd15-images`` at ``--sd15-size``, 256 px by default, one run each).
2. **Paper against official** (``study=paper_vs_official``): the structural attack at the paper's 2 U-Net
   evaluations per image against the official code's 4 (it also runs the unconditional branch at
   guidance 1), as a ratio of seconds per image from one run each.
3. **Memory** (``study=memory``): ``mialib score`` on sets of ``--memory-sizes`` images, each in a fresh
   process: the attack's peak and the process's peak resident memory, and their ratio to the smallest.
4. **Determinism** (``study=determinism``): every model attack's scores at batch size 8 against the
   table's batch size, each cold, and the structural attack read from a warm trajectory cache (a deeper
   inversion's prefix) against cold: the largest absolute difference (0 on the CPU, where the tests
   assert bit-identity; the GPU's figure is the tolerance to expect there).
5. What the trajectory cache saves (printed): a T sweep cold, read back, and a prefix.

Everything goes to ``<--out>/benchmark.csv`` with the device; timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mialib import ddim, experiment, memo, runs
from mialib.attacks import REGISTRY
from mialib.attacks.registry import AttackRequest
from mialib.imagesets.core import read_threads
from mialib.settings import Settings
from mialib.target import load_target


class ModelClock:
    """Wall seconds spent inside the model's own forward passes (U-Net, VAE encoder and decoder, text
    encoders), by forward hooks; the overhead ratio of a run is its wall time over this."""

    def __init__(self, target, device: str):
        self.seconds, self.device, self._began, self.handles = 0.0, device, {}, []
        vae = target.vae
        modules = [target.unet, vae.encoder, vae.decoder, target.text_encoder]
        modules += [
            m for m in (getattr(vae, "quant_conv", None), getattr(vae, "post_quant_conv", None)) if m is not None
        ]
        modules += [m for m in (target.text_encoder_2,) if m is not None]
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post))

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _pre(self, module, args):
        self._sync()
        self._began[id(module)] = time.perf_counter()

    def _post(self, module, args, output):
        self._sync()
        self.seconds += time.perf_counter() - self._began.pop(id(module))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def measure(target, device: str, run) -> tuple[float, float, float, float]:
    """(wall seconds, seconds inside the model, U-Net evaluations, peak MB) of ``run()``."""
    clock = ModelClock(target, device)
    runs.reset_peak_memory(device)
    before, start = target.unet_evals, time.perf_counter()
    try:
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    finally:
        clock.remove()
    return wall, clock.seconds, target.unet_evals - before, runs.peak_memory_mb(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="configs/default.yaml")
    parser.add_argument("--images", type=int, default=384, help="images of the preset's set for the attack table")
    parser.add_argument("--batch-size", type=int, default=0, help="images per batch (0: the preset's BATCH_SIZE)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each path; the median run is reported")
    parser.add_argument("--attacks", nargs="*", default=None, help="only these registry attacks")
    parser.add_argument("--sd15-images", type=int, default=2, help="images for SD 1.5-shaped random weights (0: skip)")
    parser.add_argument("--sd15-size", type=int, default=256, help="their size in pixels (SD 1.5 trains at 512)")
    parser.add_argument(
        "--sd15-batch-size",
        type=int,
        default=16,
        help="their batch size (several batches let reading overlap the model)",
    )
    parser.add_argument(
        "--memory-sizes", type=int, nargs="*", default=[200, 2000], help="set sizes of the memory study (none: skip)"
    )
    parser.add_argument("--determinism-images", type=int, default=128, help="images of the determinism study (0: skip)")
    parser.add_argument("--device", default=None, help="torch device (default: the preset's DEVICE)")
    parser.add_argument("--out", default="outputs/benchmark", help="folder of benchmark.csv")
    parser.add_argument(
        "--studies", nargs="*", default=STUDIES, choices=STUDIES, help="which studies to run (default: all)"
    )
    args = parser.parse_args()
    import pandas as pd

    params = experiment.load_preset(args.preset)
    model = experiment.locate_model(experiment.prepare_target(params))
    device = args.device or params.get("DEVICE", "cpu")
    settings = Settings.from_parameters(params)
    target = load_target(model, device=device, dtype=settings.dtype)
    imageset = experiment.open_data(params)
    imageset = imageset.select(list(imageset.records["id"][: args.images]))
    size = params["IMAGE_SIZE"]
    args.batch_size = args.batch_size or params["BATCH_SIZE"]
    out = experiment.ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def save(new_rows: list[dict]) -> None:  # after every study, so that an interrupted run keeps what it measured
        rows.extend(new_rows)
        pd.DataFrame(rows).to_csv(out / "benchmark.csv", index=False)

    studies = set(args.studies)
    if "attacks" in studies:
        save(attack_table(target, imageset, settings, size, args.batch_size, args.repeats, args.attacks, device))
    if "paper_vs_official" in studies:
        save(paper_against_official(target, imageset, settings, size, args.batch_size, device))
    if args.determinism_images and "determinism" in studies:
        save(
            determinism(
                target,
                imageset.select(list(imageset.records["id"][: args.determinism_images])),
                settings,
                size,
                args.batch_size,
                args.attacks,
                device,
            )
        )
    if args.memory_sizes and "memory" in studies:
        save(memory_study(model, args.memory_sizes, size, args.batch_size, device, out))
    if args.sd15_images and "sd15" in studies:
        save(sd15_table(args.sd15_images, args.sd15_size, args.sd15_batch_size, args.attacks, device, out))
    print(f"saved {out / 'benchmark.csv'}")
    if "trajectory_cache" in studies:
        trajectory_cache(target, imageset, params, settings, args.batch_size)


STUDIES = ["attacks", "paper_vs_official", "determinism", "memory", "sd15", "trajectory_cache"]


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"


HEADER = (
    f"{'attack (registry setting)':34s} {'path':10s} {'s/image':>8s} {'img/s':>7s} {'U-Net/img':>9s} "
    f"{'formula':>7s} {'overhead':>8s} {'peak MB':>8s}"
)


def attack_table(
    target, imageset, settings: Settings, size: int, batch_size: int, repeats: int, only, device: str
) -> list[dict]:
    """Every model attack at its registry setting: the function on batches in memory, and the production
    path cold (empty caches, nothing remembered), each the median of ``repeats`` runs."""
    began = time.perf_counter()
    # once per loaded model (hashes the weight files): reported here, not charged to the first attack
    target.fingerprint()
    threads = read_threads(target.device)
    print(
        f"\ntarget {target.name} on {device_name(device)}, {len(imageset)} images of {size} px, batch {batch_size}, "
        f"median of {repeats}, "
        f"{threads} reader thread(s); model fingerprint {time.perf_counter() - began:.1f} s (once per model)"
    )
    print(HEADER)
    rows = []
    batches = [(list(r["id"]), list(r["caption"]), pixels) for r, pixels in imageset.batches(size, batch_size)]
    for name, spec in REGISTRY.items():
        if spec.kind == "blind" or (only and name not in only):
            continue
        point = spec.params()
        keywords = {**point, **settings.for_function(spec.function)}
        measured = {"function": [], "production": []}
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as cache:
                paths = {
                    # the attack function alone, pixels already in memory (trajectory cache off)
                    "function": lambda: [
                        spec.function(target, p.to(target.device), c, i, **keywords) for i, c, p in batches
                    ],
                    # the production path, cold: reading and checking images, the caches, SSIM, the result store
                    "production": lambda: runs.attack_values(
                        target, imageset, spec, point, settings, cache, batch_size, size, progress=False
                    ),
                }
                for path, run in paths.items():
                    memo.clear()  # nothing remembered from an earlier run
                    measured[path].append(measure(target, device, run))
        for path, results in measured.items():
            wall, inside, evals, peak = sorted(results, key=lambda r: r[0] / r[1] if r[1] else 0)[
                len(results) // 2
            ]  # the median run
            row = dict(
                study="attacks",
                target=target.name,
                attack=name,
                setting=spec.describe(point),
                path=path,
                device=device_name(device),
                images=len(imageset),
                size=size,
                batch_size=batch_size,
                repeats=repeats,
                read_threads=threads,
                seconds_per_image=wall / len(imageset),
                images_per_second=len(imageset) / wall,
                unet_evals=evals / len(imageset),
                formula=spec.cost(point, settings),
                model_seconds=inside,
                overhead_ratio=wall / inside if inside else float("nan"),
                peak_memory_mb=peak,
            )
            rows.append(row)
            label = f"{name} {spec.describe(point)}"[:34]
            print(
                f"{label:34s} {path:10s} {row['seconds_per_image']:8.4f} {row['images_per_second']:7.1f} "
                f"{row['unet_evals']:9.1f} "
                f"{row['formula']:7d} {row['overhead_ratio']:8.2f} {peak:8.0f}",
                flush=True,
            )
    return rows


def paper_against_official(target, imageset, settings: Settings, size: int, batch_size: int, device: str) -> list[dict]:
    """The paper's setting (t=100, stride 50, guidance 1: 2 U-Net evaluations per image) against the official
    code's cost for the same scores: it runs the unconditional branch at guidance 1 too (4 evaluations).
    Emulated here with the two-branch path at guidance 1 + 1e-9 (the scores differ by about 1e-9); one run each."""
    spec = REGISTRY["structural"]
    point = spec.params()
    rows = []
    for name, chosen in (
        ("paper (2 evaluations)", settings),
        ("official code (4 evaluations)", settings.replace(guidance=1.0 + 1e-9)),
    ):
        keywords = {**point, **chosen.for_function(spec.function)}
        batches = [(list(r["id"]), list(r["caption"]), p) for r, p in imageset.batches(size, batch_size)]
        wall, inside, evals, peak = measure(
            target,
            device,
            lambda: [spec.function(target, p.to(target.device), c, i, **keywords) for i, c, p in batches],
        )
        rows.append(
            dict(
                study="paper_vs_official",
                target=target.name,
                attack="structural",
                setting=name,
                path="function",
                device=device_name(device),
                images=len(imageset),
                size=size,
                batch_size=batch_size,
                seconds_per_image=wall / len(imageset),
                images_per_second=len(imageset) / wall,
                unet_evals=evals / len(imageset),
                model_seconds=inside,
                peak_memory_mb=peak,
            )
        )
    rows[1]["ratio_to_paper"] = rows[1]["seconds_per_image"] / rows[0]["seconds_per_image"]
    rows[0]["ratio_to_paper"] = 1.0
    print(
        f"\nstructural, paper setting: {rows[0]['unet_evals']:.0f} U-Net evaluations, "
        f"{rows[0]['seconds_per_image'] * 1e3:.2f} ms per image; "
        f"the official code's {rows[1]['unet_evals']:.0f}: {rows[1]['seconds_per_image'] * 1e3:.2f} ms per image "
        f"({rows[1]['ratio_to_paper']:.2f} times)"
    )
    return rows


def determinism(target, imageset, settings: Settings, size: int, batch_size: int, only, device: str) -> list[dict]:
    """Largest absolute score difference: batch size 8 against ``batch_size`` (each cold, in its own
    cache), for every model attack; and the structural attack at its registry t read as the prefix of a
    deeper inversion in a warm trajectory cache, against cold."""
    rows = []
    print(f"\ndeterminism on {device_name(device)}: largest |score difference| over {len(imageset)} images")

    def scores(spec, point, chosen_batch, cache):
        memo.clear()
        frame = runs.attack_values(target, imageset, spec, point, settings, cache, chosen_batch, size, progress=False)
        return frame.set_index("id")["score"].astype(float)

    def record(name, comparison, a, b):
        difference = float((a - b.reindex(a.index)).abs().max())
        rows.append(
            dict(
                study="determinism",
                target=target.name,
                attack=name,
                setting=comparison,
                path="production",
                device=device_name(device),
                images=len(imageset),
                size=size,
                batch_size=batch_size,
                max_abs_difference=difference,
            )
        )
        print(f"{name:12s} {comparison:48s} {difference:.3g}", flush=True)

    # on a GPU, again with cuDNN's TF32 convolutions (PyTorch's default) turned off: full float32
    default_tf32 = torch.backends.cudnn.allow_tf32
    for tf32 in (True, False) if device.startswith("cuda") else (True,):
        torch.backends.cudnn.allow_tf32 = tf32
        for name, spec in REGISTRY.items():
            if spec.kind == "blind" or (only and name not in only):
                continue
            point = spec.params()
            with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as other:
                record(
                    name,
                    f"batch 8 vs {batch_size}, both cold"
                    + ("" if tf32 or not device.startswith("cuda") else ", TF32 off"),
                    scores(spec, point, batch_size, one),
                    scores(spec, point, 8, other),
                )
    torch.backends.cudnn.allow_tf32 = default_tf32
    spec = REGISTRY["structural"]
    point = spec.params()
    deeper = {**point, "t": 2 * point["t"]}
    with tempfile.TemporaryDirectory() as cold, tempfile.TemporaryDirectory() as warm:
        scores(spec, deeper, batch_size, warm)  # fills the trajectory cache to 2t
        record(
            "structural",
            f"t={point['t']} warm (prefix of t={deeper['t']}) vs cold",
            scores(spec, point, batch_size, cold),
            scores(spec, point, batch_size, warm),
        )
    return rows


def memory_study(model: str, sizes: list[int], size: int, batch_size: int, device: str, out: Path) -> list[dict]:
    """Peak memory of `mialib score` (structural, paper setting) on sets of each size, each in a fresh
    process: the attack's own peak (reset when it starts) and the process's peak resident memory."""
    import os
    import subprocess
    import sys

    import pandas as pd

    sys.path.insert(0, str(experiment.ROOT / "tests"))
    import helpers  # the test suite's structured images, as tests/test_scale.py uses

    rows = []
    print(
        f"\nmemory of `mialib score --attack structural` (batch {batch_size}, {size} px, structured test images), "
        "each set in a fresh process"
    )
    with tempfile.TemporaryDirectory() as folder:
        for n in sizes:
            data = helpers.write_imagefolder(Path(folder) / f"set{n}", n=n, size=size)
            result = Path(folder) / f"out{n}"
            command = [
                sys.executable,
                "-m",
                "mialib",
                "score",
                "--model",
                model,
                "--data",
                f"imagefolder:{data}",
                "--attack",
                "structural",
                "--out",
                str(result),
                "--batch-size",
                str(batch_size),
                "--size",
                str(size),
                "--device",
                device,
                "--bootstrap",
                "10",
                "--quiet",
            ]
            start = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(process.pid, 0)
            if status:
                raise RuntimeError(process.stderr.read())
            scores = pd.read_parquet(result / "scores.parquet")
            row = dict(
                study="memory",
                target=Path(model).name,
                attack="structural",
                setting="t=100, stride=50",
                path="production",
                device=device_name(device),
                images=n,
                size=size,
                batch_size=batch_size,
                seconds=time.perf_counter() - start,
                peak_memory_mb=float(scores["peak_memory_mb"].max()),
                process_peak_mb=usage.ru_maxrss / 1024,
            )
            rows.append(row)
            print(
                f"{n:6d} images: attack peak {row['peak_memory_mb']:7.0f} MB, "
                f"process peak {row['process_peak_mb']:7.0f} MB, {row['seconds']:.0f} s"
            )
    for row in rows:
        row["peak_vs_smallest"] = row["process_peak_mb"] / rows[0]["process_peak_mb"]
    return rows


def sd15_table(n: int, size: int, batch_size: int, only, device: str, out: Path) -> list[dict]:
    """The attack table on random weights in SD 1.5's shapes at ``size`` px, ``n`` images, one run each
    (the weights are built once into outputs/benchmark_sd/sd15-random, 4 GB, as `make benchmark-sd` does)."""
    import sys

    sys.path.insert(0, str(experiment.ROOT / "scripts"))
    from benchmark_sd import build_sd15

    sys.path.insert(0, str(experiment.ROOT / "tests"))
    import helpers
    from mialib import imagesets

    folder = experiment.ROOT / "outputs" / "benchmark_sd" / "sd15-random"
    if not (folder / "model_index.json").exists():
        build_sd15(folder)
    target = load_target(str(folder), device=device, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as data:
        imageset = imagesets.open_imageset(
            f"imagefolder:{helpers.write_imagefolder(Path(data) / 'set', n=n, size=size)}"
        )
        return attack_table(target, imageset, Settings(), size, min(batch_size, n), 1, only, device)


def trajectory_cache(target, imageset, params: dict, settings: Settings, batch_size: int) -> None:
    """Seconds per image and U-Net evaluations of the T sweep with and without the trajectory cache."""
    t_max, stride, size = params["CURVE_T_MAX"], params["CURVE_STRIDE"], params["IMAGE_SIZE"]
    paper_t = REGISTRY["structural"].defaults["t"]
    print(f"\ntrajectory cache (structural attack at every t of 0..{t_max}, stride {stride})")
    print(f"{'study':40s} {'s/image':>9s} {'U-Net/img':>10s}")
    with tempfile.TemporaryDirectory() as cache:
        studies = [
            (f"T sweep to {t_max}, cold", t_max, settings),
            (f"T sweep to {t_max}, rerun (all cached)", t_max, settings),
            (f"T={paper_t}, data range 1 (path cached)", paper_t, settings.replace(data_range=1.0)),
        ]
        for name, total, chosen in studies:
            request = AttackRequest("structural", {"stride": stride}, {"t": ddim.path(total, stride)}, 1)
            before, start = target.unet_evals, time.perf_counter()
            runs.grid_values(target, imageset, request, chosen, cache, batch_size, size, progress=False)
            seconds = (time.perf_counter() - start) / len(imageset)
            print(f"{name:40s} {seconds:9.4f} {(target.unet_evals - before) / len(imageset):10.1f}")
        files = list((Path(cache) / "trajectory").glob("*.safetensors"))
        per_image = sum(f.stat().st_size for f in files) / len(files)
        print(
            f"disk: {len(files)} trajectory files, {per_image / 1024:.1f} KiB per image ({t_max // stride + 1} latents)"
        )


if __name__ == "__main__":
    main()
