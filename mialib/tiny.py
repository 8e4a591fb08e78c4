"""Build and train the embedded default target: a tiny Stable-Diffusion-shaped model on CPU.

Real classes throughout (diffusers ``UNet2DConditionModel``, ``AutoencoderKL``, ``DDIMScheduler``;
transformers ``CLIPTextModel``, ``CLIPTokenizer``), saved as a ``StableDiffusionPipeline`` folder with
safetensors and loaded back through :func:`mialib.target.load_target` like any Stable Diffusion.

As in Stable Diffusion, the VAE never sees the attacked images (it trains on the public split only).
The U-Net trains on the members only with the epsilon objective and 10 % caption dropout, saving
checkpoints at chosen steps. Unlike Stable Diffusion's frozen pre-trained CLIP, the text encoder trains
with the U-Net: there is no pre-trained CLIP offline, and a frozen random one maps all captions to nearly
the same embedding (mean cosine similarity 0.92 measured), so captions could not select a memorised image. Training resumes after an interruption from its last checkpoint,
optimizer and random state included, so a resumed run ends with the same weights.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


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

    def __post_init__(self):
        self.vae_channels = tuple(self.vae_channels)
        self.unet_channels = tuple(self.unet_channels)
        self.checkpoints = tuple(sorted({int(s) for s in self.checkpoints if 0 < int(s) <= self.unet_steps} | {self.unet_steps}))


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
    """Untrained VAE, U-Net and text encoder, and Stable Diffusion's scheduler, all seeded."""
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(
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
    return dict(vae=vae, unet=unet, text_encoder=text_encoder.eval().requires_grad_(False), tokenizer=tokenizer, scheduler=scheduler)


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


def train_vae(vae: AutoencoderKL, images: torch.Tensor, config: TinyConfig, progress: bool = True) -> list[float]:
    """Reconstruction (MSE) plus a small KL term, on the public split only."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    batches = _batches(len(images), config.batch_size, generator)
    losses = []
    vae.train()
    for step in tqdm(range(config.vae_steps), desc="train VAE (public split)", disable=not progress):
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
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
    # As for Stable Diffusion: scale latents to unit variance.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return losses


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
) -> list[float]:
    """Epsilon-prediction training of the U-Net and text encoder on the member latents, with
    checkpoints and exact resume."""
    unet, scheduler = components["unet"], components["scheduler"]
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    tokens = tokenizer(list(captions) + [""], padding="max_length", max_length=config.max_tokens, truncation=True, return_tensors="pt").input_ids
    caption_tokens, null_tokens = tokens[:-1], tokens[-1:]
    generator = torch.Generator().manual_seed(config.seed + 2)
    modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.unet_lr)
    state_path = target_dir / "training" / "unet_optimizer.safetensors"
    start = 0
    done = [s for s in config.checkpoints if (checkpoint_dir(target_dir, s) / "unet" / "diffusion_pytorch_model.safetensors").exists()]
    if done and state_path.exists():
        start = max(done)
        folder = checkpoint_dir(target_dir, start)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True).state_dict())
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True).state_dict())
        _load_optimizer(optimizer, generator, state_path)
    # The generator state was restored, so the batch stream continues where the run stopped.
    batches = _batches(len(latents), config.batch_size, generator)
    losses = []
    modules.train().requires_grad_(True)
    for step in tqdm(range(start + 1, config.unet_steps + 1), initial=start, total=config.unet_steps, desc="train U-Net (members)", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config.unet_lr, step - 1, config.unet_steps)
        index = next(batches)
        z0 = latents[index]
        noise = torch.randn(z0.shape, generator=generator)
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
            unet.save_pretrained(folder / "unet", safe_serialization=True)
            text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
            state_path.parent.mkdir(parents=True, exist_ok=True)
            _save_optimizer(optimizer, generator, step, state_path)
    modules.eval().requires_grad_(False)
    return losses


def build_tiny_target(
    target_dir: str | Path,
    public_images: torch.Tensor,
    member_images: torch.Tensor,
    member_captions: list[str],
    vocabulary_captions: list[str],
    config: TinyConfig,
    progress: bool = True,
    tokenizer: CLIPTokenizer | None = None,
) -> Path:
    """Train (or finish training) the tiny target and save it as a pipeline folder; returns the folder.

    A finished folder (``model_index.json`` present with the same config) is left as it is. ``tokenizer``:
    a fixed one (the embedded default's is committed, ``data/emoji_tokenizer``); without it one is trained
    on ``vocabulary_captions``. Training a byte-level BPE is not reproducible between processes (the
    ``tokenizers`` trainer breaks ties between equally frequent pairs in hash-map order, so token ids and
    merges differ from run to run), and everything downstream of the token ids with it.
    """
    target_dir = Path(target_dir)
    config_path = target_dir / "tiny_config.json"
    if (target_dir / "model_index.json").exists():
        if config_path.exists() and json.loads(config_path.read_text()) == json.loads(json.dumps(asdict(config))):
            return target_dir
        raise FileExistsError(f"{target_dir} holds a target built with other settings; remove it to rebuild")
    if config.threads:
        torch.set_num_threads(config.threads)
    (target_dir / "training").mkdir(parents=True, exist_ok=True)
    started = target_dir / "training" / "config.json"
    if started.exists() and json.loads(started.read_text()) != json.loads(json.dumps(asdict(config))):
        shutil.rmtree(target_dir)  # an interrupted build with other settings cannot be resumed
        (target_dir / "training").mkdir(parents=True)
    started.write_text(json.dumps(asdict(config), indent=2))

    if tokenizer is None:
        tokenizer = build_tokenizer(vocabulary_captions, config.max_tokens)
    components = build_components(config, tokenizer)
    vae_dir = target_dir / "training" / "vae"
    if (vae_dir / "diffusion_pytorch_model.safetensors").exists():
        components["vae"] = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval().requires_grad_(False)
    else:
        losses = train_vae(components["vae"], public_images, config, progress)
        components["vae"].save_pretrained(vae_dir, safe_serialization=True)
        (target_dir / "training" / "vae_loss.json").write_text(json.dumps(losses))
    vae = components["vae"]
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(member_images[i : i + 64]).latent_dist.mode() for i in range(0, len(member_images), 64)]
        ) * vae.config.scaling_factor
    losses = train_unet(components, latents, member_captions, config, target_dir, progress)
    if losses:
        log = target_dir / "training" / "unet_loss.json"
        previous = json.loads(log.read_text()) if log.exists() else []
        log.write_text(json.dumps(previous + losses))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=components["text_encoder"],
        tokenizer=tokenizer,
        unet=components["unet"],
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(target_dir, safe_serialization=True)
    config_path.write_text(json.dumps(asdict(config), indent=2))
    return target_dir
