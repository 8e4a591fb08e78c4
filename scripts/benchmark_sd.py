"""Stable Diffusion as users load it, on this machine: random weights in a family's real component shapes.

    python scripts/benchmark_sd.py [--out outputs/benchmark_sd] [--images 8] [--sizes 64 256] [--device cpu]
    python scripts/benchmark_sd.py --device cuda --sizes 512 --dtypes float32 float16 --images 32     # on a GPU
    python scripts/benchmark_sd.py --family sd3 --device cuda --images 4             # SD3.5-medium, 1024 px, bf16
    python scripts/benchmark_sd.py --family flux --device cuda --images 4            # FLUX.1-dev, 1024 px, bf16
    python scripts/benchmark_sd.py --family flux --scale tiny                        # the same path, tiny, CPU

``--family sd15`` (the default) builds a pipeline folder with SD 1.5's component configs (U-Net 320/640/1280/1280
with cross-attention 768, VAE 128/256/512/512, CLIP ViT-L/14-shaped text encoder, SD's PNDM scheduler config) and
random weights, saved with ``save_pretrained`` (safetensors) as a user's download would be. Then, each in a fresh
process so memory is the process's own:

1. load (float32 and bfloat16) and fingerprint it: seconds, and resident memory after loading, after
   fingerprinting and at the peak (the fingerprint must not hold a copy of the weights);
2. ``mialib score`` at each size on an imagefolder of structured images: seconds per image, U-Net evaluations
   per image and peak memory per attack (cold caches), and a second run that must read everything back.

Random weights say nothing about membership; the figures are cost. Everything is printed and saved
(``sd15_load.csv``, ``sd15_score_<dtype>.csv``, ``sd15_cost.png``); nothing is asserted.

The flow-matching families do the same with their own pipeline class, in bfloat16 by default (the load probe in
bfloat16 only, scoring with ``--dtype bfloat16``, 1024 px: their native size), and write ``<family>_load.csv``,
``<family>_score_<dtype>.csv`` and ``<family>_cost.png``. Their attacks are sd15's plus the noise-level curve,
less CLiD on FLUX (FLUX.1 has no trained unconditional branch; ``mialib.target.Target.unconditional``).

- ``--family sd3``: a ``StableDiffusion3Pipeline`` in stabilityai/stable-diffusion-3.5-medium's shapes:
  ``SD3Transformer2DModel`` (sample_size 128, patch_size 2, 16 channels in and out, 24 layers, 24 heads of 64,
  joint_attention_dim 4096, caption_projection_dim 1536, pooled_projection_dim 2048, pos_embed_max_size 384,
  dual_attention_layers 0-12, qk_norm rms_norm: diffusers' scripts/convert_sd3_to_diffusers.py, which reads
  the layer count, caption projection, pos-embed size, dual-attention layers and qk norm off the SD3.5 checkpoint
  and sets heads = layers, and the repository's transformer/config.json); the 16-channel SD3 VAE (SDXL's VAE
  layout, 128/256/512/512, two layers per block, no quant convs, scaling_factor 1.5305, shift_factor 0.0609: the
  same script); CLIP-L (``CLIPTextModelWithProjection``: 768 wide, 12 layers, 12 heads, MLP 3072, quick_gelu,
  projection 768) and OpenCLIP bigG (1280 wide, 32 layers, 20 heads, MLP 5120, gelu, projection 1280; the two
  projections make the transformer's pooled 2048); T5-XXL's encoder (``T5EncoderModel``, google/t5-v1_1-xxl:
  d_model 4096, 24 layers, 64 heads of 64, d_ff 10240, gated-gelu, vocabulary 32128); SD3's
  ``FlowMatchEulerDiscreteScheduler`` (shift 3.0).
- ``--family flux``: a ``FluxPipeline`` in black-forest-labs/FLUX.1-dev's shapes: ``FluxTransformer2DModel``
  (19 double and 38 single blocks, 24 heads of 128, joint_attention_dim 4096, pooled_projection_dim 768,
  in_channels 64 (16 latent channels packed 2x2), axes_dims_rope (16, 56, 56): diffusers' defaults, which
  scripts/convert_flux_to_diffusers.py uses, and dev's guidance_embeds True); the 16-channel FLUX VAE (as SD3's,
  scaling_factor 0.3611, shift_factor 0.1159: the repository's vae/config.json); CLIP-L (``CLIPTextModel``, as
  above); T5-XXL's encoder (as above); FLUX's ``FlowMatchEulerDiscreteScheduler`` (shift 3.0, dynamic shifting
  from base_shift 0.5 at 256 image tokens to max_shift 1.15 at 4096).

Parameter counts these configs give (``--scale real``; printed at build time): SD3.5-medium transformer 2.243 B
(+0.227 B in its stored position-embedding buffer: 2.47 B stored, the published "2.5 B"), FLUX.1-dev transformer
11.90 B, T5-XXL encoder 4.762 B, CLIP-L 123.1 M (123.7 M with projection), bigG 694.7 M, each VAE 83.8 M.

Every flow component is built on the meta device (accelerate's ``init_empty_weights``: no memory, no
initialisation) and then given random weights directly in bfloat16 on ``--device`` (uniform within PyTorch's
default bound 1/sqrt(fan_in) for linear and convolution layers, N(0, 1) for embeddings, ones and zeros for norms),
so FLUX's 12 B transformer and T5-XXL never exist in float32 (about 64 GB) nor initialise on a CPU; the folder is
saved in bfloat16 safetensors (as the hub's FLUX.1-dev and SD3.5 files are). ``--scale tiny`` builds the same
classes, through the same code, at a few layers and small widths (the tokenizers are the same), so the whole path
runs on a CPU in seconds; its files are named ``<family>_tiny_*``. The CLIP tokenizers are trained offline on a
few captions (:func:`mialib.tiny.build_tokenizer`), the T5 tokenizer is the tests' offline Unigram one
(tests/model_zoo.py): nothing is downloaded.
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
FAMILIES = ("sd15", "sd3", "flux")
REAL, TINY = "real", "tiny"  # --scale: the published shapes, or the same classes at a few layers and small widths
LABELS = {"sd15": "SD 1.5", "sd3": "SD3.5-medium", "flux": "FLUX.1-dev"}
# the families without a trained unconditional branch, whose attacks exclude those that need one (CLiD): the
# registry's ``unconditional`` attacks are refused there (mialib.target.Target.unconditional)
NO_UNCONDITIONAL = {"flux"}
FLOW_SEED = 0


def family_attacks(family: str) -> list[str]:
    """The attacks benchmarked on a family: sd15's five; on a flow family also the noise-level curve, less what
    needs an unconditional branch where the model has none."""
    from mialib.attacks import REGISTRY

    if family == "sd15":
        return list(ATTACKS)
    return [a for a in [*ATTACKS, "curve"] if not (REGISTRY[a].unconditional and family in NO_UNCONDITIONAL)]


def files_tag(family: str, scale: str) -> str:
    """The prefix of a run's files and model folder: ``sd15``, ``sd3``, ``flux``; tiny builds add ``_tiny``."""
    return family if scale == REAL else f"{family}_{scale}"


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


# --------------------------------------------------------------------------------------------------
# SD3.5-medium and FLUX.1-dev: built on the meta device, given random bfloat16 weights where they run
# --------------------------------------------------------------------------------------------------
# ``--scale real``: the published shapes (sources in the module docstring); ``tiny``: the same classes, a few layers
CLIP_L = {
    REAL: dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    TINY: dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
}
CLIP_G = {
    REAL: dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20),
    TINY: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
}
T5_XXL = {
    REAL: dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    TINY: dict(d_model=128, d_kv=16, d_ff=256, num_layers=2, num_heads=4),
}
FLOW_VAE = {
    REAL: dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024),
    TINY: dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64),
}
SD3_TRANSFORMER = {
    REAL: dict(
        sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
    ),
    TINY: dict(
        sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=128,
        caption_projection_dim=32, pooled_projection_dim=96, pos_embed_max_size=16, dual_attention_layers=(0,),
    ),
}  # fmt: skip
FLUX_TRANSFORMER = {
    REAL: dict(
        num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
    ),
    TINY: dict(
        num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=128,
        pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ),
}  # fmt: skip
# the VAEs' latent normalisation: SD3's (diffusers' convert_sd3_to_diffusers.py), FLUX's (FLUX.1-dev vae/config.json)
VAE_FACTORS = {
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159),
}


def _clip(config: dict, tokenizer, hidden_act: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_act=hidden_act, projection_dim=config["hidden_size"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **config,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(text_config)


def _t5(config: dict, tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
            relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
            **config,
        )
    )  # fmt: skip


def _flow_vae(family: str, scale: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
        use_post_quant_conv=False, force_upcast=True, **FLOW_VAE[scale], **VAE_FACTORS[family],
    )  # fmt: skip


def flow_components(family: str, scale: str = REAL) -> dict:
    """A flow family's pipeline components, their modules on the meta device (no memory, no initialisation): the
    keyword arguments of its pipeline class."""
    from accelerate import init_empty_weights
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    import model_zoo
    from mialib.tiny import build_tokenizer

    clip_tokenizer = build_tokenizer(CAPTIONS, 77)
    t5_tokenizer = model_zoo._t5_tokenizer()  # the flow tests' offline T5 tokenizer (model_max_length 512)
    with init_empty_weights():  # parameters on the meta device; buffers (position ids, SD3's pos_embed) real
        if family == "sd3":
            modules = dict(
                transformer=SD3Transformer2DModel(
                    patch_size=2, in_channels=16, out_channels=16, qk_norm="rms_norm", **SD3_TRANSFORMER[scale]
                ),
                vae=_flow_vae(family, scale),
                text_encoder=_clip(CLIP_L[scale], clip_tokenizer, "quick_gelu", projection=True),
                text_encoder_2=_clip(CLIP_G[scale], clip_tokenizer, "gelu", projection=True),
                text_encoder_3=_t5(T5_XXL[scale], t5_tokenizer),
            )
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
            tokenizers = dict(tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer, tokenizer_3=t5_tokenizer)
        elif family == "flux":
            modules = dict(
                transformer=FluxTransformer2DModel(
                    patch_size=1, in_channels=64, guidance_embeds=True, **FLUX_TRANSFORMER[scale]
                ),
                vae=_flow_vae(family, scale),
                text_encoder=_clip(CLIP_L[scale], clip_tokenizer, "quick_gelu", projection=False),
                text_encoder_2=_t5(T5_XXL[scale], t5_tokenizer),
            )
            scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096,
            )  # fmt: skip
            tokenizers = dict(tokenizer=clip_tokenizer, tokenizer_2=t5_tokenizer)
        else:
            raise ValueError(f"no flow family {family!r}")
    for module in modules.values():
        if hasattr(module, "tie_weights"):  # T5: the encoder's token embedding is ``shared``; tied outside the
            module.tie_weights()  # context, whose patched register_parameter would make the tied one a copy
    return {**modules, **tokenizers, "scheduler": scheduler}


def weight_counts(module) -> tuple[int, int]:
    """(parameters, elements of the stored buffers) of a module, tied parameters once; works on the meta device."""
    parameters = sum(p.numel() for p in module.parameters())
    buffers = sum(
        b.numel()
        for m in module.modules()
        for name, b in m._buffers.items()
        if b is not None and name not in m._non_persistent_buffers_set
    )
    return parameters, buffers


def materialise(module, device, dtype, generator):
    """Random weights, made directly in ``dtype`` on ``device``, for a module whose parameters are on the meta
    device (tied parameters stay one): uniform within 1/sqrt(fan_in) for linear and convolution layers (PyTorch's
    default bound), N(0, 1) for embeddings, ones for other 1-d weights (norms' scales), zeros for their biases,
    N(0, 0.02) for anything else. Floating-point buffers are cast to ``dtype`` too."""
    import torch

    made = {}  # id(meta parameter) -> (meta parameter, its random replacement)
    for owner in module.modules():
        for name, parameter in list(owner._parameters.items()):
            if parameter is None:
                continue
            if id(parameter) not in made:
                tensor = torch.empty(parameter.shape, device=device, dtype=dtype)
                if isinstance(owner, torch.nn.Embedding):
                    tensor.normal_(0.0, 1.0, generator=generator)
                elif isinstance(owner, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
                    bound = owner.weight.shape[1:].numel() ** -0.5
                    tensor.uniform_(-bound, bound, generator=generator)
                elif parameter.dim() == 1:
                    tensor.fill_(0.0 if name == "bias" else 1.0)
                else:
                    tensor.normal_(0.0, 0.02, generator=generator)
                made[id(parameter)] = (parameter, torch.nn.Parameter(tensor, requires_grad=False))
            owner._parameters[name] = made[id(parameter)][1]
        for name, buffer in list(owner._buffers.items()):
            if buffer is not None:  # cast here: diffusers' ``.to(dtype)`` warns about float32-kept modules
                owner._buffers[name] = buffer.to(device, dtype if buffer.is_floating_point() else buffer.dtype)
    return module.eval().requires_grad_(False)


def build_flow(folder: Path, family: str, scale: str = REAL, device: str = "cpu") -> None:
    """Random bfloat16 weights in a flow family's shapes (:func:`flow_components`), made on ``device`` and saved
    like the hub's folder (bfloat16 safetensors); prints each component's parameter count."""
    import diffusers
    import torch

    components = flow_components(family, scale)
    generator = torch.Generator(device=device).manual_seed(FLOW_SEED)
    for name, component in components.items():
        if isinstance(component, torch.nn.Module):
            parameters, buffers = weight_counts(component)
            extra = f" (+{buffers / 1e6:,.1f} M in stored buffers)" if buffers > 1e6 else ""
            print(f"  {name}: {type(component).__name__}, {parameters / 1e6:,.1f} M parameters{extra}", flush=True)
            materialise(component, device, torch.bfloat16, generator)
    pipeline_class = {"sd3": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline}[family]
    pipeline_class(**components).save_pretrained(folder, safe_serialization=True)
    del components
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the scoring processes measure their own memory; this one gives its share back


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
    parser.add_argument("--family", choices=FAMILIES, default="sd15", help="whose component shapes (default sd15)")
    parser.add_argument(
        "--scale",
        choices=(REAL, TINY),
        default=REAL,
        help="real: the published shapes; tiny (flow families): a few layers",
    )
    parser.add_argument("--out", default="outputs/benchmark_sd")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="sd15: 64 256; flow families: 1024 (tiny scale: 64)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        help="dtypes of the load and fingerprint probe (sd15: float32 bfloat16; flow: bfloat16)",
    )
    parser.add_argument(
        "--score-dtype", default=None, help="dtype of the scoring runs (sd15: float32; flow families: bfloat16)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch of the scoring runs")
    parser.add_argument(
        "--runs", nargs="+", choices=("cold", "warm"), default=["cold", "warm"],
        help="cold (empty caches) and warm (the rerun that reads everything back)",
    )  # fmt: skip
    args = parser.parse_args()
    flow = args.family != "sd15"
    if args.scale == TINY and not flow:
        parser.error("--scale tiny is for the flow families (tests/model_zoo.py builds tiny SD 1.x pipelines)")
    if args.sizes is None:
        args.sizes = [64 if args.scale == TINY else 1024] if flow else [64, 256]
    if args.dtypes is None:
        args.dtypes = ["bfloat16"] if flow else ["float32", "bfloat16"]
    if args.score_dtype is None:
        args.score_dtype = "bfloat16" if flow else "float32"
    tag = files_tag(args.family, args.scale)
    attacks = family_attacks(args.family)
    folders = "" if args.family == "sd15" else f"{tag}-"  # the image sets' and scoring runs' folders

    import pandas as pd

    import helpers

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    model = out / f"{tag}-random"
    if not (model / "model_index.json").exists():
        began = time.perf_counter()
        if flow:
            print(
                f"building {LABELS[args.family]}-shaped random weights ({args.scale} scale, bfloat16, {args.device}):",
                flush=True,
            )
            build_flow(model, args.family, args.scale, args.device)
        else:
            build_sd15(model)
        print(f"built {model} in {time.perf_counter() - began:.0f} s", flush=True)
    sizes_mb = {p.parent.name + "/" + p.name: p.stat().st_size / 2**20 for p in model.rglob("*.safetensors")}
    print("weight files (MB):", {k: round(v) for k, v in sizes_mb.items()}, flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if args.scale == TINY:  # tiny models gain nothing from threads, and on a busy CPU two made them 100x slower
        env.setdefault("OMP_NUM_THREADS", "1")

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
    pd.DataFrame(loads).to_csv(out / f"{tag}_load.csv", index=False)

    # 2. mialib score at each size, cold and then warm (the rerun must read every result back)
    rows = []
    for size in args.sizes:
        images = helpers.write_imagefolder(out / f"{folders}images-{size}", n=args.images, size=size)
        scored = out / f"{folders}scored-{size}-{args.score_dtype}"
        for run in args.runs:
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
                str(scored),
                "--size",
                str(size),
                "--batch-size",
                str(args.batch_size),
                "--device",
                args.device,
                "--dtype",
                args.score_dtype,
                "--bootstrap",
                "10",
                "--quiet",
            ]
            for attack in attacks:
                argv += ["--attack", attack]
            began = time.perf_counter()
            subprocess.run(argv, env=env, check=True)
            wall = time.perf_counter() - began
            scores = pd.read_parquet(scored / "scores.parquet")
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
    frame.to_csv(out / f"{tag}_score_{args.score_dtype}.csv", index=False)
    title = LABELS[args.family] + (" (tiny)" if args.scale == TINY else "")
    plot(frame, pd.DataFrame(loads), out / f"{tag}_cost.png", title, attack_memory=flow)
    print(f"saved {out / f'{tag}_load.csv'}, {out / f'{tag}_score_{args.score_dtype}.csv'}, {out / f'{tag}_cost.png'}")


def plot(frame, loads, path: Path, title: str = "SD 1.5", attack_memory: bool = False) -> None:
    """Seconds per image by attack and size (cold) and the load probe's host memory; with ``attack_memory`` also
    each attack's peak memory (GPU: allocated by torch; CPU: resident)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    cold = frame[frame["run"] == "cold"]
    figure, axes = plt.subplots(1, 3 if attack_memory else 2, figsize=(16.5 if attack_memory else 11, 3.8))
    sns.barplot(data=cold, x="attack", y="seconds_per_image", hue="size", ax=axes[0])
    axes[0].set(title=f"{title} shape, random weights: seconds per image (cold)", ylabel="s / image", xlabel="")
    melted = loads.melt(
        id_vars="dtype",
        value_vars=["weights_mb", "rss_after_load_mb", "rss_after_fingerprint_mb", "peak_rss_mb"],
        var_name="memory",
        value_name="MB",
    )
    sns.barplot(data=melted, x="dtype", y="MB", hue="memory", ax=axes[1])
    axes[1].set(title="host memory: load and fingerprint", xlabel="")
    if attack_memory:
        sns.barplot(data=cold, x="attack", y="peak_memory_mb", hue="size", ax=axes[2])
        axes[2].set(title="peak memory per attack (cold)", ylabel="MB", xlabel="")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
