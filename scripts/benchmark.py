"""Print speed and memory figures of the attacks on a preset's target (CPU or GPU).

    python scripts/benchmark.py --preset configs/default.yaml [--images 64] [--batch-size 32]

Figures: seconds per image, images per second, U-Net evaluations per image (counted), and peak memory
(resident set size on CPU, ``torch.cuda.max_memory_allocated`` on GPU); then what the trajectory cache
saves: a T sweep computed cold, the same sweep read back, a shorter path read as a prefix, and the disk
it takes per image. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from mialib import data, ddim, experiment, runs
from mialib.attacks import loss_attack, structural_attack, vae_control
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
    images = experiment.prepare_data(**experiment.data_args(params))
    model = experiment.prepare_target(params, images)
    device = params.get("DEVICE", "cpu")
    target = load_target(model, device=device)
    rows = images[images["split"] != "public"].head(args.images)
    tensors, rows = data.load_images(rows, params["IMAGE_SIZE"])
    attacks = {
        "structural t=100 stride=50 (paper)": lambda x, c, i: structural_attack(target, x, c, i, t=100, stride=50),
        "structural t=100 stride=10": lambda x, c, i: structural_attack(target, x, c, i, t=100, stride=10),
        "structural t=100 guidance=3": lambda x, c, i: structural_attack(target, x, c, i, t=100, stride=50, guidance=3.0),
        "loss t=100": lambda x, c, i: loss_attack(target, x, c, i, t=100),
        "VAE-only control": lambda x, c, i: vae_control(target, x, c, i),
    }
    print(f"target {target.name} on {device}, {torch.get_num_threads()} threads, {len(rows)} images of {params['IMAGE_SIZE']} px, batch {args.batch_size}")
    print(f"{'attack':40s} {'s/image':>9s} {'images/s':>9s} {'U-Net/img':>10s} {'peak MB':>8s}")
    for name, attack in attacks.items():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        evals_before = target.unet_evals
        start = time.perf_counter()
        for s in range(0, len(rows), args.batch_size):
            part = rows.iloc[s : s + args.batch_size]
            attack(tensors[s : s + args.batch_size].to(device), list(part["caption"]), list(part["id"]))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / len(rows)
        evals = (target.unet_evals - evals_before) / len(rows)
        print(f"{name:40s} {seconds:9.4f} {1 / seconds:9.1f} {evals:10.1f} {peak_mb(device):8.0f}")
    trajectory_cache(target, rows, tensors, params, args.batch_size)


def trajectory_cache(target, rows, tensors, params: dict, batch_size: int) -> None:
    """Seconds per image and U-Net evaluations of curve studies with and without the trajectory cache."""
    settings = dict(
        guidance=params["GUIDANCE"], prompt=params["PROMPT"], encode_mode=params["ENCODE_MODE"],
        schedule=params["SCHEDULE"], seed=params["SEED"],
    )
    t_max, stride, paper_t = params["CURVE_T_MAX"], params["CURVE_STRIDE"], params["PAPER_T"]
    print(f"\ntrajectory cache (path 0..{t_max}, stride {stride}, measures: SSIM, MSE, MS-SSIM, latent MSE)")
    print(f"{'study':40s} {'s/image':>9s} {'U-Net/img':>10s}")
    with tempfile.TemporaryDirectory() as cache:
        studies = [
            (f"T sweep to {t_max}, cold", t_max, 2.0),
            (f"T sweep to {t_max}, rerun (all cached)", t_max, 2.0),
            (f"T={paper_t}, data range 1 (path cached)", paper_t, 1.0),
        ]
        for name, total, data_range in studies:
            before, start = target.unet_evals, time.perf_counter()
            runs.structural_curves(target, rows, tensors, ddim.path(total, stride), cache, batch_size, data_range=data_range, **settings)
            seconds = (time.perf_counter() - start) / len(rows)
            print(f"{name:40s} {seconds:9.4f} {(target.unet_evals - before) / len(rows):10.1f}")
        files = list((Path(cache) / "trajectory").glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files) / len(files)
        print(f"disk: {len(files)} trajectory files, {size / 1024:.1f} KiB per image ({t_max // stride + 1} latents)")


if __name__ == "__main__":
    main()
