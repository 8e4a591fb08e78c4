"""The attacked model: any Stable-Diffusion-shaped pipeline folder or hub id, loaded from safetensors.

``Target`` bundles the VAE, U-Net, text encoder, tokenizer and a DDIM scheduler built ``from_config``
of the model's own scheduler (so ``alphas_cumprod`` is the model's). Every U-Net evaluation goes
through :meth:`Target.eps`, which applies classifier-free guidance explicitly and counts evaluations.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class Target:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    unet_evals: int = 0  # U-Net forward passes, counted per image (a batch of n counts n)
    _fingerprint: tuple | None = field(default=None, repr=False, compare=False)  # (weights' state, digest)

    # ----------------------------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def resolution(self) -> int:
        """Native image size: latent sample size times the VAE's downscale factor."""
        downscale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * downscale

    def fingerprint(self) -> str:
        """sha256 over every weight, the tokenizer's vocabulary and the scheduler config (keys caches).

        Hashing Stable Diffusion's weights takes seconds, so the digest is kept and reused while every
        weight tensor is the same object at the same version (an in-place change bumps the version).
        """
        state = (
            json.dumps(dict(self.scheduler.config), sort_keys=True, default=str),
            tuple((t.data_ptr(), t._version) for m in (self.unet, self.vae, self.text_encoder) for t in m.state_dict().values()),
        )
        if self._fingerprint is not None and self._fingerprint[0] == state:
            return self._fingerprint[1]
        self._fingerprint = (state, self._digest())
        return self._fingerprint[1]

    def _digest(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps(dict(self.scheduler.config), sort_keys=True, default=str).encode())
        digest.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
        for module in (self.unet, self.vae, self.text_encoder):
            for key, tensor in sorted(module.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        """Text-encoder hidden states (batch, tokens, dim); "" is the null prompt (never the word "none")."""
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0].to(self.dtype)

    def truncated_captions(self, captions: list[str]) -> list[tuple[int, int]]:
        """(index, token count) of every caption longer than the text encoder's limit, where
        :meth:`encode_prompts` cuts it (the start and end tokens count)."""
        limit = self.tokenizer.model_max_length
        lengths = [len(ids) for ids in self.tokenizer(list(captions), truncation=False, verbose=False)["input_ids"]]
        return [(i, n) for i, n in enumerate(lengths) if n > limit]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, mode: str = "mode", seeds: list[int] | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> latents times the VAE's own ``scaling_factor``.

        ``mode="mode"`` takes the posterior mean (deterministic); ``mode="sample"`` draws one posterior
        sample per image with a per-image seed (the official code samples, unseeded).
        """
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        if mode == "mode":
            latents = posterior.mode()
        elif mode == "sample":
            if seeds is None or len(seeds) != len(images):
                raise ValueError("mode='sample' needs one seed per image")
            noise = torch.stack(
                [torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
            ).to(self.device, self.dtype)
            latents = posterior.mean + posterior.std * noise
        else:
            raise ValueError(f"encode mode must be 'mode' or 'sample', not {mode!r}")
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (no clamp, as in the official code)."""
        return self.vae.decode(latents / self.scaling_factor).sample

    @torch.no_grad()
    def eps(
        self,
        latents: torch.Tensor,
        t: int,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """Noise prediction with explicit classifier-free guidance.

        ``eps = eps(z|"") + guidance * (eps(z|c) - eps(z|""))``. At guidance 1 only the conditional branch
        runs and at guidance 0 only the unconditional one (one U-Net evaluation per image); otherwise two.
        """
        timestep = torch.full((latents.shape[0],), int(t), device=self.device, dtype=torch.long)
        if guidance == 1.0:
            return self._unet(latents, timestep, cond)
        if uncond is None:
            raise ValueError("guidance != 1 needs the unconditional (empty prompt) embedding")
        if guidance == 0.0:
            return self._unet(latents, timestep, uncond)
        eps_uncond = self._unet(latents, timestep, uncond)
        eps_cond = self._unet(latents, timestep, cond)
        return eps_uncond + guidance * (eps_cond - eps_uncond)

    def _unet(self, latents: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        self.unet_evals += latents.shape[0]
        return self.unet(latents, timestep, encoder_hidden_states=embeddings).sample


def _check_supported(scheduler_config: dict) -> None:
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise NotImplementedError(
            f"this model predicts {prediction!r}; the attacks here implement epsilon prediction only"
        )


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def locate_model(model: str | os.PathLike) -> str:
    """An existing local folder, or a string of the hub's form ``owner/name`` whose first part is not a
    local folder. Anything else is a local path that does not exist: say so, rather than ask the hub."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    if HUB_ID.match(text) and not Path(text.split("/")[0]).exists():
        return text
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    raise FileNotFoundError(f"model path {text!r} does not exist (the nearest existing folder is {parent}); check the MODEL / --model path")


def load_target(
    model: str | os.PathLike,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: str | os.PathLike | None = None,
) -> Target:
    """Load a Stable Diffusion pipeline folder or hub id, weights from safetensors only.

    ``checkpoint`` is a folder holding ``unet/`` (and optionally ``text_encoder/``) that replace the model's
    own, for example a training checkpoint of the embedded target.
    No remote code is ever executed. The scheduler is a ``DDIMScheduler`` built from the model's own
    scheduler config, so a PNDM-configured Stable Diffusion keeps its ``scaled_linear`` betas.
    """
    model = locate_model(model)
    kwargs = dict(use_safetensors=True)
    scheduler_config = DDIMScheduler.load_config(model, subfolder="scheduler")
    _check_supported(scheduler_config)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **kwargs)
    unet_source = str(checkpoint) if checkpoint is not None else model
    unet = UNet2DConditionModel.from_pretrained(unet_source, subfolder="unet", **kwargs)
    text_source = model
    if checkpoint is not None and (Path(checkpoint) / "text_encoder").exists():
        text_source = str(checkpoint)
    text_encoder = CLIPTextModel.from_pretrained(text_source, subfolder="text_encoder", **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    for module in (vae, unet, text_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    name = Path(model).name if Path(model).exists() else model
    if checkpoint is not None:
        name = f"{name}@{Path(checkpoint).name}"
    return Target(vae, unet, text_encoder, tokenizer, scheduler, name=name, device=torch.device(device), dtype=dtype)
