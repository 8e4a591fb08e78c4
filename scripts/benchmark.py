"""Print speed and memory figures of every registered attack on a preset's target and image set (CPU or GPU).

    python scripts/benchmark.py --preset configs/default.yaml [--images 64] [--batch-size 32]

Each attack runs at its registry setting through the production path (``runs.attack_values``, cold:
empty caches). Figures: seconds per image, images per second, U-Net evaluations per image (counted, and
the registry's formula), and peak memory (resident set size on CPU, ``torch.cuda.max_memory_allocated``
on GPU). Then what the trajectory cache saves: a T sweep cold, the same sweep read back, a shorter path
read as a prefix, and the disk it takes per image. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from mialib import ddim, experiment, runs
from mialib.attacks import REGISTRY
from mialib.attacks.registry import AttackRequest
from mialib.settings import Settings
from mialib.target import load_target


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="configs/default.yaml")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    params = experiment.load_preset(args.preset)
    model = experiment.prepare_target(params)
    device = params.get("DEVICE", "cpu")
    settings = Settings.from_parameters(params)
    target = load_target(experiment.locate_model(model), device=device, dtype=getattr(torch, settings.dtype))
    imageset = experiment.open_data(params)
    imageset = imageset.select(list(imageset.records["id"][: args.images]))
    size = params["IMAGE_SIZE"]
    print(f"target {target.name} on {device}, {torch.get_num_threads()} threads, {len(imageset)} images of {size} px, batch {args.batch_size}")
    print(f"{'attack (registry setting)':40s} {'s/image':>9s} {'images/s':>9s} {'U-Net/img':>10s} {'formula':>8s} {'peak MB':>8s}")
    for name, spec in REGISTRY.items():
        if spec.kind == "blind":
            continue
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as cache:
            before, start = target.unet_evals, time.perf_counter()
            runs.attack_values(target, imageset, spec, spec.params(), settings, cache, args.batch_size, size, progress=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / len(imageset)
        evals = (target.unet_evals - before) / len(imageset)
        label = f"{name} {spec.describe(spec.params())}"[:40]
        print(f"{label:40s} {seconds:9.4f} {1 / seconds:9.1f} {evals:10.1f} {spec.cost(spec.params(), settings):8d} {peak_mb(device):8.0f}")
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
