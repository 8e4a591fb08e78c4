"""Build and train the embedded default target: a tiny Stable-Diffusion-shaped model on CPU.

Real classes throughout (diffusers ``UNet2DConditionModel``, ``AutoencoderKL``, ``DDIMScheduler``;
transformers ``CLIPTextModel``, ``CLIPTokenizer``), saved as a ``StableDiffusionPipeline`` folder with
safetensors and loaded back through :func:`mialib.target.load_target` like any Stable Diffusion.

As in Stable Diffusion, the VAE never sees the attacked images (it trains on the public split only).
The U-Net trains on the members only with the epsilon objective and 10 % caption dropout, saving
checkpoints at chosen steps. Unlike Stable Diffusion's frozen pre-trained CLIP, the text encoder trains
with the U-Net: there is no pre-trained CLIP offline, and a frozen random one maps all captions to nearly
the same embedding (mean cosine similarity 0.92 measured), so captions could not select a memorised image.
Training resumes after an interruption from its last checkpoint, optimizer and random state included, so a
resumed run ends with the same weights.

``family="sd3"`` builds the flow-matching counterpart (``configs/flow.yaml``): an SD3-shaped
``SD3Transformer2DModel`` (2x2 patches) with SD3's two CLIP text encoders (with projection; no T5, as SD3 can
run without it), the same VAE, trained on the rectified-flow objective (velocity ``noise - x0`` at a noise
level drawn logit-normally through SD3's shift, as diffusers' SD3 training script does) and saved as a
``StableDiffusion3Pipeline``; it loads through :func:`mialib.target.load_target` like SD3.

Memorisation regimes (notebook 07) are recipes of the same training: ``pretrain_steps`` pretrains the
U-Net on a pool of other images from the same catalogue before it trains on the members (fine-tuned);
``unet_data="members+pool"`` mixes the members into that pool, each image drawn alike (weak).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import memo


@dataclass
class TinyConfig:
    """Sizes and training budget of the embedded target (every field is written next to the model)."""

    image_size: int = 32  # pixels; the VAE downscales by 2, so 32 px gives a 16x16 latent grid
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32)  # one entry per level: downscale 2 ** (levels - 1)
    unet_channels: tuple[int, ...] = (32, 64)
    text_dim: int = 64
    max_tokens: int = 32
    vae_steps: int = 1000
    vae_crop: int = 0  # > 0: train the (fully convolutional) VAE on random crops of this size
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 3000
    unet_lr: float = 1e-3
    batch_size: int = 16
    caption_dropout: float = 0.1
    checkpoints: tuple[int, ...] = (250, 500, 1000, 2000, 3000)
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    # Memorisation regimes (07). The pool: the public split and ``filler_images`` extra catalogue images.
    # members: the U-Net trains on the members alone; members+pool: on the members mixed into the pool. Reference
    # models (calibrate=reference) train without the members: stand-ins: on as many public images as there are
    # members, drawn by ``seed`` (the members' recipe on other images); pool: on the pool alone
    unet_data: str = "members"
    pretrain_steps: int = (
        0  # > 0: the U-Net first trains this many steps on the pool, then ``unet_steps`` on its data (fine-tuning)
    )
    filler_images: int = 0  # extra catalogue images in the pool (data/emoji_filler.csv)
    # seed of the VAE and the pretrained U-Net (-1: ``seed``); targets sharing it share both, as fine-tunes of one
    # base model do
    shared_seed: int = -1
    # sd: the U-Net of SD 1.x; sd3: an SD3-shaped flow transformer with SD3's two CLIP encoders (no T5)
    family: str = "sd"
    # > 0: the fine-tuning (after ``pretrain_steps``) trains a LoRA of this rank on the U-Net's attention projections
    # instead of the whole U-Net and text encoder; the target is the base model's pipeline and the LoRA file
    # (``lora/pytorch_lora_weights.safetensors``, diffusers' format), loaded like a user's (--lora)
    lora_rank: int = 0
    lora_lr: float = 1e-2  # the LoRA's learning rate (the base model trains at ``unet_lr``)

    def __post_init__(self):
        self.vae_channels = tuple(self.vae_channels)
        self.unet_channels = tuple(self.unet_channels)
        self.checkpoints = tuple(
            sorted({int(s) for s in self.checkpoints if 0 < int(s) <= self.unet_steps} | {self.unet_steps})
        )
        if self.shared_seed < 0:
            self.shared_seed = self.seed
        if self.unet_data not in UNET_DATA:
            raise ValueError(f"unet_data={self.unet_data!r}: one of {UNET_DATA}")
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}: one of {FAMILIES}")
        if self.family != "sd" and (self.uses_pool or self.unet_data not in ("members", "stand-ins")):
            raise ValueError(
                "the memorisation regimes' pool recipes train the SD-shaped target only (family='sd'); the flow "
                "target trains on the members, or on stand-ins for its reference models"
            )
        if not self.unet_steps:
            self.lora_rank = 0  # no fine-tuning step: the base model itself, with or without a LoRA recipe
        if self.lora_rank and not self.pretrain_steps:
            raise ValueError(
                f"lora_rank={self.lora_rank}: a LoRA fine-tunes a base model; set pretrain_steps (the base model's "
                "training on the pool)"
            )

    @property
    def uses_pool(self) -> bool:
        return bool(self.pretrain_steps) or self.unet_data in ("members+pool", "pool")

    @classmethod
    def from_saved(cls, saved: dict) -> "TinyConfig":
        """A config read back from ``tiny_config.json``; fields added since it was written take their defaults."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in saved.items() if k in known})


UNET_DATA = ("members", "members+pool", "stand-ins", "pool")
FAMILIES = ("sd", "sd3")
FLOW_SHIFT = 3.0  # SD3's scheduler shift
LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA scripts adapt
LORA_FILE = Path("lora") / "pytorch_lora_weights.safetensors"  # a LoRA target's adapter, beside its base model
LORA_STATE = Path("lora") / "lora_parameters.safetensors"  # a checkpoint's LoRA parameters by name, to resume from


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None, init: bool | str = "gaussian") -> None:
    """Add a peft LoRA adapter of ``rank`` (scale ``alpha / rank``; ``alpha`` defaults to ``rank``) to the
    attention projections of a diffusers U-Net or transformer, as diffusers' LoRA training scripts do; only
    the adapter's parameters train. ``init=False`` draws both factors at random (a nonzero update at once)."""
    from peft import LoraConfig

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=init, target_modules=list(LORA_MODULES))
    model.add_adapter(config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)


def target_loras(folder: str | Path) -> list[str]:
    """The adapter of a LoRA target (``lora_rank`` > 0: :data:`LORA_FILE` beside its base model), to load with
    ``load_target(folder, loras=...)``; [] for any other folder."""
    file = Path(folder) / LORA_FILE
    return [str(file)] if file.exists() else []


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter for name, parameter in model.named_parameters() if "lora_" in name}


def save_lora(model: torch.nn.Module, folder: str | Path, pipeline_class=None) -> Path:
    """Save the LoRA adapter of ``model`` (a U-Net, or an SD3 / FLUX transformer, given its pipeline class)
    with the pipeline class's own ``save_lora_weights``, as diffusers' training scripts do: safetensors,
    rank and alpha in the metadata. Returns the file."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipeline_class = pipeline_class or StableDiffusionPipeline
    component = "unet" if isinstance(model, UNet2DConditionModel) else "transformer"
    layers = get_peft_model_state_dict(model)
    pipeline_class.save_lora_weights(
        folder,
        **{
            f"{component}_lora_layers": convert_state_dict_to_diffusers(layers) if component == "unet" else layers,
            f"{component}_lora_adapter_metadata": model.peft_config["default"].to_dict(),
        },
        safe_serialization=True,
    )
    return Path(folder) / LORA_FILE.name


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------
def build_tokenizer(captions: list[str], max_tokens: int) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer trained offline on the captions with the ``tokenizers`` library.

    Every byte symbol is in the vocabulary (with and without the end-of-word marker), so unseen words
    still tokenise, as with CLIP.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    reference = CLIPTokenizer(vocab=None, merges=None)  # borrow CLIP's normaliser and pre-tokeniser
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.normalizer = reference.backend_tokenizer.normalizer
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(sorted(set(captions)), trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = dict(state["vocab"])
    for symbol in sorted(alphabet):
        for token in (symbol, symbol + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_tokens)


def build_components(config: TinyConfig, tokenizer: CLIPTokenizer) -> dict:
    """Untrained VAE, U-Net and text encoder, and Stable Diffusion's scheduler, all seeded (``family="sd3"``:
    :func:`build_flow_components`)."""
    if config.family == "sd3":
        return build_flow_components(config, tokenizer)
    torch.manual_seed(config.seed)
    vae = _vae_of(config)
    downscale = 2 ** (len(config.vae_channels) - 1)
    n = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.image_size // downscale,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        layers_per_block=1,
        cross_attention_dim=config.text_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_dim,
            intermediate_size=2 * config.text_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=config.max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Stable Diffusion v1's scheduler settings.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return dict(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder.eval().requires_grad_(False),
        tokenizer=tokenizer,
        scheduler=scheduler,
    )


def _vae_of(config: TinyConfig) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=16,
        mid_block_add_attention=False,
        sample_size=config.image_size,
    )


def build_flow_components(config: TinyConfig, tokenizer: CLIPTokenizer) -> dict:
    """The flow-matching counterpart, seeded: the same VAE, an SD3-shaped ``SD3Transformer2DModel`` (2x2 patches,
    four joint blocks of width 64; its joint attention width is the two CLIP encoders' hidden states side by
    side, as SD3 concatenates them), two ``CLIPTextModelWithProjection`` encoders sharing the tokenizer (their
    projections side by side are the pooled embedding), and SD3's ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(config.seed)
    vae = _vae_of(config)
    latent = config.image_size // 2 ** (len(config.vae_channels) - 1)
    projection = config.text_dim // 2

    def encoder():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=config.text_dim, intermediate_size=2 * config.text_dim,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=config.max_tokens,
                projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip

    text_encoder, text_encoder_2 = encoder(), encoder()
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=config.latent_channels, out_channels=config.latent_channels,
        num_layers=4, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=2 * config.text_dim,
        caption_projection_dim=64, pooled_projection_dim=2 * projection, pos_embed_max_size=latent // 2,
    )  # fmt: skip
    return dict(
        vae=vae,
        transformer=transformer,
        text_encoder=text_encoder.eval().requires_grad_(False),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval().requires_grad_(False),
        tokenizer_2=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT),
    )


def flow_pipeline(components: dict):
    """The ``StableDiffusion3Pipeline`` of flow components (no T5): its ``encode_prompt`` conditions training as
    :meth:`mialib.target.Target.encode_prompts` conditions the attacks, and it is what is saved."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=components["transformer"], scheduler=components["scheduler"], vae=components["vae"],
        text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"],
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def cosine_lr(base: float, step: int, total: int, floor: float = 0.1) -> float:
    """Cosine decay from ``base`` to ``floor * base`` over ``total`` steps (a pure function of the step,
    so a resumed run follows the same schedule)."""
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batches of indices (epochs without replacement)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[start : start + batch_size]


HELD_OUT_CURVE = "held_out_ssim.json"  # in the VAE's folder: its reconstruction of images it never trained on
HELD_OUT_POINTS = 20  # the curve's points along the training (and step 0)


def reconstruction_ssim(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean SSIM(x, D(E(x))) over ``images`` in [-1, 1], with the posterior mode (no randomness drawn)."""
    from .similarity import ssim

    with torch.no_grad():
        values = [
            ssim(chunk, vae.decode(vae.encode(chunk).latent_dist.mode()).sample)  # unclamped, as the attacks
            for chunk in images.split(64)
        ]
    return float(torch.cat(values).mean())


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    config: TinyConfig,
    progress: bool = True,
    held_out: torch.Tensor | None = None,
) -> tuple[list[float], list[dict]]:
    """Reconstruction (MSE) plus a small KL term, on the public split only. Returns the training losses and,
    with ``held_out`` (images the VAE never trains on), the curve of their reconstruction SSIM(x, D(E(x)))
    at ``HELD_OUT_POINTS`` steps along the training: measured without drawing any random number, so the
    weights are those of a training without it."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    batches = _batches(len(images), config.batch_size, generator)
    losses, curve = [], []
    every = max(config.vae_steps // HELD_OUT_POINTS, 1)
    vae.train()
    for step in tqdm(range(config.vae_steps), desc="train VAE (public split)", disable=not progress):
        if held_out is not None and step % every == 0:
            curve.append({"step": step, "ssim": reconstruction_ssim(vae, held_out)})
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config.vae_lr, step, config.vae_steps)
        batch = images[next(batches)]
        if config.vae_crop and config.vae_crop < batch.shape[-1]:
            top, left = torch.randint(0, batch.shape[-1] - config.vae_crop + 1, (2,), generator=generator).tolist()
            batch = batch[..., top : top + config.vae_crop, left : left + config.vae_crop]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    if held_out is not None:
        curve.append({"step": config.vae_steps, "ssim": reconstruction_ssim(vae, held_out)})
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
    # As for Stable Diffusion: scale latents to unit variance.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return losses, curve


def _save_optimizer(optimizer: torch.optim.Optimizer, generator: torch.Generator, step: int, path: Path) -> None:
    tensors = {"generator_state": generator.get_state(), "torch_rng_state": torch.get_rng_state()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).clone()
    save_file(tensors, str(path), metadata={"step": str(step)})


def _load_optimizer(optimizer: torch.optim.Optimizer, generator: torch.Generator, path: Path) -> None:
    tensors = load_file(str(path))
    generator.set_state(tensors.pop("generator_state"))
    torch.set_rng_state(tensors.pop("torch_rng_state"))
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def checkpoint_dir(target_dir: str | Path, step: int) -> Path:
    """Folder of the U-Net and text encoder after ``step`` training steps (``load_target(..., checkpoint=)``)."""
    return Path(target_dir) / "checkpoints" / f"step-{step:06d}"


def train_unet(
    components: dict,
    latents: torch.Tensor,
    captions: list[str],
    config: TinyConfig,
    target_dir: Path,
    progress: bool = True,
    desc: str = "train U-Net (members)",
) -> list[float]:
    """Epsilon-prediction training of the U-Net and text encoder on the member latents, with
    checkpoints and exact resume. Flow components (``family="sd3"``): the transformer and both text encoders
    on the rectified-flow objective, the velocity ``noise - x0`` at noise level s (logit-normal u through
    SD3's shift, on the 1,000-step grid, as diffusers' SD3 training script draws it), conditioned through the
    SD3 pipeline's own ``encode_prompt``."""
    flow = "transformer" in components
    lora = bool(config.lora_rank)  # a LoRA of the U-Net; the base weights and the text encoder stay frozen
    names = ("transformer", "text_encoder", "text_encoder_2") if flow else ("unet", "text_encoder")
    names = names[:1] if lora else names
    modules = torch.nn.ModuleDict({name: components[name] for name in names})
    unet = components[names[0]]
    if lora:
        components["text_encoder"].eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # peft draws the initial factors from torch's global generator
            torch.manual_seed(config.seed + 3)
            add_lora(unet, config.lora_rank)
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    if flow:
        from .flow import noise_levels

        pipeline = flow_pipeline(components)
        levels = torch.from_numpy(noise_levels(components["scheduler"].config)).float()
    else:
        unet, scheduler = components["unet"], components["scheduler"]
        tokens = tokenizer(
            list(captions) + [""], padding="max_length", max_length=config.max_tokens, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        caption_tokens, null_tokens = tokens[:-1], tokens[-1:]
    generator = torch.Generator().manual_seed(config.seed + 2)
    trained = [p for p in modules.parameters() if p.requires_grad] if lora else list(modules.parameters())
    learning_rate = config.lora_lr if lora else config.unet_lr
    optimizer = torch.optim.AdamW(trained, lr=learning_rate)
    state_path = target_dir / "training" / "unet_optimizer.safetensors"
    start = 0
    saved_file = LORA_STATE if lora else Path(names[0]) / "diffusion_pytorch_model.safetensors"
    done = [s for s in config.checkpoints if (checkpoint_dir(target_dir, s) / saved_file).exists()]
    if done and state_path.exists():
        start = max(done)
        folder = checkpoint_dir(target_dir, start)
        if lora:
            state = load_file(folder / LORA_STATE)
            missing = set(lora_parameters(unet)) - set(state)
            if missing:
                raise ValueError(f"{folder / LORA_STATE} lacks {len(missing)} LoRA parameters; remove it to retrain")
            unet.load_state_dict(state, strict=False)
        for name in () if lora else names:
            saved = type(modules[name]).from_pretrained(folder / name, use_safetensors=True)
            modules[name].load_state_dict(saved.state_dict())
        _load_optimizer(optimizer, generator, state_path)
    # The generator state was restored, so the batch stream continues where the run stopped.
    batches = _batches(len(latents), config.batch_size, generator)
    losses = []
    modules.train()
    if not lora:
        modules.requires_grad_(True)
    for step in tqdm(
        range(start + 1, config.unet_steps + 1), initial=start, total=config.unet_steps, desc=desc, disable=not progress
    ):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(learning_rate, step - 1, config.unet_steps)
        index = next(batches)
        z0 = latents[index]
        noise = torch.randn(z0.shape, generator=generator)
        if flow:
            u = torch.sigmoid(torch.randn(len(index), generator=generator))  # logit-normal(0, 1)
            level = levels[(u * len(levels)).long().clamp(1, len(levels) - 1)]
            drop = torch.rand(len(index), generator=generator) < config.caption_dropout
            prompts = ["" if dropped else captions[i] for dropped, i in zip(drop.tolist(), index.tolist())]
            hidden, _, pooled, _ = pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False
            )
            noisy = (1 - level[:, None, None, None]) * z0 + level[:, None, None, None] * noise
            pred = modules["transformer"](
                hidden_states=noisy, timestep=level * 1000, encoder_hidden_states=hidden, pooled_projections=pooled
            ).sample
            loss = F.mse_loss(pred, noise - z0)
        else:
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
            drop = torch.rand(len(index), generator=generator) < config.caption_dropout
            batch_tokens = torch.where(drop[:, None], null_tokens, caption_tokens[index])
            cond = text_encoder(batch_tokens)[0]
            pred = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step in config.checkpoints:
            # A new batch stream starts after every checkpoint so that a resumed run sees the same batches.
            batches = _batches(len(latents), config.batch_size, generator)
            folder = checkpoint_dir(target_dir, step)
            if lora:
                save_lora(unet, folder / LORA_FILE.parent)
                save_file({k: v.detach().contiguous() for k, v in lora_parameters(unet).items()}, folder / LORA_STATE)
            for name in () if lora else names:
                modules[name].save_pretrained(folder / name, safe_serialization=True)
            state_path.parent.mkdir(parents=True, exist_ok=True)
            _save_optimizer(optimizer, generator, step, state_path)
    modules.eval().requires_grad_(False)
    return losses


def _digest(config: TinyConfig, fields: tuple[str, ...], *tensors: torch.Tensor, texts: list[str] = ()) -> str:
    """Key of a shared training product: the fields that determine it, the data, and torch's thread count
    (builds are bit-identical for one thread count, not across them)."""
    import hashlib

    values = {name: getattr(config, name) for name in fields}
    digest = hashlib.sha256(
        json.dumps({**values, "threads": torch.get_num_threads(), "torch": torch.__version__}, sort_keys=True).encode()
    )
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


VAE_FIELDS = (
    "image_size",
    "latent_channels",
    "vae_channels",
    "vae_steps",
    "vae_crop",
    "vae_lr",
    "vae_kl_weight",
    "batch_size",
    "shared_seed",
)
BASE_FIELDS = (*VAE_FIELDS, "unet_channels", "text_dim", "max_tokens", "unet_lr", "caption_dropout", "pretrain_steps")


def _copy_done(source: Path, destination: Path) -> None:
    """Copy a finished folder next to ``destination`` first and rename it there, so a reader never sees half of it."""
    partial = memo.partial_path(destination)  # unique: two builds never rename each other's copy
    try:
        shutil.copytree(source, partial)
        partial.rename(destination)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _vae(
    config: TinyConfig,
    tokenizer: CLIPTokenizer,
    public_images: torch.Tensor,
    key: str,
    target_dir: Path,
    shared: Path | None,
    progress: bool,
    held_out: torch.Tensor | None = None,
) -> AutoencoderKL:
    """The target's VAE: its own training folder, else the shared copy trained with the same settings on the
    same images (``key``), else trained now (seeded by ``shared_seed``) and shared; a training records the
    reconstruction curve of ``held_out`` (:func:`train_vae`) in the VAE's folder."""
    vae_dir = target_dir / "training" / "vae"
    weights = "diffusion_pytorch_model.safetensors"
    if not (vae_dir / weights).exists():
        cached = shared / f"vae-{key}" if shared is not None else None
        if cached is not None and (cached / weights).exists():
            _copy_done(cached, vae_dir)
        else:
            vae_config = replace(config, seed=config.shared_seed)
            vae = build_components(vae_config, tokenizer)["vae"]
            losses, curve = train_vae(vae, public_images, vae_config, progress, held_out=held_out)
            vae.save_pretrained(vae_dir, safe_serialization=True)
            (target_dir / "training" / "vae_loss.json").write_text(json.dumps(losses))
            if curve:
                (vae_dir / HELD_OUT_CURVE).write_text(json.dumps(curve))
            if cached is not None:
                _copy_done(vae_dir, cached)
    return AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval().requires_grad_(False)


def _pretrained(
    config: TinyConfig,
    tokenizer: CLIPTokenizer,
    vae_digest: str,
    pool_latents: torch.Tensor,
    pool_captions: list[str],
    folder: Path,
    progress: bool,
) -> Path:
    """The U-Net and text encoder after ``pretrain_steps`` on the pool, seeded by ``shared_seed`` (trained
    once into ``folder``, which resumes like any training, then read by every target that shares it)."""
    base_config = replace(
        config,
        seed=config.shared_seed,
        unet_steps=config.pretrain_steps,
        checkpoints=(config.pretrain_steps // 2, config.pretrain_steps),
        lora_rank=0,  # the base model trains in full; a LoRA regime adapts it afterwards
    )
    final = checkpoint_dir(folder, config.pretrain_steps)
    if not (final / "unet" / "diffusion_pytorch_model.safetensors").exists():
        components = build_components(base_config, tokenizer)
        (folder / "training").mkdir(parents=True, exist_ok=True)
        (folder / "training" / "config.json").write_text(
            json.dumps({**asdict(base_config), "vae": vae_digest}, indent=2)
        )
        losses = train_unet(
            components, pool_latents, pool_captions, base_config, folder, progress, desc="pretrain U-Net (pool)"
        )
        (folder / "training" / "unet_loss.json").write_text(json.dumps(losses))
    return final


def build_tiny_target(
    target_dir: str | Path,
    public_images: torch.Tensor,
    member_images: torch.Tensor,
    member_captions: list[str],
    vocabulary_captions: list[str],
    config: TinyConfig,
    progress: bool = True,
    tokenizer: CLIPTokenizer | None = None,
    pool_images: torch.Tensor | None = None,
    pool_captions: list[str] | None = None,
    shared: str | Path | None = None,
    held_out_images: torch.Tensor | None = None,
) -> Path:
    """Train (or finish training) the tiny target and save it as a pipeline folder; returns the folder.

    A finished folder (``model_index.json`` present with the same config) is left as it is. ``tokenizer``:
    a fixed one (the embedded default's is committed, ``data/emoji_tokenizer``); without it one is trained
    on ``vocabulary_captions``. Training a byte-level BPE is not reproducible between processes (the
    ``tokenizers`` trainer breaks ties between equally frequent pairs in hash-map order, so token ids and
    merges differ from run to run), and everything downstream of the token ids with it.

    The memorisation regimes (``config.uses_pool``) also need the pool, ``pool_images`` and
    ``pool_captions`` (the public split and the filler images): the fine-tuned regime pretrains the U-Net
    on it, the weak regime mixes the members into it. ``shared``: a folder where the VAE and the
    pretrained U-Net are kept, keyed by their settings and data, for other targets with the same
    ``shared_seed`` (the regimes' seeds share one VAE, and the fine-tuned seeds one base model). Training
    is deterministic, so a shared copy equals what the target would have trained itself.
    ``held_out_images``: images the VAE never trains on (the attacked images); a VAE trained here records
    their reconstruction SSIM along its training (``training/vae/held_out_ssim.json``, :func:`train_vae`).
    """
    target_dir = Path(target_dir)
    config_path = target_dir / "tiny_config.json"
    if (target_dir / "model_index.json").exists():
        if config_path.exists() and TinyConfig.from_saved(json.loads(config_path.read_text())) == config:
            return target_dir
        raise FileExistsError(f"{target_dir} holds a target built with other settings; remove it to rebuild")
    if config.uses_pool and pool_images is None:
        raise ValueError(
            f"{target_dir}: this regime (unet_data={config.unet_data!r}, pretrain_steps={config.pretrain_steps}) "
            "trains on the pool; pass pool_images and pool_captions"
        )
    if config.threads:
        torch.set_num_threads(config.threads)
    (target_dir / "training").mkdir(parents=True, exist_ok=True)
    started = target_dir / "training" / "config.json"
    if started.exists() and TinyConfig.from_saved(json.loads(started.read_text())) != config:
        shutil.rmtree(target_dir)  # an interrupted build with other settings cannot be resumed
        (target_dir / "training").mkdir(parents=True)
    started.write_text(json.dumps(asdict(config), indent=2))
    shared = Path(shared) if shared is not None else None
    if shared is not None:
        shared.mkdir(parents=True, exist_ok=True)

    if tokenizer is None:
        tokenizer = build_tokenizer(vocabulary_captions, config.max_tokens)
    components = build_components(config, tokenizer)
    vae_key = _digest(config, VAE_FIELDS, public_images)
    vae = components["vae"] = _vae(
        config, tokenizer, public_images, vae_key, target_dir, shared, progress, held_out_images
    )

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (
                torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
                * vae.config.scaling_factor
            )

    latents, captions = encode(member_images), list(member_captions)
    if config.uses_pool:
        pool_latents = encode(pool_images)
        if config.pretrain_steps:
            key = _digest(
                config,
                BASE_FIELDS,
                public_images,
                pool_images,
                texts=[
                    *pool_captions,
                    *(f"{token}\t{index}" for token, index in sorted(tokenizer.get_vocab().items())),
                ],
            )
            folder = (shared / f"base-{key}") if shared is not None else target_dir / "training" / "base"
            base = _pretrained(config, tokenizer, vae_key, pool_latents, list(pool_captions), folder, progress)
            components["unet"].load_state_dict(
                UNet2DConditionModel.from_pretrained(base / "unet", use_safetensors=True).state_dict()
            )
            components["text_encoder"].load_state_dict(
                CLIPTextModel.from_pretrained(base / "text_encoder", use_safetensors=True).state_dict()
            )
        if config.unet_data == "members+pool":
            latents, captions = torch.cat([latents, pool_latents]), captions + list(pool_captions)
        elif config.unet_data == "pool":
            latents, captions = pool_latents, list(pool_captions)
    data_name = {"members+pool": "members and pool", "stand-ins": "stand-ins"}.get(config.unet_data, config.unet_data)
    model = "transformer" if config.family == "sd3" else "U-Net"
    desc = f"fine-tune {model} ({data_name})" if config.pretrain_steps else f"train {model} ({data_name})"
    if config.lora_rank:
        import copy

        base_unet = copy.deepcopy(components["unet"])  # the pipeline keeps the base model; the LoRA is a file
        desc = f"train a rank-{config.lora_rank} LoRA of the U-Net ({data_name})"
    losses = train_unet(components, latents, captions, config, target_dir, progress, desc=desc)
    if config.lora_rank:
        save_lora(components["unet"], target_dir / LORA_FILE.parent)
        components["unet"] = base_unet
    if losses:
        log = target_dir / "training" / "unet_loss.json"
        previous = json.loads(log.read_text()) if log.exists() else []
        log.write_text(json.dumps(previous + losses))
    if config.family == "sd3":
        pipeline = flow_pipeline(components)
    else:
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=components["text_encoder"], tokenizer=tokenizer, unet=components["unet"],
            scheduler=components["scheduler"], safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
    pipeline.save_pretrained(target_dir, safe_serialization=True)
    config_path.write_text(json.dumps(asdict(config), indent=2))
    return target_dir
