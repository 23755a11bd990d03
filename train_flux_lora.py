#!/usr/bin/env python
# Copyright 2025 The accelerate-offload authors. Licensed under the Apache License, Version 2.0.
"""Train a LoRA for FLUX.1 (dev or schnell) with flow matching, DreamBooth-style or on a captioned dataset.

Modelled on diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py` (same flags), with:
  * aspect-ratio buckets (`--aspect_ratio_buckets auto`): each image trains at the bucket nearest its shape and
    a batch never mixes shapes;
  * prior preservation that works at any batch size (every image gets its own prompt embedding);
  * text embeddings computed once, then the text encoders are freed before the transformer is loaded;
  * the accelerate-offload runtime: with `--gradient_checkpointing` or an `offload_config:` in the launch config,
    the transformer's blocks are checkpointed and streamed from pinned CPU memory, so a 12B model trains in bf16
    on a small GPU;
  * interruption and faults handled: checkpoints are written to `checkpoint-N.tmp`, synced and renamed into place,
    SIGINT or SIGTERM saves one at the next step boundary and exits with 128 + the signal number (130 or 143), a
    NaN/inf loss or gradient stops before the optimizer applies it, out of memory is explained in one line.

    accelerate launch train_flux_lora.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir flux-dog-lora \
        --resolution 512 --mixed_precision bf16 --gradient_checkpointing --max_train_steps 500
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from accelerate_offload.adapters import adapter_checkpoint_problem
from accelerate_offload.buckets import (
    SIZE_MULTIPLE,
    BucketBatchSampler,
    bucket_spec_problem,
    fit_to_bucket,
    nearest_bucket,
    training_buckets,
)
from accelerate_offload.ema import ema_weights
from accelerate_offload.loss_plot import plot_losses
from accelerate_offload.optimizers import (
    add_optimizer_args,
    build_optimizer,
    chosen_optimizer,
    optimizer_checkpoint_problem,
    optimizer_problem,
)
from accelerate_offload.script_errors import ScriptError, TrainingFault, UsageError
from accelerate_offload.training_math import (
    TIMESTEP_SAMPLING,
    caption_orderings,
    fixed_noise_loss,
    held_out_indices,
    mask_to_latent_grid,
    mask_to_tensor,
    masked_mean,
    sample_shifted_sigmas,
    shuffle_caption,
    validation_share,
)
from accelerate_offload.training_utils import (
    CHECKPOINT_PREFIX,
    LORA_WEIGHT_NAME,
    PARTIAL_SUFFIX,
    LatentCache,
    LatentDistribution,
    MetricsFileError,
    MetricsLog,
    StopSignals,
    cache_latents,
    checkpoint_step,
    encode_latent_distribution,
    give_default_modes,
    last_checkpoint_note,
    output_dir_problem,
    remove_unfinished_checkpoints,
    resolve_checkpoint,
    sample_latents,
    save_adapter_files,
    save_checkpoint,
    step_is_finite,
    trainable_is_finite,
    validation_loss_due,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_LORA_LAYERS = (
    "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,"
    "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"
)
TRACKERS = ("tensorboard", "wandb", "all", "none")
PRECISIONS = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"  # the run's summary plot: training loss, and validation loss where measured
TRACKER_PROJECT = "flux-lora"
# FLUX.1 was trained with at most this many T5 tokens a prompt (FluxPipeline refuses more).
MAX_T5_TOKENS = 512
# Prompts encoded per text-encoder call; small enough for T5-XXL at 512 tokens on any GPU.
TEXT_ENCODING_BATCH = 8


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """A bad argument is one line and a pointer to --help, not the whole usage text before it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Train a FLUX.1 LoRA (DreamBooth or captioned dataset).")
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local pipeline folder.")
    model.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model.")
    model.add_argument("--variant", default=None, help="Weight file variant, e.g. 'fp16'.")
    model.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are stored.")

    data = parser.add_argument_group("data")
    data.add_argument("--instance_data_dir", default=None, help="Folder of training images (DreamBooth).")
    data.add_argument("--instance_prompt", default=None, help="Prompt for every image, e.g. 'a photo of sks dog'.")
    data.add_argument("--dataset_name", default=None, help="Hub dataset id or local folder (imagefolder).")
    data.add_argument("--dataset_config_name", default=None, help="Dataset configuration, if it has several.")
    data.add_argument("--image_column", default="image", help="Dataset column holding the images.")
    data.add_argument("--caption_column", default=None, help="Dataset column holding each image's caption.")
    data.add_argument(
        "--strict",
        action="store_true",
        help="Stop on an unreadable image instead of skipping it (skipped images are counted in a warning).",
    )
    data.add_argument("--repeats", type=int, default=1, help="How many times each training image is repeated.")
    data.add_argument("--resolution", type=int, default=512, help="Side of the square training size (pixels).")
    data.add_argument(
        "--aspect_ratio_buckets",
        default=None,
        help="'auto' for buckets of about resolution^2 pixels over common aspect ratios, or 'H,W;H,W;...'. Each "
        "image trains at its nearest bucket; batches never mix buckets. Default: square crops.",
    )
    data.add_argument("--center_crop", action="store_true", help="Center crop instead of a random crop.")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses.")

    prior = parser.add_argument_group("prior preservation")
    prior.add_argument("--with_prior_preservation", action="store_true", help="Add the prior preservation loss.")
    prior.add_argument("--class_prompt", default=None, help="Prompt of the class, e.g. 'a photo of a dog'.")
    prior.add_argument("--class_data_dir", default=None, help="Folder of class images (filled if short).")
    prior.add_argument("--num_class_images", type=int, default=100, help="Class images to use (generated if short).")
    prior.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior preservation loss.")
    prior.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    prior.add_argument(
        "--prior_generation_precision",
        default=None,
        choices=["no", "fp32", "fp16", "bf16"],
        help="Precision of class-image generation (default: the training's, so the weights load without a copy).",
    )

    flow = parser.add_argument_group("flow matching")
    flow.add_argument(
        "--weighting_scheme",
        default="none",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
        help="Timestep sampling density / loss weighting (SD3 paper).",
    )
    flow.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the 'logit_normal' scheme.")
    flow.add_argument("--logit_std", type=float, default=1.0, help="Std of the 'logit_normal' scheme.")
    flow.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the 'mode' scheme.")
    flow.add_argument("--guidance_scale", type=float, default=3.5, help="Guidance fed to FLUX.1-dev's embedding.")
    flow.add_argument("--max_sequence_length", type=int, default=512, help="T5 tokens per prompt.")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=4, help="Dimension of the LoRA update matrices.")
    lora.add_argument("--lora_alpha", type=int, default=None, help="LoRA scaling numerator (default: rank).")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout inside the LoRA layers.")
    lora.add_argument(
        "--lora_layers", default=DEFAULT_LORA_LAYERS, help="Comma-separated transformer modules that get a LoRA."
    )
    add_adapter_args(parser)

    memory = parser.add_argument_group("memory")
    memory.add_argument("--cache_latents", action="store_true", help="Encode the images once; frees the VAE.")
    memory.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute each transformer block in the backward pass (through accelerate-offload).",
    )

    optim = parser.add_argument_group("optimisation")
    add_optimizer_args(optim)
    optim.add_argument("--learning_rate", type=float, default=1e-4, help="Learning rate after warm-up.")
    optim.add_argument("--scale_lr", action="store_true", help="Multiply the learning rate by the total batch size.")
    optim.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning rate schedule.",
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the schedule.")
    optim.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of 'cosine_with_restarts'.")
    optim.add_argument("--lr_power", type=float, default=1.0, help="Power of the 'polynomial' schedule.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    optim.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    optim.add_argument("--num_train_epochs", type=int, default=1, help="Epochs (unless --max_train_steps).")
    optim.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides epochs.")
    optim.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")
    optim.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Precision of the frozen weights (the LoRA stays fp32). Default: the accelerate config's.",
    )
    optim.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    optim.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Not offered: prompts are embedded once and the text encoders freed before training (refused).",
    )
    optim.add_argument(
        "--local_rank", type=int, default=-1, help="Set by torch.distributed.launch; accelerate reads the environment."
    )

    output = parser.add_argument_group("checkpoints and output")
    output.add_argument("--output_dir", default="flux-lora", help="Where the LoRA, logs and checkpoints go.")
    output.add_argument("--logging_dir", default="logs", help="Tracker log folder, inside --output_dir.")
    output.add_argument(
        "--upcast_before_saving",
        action="store_true",
        help="Save the final LoRA in fp32 (default: in the training precision, as diffusers' scripts do).",
    )
    output.add_argument("--checkpointing_steps", type=int, default=500, help="Save the training state every N steps.")
    output.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    output.add_argument(
        "--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder (path or name in output_dir)."
    )
    output.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub.")
    output.add_argument("--hub_model_id", default=None, help="Hub repository (default: output folder name).")
    output.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one).")

    validation = parser.add_argument_group("validation")
    validation.add_argument("--validation_prompt", default=None, help="Prompt of the validation images.")
    validation.add_argument("--num_validation_images", type=int, default=4, help="Images per validation.")
    validation.add_argument(
        "--num_inference_steps", type=int, default=28, help="Denoising steps of validation, final and class images."
    )
    validation.add_argument("--validation_epochs", type=int, default=50, help="Validate every N epochs.")
    validation.add_argument("--validation_steps", type=int, default=None, help="Also validate every N steps.")
    validation.add_argument("--report_to", default="tensorboard", choices=TRACKERS, help="Where to log.")
    add_training_feature_args(parser)
    return parser


def add_training_feature_args(parser: argparse.ArgumentParser) -> None:
    """Masked loss, shifted timesteps, caption dropout and shuffling, validation loss (SD3's script shares most)."""
    features = parser.add_argument_group("masks, timesteps, captions, validation loss")
    features.add_argument(
        "--mask_data_dir",
        default=None,
        help="Folder of loss masks: one per training image, same relative path and name, any image extension. White "
        "trains, black is ignored; a training image without a mask is an error.",
    )
    features.add_argument("--mask_column", default=None, help="Dataset column of loss masks (with --dataset_name).")
    features.add_argument(
        "--timestep_sampling",
        default="sigma",
        choices=TIMESTEP_SAMPLING,
        help="'sigma': the --weighting_scheme density on the scheduler's timesteps; 'shift': a logit-normal draw "
        "shifted by --discrete_flow_shift; 'flux_shift': shifted by the image's token count, as Flux at inference.",
    )
    features.add_argument(
        "--discrete_flow_shift", type=float, default=3.0, help="Shift of --timestep_sampling shift: s*t/(1+(s-1)*t)."
    )
    features.add_argument(
        "--caption_dropout_rate",
        type=float,
        default=0.0,
        help="Share of training images whose caption is replaced by the empty prompt (drawn from seed, epoch, image).",
    )
    features.add_argument(
        "--shuffle_caption",
        action="store_true",
        help="Shuffle each caption's comma-separated tags, per epoch and image (the first --keep_tokens stay).",
    )
    features.add_argument("--keep_tokens", type=int, default=0, help="Leading tags that --shuffle_caption keeps.")
    features.add_argument(
        "--max_cached_captions",
        type=int,
        default=1024,
        help="With --shuffle_caption: the most distinct captions embedded (each kept in CPU memory all run).",
    )
    features.add_argument(
        "--validation_loss_images",
        default=None,
        help="A folder of held-out images, or a share of the training images such as 0.1: their loss at fixed "
        "timesteps and noise is logged every --validation_steps and at the end (validation_loss in metrics.jsonl).",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    checks = (check_data_args, check_prior_args, check_numbers, check_training_features, check_optimizer)
    for check in (*checks, check_text_encoder, check_reporting, check_output, check_adapter_args):
        message = check(args)
        if message:  # a value that parses but cannot work: one line naming the fix
            parser.exit(2, f"error: {message}\n")
    if args.lora_alpha is None:
        args.lora_alpha = args.rank
    return args


def check_data_args(args: argparse.Namespace) -> str | None:
    if (args.instance_data_dir is None) == (args.dataset_name is None):
        return "give exactly one of --instance_data_dir (a folder of images) or --dataset_name"
    if args.dataset_name is not None and is_local_path(args.dataset_name) and not Path(args.dataset_name).is_dir():
        return (
            f"cannot load --dataset_name {args.dataset_name}: no such folder; give a folder of images with "
            "metadata.jsonl (imagefolder) or a Hub dataset id"
        )
    if args.instance_data_dir is not None:
        folder = Path(args.instance_data_dir)
        if not folder.is_dir():
            return f"--instance_data_dir {folder} is not a folder; point it at a folder of training images"
        if not list_images(folder):
            return f"--instance_data_dir {folder} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add some"
    if args.instance_prompt is None and (args.instance_data_dir is not None or args.caption_column is None):
        return "give --instance_prompt (e.g. 'a photo of sks dog'), or --dataset_name with --caption_column"
    if args.resolution <= 0 or args.resolution % SIZE_MULTIPLE:
        lower = max(SIZE_MULTIPLE, args.resolution // SIZE_MULTIPLE * SIZE_MULTIPLE)
        upper = max(SIZE_MULTIPLE, math.ceil(args.resolution / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        suggestion = str(lower) if lower == upper else f"{lower} or {upper}"
        return f"--resolution must be a multiple of {SIZE_MULTIPLE}, got {args.resolution}; try {suggestion}"
    return bucket_spec_problem(args.aspect_ratio_buckets)


def is_local_path(name: str) -> bool:
    """Whether a --dataset_name can only mean a folder (a Hub id is `name` or `owner/name`): then it must exist."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_prior_args(args: argparse.Namespace) -> str | None:
    if not args.with_prior_preservation:
        return None
    if not args.class_prompt or not args.class_data_dir:
        return "--with_prior_preservation needs --class_prompt and --class_data_dir (filled with generated images)"
    if Path(args.class_data_dir).exists() and not Path(args.class_data_dir).is_dir():
        return f"--class_data_dir {args.class_data_dir} is a file; give a folder"
    if args.num_class_images < 1:
        return "--num_class_images must be at least 1"
    return None


def check_training_features(args: argparse.Namespace) -> str | None:
    if args.mask_column is not None and args.dataset_name is None:
        return "--mask_column needs --dataset_name; for a folder of images give --mask_data_dir"
    if args.mask_column is not None and args.mask_data_dir is not None:
        return "give one of --mask_data_dir or --mask_column"
    if args.mask_data_dir is not None and not Path(args.mask_data_dir).is_dir():
        return f"--mask_data_dir {args.mask_data_dir} is not a folder; point it at the folder of loss masks"
    if not 0.0 < args.discrete_flow_shift < math.inf:
        return f"--discrete_flow_shift must be a positive number, got {args.discrete_flow_shift}"
    if not 0.0 <= args.caption_dropout_rate < 1.0:
        return f"--caption_dropout_rate must be in [0, 1), got {args.caption_dropout_rate}"
    if args.keep_tokens < 0:
        return f"--keep_tokens cannot be negative, got {args.keep_tokens}"
    if args.max_cached_captions < 1:
        return f"--max_cached_captions must be at least 1, got {args.max_cached_captions}"
    if args.validation_loss_images is None:
        return None
    share, folder = validation_share(args.validation_loss_images), Path(args.validation_loss_images)
    if share is not None and not 0.0 < share < 1.0:
        return f"--validation_loss_images {share:g}: give a share in (0, 1) such as 0.1, or a folder of images"
    if share is None and not (folder.is_dir() and list_images(folder)):
        return f"--validation_loss_images {folder} is neither a share such as 0.1 nor a folder of images"
    if share is None and args.instance_prompt is None:
        return "--validation_loss_images as a folder needs --instance_prompt (its images' prompt), or give a share"
    return None


def check_numbers(args: argparse.Namespace) -> str | None:
    positive = ("train_batch_size", "gradient_accumulation_steps", "rank", "repeats", "checkpointing_steps")
    positive += ("sample_batch_size", "validation_epochs", "max_sequence_length", "num_train_epochs")
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    for name in ("max_train_steps", "validation_steps", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    for name in ("lr_warmup_steps", "dataloader_num_workers"):
        if getattr(args, name) < 0:
            return f"--{name} cannot be negative, got {getattr(args, name)}"
    if args.lora_alpha is not None and args.lora_alpha < 1:
        return f"--lora_alpha must be at least 1, got {args.lora_alpha}"
    if args.lr_num_cycles < 1:
        return f"--lr_num_cycles must be at least 1, got {args.lr_num_cycles}"
    for name in ("learning_rate", "max_grad_norm", "lr_power", "logit_std"):
        if not 0.0 < getattr(args, name) < math.inf:
            return f"--{name} must be a positive number, got {getattr(args, name)}"
    if not 0.0 <= args.prior_loss_weight < math.inf:
        return f"--prior_loss_weight cannot be negative, got {args.prior_loss_weight}"
    if args.max_sequence_length > MAX_T5_TOKENS:
        return (
            f"--max_sequence_length must be at most {MAX_T5_TOKENS} (FLUX.1's T5 limit), got {args.max_sequence_length}"
        )
    if not 0.0 <= args.lora_dropout < 1.0:
        return f"--lora_dropout must be in [0, 1), got {args.lora_dropout}"
    if args.num_validation_images < 0:
        return "--num_validation_images cannot be negative"
    return None


def check_optimizer(args: argparse.Namespace) -> str | None:
    return optimizer_problem(args, cuda=torch.cuda.is_available())


def check_text_encoder(args: argparse.Namespace) -> str | None:
    if args.train_text_encoder:
        return (
            "--train_text_encoder is not offered: prompts are embedded once and the text encoders freed, so the "
            "whole GPU budget goes to the transformer; drop the flag (its LoRA learns the instance prompt)"
        )
    return None


def check_reporting(args: argparse.Namespace) -> str | None:
    if args.report_to in ("wandb", "all"):
        if args.hub_token is not None:
            return "--hub_token would be logged to wandb: log in with `hf auth login` instead and drop --hub_token"
        try:
            import wandb  # noqa: F401
        except ImportError:
            return "--report_to wandb needs wandb: pip install wandb (or use --report_to tensorboard)"
    return None


def check_output(args: argparse.Namespace) -> str | None:
    """An --output_dir that can be created, and holds no other run unless a checkpoint of it that fits resumes."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output_dir {output_dir} is a file; give a folder"
    existing = next(folder for folder in [output_dir, *output_dir.parents] if folder.exists())
    if not existing.is_dir():
        return f"--output_dir {output_dir} cannot be created: {existing} is a file; give a folder path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--output_dir {output_dir} cannot be created: {existing} is not writable; give a folder you can write"
    return output_dir_problem(
        output_dir,
        args.resume_from_checkpoint,
        args.rank,
        lora_targets(args),
        lambda checkpoint, shapes: adapter_checkpoint_problem(checkpoint, shapes, args.adapter, args.use_ema)
        or optimizer_checkpoint_problem(checkpoint, chosen_optimizer(args)),
    )


def lora_targets(args: argparse.Namespace) -> list[str]:
    return [name.strip() for name in args.lora_layers.split(",") if name.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Data: images, buckets, batches
# ----------------------------------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` and its subfolders (hidden ones skipped), in a stable order, as the SD3 scripts."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def open_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and float grayscale rescaled, transparency composited over white."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().astype(np.uint8))
    elif image.mode in ("I", "F"):  # 32-bit: 16-bit data (PNG) or 0..1 floats, scaled by their range
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0 if array.max() > 1 else 1.0
        image = Image.fromarray((np.clip(array / top, 0, 1) * 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(path: Path) -> Image.Image:
    """Loads an image fully (so a broken file fails here, naming itself, not mid-training); ValueError if it can't."""
    try:
        with Image.open(path) as image:
            image.load()
            return open_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path} ({error})") from None


@dataclass
class Example:
    image: Image.Image
    prompt: str
    name: str = ""
    mask: Image.Image | None = None  # the loss mask, the image's size (white trains)


def readable_images(paths: Sequence[Path], strict: bool, what: str) -> list[tuple[Path, Image.Image]]:
    """The images that load; the others stop the run under --strict, else are skipped with one warning."""
    images, unreadable = [], []
    for path in paths:
        try:
            images.append((path, read_image(path)))
        except ValueError as error:
            if strict:
                raise UsageError(f"{error}; fix or remove it (or drop --strict to skip unreadable images)") from None
            unreadable.append(path.name)
    if unreadable:
        logger.warning(
            "Skipped %d of %d %s that cannot be read: %s (fix or remove them; --strict stops on them instead)",
            len(unreadable), len(paths), what, ", ".join(unreadable),
        )  # fmt: skip
    if paths and not images:
        raise UsageError(f"none of the {len(paths)} {what} in {paths[0].parent} can be read; replace them")
    return images


def load_folder_examples(args: argparse.Namespace) -> list[Example]:
    root = Path(args.instance_data_dir)
    images = readable_images(list_images(root), args.strict, "training images")
    examples = [Example(image, args.instance_prompt, path.relative_to(root).as_posix()) for path, image in images]
    if args.mask_data_dir is not None:
        for example in examples:
            example.mask = load_mask(find_mask(Path(args.mask_data_dir), example.name), example)
    return examples


def find_mask(mask_dir: Path, name: str) -> Path:
    """The mask of training image `name` (a relative path): the same path in `mask_dir`, with any image extension."""
    relative = Path(name)
    folder = mask_dir / relative.parent
    found = sorted(
        path for path in (folder.iterdir() if folder.is_dir() else ())
        if path.stem == relative.stem and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )  # fmt: skip
    if not found:
        raise UsageError(
            f"no mask for training image {name} in --mask_data_dir {mask_dir} (looked for "
            f"{folder / relative.stem}.png or another image extension); add one: white trains, black is ignored"
        )
    return found[0]


def load_mask(source: Path | Image.Image, example: Example) -> Image.Image:
    """A loss mask as 8-bit grayscale; it must have its image's size and let something train."""
    try:
        mask = read_image(source) if isinstance(source, Path) else open_rgb(source)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the mask of training image {example.name} ({error}); replace it") from None
    mask = mask.convert("L")
    if mask.size != example.image.size:
        raise UsageError(
            f"the mask of training image {example.name} is {mask.width}x{mask.height}, the image "
            f"{example.image.width}x{example.image.height}; give a mask of the image's size"
        )
    if mask.getextrema()[1] == 0:
        raise UsageError(f"the mask of training image {example.name} is black everywhere: nothing would train; fix it")
    return mask


def load_dataset_examples(args: argparse.Namespace) -> list[Example]:
    """Images and captions from a Hub dataset or a local `imagefolder` (captions in `metadata.jsonl`)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise UsageError(f"cannot load --dataset_name {args.dataset_name} ({error})") from None
    split = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    columns = split.column_names
    for flag in ("image_column", "caption_column", "mask_column"):
        column = getattr(args, flag)
        if column is not None and column not in columns:
            raise UsageError(f"--{flag} '{column}' is not in the dataset; its columns are: {', '.join(columns)}")
    examples, unreadable = [], []
    for index in range(len(split)):
        try:
            row = split[index]
            image = open_rgb(row[args.image_column])
        except (UnidentifiedImageError, OSError, ValueError) as error:
            if args.strict:
                raise UsageError(
                    f"cannot read image {index} of {args.dataset_name} ({error}); fix or remove it (or drop --strict)"
                ) from None
            unreadable.append(str(index))
            continue
        caption = row[args.caption_column] if args.caption_column else None
        prompt = caption or args.instance_prompt
        if not prompt:
            raise UsageError(f"image {index} of {args.dataset_name} has no caption: add one or pass --instance_prompt")
        examples.append(Example(image, prompt, f"row {index}"))
        if args.mask_column is not None:
            if row[args.mask_column] is None:
                raise UsageError(f"row {index} of {args.dataset_name} has no mask in --mask_column {args.mask_column}")
            examples[-1].mask = load_mask(row[args.mask_column], examples[-1])
    if unreadable:
        logger.warning("Skipped %d unreadable rows: %s (--strict stops on them)", len(unreadable), ",".join(unreadable))
    if not examples:
        raise UsageError(f"--dataset_name {args.dataset_name} has no readable images")
    return examples


def load_instance_examples(args: argparse.Namespace) -> tuple[list[Example], list[Example]]:
    """The training examples (repeated) and the held-out ones whose loss --validation_loss_images measures."""
    examples = load_dataset_examples(args) if args.dataset_name else load_folder_examples(args)
    held_out: list[Example] = []
    share = validation_share(args.validation_loss_images)
    if share is not None:
        chosen = set(held_out_indices(len(examples), share, args.seed or 0))
        if len(chosen) >= len(examples):
            raise UsageError(
                f"--validation_loss_images {share:g} would hold out all {len(examples)} images; give a smaller share"
            )
        held_out = [example for index, example in enumerate(examples) if index in chosen]
        examples = [example for index, example in enumerate(examples) if index not in chosen]
    elif args.validation_loss_images is not None:
        root = Path(args.validation_loss_images)
        images = readable_images(list_images(root), args.strict, "validation loss images")
        held_out = [Example(image, args.instance_prompt, path.relative_to(root).as_posix()) for path, image in images]
    return [example for example in examples for _ in range(args.repeats)], held_out


def warn_about_small_images(examples: Sequence[Example], buckets: Sequence[tuple[int, int]]) -> None:
    """Images smaller than their bucket train upscaled (and blurrier): said once, with the worst offenders."""
    small = {
        f"{example.name} ({example.image.width}x{example.image.height} < {width}x{height})"
        for example, (height, width) in zip(examples, buckets)
        if example.image.width < width or example.image.height < height
    }
    if small:
        logger.warning(
            "%d images are smaller than their training size and are upscaled: %s; use larger images or a lower "
            "--resolution", len(small), ", ".join(sorted(small)[:5]) + (", ..." if len(small) > 5 else ""),
        )  # fmt: skip


def derived_seed(*keys: int) -> int:
    """A seed for one use (an image's crop and flip in one epoch) from the run's seed: the same on resume."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def to_pixels(image: Image.Image) -> torch.Tensor:
    """uint8 HWC image -> float CHW tensor in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (each at its bucket) with their prompts, plus class images cropped to the same bucket."""

    def __init__(
        self,
        examples: list[Example],
        buckets: Sequence[tuple[int, int]],
        class_images: Sequence[Path] = (),
        class_prompt: str | None = None,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        caption: Callable[[str, int, int], str] | None = None,
    ) -> None:
        self.caption = caption  # (prompt, epoch, example index) -> the caption trained on: shuffled, dropped
        self.examples = examples
        self.buckets = [nearest_bucket(example.image.size, buckets) for example in examples]
        self.class_images = list(class_images)
        self.class_prompt = class_prompt
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return max(len(self.examples), len(self.class_images))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def bucket_of(self, index: int) -> tuple[int, int]:
        return self.buckets[index % len(self.examples)]

    def _pixels(self, image: Image.Image, bucket: tuple[int, int], rng: random.Random) -> torch.Tensor:
        image = fit_to_bucket(image, bucket, self.center_crop, rng)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_pixels(image)

    def _mask(self, mask: Image.Image, bucket: tuple[int, int], crop_state: tuple) -> torch.Tensor:
        """The mask cropped and flipped exactly as its image: the same draws, replayed from the image's rng state."""
        rng = random.Random()
        rng.setstate(crop_state)
        mask = fit_to_bucket(mask, bucket, self.center_crop, rng)
        if self.random_flip and rng.random() < 0.5:
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return mask_to_tensor(mask)

    def __getitem__(self, index: int) -> dict:
        # Crops and flips come from (seed, epoch, index), never a global stream: the data loader fetches ahead, so
        # the random state a checkpoint saves would already hold the next batch's draws.
        rng = random.Random(derived_seed(self.seed, self.epoch, index))
        example = self.examples[index % len(self.examples)]
        bucket = self.bucket_of(index)
        crop_state = rng.getstate()
        item = {"index": index, "pixels": self._pixels(example.image, bucket, rng), "prompt": example.prompt}
        if self.caption is not None:
            item["prompt"] = self.caption(example.prompt, self.epoch, index % len(self.examples))
        if example.mask is not None:
            item["mask"] = self._mask(example.mask, bucket, crop_state)
        if self.class_images:
            class_image = read_image(self.class_images[index % len(self.class_images)])
            item["class_pixels"] = self._pixels(class_image, bucket, rng)
            item["class_prompt"] = self.class_prompt
        return item


def collate(examples: list[dict]) -> dict:
    """Instance images first, then their class images, so the loss can split the batch in two halves."""
    pixels = [example["pixels"] for example in examples]
    prompts = [example["prompt"] for example in examples]
    if "class_pixels" in examples[0]:
        pixels += [example["class_pixels"] for example in examples]
        prompts += [example["class_prompt"] for example in examples]
    batch = {
        "indices": [example["index"] for example in examples],
        "pixels": torch.stack(pixels).contiguous(),
        "prompts": prompts,
    }
    if "mask" in examples[0]:  # class images train everywhere
        masks = [example["mask"] for example in examples]
        batch["masks"] = torch.stack(masks + [torch.ones_like(masks[0])] * (len(pixels) - len(masks)))
    return batch


def training_caption(args: argparse.Namespace, prompt: str, epoch: int, index: int) -> str:
    """The caption example `index` trains with in `epoch`: its tags shuffled, or dropped to the empty prompt."""
    if args.shuffle_caption:
        prompt = shuffle_caption(prompt, args.keep_tokens, args.seed or 0, epoch, index)
    dropout = random.Random(derived_seed(args.seed or 0, epoch, index, 1))
    return "" if args.caption_dropout_rate and dropout.random() < args.caption_dropout_rate else prompt


def planned_epochs(args: argparse.Namespace, examples: Sequence[Example], buckets, num_processes: int) -> int:
    """At least the epochs this run trains (counted without class images, which only lengthen an epoch)."""
    if args.max_train_steps is None:
        return args.num_train_epochs
    groups = defaultdict(int)
    for example in examples:
        groups[nearest_bucket(example.image.size, buckets)] += 1
    batches = sum(math.ceil(size / args.train_batch_size) for size in groups.values())
    steps_per_epoch = max(1, batches // num_processes // args.gradient_accumulation_steps)
    return math.ceil(args.max_train_steps / steps_per_epoch)


def training_captions(args: argparse.Namespace, examples: Sequence[Example], buckets, num_processes: int) -> set[str]:
    """Every caption the run trains with, to embed once before the text encoders are freed.

    With --shuffle_caption each epoch reorders the tags, so a caption of n shuffled tags can become n! strings:
    more than --max_cached_captions stops here, in one line, before anything loads.
    """
    if not (args.shuffle_caption or args.caption_dropout_rate):
        return {example.prompt for example in examples}
    epochs = planned_epochs(args, examples, buckets, num_processes)
    captions = {
        training_caption(args, example.prompt, epoch, index)
        for epoch in range(epochs)
        for index, example in enumerate(examples)
    }
    if args.shuffle_caption and len(captions) > args.max_cached_captions:
        orderings = max(caption_orderings(example.prompt, args.keep_tokens) for example in examples)
        raise UsageError(
            f"--shuffle_caption makes {len(captions)} distinct captions over {epochs} epochs (up to {orderings} "
            f"orders of one caption's tags), more than --max_cached_captions {args.max_cached_captions}, each embedded "
            "and kept in memory: raise --keep_tokens, train fewer epochs, or raise --max_cached_captions"
        )
    return captions | ({""} if args.caption_dropout_rate else set())


# ----------------------------------------------------------------------------------------------------------------
# Models and prompts
# ----------------------------------------------------------------------------------------------------------------


def pretrained_kwargs(args: argparse.Namespace) -> dict:
    return {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}


def check_model(args: argparse.Namespace, offload_plugin) -> None:
    """The model fails in one line before anything is loaded or written: missing, not a Flux pipeline, without a
    transformer, or with --lora_layers or offload block_names that name none of its modules.

    Reads model_index.json and the transformer's config, and builds the transformer on the meta device (no memory).
    """
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

    from accelerate_offload import BlocksNotFoundError, find_blocks

    model = args.pretrained_model_name_or_path
    try:
        index = DiffusionPipeline.load_config(model, revision=args.revision, cache_dir=args.cache_dir)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(
            f"cannot load --pretrained_model_name_or_path {model} ({reason}); give a "
            "local pipeline folder or a Hub id (gated models need `hf auth login`)"
        ) from None
    family = index.get("_class_name", "")
    if not family.startswith("Flux"):
        other = " (train it with train_sd3_dreambooth_lora.py)" if family.startswith("StableDiffusion3") else ""
        raise UsageError(f"{model} is a {family or 'pipeline of unknown class'}, not a FLUX.1 pipeline{other}")
    try:
        config = FluxTransformer2DModel.load_config(
            model, subfolder="transformer", revision=args.revision, cache_dir=args.cache_dir
        )
    except (OSError, ValueError):
        raise UsageError(
            f"{model} has no transformer/ folder with a config.json; give a complete FLUX.1 pipeline"
        ) from None
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(config)
    names = [name for name, _ in transformer.named_modules()]
    for target in lora_targets(args):
        if not any(name == target or name.endswith(f".{target}") for name in names):
            raise UsageError(
                f"--lora_layers {target}: the transformer has no such module; use names like attn.to_q, ff.net.2"
            )
    if offload_plugin.enabled:
        try:
            find_blocks(transformer, offload_plugin.block_names)
        except BlocksNotFoundError as error:
            raise UsageError(f"offload settings: {error}") from None


@dataclass
class PromptEmbeddings:
    """T5 sequence and CLIP pooled embeddings of one prompt, kept on the CPU while training."""

    sequence: torch.Tensor
    pooled: torch.Tensor


def encode_prompts(
    args: argparse.Namespace, prompts: Sequence[str], device: torch.device, dtype: torch.dtype, offload_plugin
) -> dict[str, PromptEmbeddings]:
    """Encodes every prompt once with both text encoders, then frees them (they never stay on the GPU).

    When the launch config streams blocks on a GPU, T5-XXL (9.5 GB in bf16) streams too, block by block.
    """
    from diffusers import FluxPipeline

    from accelerate_offload.inference import place_pipeline

    text_pipeline = FluxPipeline.from_pretrained(
        args.pretrained_model_name_or_path, transformer=None, vae=None, dtype=dtype, **pretrained_kwargs(args)
    )
    place_pipeline(text_pipeline, device, offload_plugin)
    unique = sorted(set(prompts))
    cache = {}
    with torch.no_grad():
        for start in range(0, len(unique), TEXT_ENCODING_BATCH):
            batch = unique[start : start + TEXT_ENCODING_BATCH]
            sequence, pooled, _ = text_pipeline.encode_prompt(
                batch, prompt_2=None, device=device, max_sequence_length=args.max_sequence_length
            )
            for prompt, one_sequence, one_pooled in zip(batch, sequence.cpu(), pooled.cpu()):
                cache[prompt] = PromptEmbeddings(one_sequence, one_pooled)
    del text_pipeline  # freed, pinned buffers and all, as the prompts phase ends
    logger.info("Encoded %d prompts; text encoders freed", len(cache))
    return cache


def stack_embeddings(
    cache: dict[str, PromptEmbeddings], prompts: Sequence[str], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One embedding per image (instance and class alike), so prior preservation works at any batch size."""
    sequence = torch.stack([cache[prompt].sequence for prompt in prompts]).to(device, dtype)
    pooled = torch.stack([cache[prompt].pooled for prompt in prompts]).to(device, dtype)
    return sequence, pooled


def load_vae(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", dtype=dtype, **pretrained_kwargs(args)
    )
    vae.requires_grad_(False)
    vae.enable_tiling()  # only images larger than the VAE's tile size are split: large buckets fit in memory
    return vae.to(device)


def load_transformer_with_lora(args: argparse.Namespace, dtype: torch.dtype):
    """The frozen transformer in `dtype` on the CPU, with a fresh fp32 adapter (--adapter)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.training_utils import cast_training_params

    transformer = FluxTransformer2DModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="transformer", dtype=dtype, **pretrained_kwargs(args)
    )
    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(new_adapter_config(args))
    except ValueError as error:
        raise UsageError(f"--lora_layers {args.lora_layers}: {error}") from None
    check_kohya_names(args, transformer)
    cast_training_params(transformer, dtype=torch.float32)
    return transformer


def inference_pipeline(args: argparse.Namespace, dtype: torch.dtype, **components):
    """A FluxPipeline without text encoders: prompts go in as the cached embeddings."""
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        dtype=dtype,
        **components,
        **pretrained_kwargs(args),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(
    pipeline,
    embeddings: PromptEmbeddings,
    count: int,
    size: int,
    seed: int | None,
    device: torch.device,
    dtype,
    max_vram: str | None = None,
    num_inference_steps: int = 28,
) -> list[Image.Image]:
    """`count` images, one per call; the VAE decodes whole, per image or in tiles, as the GPU budget allows."""
    from accelerate_offload.inference import plan_vae_passes

    plan_vae_passes(pipeline.vae, device, max_vram)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    sequence, pooled = embeddings.sequence[None].to(device, dtype), embeddings.pooled[None].to(device, dtype)
    # autocast as in training: the fp32 LoRA makes fp32 latents that a bf16/fp16 VAE would refuse
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        return [
            pipeline(
                prompt_embeds=sequence,
                pooled_prompt_embeds=pooled,
                height=size,
                width=size,
                num_inference_steps=num_inference_steps,
                generator=generator,
            ).images[0]
            for _ in range(count)
        ]


def class_image_paths(args: argparse.Namespace) -> list[Path]:
    folder = Path(args.class_data_dir)
    return list_images(folder)[: args.num_class_images] if folder.is_dir() else []


def generate_class_images(
    args: argparse.Namespace, embeddings: PromptEmbeddings, offload_plugin, accelerator, dtype: torch.dtype
) -> None:
    """Fills --class_data_dir up to --num_class_images with images of --class_prompt from the base model."""
    from accelerate_offload.inference import place_pipeline

    missing = args.num_class_images - len(class_image_paths(args))
    if missing <= 0 or not accelerator.is_main_process:
        return
    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("Generating %d class images of '%s' into %s", missing, args.class_prompt, folder)
    pipeline = place_pipeline(inference_pipeline(args, dtype), accelerator.device, offload_plugin)
    start = len(list_images(folder))
    for offset in range(0, missing, args.sample_batch_size):
        count = min(args.sample_batch_size, missing - offset)
        seed = None if args.seed is None else args.seed + offset
        for number, image in enumerate(
            generate(
                pipeline, embeddings, count, args.resolution, seed, accelerator.device, dtype, offload_plugin.max_vram,
                args.num_inference_steps,
            )
        ):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
            image.save(folder / f"{start + offset + number:05d}-{digest}.png")
    del pipeline  # freed, pinned buffers and all, as the class-images phase ends


def batch_latent_distribution(batch: dict, latent_cache: LatentCache | None, vae) -> LatentDistribution:
    """The batch's VAE posterior: cached before training, or encoded now."""
    if latent_cache is None:
        return encode_latent_distribution(vae, batch["pixels"])
    return latent_cache.distribution(batch["indices"])


def batch_masks(batch: dict, latent_cache: LatentCache | None) -> torch.Tensor | None:
    """The batch's pixel masks (class images all ones): cached with the latents when they are."""
    return batch.get("masks") if latent_cache is None else latent_cache.batch_masks(batch)


# ----------------------------------------------------------------------------------------------------------------
# Flow matching
# ----------------------------------------------------------------------------------------------------------------


def sample_timesteps(
    args: argparse.Namespace, noise_scheduler, batch_size: int, image_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps and noise levels of one batch, from --timestep_sampling (the global RNG, as the noise)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if args.timestep_sampling == "sigma":
        density = compute_density_for_timestep_sampling(
            weighting_scheme=args.weighting_scheme,
            batch_size=batch_size,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            mode_scale=args.mode_scale,
        )
        indices = (density * noise_scheduler.config.num_train_timesteps).long()
        return noise_scheduler.timesteps[indices], noise_scheduler.sigmas[indices]
    sigmas = sample_shifted_sigmas(
        args.timestep_sampling, batch_size, image_seq_len, noise_scheduler.config, args.discrete_flow_shift,
        args.logit_mean, args.logit_std,
    )  # fmt: skip
    return sigmas * noise_scheduler.config.num_train_timesteps, sigmas


@dataclass
class LatentSpace:
    """What it takes to go from VAE latents to the transformer's packed tokens and back."""

    shift_factor: float
    scaling_factor: float
    vae_scale_factor: int

    @classmethod
    def from_vae(cls, vae) -> LatentSpace:
        return cls(vae.config.shift_factor, vae.config.scaling_factor, 2 ** (len(vae.config.block_out_channels) - 1))


def predict_velocity(
    transformer,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    guidance: torch.Tensor | None,
    embeddings: tuple[torch.Tensor, torch.Tensor],
    latent_space: LatentSpace,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The transformer's prediction for latents `noisy` (B x C x h x w) at `timesteps` in [0, 1], unpacked to them."""
    from diffusers import FluxPipeline

    batch_size, channels, height, width = noisy.shape
    device = noisy.device
    prediction = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy, batch_size, channels, height, width),
        timestep=timesteps,
        guidance=guidance,
        pooled_projections=embeddings[1],
        encoder_hidden_states=embeddings[0],
        txt_ids=torch.zeros(embeddings[0].shape[1], 3, device=device, dtype=dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, device, dtype),
        return_dict=False,
    )[0]
    scale = latent_space.vae_scale_factor
    return FluxPipeline._unpack_latents(prediction, height * scale, width * scale, scale)


def flow_matching_loss(
    args: argparse.Namespace,
    transformer,
    noise_scheduler,
    latent_space: LatentSpace,
    latent_distribution: tuple[torch.Tensor, torch.Tensor],
    embeddings: tuple[torch.Tensor, torch.Tensor],
    guidance_embeds: bool,
    dtype: torch.dtype,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified-flow loss of one batch, as in diffusers' Flux trainers (plus the prior loss when asked).

    With `masks` (pixel masks, B x 1 x H x W) each latent pixel's error is weighted by its share of masked-in pixels.
    """
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    device = embeddings[0].device
    mean, std = (part.to(device) for part in latent_distribution)
    latents = sample_latents((mean, std))
    latents = ((latents - latent_space.shift_factor) * latent_space.scaling_factor).to(device, dtype)
    batch_size, _, height, width = latents.shape
    noise = torch.randn_like(latents)
    timesteps, sigmas = sample_timesteps(args, noise_scheduler, batch_size, (height // 2) * (width // 2))
    timesteps, sigmas = timesteps.to(device), sigmas.to(device, dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    guidance = torch.full((batch_size,), args.guidance_scale, device=device) if guidance_embeds else None
    timesteps = timesteps / noise_scheduler.config.num_train_timesteps
    prediction = predict_velocity(transformer, noisy, timesteps, guidance, embeddings, latent_space, dtype)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas).float()
    squared_error = weighting * (prediction.float() - (noise - latents).float()) ** 2
    if masks is None:
        per_image = squared_error.reshape(batch_size, -1).mean(dim=1)
    else:
        per_image = masked_mean(squared_error, mask_to_latent_grid(masks.to(device), latent_space.vae_scale_factor))
    if not args.with_prior_preservation:
        return per_image.mean()
    instance_loss, prior_loss = per_image.chunk(2)
    return instance_loss.mean() + args.prior_loss_weight * prior_loss.mean()


def encode_validation_latents(
    args: argparse.Namespace, vae, examples: Sequence[Example], buckets, latent_space: LatentSpace
) -> list[tuple[torch.Tensor, str]]:
    """Each held-out image, center-cropped to its bucket, as scaled latents (the posterior mean) with its prompt."""
    dataset = DreamBoothDataset(list(examples), buckets, center_crop=True)
    encoded = []
    for index, example in enumerate(examples):
        mean, _ = encode_latent_distribution(vae, dataset[index]["pixels"][None])
        encoded.append((((mean - latent_space.shift_factor) * latent_space.scaling_factor).cpu(), example.prompt))
    return encoded


def validation_loss(
    args: argparse.Namespace,
    accelerator,
    model,
    latent_space: LatentSpace,
    validation_set: Sequence[tuple[torch.Tensor, str]],
    embeddings: dict[str, PromptEmbeddings],
    guidance_embeds: bool,
    dtype: torch.dtype,
) -> float:
    """Mean flow-matching loss of the held-out images at the package's fixed noise levels and fixed noise
    (`fixed_noise_loss`): only the LoRA changes the number. No gradient; the model streams as in training."""
    device = accelerator.device
    guidance = torch.full((1,), args.guidance_scale, device=device) if guidance_embeds else None

    def loss_at(latents: torch.Tensor, prompt: str, sigma: float, noise: torch.Tensor) -> float:
        latents, noise = latents.to(device, dtype), noise.to(device, dtype)
        prompt_embeddings = stack_embeddings(embeddings, [prompt], device, dtype)
        noisy = (1.0 - sigma) * latents + sigma * noise
        timestep = torch.full((1,), sigma, device=device, dtype=dtype)
        prediction = predict_velocity(model, noisy, timestep, guidance, prompt_embeddings, latent_space, dtype)
        return torch.mean((prediction.float() - (noise - latents).float()) ** 2).item()

    model.eval()
    with torch.no_grad(), accelerator.autocast():
        loss = fixed_noise_loss(validation_set, args.seed or 0, loss_at)
    model.train()
    return loss


# ----------------------------------------------------------------------------------------------------------------
# Optimisation, checkpoints
# ----------------------------------------------------------------------------------------------------------------


def write_lora(model, folder: Path, weight_name: str = LORA_WEIGHT_NAME) -> None:
    """The adapter in diffusers' file layout (`pytorch_lora_weights.safetensors`), as its loader reads it."""
    from diffusers import FluxPipeline

    from accelerate_offload.adapters import write_adapter_file

    write_adapter_file(FluxPipeline, model, folder, weight_name)
    give_default_modes(folder / weight_name)


# ----------------------------------------------------------------------------------------------------------------
# Faults and interruptions
# ----------------------------------------------------------------------------------------------------------------


def check_finite_step(loss: float, grad_norm: float | None, step: int, args: argparse.Namespace) -> None:
    """Stops before the optimizer applies a NaN/inf loss or gradient, so weights and checkpoints stay finite."""
    if step_is_finite(loss, grad_norm):
        return
    raise TrainingFault(
        f"step {step}: the loss is {loss} (gradient norm {grad_norm}); stopped before the optimizer applied it, no "
        f"LoRA written. Lower --learning_rate (now {args.learning_rate:g}); "
        + last_checkpoint_note(Path(args.output_dir))
    )


def check_finite_lora(model, step: int, args: argparse.Namespace) -> None:
    """The LoRA is never saved with NaN/inf values (a huge learning rate can overflow the weights themselves)."""
    if trainable_is_finite(model):
        return
    raise TrainingFault(
        f"step {step}: the LoRA weights are not finite; nothing was saved. Lower --learning_rate (now "
        f"{args.learning_rate:g}); " + last_checkpoint_note(Path(args.output_dir))
    )


def exit_after_signal(accelerator, checkpoint: Path, received: signal.Signals) -> None:
    """Once the checkpoint of the step a signal interrupted is saved: how to resume, then exit 128 + signal number."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    logger.warning(
        "Stopped by %s at step %s; saved %s. To continue, run the same command with --resume_from_checkpoint latest",
        received.name, checkpoint_step(checkpoint), checkpoint,
    )  # fmt: skip
    sys.exit(128 + received)


@contextmanager
def out_of_memory_explained(model, device: torch.device, batch_size: int, resolution: int | str, step: int):
    """Turns an out-of-memory error in a training step into one line with the memory figures and what to change."""
    from accelerate_offload.oom import explain_out_of_memory

    try:
        yield
    except torch.OutOfMemoryError:
        explanation = explain_out_of_memory(model, device, batch_size, resolution)
        raise TrainingFault(f"step {step}: {explanation}") from None


def register_lora_checkpoint_hooks(accelerator, transformer_class: type) -> None:
    """Makes save_state/load_state store only the LoRA (in diffusers format), not the 12B base weights."""
    from diffusers.training_utils import cast_training_params

    from accelerate_offload.adapters import read_adapter_file, set_adapter_state

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if not accelerator.is_main_process:
            return
        for model in models:
            if not isinstance(model, transformer_class):
                raise TypeError(f"unexpected model to save: {model.__class__.__name__}")
            write_lora(model, Path(output_dir))
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            model = models.pop()
            if not isinstance(model, transformer_class):
                raise TypeError(f"unexpected model to load: {model.__class__.__name__}")
            unexpected = set_adapter_state(model, read_adapter_file(Path(input_dir) / LORA_WEIGHT_NAME)[0])
            if unexpected:
                logger.warning("Checkpoint LoRA keys not in the model: %s", unexpected)
            cast_training_params(model, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------------------------------------------
# Adapters (LoRA, DoRA, LoKr, LoHa), file formats, EMA
# ----------------------------------------------------------------------------------------------------------------

ADAPTER_SETTINGS = ("adapter", "use_dora", "lokr_factor", "save_format", "use_ema", "ema_decay")


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    from accelerate_offload.adapters import ADAPTER_TYPES

    adapter = parser.add_argument_group("adapter type, file formats, EMA")
    adapter.add_argument(
        "--adapter", default="lora", choices=ADAPTER_TYPES, help="PEFT adapter type (--rank and --lora_alpha apply)."
    )
    adapter.add_argument("--use_dora", action="store_true", help="DoRA: a LoRA with a trained magnitude per output.")
    adapter.add_argument(
        "--lokr_factor", type=int, default=-1, help="LoKr: Kronecker factor of each layer's sizes (-1: near square)."
    )
    adapter.add_argument(
        "--save_format",
        default="diffusers",
        help="Comma list of diffusers (always written) and kohya (also pytorch_lora_weights_kohya.safetensors, "
        "kohya keys for ComfyUI, Forge and sd-scripts).",
    )
    adapter.add_argument(
        "--use_ema", action="store_true", help="Keep an average of the adapter in CPU memory; validate and save it."
    )
    adapter.add_argument("--ema_decay", type=float, default=0.999, help="Decay of the adapter's average.")


def check_adapter_args(args: argparse.Namespace) -> str | None:
    from accelerate_offload.adapters import flag_problem

    return flag_problem(
        args.adapter, args.use_dora, args.save_format, args.lora_dropout, args.lokr_factor, args.ema_decay
    )


def new_adapter_config(args: argparse.Namespace):
    from accelerate_offload.adapters import adapter_config

    return adapter_config(
        args.adapter, args.rank, args.lora_alpha, lora_targets(args), dropout=args.lora_dropout,
        use_dora=args.use_dora, lokr_factor=args.lokr_factor,
    )  # fmt: skip


def check_kohya_names(args: argparse.Namespace, transformer) -> None:
    from accelerate_offload.adapters import save_formats
    from accelerate_offload.lora_formats import kohya_problem

    problem = kohya_problem(transformer, "flux") if "kohya" in save_formats(args.save_format) else None
    if problem:
        raise UsageError(problem)


def make_ema(args: argparse.Namespace, accelerator, model):
    """The adapter's average in CPU memory, saved in every checkpoint (None without --use_ema)."""
    if not args.use_ema:
        return None
    from accelerate_offload.ema import AdapterEMA

    ema = AdapterEMA(model, args.ema_decay)
    accelerator.register_for_checkpointing(ema)
    return ema


def final_weight_name(args: argparse.Namespace) -> str:
    """The file the final images are drawn with: the average's under --use_ema."""
    from accelerate_offload.adapters import ema_weight_name

    return ema_weight_name(LORA_WEIGHT_NAME) if args.use_ema else LORA_WEIGHT_NAME


def save_final_adapter(args: argparse.Namespace, model, output_dir: Path, ema, dtype: torch.dtype) -> None:
    from diffusers import FluxPipeline

    saved_dtype = torch.float32 if args.upcast_before_saving else dtype
    save_adapter_files(FluxPipeline, "flux", model, output_dir, args.save_format, ema, saved_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Validation, logging, model card
# ----------------------------------------------------------------------------------------------------------------


def log_images(accelerator, images: list[Image.Image], phase: str, prompt: str, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(phase, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {phase: [wandb.Image(image, caption=f"{i}: {prompt}") for i, image in enumerate(images)]}, step=step
            )


def save_images(images: list[Image.Image], folder: Path, stem: str) -> list[Path]:
    """Each image as <stem>-<i>.png plus a <stem>-grid.png contact sheet."""
    from diffusers.utils import make_image_grid

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, image in enumerate(images):
        paths.append(folder / f"{stem}-{number}.png")
        image.save(paths[-1])
    columns = math.ceil(math.sqrt(len(images)))
    grid = images + [Image.new("RGB", images[0].size)] * (columns * math.ceil(len(images) / columns) - len(images))
    make_image_grid(grid, rows=len(grid) // columns, cols=columns).save(folder / f"{stem}-grid.png")
    return paths


def run_validation(
    args: argparse.Namespace,
    accelerator,
    transformer,
    vae,
    embeddings: PromptEmbeddings,
    step: int,
    dtype,
    max_vram: str | None = None,
) -> None:
    """Images of --validation_prompt from the LoRA being trained: saved as PNGs and sent to the trackers."""
    from accelerate_offload.inference import place_pipeline

    logger.info("Validation at step %d: %d images of '%s'", step, args.num_validation_images, args.validation_prompt)
    model = accelerator.unwrap_model(transformer)
    vae_device = vae.device
    model.eval()
    pipeline = place_pipeline(inference_pipeline(args, dtype, transformer=model, vae=vae), accelerator.device)
    images = generate(
        pipeline, embeddings, args.num_validation_images, args.resolution, args.seed, accelerator.device, dtype,
        max_vram, args.num_inference_steps,
    )
    model.train()
    vae.to(vae_device)
    save_images(images, Path(args.output_dir) / "validation", f"step-{step:06d}")
    log_images(accelerator, images, "validation", args.validation_prompt, step)


def final_inference(
    args: argparse.Namespace,
    accelerator,
    offload_plugin,
    model,
    vae,
    embeddings: PromptEmbeddings,
    prompt: str,
    dtype,
    step: int,
) -> list[Path]:
    """Writes images with the saved LoRA file, loaded by the pipeline's `load_lora_weights` as a user would, onto
    the transformer that trained (its adapter swapped for the file's): no second copy of the base weights."""
    from accelerate_offload.inference import load_lora_file, place_pipeline

    pipeline = inference_pipeline(args, dtype, transformer=model, vae=vae or load_vae(args, accelerator.device, dtype))
    load_lora_file(pipeline, args.output_dir, final_weight_name(args), accelerator.device)
    model.eval()
    place_pipeline(pipeline, accelerator.device, offload_plugin)
    count = max(1, args.num_validation_images)
    images = generate(
        pipeline, embeddings, count, args.resolution, args.seed, accelerator.device, dtype, offload_plugin.max_vram,
        args.num_inference_steps,
    )
    log_images(accelerator, images, "test", prompt, step)
    return save_images(images, Path(args.output_dir), "final")


def peak_vram_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def tracker_config(args: argparse.Namespace) -> dict:
    """The run's settings as trackers accept them (scalars and strings only)."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
    }


TRAINING_SETTINGS = (
    "resolution", "aspect_ratio_buckets", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
    "learning_rate", "lr_scheduler", "optimizer", "rank", "lora_alpha", "lora_layers", "mixed_precision",
    "weighting_scheme", "guidance_scale", "with_prior_preservation", "seed",
    "timestep_sampling", "caption_dropout_rate", "shuffle_caption", "keep_tokens", "mask_data_dir", "mask_column",
    "validation_loss_images",
)  # fmt: skip


def write_model_card(args: argparse.Namespace, repo_id: str, images: list[Path], prompt: str | None) -> None:
    """README.md with the Hub metadata (base model, tags, widget) and how the LoRA was trained and is used."""
    from huggingface_hub import ModelCard, ModelCardData

    from accelerate_offload.adapters import formats_note, save_formats, usage_snippet

    base = args.pretrained_model_name_or_path
    is_hub_model = not Path(base).exists()
    card_data = ModelCardData(
        license="other",
        library_name="diffusers",
        base_model=base if is_hub_model else None,
        instance_prompt=args.instance_prompt,
        tags=[
            "text-to-image",
            "diffusers-training",
            "diffusers",
            "lora",
            "flux",
            "flux-diffusers",
            "template:sd-lora",
        ],
        widget=[{"text": prompt or "", "output": {"url": path.name}} for path in images],
    )
    names = (*TRAINING_SETTINGS, *ADAPTER_SETTINGS)
    shown = {**vars(args), "optimizer": chosen_optimizer(args)}  # --use_8bit_adam shows as adamw8bit
    settings = "\n".join(f"| `{name}` | `{shown[name]}` |" for name in names)
    trigger = (
        f"Use `{args.instance_prompt}` in the prompt to trigger it." if args.instance_prompt else "No trigger words."
    )
    usage_prompt = (prompt or "").replace("'", "\\'")
    adapter_name = args.adapter.upper() + (" with DoRA" if args.use_dora else "")
    body = f"""
# Flux LoRA - {repo_id}

<Gallery />

## Model description

LoRA weights for {f"[{base}](https://huggingface.co/{base})" if is_hub_model else f"the local model `{base}`"},
trained with `train_flux_lora.py` from accelerate-offload (flow matching, adapter: {adapter_name}).

## Trigger words

{trigger}

## Training curves

`loss.png` draws the training loss of every step and, with `--validation_loss_images`, the loss of held-out images
at fixed timesteps and noise (`validation_loss` in `metrics.jsonl`), comparable between runs of the same seed.

## Use it with diffusers

{formats_note(args.adapter, save_formats(args.save_format), args.use_ema, LORA_WEIGHT_NAME)}

```py
{usage_snippet(args.adapter, "FluxPipeline", base, repo_id, LORA_WEIGHT_NAME)}
image = pipeline('{usage_prompt}').images[0]
```

## Training settings

| setting | value |
|---|---|
{settings}

## License

Follow the license of the base model {base}.
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    card.save(Path(args.output_dir) / "README.md")


def hub_errors() -> tuple[type[Exception], ...]:
    """What a failed Hub call raises: HTTP errors (bad token, server error), no connection, offline mode."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    return HfHubHTTPError, httpx.HTTPError, OSError, ValueError


def hub_error_reason(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


UPLOAD_EXCLUDES = (f"{CHECKPOINT_PREFIX}*", f"{CHECKPOINT_PREFIX}*/**", f"*{PARTIAL_SUFFIX}", f"*{PARTIAL_SUFFIX}/**")


def push_to_hub(args: argparse.Namespace, repo_id: str) -> None:
    """Uploads the output folder without the checkpoints; a failed upload keeps every file and says how to retry it."""
    from huggingface_hub import upload_folder

    try:
        upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            commit_message="End of training",
            ignore_patterns=list(UPLOAD_EXCLUDES),
            token=args.hub_token,
        )
    except hub_errors() as error:
        excludes = " ".join(f"--exclude '{pattern}'" for pattern in UPLOAD_EXCLUDES[::2])
        raise TrainingFault(
            f"the upload to {repo_id} failed ({hub_error_reason(error)}); the LoRA, model card and images are kept in "
            f"{args.output_dir}. Upload them alone, without training again: hf upload {repo_id} {args.output_dir} "
            f"{excludes} --commit-message 'End of training'"
        ) from None
    logger.info("Uploaded %s to %s", args.output_dir, repo_id)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    output_dir = Path(args.output_dir)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def setup_logging(accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.ERROR)


class ShortTruncationWarnings(logging.Filter):
    """diffusers' warning for a prompt longer than the text encoders take quotes all that was cut; the first words
    and a count are enough to find the prompt."""

    def filter(self, record: logging.LogRecord) -> bool:
        head, found, dropped = record.getMessage().partition(" tokens: ")
        if found and "was truncated" in head:
            words = dropped.strip("[]'\"").split()  # the dropped text arrives as a list's repr, one per prompt
            shown = " ".join(words[:6]) + (" ..." if len(words) > 6 else "")
            record.msg, record.args = f"{head} tokens; dropped {len(words)} words: {shown}", ()
        return True


def quiet_libraries(accelerator) -> None:
    import diffusers
    import transformers
    from diffusers import FluxPipeline

    diffusers.utils.logging.get_logger(FluxPipeline.__module__).addFilter(ShortTruncationWarnings())

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # one progress bar (the steps) keeps the log readable
    diffusers.utils.logging.set_verbosity_warning()
    diffusers.utils.logging.disable_progress_bar()
    if not accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_error()


def make_offload_plugin(args: argparse.Namespace):
    from accelerate_offload import LayerOffloadPlugin, OffloadConfigError

    try:
        # other settings come from the launch config (ACCELERATE_OFFLOAD_* variables)
        return LayerOffloadPlugin(gradient_checkpointing=True if args.gradient_checkpointing else None)
    except OffloadConfigError as error:
        raise UsageError(f"offload settings: {error}") from None


def create_hub_repo(args: argparse.Namespace) -> str:
    """Creates the Hub repository up front, so a bad token or name fails before training, not after."""
    if not args.push_to_hub:
        return args.hub_model_id or Path(args.output_dir).name
    from huggingface_hub import create_repo

    name = args.hub_model_id or Path(args.output_dir).name
    try:
        return create_repo(name, exist_ok=True, token=args.hub_token).repo_id
    except hub_errors() as error:
        raise UsageError(
            f"--push_to_hub: cannot create the Hub repository {name} ({hub_error_reason(error)}); log in with "
            "`hf auth login` or pass a valid --hub_token, or drop --push_to_hub"
        ) from None


def main(args: argparse.Namespace) -> None:
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args)
    setup_logging(accelerator)
    if args.seed is not None:
        set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    device, dtype = accelerator.device, weight_dtype_of(accelerator)
    output_dir = Path(args.output_dir)

    # 1. Data first: a broken image fails here, in seconds (before diffusers is imported), and nothing is written.
    examples, validation_examples = load_instance_examples(args)
    offload_plugin = make_offload_plugin(args)
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from accelerate_offload.inference import plan_vae_passes
    from accelerate_offload.phases import STREAM_MORE, JobPhases, kept_outputs

    quiet_libraries(accelerator)
    phases = JobPhases(device, kept=lambda: kept_outputs(output_dir))
    resolution_fix = f"lower --resolution (now {args.resolution})"
    image_fixes = [STREAM_MORE, resolution_fix]
    buckets = training_buckets(args.aspect_ratio_buckets, args.resolution)
    captions = training_captions(args, examples, buckets, accelerator.num_processes)
    check_model(args, offload_plugin)
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"cannot create --output_dir {output_dir} ({error.strerror}); give a folder you can write"
            ) from None
    repo_id = create_hub_repo(args) if accelerator.is_main_process else ""

    # 2. Every prompt is encoded once; the text encoders are freed before the transformer loads.
    final_prompt = args.validation_prompt or args.instance_prompt or examples[0].prompt
    prompts = [*captions, *(example.prompt for example in validation_examples), final_prompt]
    if args.with_prior_preservation:
        prompts.append(args.class_prompt)
    with phases.phase("prompts", ["stream T5: a launch config that streams blocks streams it too"]):
        embeddings = encode_prompts(args, prompts, device, dtype, offload_plugin)

    # 3. Class images for prior preservation, generated by the base model where the folder is short.
    class_images: list[Path] = []
    if args.with_prior_preservation:
        with phases.phase("class images", [*image_fixes, f"lower --sample_batch_size (now {args.sample_batch_size})"]):
            class_dtype = PRECISIONS[args.prior_generation_precision] if args.prior_generation_precision else dtype
            generate_class_images(args, embeddings[args.class_prompt], offload_plugin, accelerator, class_dtype)
        accelerator.wait_for_everyone()
        class_images = [path for path, _ in readable_images(class_image_paths(args), args.strict, "class images")]
    dataset = DreamBoothDataset(
        examples, buckets, class_images, args.class_prompt, args.center_crop, args.random_flip, args.seed or 0,
        caption=partial(training_caption, args) if args.shuffle_caption or args.caption_dropout_rate else None,
    )
    warn_about_small_images(dataset.examples, dataset.buckets)
    batch_sampler = BucketBatchSampler(dataset, args.train_batch_size, args.seed or 0)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed or 0),  # keeps the global RNG for noise only
    )
    logger.info("%d images in buckets %s", len(examples), sorted(set(dataset.buckets)))

    # 4. VAE: latents encoded now (and the VAE moved off the GPU) or at every step.
    vae = load_vae(args, device, dtype)
    plan_vae_passes(vae, device, offload_plugin.max_vram)  # each pass fits what is left of the budget as it starts
    latent_space = LatentSpace.from_vae(vae)
    latent_cache = None
    validation_set = encode_validation_latents(args, vae, validation_examples, buckets, latent_space)
    if args.cache_latents:
        if args.random_flip or not args.center_crop:
            logger.info("--cache_latents: each image keeps the crop and flip it was cached with")
        with phases.phase("latents", [resolution_fix]):
            latent_cache = cache_latents(
                vae, dataset, lambda item: collate([item])["pixels"], accelerator.is_local_main_process
            )
            vae.to("cpu")  # needed again only to decode validation images
            if args.validation_prompt is None:
                del vae
                vae = None

    # 5. The transformer: CPU, cast, LoRA, then the offload runtime places it (streamed blocks stay in CPU memory).
    with phases.phase("load", [STREAM_MORE]):
        transformer = load_transformer_with_lora(args, dtype)
        # Checkpointing goes through the plugin (per block, compatible with streaming), never the model's own.
        transformer = offload_plugin.prepare_model(transformer, device)
    register_lora_checkpoint_hooks(accelerator, type(transformer))
    guidance_embeds = accelerator.unwrap_model(transformer).config.guidance_embeds

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(args, [p for p in transformer.parameters() if p.requires_grad])
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_steps_given = args.max_train_steps is not None
    if not max_steps_given:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    transformer, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, dataloader, lr_scheduler
    )
    ema = make_ema(args, accelerator, accelerator.unwrap_model(transformer))
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    if not max_steps_given:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(args))

    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir
    )

    global_step = 0
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            logger.info("No checkpoint in %s: starting a new run", output_dir)
        else:
            logger.info("Resuming from %s", checkpoint)
            try:
                accelerator.load_state(str(checkpoint))
            except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as error:
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise UsageError(
                    f"cannot resume from {checkpoint} ({type(error).__name__}: {reason}); pass an earlier checkpoint-N "
                    "to --resume_from_checkpoint"
                ) from None
            global_step = checkpoint_step(checkpoint)
    if accelerator.is_main_process:
        remove_unfinished_checkpoints(output_dir)
    first_epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        "Training: %d examples, %d batches/epoch, %d epochs, batch %d (total %d), %d steps, offloading %s",
        len(dataset), len(dataloader), args.num_train_epochs, args.train_batch_size, total_batch,
        args.max_train_steps, "on" if offload_plugin.enabled else "off",
    )  # fmt: skip
    metrics = MetricsLog(output_dir / METRICS_FILE, accelerator.is_main_process)
    try:
        metrics.drop_after(global_step)  # steps a stopped run logged after its last checkpoint are trained again
    except MetricsFileError as error:
        raise UsageError(str(error)) from None
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    model = accelerator.unwrap_model(transformer)
    stop, stopped_by = StopSignals(), None
    step_started = time.perf_counter()
    step_indices: list[int] = []
    try:
        for epoch in range(first_epoch, args.num_train_epochs):
            if global_step >= args.max_train_steps:  # resumed from the last step's checkpoint
                break
            transformer.train()
            batch_sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            dataloader.set_epoch(epoch)
            batches = dataloader
            if epoch == first_epoch and steps_into_epoch:
                batches = accelerator.skip_first_batches(
                    dataloader, steps_into_epoch * args.gradient_accumulation_steps
                )
            for batch in batches:
                step_indices += batch["indices"]
                with (
                    phases.phase(f"step {global_step + 1}", step=True),
                    out_of_memory_explained(model, device, args.train_batch_size, args.resolution, global_step + 1),
                    accelerator.accumulate(transformer),
                ):
                    loss = flow_matching_loss(
                        args,
                        transformer,
                        noise_scheduler,
                        latent_space,
                        batch_latent_distribution(batch, latent_cache, vae),
                        stack_embeddings(embeddings, batch["prompts"], device, dtype),
                        guidance_embeds,
                        dtype,
                        batch_masks(batch, latent_cache),
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
                        # under fp16 the loss scaler skips steps with inf gradients itself
                        norm = None if grad_norm is None or accelerator.scaler is not None else float(grad_norm)
                        check_finite_step(loss.item(), norm, global_step + 1, args)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                if ema is not None:
                    ema.step(model)
                now = time.perf_counter()
                record = {
                    "step": global_step,
                    "epoch": epoch,
                    "loss": loss.detach().item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "seconds_per_step": now - step_started,
                    "size": list(batch["pixels"].shape[-2:]),
                    "indices": step_indices,
                }
                step_indices = []
                postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
                postfix["s/step"] = f"{record['seconds_per_step']:.2f}"
                peak = peak_vram_gb(device)
                if peak is not None:
                    record["peak_vram_gb"] = peak
                    postfix["peak_vram"] = f"{peak:.1f}GB"
                progress.update(1)
                progress.set_postfix(**postfix)
                logged = ("loss", "lr", "seconds_per_step")
                due = validation_loss_due(global_step, args.max_train_steps, args.validation_steps)
                if validation_set and accelerator.is_main_process and due:
                    with phases.phase("validation loss", [STREAM_MORE]):
                        record["validation_loss"] = validation_loss(
                            args, accelerator, model, latent_space, validation_set, embeddings, guidance_embeds, dtype
                        )
                    logged += ("validation_loss",)
                accelerator.log({key: record[key] for key in logged}, step=global_step)
                metrics.write(record)
                if global_step % args.checkpointing_steps == 0:
                    with phases.phase("save"):
                        check_finite_lora(model, global_step, args)
                        save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                if (
                    accelerator.is_main_process
                    and args.validation_prompt
                    and args.num_validation_images
                    and args.validation_steps
                    and global_step % args.validation_steps == 0
                ):
                    with phases.phase("validation", image_fixes), ema_weights(ema, model):
                        run_validation(
                            args, accelerator, transformer, vae, embeddings[args.validation_prompt], global_step,
                            dtype, offload_plugin.max_vram,
                        )
                if stop.requested(accelerator):
                    stopped_by = stop.received or signal.SIGTERM  # a process that got none stops with the others
                    if global_step % args.checkpointing_steps:
                        check_finite_lora(model, global_step, args)
                        save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                    break
                step_started = time.perf_counter()  # checkpoints and validation do not count as step time
                if global_step >= args.max_train_steps:
                    break
            if stopped_by:
                break
            if (
                accelerator.is_main_process
                and args.validation_prompt
                and args.num_validation_images
                and epoch % args.validation_epochs == 0
            ):
                with phases.phase("validation", image_fixes), ema_weights(ema, model):
                    run_validation(
                        args, accelerator, transformer, vae, embeddings[args.validation_prompt], global_step, dtype,
                        offload_plugin.max_vram,
                    )
                step_started = time.perf_counter()
    finally:  # the progress bar ends before any error line; Ctrl-C stops at once from here on
        stop.restore()
        progress.close()
    if stopped_by:
        exit_after_signal(accelerator, output_dir / f"{CHECKPOINT_PREFIX}{global_step}", stopped_by)

    # 6. The LoRA in diffusers format, then a fresh pipeline loads it, a model card, and the upload.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        check_finite_lora(model, global_step, args)
        with phases.phase("save"):
            save_final_adapter(args, model, output_dir, ema, dtype)
        logger.info("Saved the LoRA to %s", output_dir / LORA_WEIGHT_NAME)
        del transformer, optimizer, lr_scheduler  # the trained model draws the final images with the saved file
        accelerator.free_memory()
        with phases.phase("final images", image_fixes):
            images = final_inference(
                args, accelerator, offload_plugin, model, vae, embeddings[final_prompt], final_prompt, dtype,
                global_step,
            )
        write_model_card(args, repo_id, images, final_prompt)
        if metrics.path.exists():
            plot_losses(metrics.records(), output_dir / LOSS_PLOT, f"{TRACKER_PROJECT}: {output_dir.name}")
        if args.push_to_hub:
            push_to_hub(args, repo_id)
    accelerator.end_training()


def remove_if_left_empty(folder: Path) -> None:
    """A run that stopped before writing a file leaves no folder behind (called only for a folder it created)."""
    if folder.is_dir() and not any(path.is_file() for path in folder.rglob("*")):
        shutil.rmtree(folder)


if __name__ == "__main__":
    from accelerate_offload.quiet import quiet_third_party_noise

    quiet_third_party_noise()  # before any library loads: some log notes as they import that say nothing of a run
    arguments = parse_args()
    created_output_dir = not Path(arguments.output_dir).exists()
    try:
        main(arguments)
    except ScriptError as error:
        error.exit()
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one: no checkpoint was written now
        print("Interrupted; nothing was saved by this run (earlier checkpoints are kept)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        if created_output_dir and os.environ.get("RANK", "0") == "0":
            remove_if_left_empty(Path(arguments.output_dir))
