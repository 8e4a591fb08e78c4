"""Tiny seeded pipelines of each Stable Diffusion family, and copies of them in the other file forms users have.

A test fixture module (``import model_zoo`` from a test, like ``helpers``). Every builder writes a folder in
the hub's diffusers layout (``model_index.json`` plus one sub-folder per component, safetensors weights) and
returns the in-memory pipeline. The models are a few MB and build in about a second on CPU; the shapes follow
diffusers' own ``get_dummy_components`` test fixtures (block_out_channels (32, 64), small CLIPTextConfig), and
every build is seeded (``torch.manual_seed``), so two builds give identical weights.

Families (the text encoders' widths are chosen so that the single-file copies load back exactly, see below):

* :func:`build_sd1` -- SD 1.x: CLIP (``quick_gelu``) text encoder, PNDM scheduler, epsilon (or any
  ``prediction_type``).
* :func:`build_sd2_v` -- SD 2.x (768-v): OpenCLIP-shaped text encoder (``hidden_act="gelu"``, 23 layers like SD2's
  diffusers text encoder, which keeps 23 of OpenCLIP's 24), U-Net with a per-block ``attention_head_dim`` tuple
  and ``use_linear_projection=True``, DDIM scheduler with ``prediction_type="v_prediction"``.
* :func:`build_sample` -- SD1-shaped, scheduler ``prediction_type="sample"``.
* :func:`build_sdxl` -- SDXL base: two text encoders (CLIPTextModel + CLIPTextModelWithProjection), U-Net with
  ``addition_embed_type="text_time"``, Euler scheduler.
* :func:`build_flow` -- only ``model_index.json`` (StableDiffusion3Pipeline) and a FlowMatchEulerDiscreteScheduler
  config: what a loader sees first of an SD3 / FLUX repo. No weights.

Copies: :func:`variant_copy` (only ``*.fp16.safetensors``, float16), :func:`pickle_copy` (one component as a
pickled ``.bin``), :func:`single_file` (one ``.safetensors`` in the original LDM / CompVis key layout, written by
this module's own diffusers->LDM mapping).

Findings on ``from_single_file`` (diffusers 0.42.1, transformers 5.24.0, offline: ``HF_HUB_OFFLINE=1``)
------------------------------------------------------------------------------------------------------
* Keyword arguments that work offline::

      StableDiffusionPipeline.from_single_file(str(file), config=str(diffusers_folder), local_files_only=True)
      StableDiffusionXLPipeline.from_single_file(str(file), config=str(diffusers_folder), local_files_only=True)

  ``config`` must be a *directory* that exists (``os.path.isdir``); the pipeline's ``model_index.json`` and every
  component's ``config.json`` / ``scheduler_config.json`` / tokenizer files are read from it. Only the weights of
  the U-Net, VAE and text encoder(s) come from the single file (converted from the LDM layout); the tokenizer(s)
  and the scheduler are loaded with ``from_pretrained(config, subfolder=...)`` from the config folder. The
  folder's weight files are not read for those components (a config folder without any weights works).
  The round trip was checked for sd1, sd2_v and sdxl: every U-Net / VAE / text-encoder tensor loaded from the
  single file is ``torch.equal`` to the folder's (see the self-check in the report, /tmp/check_model_zoo.py).
* With ``config`` given, diffusers never calls ``infer_diffusers_model_type``: the family comes entirely from
  the config folder. That matters for the tiny SD2: ``infer_diffusers_model_type`` says ``"v2"`` only if
  ``model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight`` is 1024 wide (SD2's OpenCLIP
  width); the tiny SD2 (width 32) is detected as ``"v1"``, and still loads correctly as SD2 (v-prediction,
  OpenCLIP text encoder) because of ``config=``. The tiny SD1 is ``"v1"`` (the fallback: its U-Net is too small
  to have ``output_blocks.11``), the tiny SDXL is ``"xl_base"`` (its second text encoder has 10 layers so the
  file has ``conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias``, the key diffusers checks for).
* Without ``config``, offline, diffusers infers the family, maps it to a hub repo id
  (``stable-diffusion-v1-5/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1``,
  ``stabilityai/stable-diffusion-xl-base-1.0``) and tries ``snapshot_download`` of its configs; with no cache
  and ``local_files_only=True`` it catches ``LocalEntryNotFoundError`` and retries *online*, which with
  ``HF_HUB_OFFLINE=1`` raises ``huggingface_hub.errors.LocalEntryNotFoundError``, a subclass of
  ``FileNotFoundError`` / ``OSError``. Observed text (same for sd1, sd2, sdxl, and with ``local_files_only``
  True or False): ``Cannot find an appropriate cached snapshot folder for the specified revision on the local
  disk and outgoing traffic has been disabled. To enable repo look-ups and downloads online, set
  'HF_HUB_OFFLINE=0' as environment variable.``, after the logged warning "`local_files_only` is True but no
  local configs were found for this checkpoint. Attempting to download the necessary config files for this
  pipeline.".
* The scheduler comes from ``<config>/scheduler``, so its ``prediction_type`` survives: the SD2 file loaded with
  ``config=<sd2 folder>`` has ``scheduler.config.prediction_type == "v_prediction"`` and the folder's DDIM
  settings; no ``prediction_type=`` is needed. Do NOT pass ``prediction_type=`` (or ``scheduler_type=``): it is a
  deprecated "legacy scheduler" keyword that makes diffusers ignore the config folder's scheduler and build one
  from ``SCHEDULER_DEFAULT_CONFIG`` with *wrong betas* (beta_start 0.02, beta_end 0.085 instead of
  0.00085/0.012, ``_legacy_load_scheduler``), and emits a deprecation warning. To override the scheduler, pass a
  scheduler instance: ``from_single_file(..., scheduler=DDIMScheduler.from_config(...))``.

Why the shapes differ from diffusers' test fixtures in two places
----------------------------------------------------------------
* SDXL: diffusers' SDXL tests use two text encoders of width 32. In a single file, diffusers' loader picks the
  source of ``text_encoder_2`` by asking, in order, "is there a ``conditioner.embedders.0.transformer``
  (CLIP-L) position embedding *of this model's width*?" before looking at ``conditioner.embedders.1.model``
  (OpenCLIP); with equal widths, ``text_encoder_2`` gets encoder 1's weights (and its ``text_projection`` stays
  uninitialised). Measured with 32 + 32: 143 of text_encoder_2's 165 tensors came back wrong or on the meta
  device, and no error was raised. Real SDXL has 768 vs 1280, so the tiny SDXL uses 32 vs 64
  (cross_attention_dim 96). Its text_encoder_2 also has 10 layers (the tests' fixture has 5) so that
  ``infer_diffusers_model_type`` finds ``resblocks.9`` and says ``xl_base``.
* SD2: real SD2 files hold OpenCLIP's 24 text layers; diffusers' SD2 text encoder has 23 and the converter
  drops the last by ignoring the hard-coded keys ``cond_stage_model.model.transformer.resblocks.23.*``
  (``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``, together with ``text_projection``). The tiny SD2 text encoder therefore
  has 23 layers (cheap at width 32), and its single file holds 24 resblocks, the last a seeded random layer,
  so the real dropping path is exercised. (For another depth N the file gets N + 1 resblocks and the extra one
  is dropped too, but by a different path: ``load_model_dict_into_meta`` silently skips keys the model lacks.
  Careful in tests: it also silently leaves *missing* keys uninitialised on the meta device, so compare every
  tensor of a loaded model, as the self-check does.)

Numerics: the weights loaded from a single file are bit-identical, and SD1 / SD2 pipeline outputs were equal
bit for bit; the SDXL output differed by ~1e-6 because one of the two bit-identical ``text_projection`` weights
sat at a 64-byte-misaligned address (mmap'd safetensors) and the CPU matmul rounds differently. Compare
pipeline outputs with a small tolerance, weights with ``torch.equal``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CAPTIONS = ["red apple", "grinning face", "man farmer"]
MAX_TOKENS = 16
# Deliberately not Stable Diffusion's 0.18215 (nor SDXL's 0.13025), so a hard-coded constant would show up.
SCALING_FACTOR = 0.7
SDXL_SCALING_FACTOR = 0.6
# SD3 / FLUX VAEs shift their latents too (SD3: 1.5305 and 0.0609); other numbers here, for the same reason
FLOW_SCALING_FACTOR, FLOW_SHIFT_FACTOR = 0.9, 0.05

# Stable Diffusion's training noise schedule (v1, v2 and XL alike).
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------
def _tokenizer():
    from mialib.tiny import build_tokenizer

    return build_tokenizer(CAPTIONS, MAX_TOKENS)


def _text_config(tokenizer, hidden_size=32, layers=2, hidden_act="quick_gelu", projection_dim=None):
    from transformers import CLIPTextConfig

    kwargs = dict(projection_dim=projection_dim) if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        layer_norm_eps=1e-5,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def _vae(image_size, scaling_factor, force_upcast=True):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=image_size,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )  # mid-block attention on (the default), so the single file has mid.attn_1


def _sd_unet(image_size, **kwargs):
    from diffusers import UNet2DConditionModel

    # Stable Diffusion's block pattern (cross-attention everywhere but the lowest resolution), two levels.
    config = dict(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    config.update(kwargs)
    return UNet2DConditionModel(**config)


def _finish(pipeline, folder):
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return pipeline


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------
def _sd_pipeline(folder, **components):
    """A ``StableDiffusionPipeline`` of these components (no safety checker), saved to ``folder``."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return _finish(pipeline, folder)


def build_sd1(folder, image_size: int = 32, prediction_type: str = "epsilon"):
    """SD 1.x-shaped ``StableDiffusionPipeline`` saved to ``folder`` (safetensors); returns the pipeline.

    U-Net (32, 64) with two layers per block and cross-attention width 32, a VAE (32, 64) with mid-block
    attention and ``scaling_factor`` 0.7, a 2-layer CLIP text encoder (``quick_gelu``) and a tokenizer trained
    offline (:func:`mialib.tiny.build_tokenizer`), and Stable Diffusion's PNDM scheduler with ``prediction_type``.
    No safety checker / feature extractor.
    """
    from diffusers import PNDMScheduler
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    unet = _sd_unet(image_size)
    vae = _vae(image_size, SCALING_FACTOR)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    scheduler = PNDMScheduler(
        **SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type
    )
    return _sd_pipeline(folder, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def build_sd2_v(folder, image_size: int = 32):
    """SD 2.x (768-v)-shaped ``StableDiffusionPipeline`` saved to ``folder``; returns the pipeline.

    As :func:`build_sd1` except: the U-Net has ``attention_head_dim=(2, 4)`` (a tuple per block, as SD2's
    config) and ``use_linear_projection=True`` and one layer per block; the text encoder is OpenCLIP-shaped
    (``hidden_act="gelu"``, 23 layers as SD2's diffusers text encoder); the scheduler is SD 2.1's
    ``DDIMScheduler`` (scaled_linear, steps_offset 1, clip_sample False, set_alpha_to_one False) with
    ``prediction_type="v_prediction"``.
    """
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    unet = _sd_unet(image_size, layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True)
    vae = _vae(image_size, SCALING_FACTOR)
    text_encoder = CLIPTextModel(_text_config(tokenizer, layers=23, hidden_act="gelu"))
    scheduler = DDIMScheduler(
        **SD_BETAS,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
    )
    return _sd_pipeline(folder, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def build_sample(folder, image_size: int = 32):
    """SD1-shaped pipeline whose scheduler config says ``prediction_type="sample"``; returns the pipeline."""
    return build_sd1(folder, image_size=image_size, prediction_type="sample")


def build_sdxl(folder, image_size: int = 32):
    """SDXL-base-shaped ``StableDiffusionXLPipeline`` saved to ``folder``; returns the pipeline.

    The U-Net is diffusers' SDXL test fixture: (32, 64), two layers per block, ``DownBlock2D`` then
    ``CrossAttnDownBlock2D``, ``attention_head_dim=(2, 4)``, ``use_linear_projection=True``,
    ``transformer_layers_per_block=(1, 2)``, ``addition_embed_type="text_time"``, ``addition_time_embed_dim=8``,
    ``projection_class_embeddings_input_dim = 6 * 8 + 32`` (``text_encoder_2``'s projection dim) and
    ``norm_num_groups=1``. Its ``cross_attention_dim`` is 32 + 64 = 96: ``text_encoder`` (CLIPTextModel, width 32,
    quick_gelu, 2 layers) and ``text_encoder_2`` (CLIPTextModelWithProjection, width 64, gelu, 10 layers,
    ``projection_dim=32``) differ in width as CLIP-L and bigG do (see the module docstring for why). Two
    tokenizers, SDXL's ``EulerDiscreteScheduler`` (scaled_linear, 0.00085-0.012, steps_offset 1, leading,
    epsilon), VAE with ``force_upcast=True`` and ``scaling_factor`` 0.6. No watermarker, no image encoder.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_size=32, layers=2))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, hidden_size=64, layers=10, hidden_act="gelu", projection_dim=32)
    )
    unet = _sd_unet(
        image_size,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + text_encoder_2.config.projection_dim,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        norm_num_groups=1,
    )
    vae = _vae(image_size, SDXL_SCALING_FACTOR, force_upcast=True)
    scheduler = EulerDiscreteScheduler(
        **SD_BETAS,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _finish(pipeline, folder)


def _t5_tokenizer():
    """A T5-style tokenizer built offline: a ``tokenizers`` Unigram model over the captions' words (with the
    SentencePiece word marker) and the letters, ``</s>`` appended, ``<pad>`` 0, as T5's; saved and loaded by
    transformers' ``T5TokenizerFast`` like a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = sorted({w for caption in CAPTIONS for w in caption.lower().split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz"]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
        model_max_length=512,
    )  # fmt: skip


def _t5(tokenizer, d_model=32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config)


def _flow_vae(image_size, latent_channels):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=latent_channels, sample_size=image_size, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=FLOW_SCALING_FACTOR, shift_factor=FLOW_SHIFT_FACTOR, force_upcast=True,
    )  # fmt: skip


def build_sd3(folder, image_size: int = 32, t5: bool = True):
    """SD3 / SD3.5-shaped ``StableDiffusion3Pipeline`` saved to ``folder``; returns the pipeline.

    As diffusers' SD3 test fixture, in SD3's proportions: an ``SD3Transformer2DModel`` with ``patch_size=2``
    (1 joint layer, 4 heads of 8), two ``CLIPTextModelWithProjection`` encoders (widths 32 and 64 as CLIP-L and
    bigG differ; projections 32 + 32 = the transformer's ``pooled_projection_dim`` 64), a T5 encoder of width 64
    (= ``joint_attention_dim``, which the CLIP states are padded to) with its offline tokenizer, or none
    (``t5=False``: SD3 without T5), a 16-channel-free 4-channel VAE without quant convs whose config has
    ``shift_factor`` and ``scaling_factor`` (SD3's VAE has both), and SD3's ``FlowMatchEulerDiscreteScheduler``
    (shift 3.0).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = _tokenizer(), _tokenizer()
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, hidden_size=32, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, hidden_size=64, hidden_act="gelu", projection_dim=32)
    )
    tokenizer_3 = _t5_tokenizer() if t5 else None
    text_encoder_3 = _t5(tokenizer_3, d_model=64) if t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
        pooled_projection_dim=64, pos_embed_max_size=16,
    )  # fmt: skip
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_flow_vae(image_size, 4), text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )  # fmt: skip
    return _finish(pipeline, folder)


def build_flux(folder, image_size: int = 32, guidance_embeds: bool = True):
    """FLUX.1-shaped ``FluxPipeline`` saved to ``folder``; returns the pipeline.

    As diffusers' FLUX test fixture: a ``FluxTransformer2DModel`` (1 double and 1 single block, 2 heads of 16,
    rope axes (4, 4, 8)) over 2x2-packed latents of a 4-channel VAE (``in_channels`` 16; FLUX.1's VAE has 16
    channels, packed to 64), with the guidance embedding of FLUX.1-dev (``guidance_embeds=False``: schnell), a
    ``CLIPTextModel`` (pooled, 32) and a T5 encoder (32 = ``joint_attention_dim``) with its offline tokenizer,
    and FLUX's dynamically shifted ``FlowMatchEulerDiscreteScheduler`` (base_shift 0.5, max_shift 1.15 over 256 to
    4096 image tokens).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = _tokenizer(), _t5_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_size=32, hidden_act="gelu"))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    pipeline = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_flow_vae(image_size, 4), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=_t5(tokenizer_2, d_model=32), tokenizer_2=tokenizer_2,
    )  # fmt: skip
    return _finish(pipeline, folder)


def build_flow(folder, pipeline_class: str = "AuraFlowPipeline") -> Path:
    """A folder that looks like a flow-matching repo as far as a loader first sees: ``model_index.json`` with
    ``_class_name`` ``pipeline_class`` and ``scheduler/scheduler_config.json`` of a ``FlowMatchEulerDiscreteScheduler``
    written by diffusers. No weights. Returns the folder."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_config(folder / "scheduler")
    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "AuraFlowTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------
# Copies in other file forms
# --------------------------------------------------------------------------------------------------
def _load(src_folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(src_folder), local_files_only=True)


def variant_copy(src_folder, dst_folder, variant: str = "fp16") -> Path:
    """Copy the pipeline in ``src_folder`` to ``dst_folder`` with every weight file only as
    ``<name>.<variant>.safetensors`` holding float16 tensors, exactly as
    ``pipeline.to(torch.float16).save_pretrained(dst, variant=variant, safe_serialization=True)`` writes it (no
    non-variant weight files). Returns ``dst_folder``."""
    dst_folder = Path(dst_folder)
    pipeline = _load(src_folder).to(torch.float16)
    pipeline.save_pretrained(dst_folder, variant=variant, safe_serialization=True)
    stray = [p for p in dst_folder.rglob("*") if p.suffix in (".safetensors", ".bin") and f".{variant}." not in p.name]
    assert not stray, stray
    return dst_folder


def pickle_copy(src_folder, dst_folder, component: str = "unet") -> Path:
    """Copy ``src_folder`` to ``dst_folder`` where ``component``'s weights are only a pickled file:
    ``diffusion_pytorch_model.bin`` for a diffusers model (written by its ``save_pretrained(...,
    safe_serialization=False)``), ``pytorch_model.bin`` for a transformers model (transformers 5 cannot write
    pickles any more, so the folder's own ``model.safetensors`` dict is ``torch.save``'d: the same keys and
    tensors). The component's ``.safetensors`` are removed. Returns ``dst_folder``."""
    from safetensors.torch import load_file

    src_folder, dst_folder = Path(src_folder), Path(dst_folder)
    shutil.copytree(src_folder, dst_folder, dirs_exist_ok=True)
    target = dst_folder / component
    library, class_name = json.loads((src_folder / "model_index.json").read_text())[component]
    if library == "diffusers":
        import diffusers

        model = getattr(diffusers, class_name).from_pretrained(str(src_folder / component), local_files_only=True)
        for path in target.glob("*.safetensors"):
            path.unlink()
        model.save_pretrained(target, safe_serialization=False)
        assert (target / "diffusion_pytorch_model.bin").exists()
    else:
        files = sorted(target.glob("*.safetensors"))
        assert [p.name for p in files] == ["model.safetensors"], files
        state = load_file(files[0])
        files[0].unlink()
        torch.save(state, target / "pytorch_model.bin")
    assert not list(target.glob("*.safetensors"))
    return dst_folder


# ---- diffusers -> original (LDM / CompVis / model-site) key layout ---------------------------------
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_to_ldm(state: dict, config) -> dict:
    """U-Net state dict -> ``input_blocks`` / ``middle_block`` / ``output_blocks`` / ``time_embed`` / ``out``
    (and ``label_emb`` for SDXL). In the original layout, input block 0 is ``conv_in``; each down level then has
    ``layers_per_block`` entries ``[resnet, (attention)]`` and, except the last level, one ``op`` downsampler;
    each up level has ``layers_per_block + 1`` entries ``[resnet, (attention), (upsampler)]``."""
    per_level = config["layers_per_block"]
    if not isinstance(per_level, int):
        raise ValueError("the original layout needs one layers_per_block for all levels")
    up_has_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        head, tail = None, None
        for diffusers_name, ldm_name in _UNET_TOP.items():
            if key.startswith(diffusers_name + "."):
                head, tail = ldm_name, key[len(diffusers_name) + 1 :]
        if head is not None:
            out[f"{head}.{tail}"] = value
        elif parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.L.downsamplers.0.conv.P
                out[f"input_blocks.{1 + level * (per_level + 1) + per_level}.0.op.{parts[-1]}"] = value
            else:
                index = 1 + level * (per_level + 1) + int(parts[3])
                out[_layer(f"input_blocks.{index}", kind, parts[4:])] = value
        elif parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # up_blocks.L.upsamplers.0.conv.P
                index = level * (per_level + 1) + per_level
                slot = 2 if level in up_has_attention else 1
                out[f"output_blocks.{index}.{slot}.conv.{parts[-1]}"] = value
            else:
                index = level * (per_level + 1) + int(parts[3])
                out[_layer(f"output_blocks.{index}", kind, parts[4:])] = value
        elif parts[0] == "mid_block":
            kind, number = parts[1], int(parts[2])
            index = 2 * number if kind == "resnets" else 1 + 2 * number
            out[_layer(f"middle_block.{index}", kind, parts[3:], slot=False)] = value
        else:
            raise KeyError(f"no original-layout name for U-Net key {key!r}")
    return out


def _layer(prefix: str, kind: str, rest: list[str], slot: bool = True) -> str:
    if kind == "resnets":
        name = ".".join([_RESNET[rest[0]]] + rest[1:])
        return f"{prefix}.0.{name}" if slot else f"{prefix}.{name}"
    if kind == "attentions":  # the transformer's own names are the same in both layouts
        return f"{prefix}.1.{'.'.join(rest)}" if slot else f"{prefix}.{'.'.join(rest)}"
    raise KeyError(f"unexpected U-Net block part {kind!r}")


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_to_ldm(state: dict, config) -> dict:
    """VAE state dict -> ``encoder.down.L.block.M`` / ``mid.block_1|2`` / ``mid.attn_1`` (q, k, v, proj_out as 1x1
    convolution weights) / ``norm_out`` / ``nin_shortcut`` / ``decoder.up`` (levels numbered from the lowest
    resolution up, so in reversed order) / ``quant_conv`` / ``post_quant_conv``."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        side, part = parts[0], parts[1]  # encoder / decoder
        if part in ("conv_in", "conv_out"):
            out[key] = value
        elif part == "conv_norm_out":
            out[f"{side}.norm_out.{parts[2]}"] = value
        elif part in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if part == "down_blocks" else levels - 1 - int(parts[2])
            ldm = "down" if part == "down_blocks" else "up"
            if parts[3] == "resnets":
                name = "nin_shortcut" if parts[5] == "conv_shortcut" else parts[5]
                out[f"{side}.{ldm}.{level}.block.{parts[4]}.{name}.{parts[-1]}"] = value
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sampler = "downsample" if parts[3] == "downsamplers" else "upsample"
                out[f"{side}.{ldm}.{level}.{sampler}.conv.{parts[-1]}"] = value
        elif part == "mid_block" and parts[2] == "resnets":
            name = "nin_shortcut" if parts[4] == "conv_shortcut" else parts[4]
            out[f"{side}.mid.block_{int(parts[3]) + 1}.{name}.{parts[-1]}"] = value
        elif part == "mid_block" and parts[2] == "attentions":
            name = _VAE_ATTENTION[parts[4]]
            if name != "norm" and parts[-1] == "weight":
                value = value[:, :, None, None]  # linear -> 1x1 convolution
            out[f"{side}.mid.attn_1.{name}.{parts[-1]}"] = value
        else:
            raise KeyError(f"no original-layout name for VAE key {key!r}")
    return out


def _clip_to_ldm(state: dict, prefix: str) -> dict:
    """HF CLIP text model -> the original checkpoints' ``<prefix>text_model.*`` (the HF names, which
    transformers 5 stores without the ``text_model.`` wrapper for CLIPTextModel)."""
    return {prefix + "text_model." + key.removeprefix("text_model."): value for key, value in state.items()}


_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _openclip_to_ldm(state: dict, prefix: str, layers: int, extra_layer: bool = False) -> dict:
    """HF CLIP text model -> OpenCLIP's layout under ``prefix`` (``cond_stage_model.model.`` for SD2,
    ``conditioner.embedders.1.model.`` for SDXL): token_embedding, positional_embedding,
    transformer.resblocks.N.{ln_1, ln_2, attn.in_proj_weight/bias (q, k, v stacked), attn.out_proj, mlp.c_fc,
    mlp.c_proj}, ln_final, text_projection (``[width, embed_dim]``, the transpose of HF's linear weight; SD2's
    CLIPTextModel has none, so a seeded random square one is written, which diffusers ignores) and logit_scale.
    With ``extra_layer`` one more seeded random resblock is appended (OpenCLIP's 24th layer that SD2 drops)."""
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    width = state["embeddings.token_embedding.weight"].shape[1]
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    generator = torch.Generator().manual_seed(1234)
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    else:
        out[prefix + "text_projection"] = torch.randn(width, width, generator=generator) * width**-0.5
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    for n in range(layers):
        head = f"encoder.layers.{n}."
        block = f"{prefix}transformer.resblocks.{n}."
        for param in ("weight", "bias"):
            qkv = [state.pop(f"{head}self_attn.{p}_proj.{param}") for p in ("q", "k", "v")]
            out[f"{block}attn.in_proj_{param}"] = torch.cat(qkv, dim=0)
            for hf_name, ldm_name in _OPENCLIP_LAYER.items():
                out[f"{block}{ldm_name}.{param}"] = state.pop(f"{head}{hf_name}.{param}")
    if state:
        raise KeyError(f"no OpenCLIP name for text-encoder keys {sorted(state)}")
    if extra_layer:  # random, same shapes as the last real layer
        last, block = f"{prefix}transformer.resblocks.{layers - 1}.", f"{prefix}transformer.resblocks.{layers}."
        for key in [k for k in out if k.startswith(last)]:
            like = out[key]
            out[block + key[len(last) :]] = 0.02 * torch.randn(like.shape, generator=generator, dtype=like.dtype)
    return out


def single_file(src_folder, dst_file, family: str | None = None) -> Path:
    """Write the pipeline in ``src_folder`` as ONE ``.safetensors`` checkpoint in the original key layout that
    model sites ship: ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE) and the text encoder(s):

    * ``sd1``: ``cond_stage_model.transformer.text_model.*`` (HF CLIP names);
    * ``sd2``: ``cond_stage_model.model.*`` (OpenCLIP names; one resblock more than the text encoder has layers,
      a seeded random one, as real SD2 files hold 24 where diffusers keeps 23);
    * ``sdxl``: ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, HF names) and
      ``conditioner.embedders.1.model.*`` (OpenCLIP bigG names, incl. the transposed ``text_projection``).

    ``family`` defaults to what the folder is: ``sdxl`` when it has ``text_encoder_2``, ``sd2`` when the text
    encoder's ``hidden_act`` is ``gelu`` (OpenCLIP; CLIP-L uses ``quick_gelu``), else ``sd1``. Load it back with
    ``StableDiffusion[XL]Pipeline.from_single_file(str(dst_file), config=str(src_folder), local_files_only=True)``
    (see the module docstring). Returns ``dst_file`` as a Path.
    """
    from safetensors.torch import save_file

    pipeline = _load(src_folder)
    if family is None:
        if getattr(pipeline, "text_encoder_2", None) is not None:
            family = "sdxl"
        elif pipeline.text_encoder.config.hidden_act == "gelu":
            family = "sd2"
        else:
            family = "sd1"
    if family not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"unknown family {family!r}")

    def tensors(model):
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    checkpoint = {}
    for key, value in _unet_to_ldm(tensors(pipeline.unet), pipeline.unet.config).items():
        checkpoint["model.diffusion_model." + key] = value
    for key, value in _vae_to_ldm(tensors(pipeline.vae), pipeline.vae.config).items():
        checkpoint["first_stage_model." + key] = value
    text = tensors(pipeline.text_encoder)
    if family == "sd1":
        checkpoint.update(_clip_to_ldm(text, "cond_stage_model.transformer."))
    elif family == "sd2":
        layers = pipeline.text_encoder.config.num_hidden_layers
        checkpoint.update(_openclip_to_ldm(text, "cond_stage_model.model.", layers, extra_layer=True))
    else:
        checkpoint.update(_clip_to_ldm(text, "conditioner.embedders.0.transformer."))
        layers = pipeline.text_encoder_2.config.num_hidden_layers
        checkpoint.update(_openclip_to_ldm(tensors(pipeline.text_encoder_2), "conditioner.embedders.1.model.", layers))
    dst_file = Path(dst_file)
    dst_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(dst_file))
    return dst_file
