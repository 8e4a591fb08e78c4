"""Print speed and memory figures of every registered attack on a preset's target and image set (CPU or GPU).

    python scripts/benchmark.py --preset configs/default.yaml [--images 64] [--batch-size 32]

Each attack runs at its registry setting twice: the attack function alone on batches already in memory,
and the production path (``runs.attack_values``, cold: empty caches). Figures: seconds per image, images
per second, U-Net evaluations per image (counted, and the registry's formula), the overhead ratio (wall
time over the time inside the model's own forward passes: U-Net, VAE encoder and decoder, text encoders)
and peak memory, reset before each run (resident high-water mark on CPU, ``torch.cuda.max_memory_allocated``
on GPU). Saved to ``<--out>/benchmark.csv`` with the device. Then what the trajectory cache saves: a T sweep cold, the same sweep read back, a shorter path
read as a prefix, and the disk it takes per image. Timings are printed, never asserted.
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
from mialib.settings import Settings
from mialib.target import load_target


class ModelClock:
    """Wall seconds spent inside the model's own forward passes (U-Net, VAE encoder and decoder, text
    encoders), by forward hooks; the overhead ratio of a run is its wall time over this."""

    def __init__(self, target, device: str):
        self.seconds, self.device, self._began, self.handles = 0.0, device, {}, []
        vae = target.vae
        modules = [target.unet, vae.encoder, vae.decoder, target.text_encoder]
        modules += [m for m in (getattr(vae, "quant_conv", None), getattr(vae, "post_quant_conv", None)) if m is not None]
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
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=0, help="images per batch (0: the preset's BATCH_SIZE)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path; the median run is reported")
    parser.add_argument("--attacks", nargs="*", default=None, help="only these registry attacks")
    parser.add_argument("--out", default="outputs/benchmark", help="folder of benchmark.csv")
    args = parser.parse_args()
    import pandas as pd

    params = experiment.load_preset(args.preset)
    model = experiment.prepare_target(params)
    device = params.get("DEVICE", "cpu")
    settings = Settings.from_parameters(params)
    target = load_target(experiment.locate_model(model), device=device, dtype=settings.dtype)
    imageset = experiment.open_data(params)
    imageset = imageset.select(list(imageset.records["id"][: args.images]))
    size = params["IMAGE_SIZE"]
    args.batch_size = args.batch_size or params["BATCH_SIZE"]
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"target {target.name} on {device_name}, {len(imageset)} images of {size} px, batch {args.batch_size}")
    header = f"{'attack (registry setting)':34s} {'path':10s} {'s/image':>8s} {'img/s':>7s} {'U-Net/img':>9s} {'formula':>7s} {'overhead':>8s} {'peak MB':>8s}"
    print(header)
    rows = []
    batches = [(list(r["id"]), list(r["caption"]), pixels) for r, pixels in imageset.batches(size, args.batch_size)]
    for name, spec in REGISTRY.items():
        if spec.kind == "blind" or (args.attacks and name not in args.attacks):
            continue
        point = spec.params()
        keywords = {**point, **settings.for_function(spec.function)}
        measured = {"function": [], "production": []}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                paths = {
                    # the attack function alone, pixels already in memory (trajectory cache off)
                    "function": lambda: [spec.function(target, p.to(target.device), c, i, **keywords) for i, c, p in batches],
                    # the production path, cold: reading and checking images, the caches, SSIM, the result store
                    "production": lambda: runs.attack_values(target, imageset, spec, point, settings, cache, args.batch_size, size, progress=False),
                }
                for path, run in paths.items():
                    memo.clear()  # nothing remembered from an earlier run
                    measured[path].append(measure(target, device, run))
        for path, results in measured.items():
            wall, inside, evals, peak = sorted(results, key=lambda r: r[0] / r[1] if r[1] else 0)[len(results) // 2]  # the median run
            row = dict(attack=name, setting=spec.describe(point), path=path, device=device_name, images=len(imageset), size=size,
                       batch_size=args.batch_size, repeats=args.repeats, seconds_per_image=wall / len(imageset), images_per_second=len(imageset) / wall,
                       unet_evals=evals / len(imageset), formula=spec.cost(point, settings), model_seconds=inside,
                       overhead_ratio=wall / inside if inside else float("nan"), peak_memory_mb=peak)
            rows.append(row)
            label = f"{name} {spec.describe(point)}"[:34]
            print(f"{label:34s} {path:10s} {row['seconds_per_image']:8.4f} {row['images_per_second']:7.1f} {row['unet_evals']:9.1f} "
                  f"{row['formula']:7d} {row['overhead_ratio']:8.2f} {peak:8.0f}", flush=True)
    out = experiment.ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "benchmark.csv", index=False)
    print(f"saved {out / 'benchmark.csv'}")
    trajectory_cache(target, imageset, params, settings, args.batch_size)


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
        print(f"disk: {len(files)} trajectory files, {per_image / 1024:.1f} KiB per image ({t_max // stride + 1} latents)")


if __name__ == "__main__":
    main()
