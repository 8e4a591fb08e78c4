"""Stable Diffusion v1.5 as users load it, on this machine: random weights in SD 1.5's real component shapes.

    python scripts/benchmark_sd.py [--out outputs/benchmark_sd] [--images 8] [--sizes 64 256] [--device cpu]
    python scripts/benchmark_sd.py --device cuda --sizes 512 --dtypes float32 float16 --images 32     # on a GPU

Builds a pipeline folder with SD 1.5's component configs (U-Net 320/640/1280/1280 with cross-attention 768, VAE
128/256/512/512, CLIP ViT-L/14-shaped text encoder, SD's PNDM scheduler config) and random weights, saved with
``save_pretrained`` (safetensors) as a user's download would be. Then, each in a fresh process so memory is the
process's own:

1. load (float32 and bfloat16) and fingerprint it: seconds, and resident memory after loading, after
   fingerprinting and at the peak (the fingerprint must not hold a copy of the weights);
2. ``mialib score`` at each size on an imagefolder of structured images: seconds per image, U-Net evaluations
   per image and peak memory per attack (cold caches), and a second run that must read everything back.

Random weights say nothing about membership; the figures are cost. Everything is printed and saved
(``sd15_load.csv``, ``sd15_score_<dtype>.csv``, ``sd15_cost.png``); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # helpers.write_imagefolder: the test suite's structured images

ATTACKS = ["structural", "loss", "pia", "secmi", "clid"]
CAPTIONS = ["red apple", "grinning face", "man farmer", "cat face", "blue car", "green tree", "old house", "small boat"]


def build_sd15(folder: Path) -> None:
    """Random weights in SD 1.5's component shapes, saved like the hub's folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mialib.tiny import build_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(CAPTIONS, 77),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)


LOAD_PROBE = r"""
import json, resource, sys, time
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
from mialib.target import load_target
began = time.perf_counter()
target = load_target(sys.argv[1], dtype=sys.argv[2], device=sys.argv[3])
loaded = time.perf_counter() - began
after_load = rss()
began = time.perf_counter(); digest = target.fingerprint(); hashed = time.perf_counter() - began
after_hash = rss()
began = time.perf_counter(); target.fingerprint(); again = time.perf_counter() - began
weights = sum(p.numel() * p.element_size() for m in target.modules().values() for p in m.parameters()) / 2**20
print(json.dumps(dict(
    dtype=sys.argv[2], load_s=loaded, fingerprint_s=hashed, fingerprint_again_s=again, weights_mb=weights,
    rss_after_load_mb=after_load, rss_after_fingerprint_mb=after_hash,
    peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, fingerprint=digest[:16],
)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/benchmark_sd")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtypes of the load and fingerprint probe"
    )
    parser.add_argument("--score-dtype", default="float32", help="dtype of the scoring runs")
    args = parser.parse_args()

    import pandas as pd

    import helpers

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    model = out / "sd15-random"
    if not (model / "model_index.json").exists():
        began = time.perf_counter()
        build_sd15(model)
        print(f"built {model} in {time.perf_counter() - began:.0f} s", flush=True)
    sizes_mb = {p.parent.name + "/" + p.name: p.stat().st_size / 2**20 for p in model.rglob("*.safetensors")}
    print("weight files (MB):", {k: round(v) for k, v in sizes_mb.items()}, flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    # 1. load and fingerprint, one fresh process per dtype
    loads = []
    for dtype in args.dtypes:
        result = subprocess.run(
            [sys.executable, "-c", LOAD_PROBE, str(model), dtype, args.device],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        loads.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(loads[-1], flush=True)
    pd.DataFrame(loads).to_csv(out / "sd15_load.csv", index=False)

    # 2. mialib score at each size, cold and then warm (the rerun must read every result back)
    rows = []
    for size in args.sizes:
        images = helpers.write_imagefolder(out / f"images-{size}", n=args.images, size=size)
        for run in ("cold", "warm"):
            argv = [
                sys.executable,
                "-m",
                "mialib",
                "score",
                "--model",
                str(model),
                "--data",
                f"imagefolder:{images}",
                "--out",
                str(out / f"scored-{size}-{args.score_dtype}"),
                "--size",
                str(size),
                "--batch-size",
                "4",
                "--device",
                args.device,
                "--dtype",
                args.score_dtype,
                "--bootstrap",
                "10",
                "--quiet",
            ]
            for attack in ATTACKS:
                argv += ["--attack", attack]
            began = time.perf_counter()
            subprocess.run(argv, env=env, check=True)
            wall = time.perf_counter() - began
            scores = pd.read_parquet(out / f"scored-{size}-{args.score_dtype}" / "scores.parquet")
            for attack, group in scores.groupby("run", sort=False):
                rows.append(
                    dict(
                        size=size,
                        dtype=args.score_dtype,
                        run=run,
                        attack=attack,
                        images=len(group),
                        seconds_per_image=group["seconds_per_image"].mean(),
                        unet_evals=group["unet_evals"].iloc[0],
                        unet_evals_run=group["unet_evals_run"].mean(),
                        peak_memory_mb=group["peak_memory_mb"].max(),
                        wall_s=wall,
                    )
                )
            print(pd.DataFrame(rows).query("size == @size and run == @run").to_string(index=False), flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / f"sd15_score_{args.score_dtype}.csv", index=False)
    plot(frame, pd.DataFrame(loads), out / "sd15_cost.png")
    print(f"saved {out / 'sd15_load.csv'}, {out / f'sd15_score_{args.score_dtype}.csv'}, {out / 'sd15_cost.png'}")


def plot(frame, loads, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    cold = frame[frame["run"] == "cold"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.barplot(data=cold, x="attack", y="seconds_per_image", hue="size", ax=axes[0])
    axes[0].set(title="SD 1.5 shape, random weights: seconds per image (cold)", ylabel="s / image", xlabel="")
    melted = loads.melt(
        id_vars="dtype",
        value_vars=["weights_mb", "rss_after_load_mb", "rss_after_fingerprint_mb", "peak_rss_mb"],
        var_name="memory",
        value_name="MB",
    )
    sns.barplot(data=melted, x="dtype", y="MB", hue="memory", ax=axes[1])
    axes[1].set(title="host memory: load and fingerprint", xlabel="")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
