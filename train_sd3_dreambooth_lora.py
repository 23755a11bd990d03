#!/usr/bin/env python
"""Step two of the two-step SD3 DreamBooth LoRA flow: train a LoRA from images and precomputed prompt embeddings.

The prompt embeddings come from the Parquet file that `compute_embeddings.py` writes, so no text encoder is ever
loaded here: the GPU holds the transformer (optionally streamed block by block from pinned CPU memory by
accelerate-offload's `LayerOffloadPlugin`) and the VAE. Per-image captions and prior preservation are supported;
validation images are rendered from precomputed validation embeddings.

    accelerate launch train_sd3_dreambooth_lora.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3-medium-diffusers \
        --embeddings_path sd3_embeddings.parquet --instance_data_dir dog --instance_prompt "a photo of sks dog" \
        --mixed_precision bf16 --gradient_checkpointing --use_8bit_adam --output_dir sd3-dog-lora
"""

import argparse
import copy
import hashlib
import io
import itertools
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from accelerate_offload.quiet import quiet_third_party_noise  # isort: skip

# Before the libraries below load: some log notes as they import that say nothing about this run.
quiet_third_party_noise()

import diffusers
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.configuration_utils import FrozenDict
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from diffusers.utils.torch_utils import is_compiled_module
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from huggingface_hub.errors import HfHubHTTPError
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from accelerate_offload import LayerOffloadPlugin, OffloadConfigError
from accelerate_offload.adapters import (
    ADAPTER_TYPES,
    adapter_checkpoint_problem,
    adapter_config,
    ema_weight_name,
    flag_problem,
    formats_note,
    read_adapter_file,
    save_formats,
    set_adapter_state,
    usage_snippet,
    write_adapter_file,
)
from accelerate_offload.buckets import (
    BucketBatchSampler,
    bucket_spec_problem,
    fit_to_bucket,
    nearest_bucket,
    training_buckets,
)
from accelerate_offload.ema import AdapterEMA, ema_weights
from accelerate_offload.inference import load_lora_file, place_pipeline, plan_vae_passes
from accelerate_offload.lora_formats import kohya_problem
from accelerate_offload.loss_plot import plot_losses
from accelerate_offload.oom import explain_out_of_memory
from accelerate_offload.optimizers import (
    add_optimizer_args,
    build_optimizer,
    chosen_optimizer,
    optimizer_checkpoint_problem,
    optimizer_problem,
)
from accelerate_offload.phases import STREAM_MORE, JobPhases, kept_outputs
from accelerate_offload.script_errors import ScriptError, TrainingFault, UsageError
from accelerate_offload.training_math import (
    TIMESTEP_SAMPLING,
    fixed_noise_loss,
    held_out_indices,
    mask_to_latent_grid,
    masked_mean,
    sample_shifted_sigmas,
    validation_share,
)
from accelerate_offload.training_utils import (
    LatentCache,
    MetricsFileError,
    MetricsLog,
    StopSignals,
    any_process,
    cache_latents,
    checkpoint_step,
    give_default_modes,
    last_checkpoint_note,
    output_dir_problem,
    remove_unfinished_checkpoints,
    resolve_checkpoint,
    sample_latents,
    save_adapter_files,
    save_checkpoint,
    validation_loss_due,
)

logger = get_logger(__name__)

# Written by compute_embeddings.py; both scripts stand alone, so the format is spelled out in each.
EMBEDDINGS_FORMAT = "sd3-prompt-embeddings"
EMBEDDINGS_VERSION = 1
EMBEDDINGS_METADATA_KEY = b"sd3_prompt_embeddings"
EMBEDDINGS_COLUMNS = (
    "role",
    "prompt",
    "image_keys",
    "prompt_embeds",
    "prompt_embeds_shape",
    "pooled_prompt_embeds",
    "pooled_prompt_embeds_shape",
)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# In every checkpoint: the seed a run drew without --seed, so that a resumed run draws the same numbers.
TRAINING_STATE = "training_state.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"  # the run's summary plot: training loss, and validation loss where measured
DEFAULT_LORA_LAYERS = (
    "attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,attn.to_out.0,attn.to_q,attn.to_v"
)


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


class ArgumentParser(argparse.ArgumentParser):
    """A bad argument is one line and a pointer to --help, not the whole usage text before it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# What a failed Hub call raises: HTTP errors (bad token, server error), no connection, offline mode.
HUB_ERRORS = (HfHubHTTPError, httpx.HTTPError, OSError, ValueError)


def hub_error_reason(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="SD3 DreamBooth LoRA training from precomputed prompt embeddings.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Path to pretrained model or model identifier from huggingface.co/models.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    parser.add_argument(
        "--embeddings_path",
        type=str,
        default="sd3_embeddings.parquet",
        help="The Parquet file of prompt embeddings written by compute_embeddings.py.",
    )
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A `datasets` dataset (hub id or local folder) of instance images, instead of --instance_data_dir.",
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The config of the dataset.")
    parser.add_argument(
        "--instance_data_dir",
        type=str,
        default=None,
        help="A folder of instance images; each finds its caption (or the instance prompt) in the embeddings file.",
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    parser.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    parser.add_argument("--repeats", type=int, default=1, help="How many times to repeat the training data.")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="Stop at the first image that cannot be read or decoded, instead of skipping (and counting) it.",
    )
    parser.add_argument(
        "--class_data_dir", type=str, default=None, help="A folder containing the training data of class images."
    )
    parser.add_argument(
        "--instance_prompt",
        type=str,
        required=True,
        help="The prompt with identifier specifying the instance, e.g. 'photo of a TOK dog', 'in the style of TOK'",
    )
    parser.add_argument(
        "--class_prompt",
        type=str,
        default=None,
        help="The prompt to specify images in the same class as provided instance images.",
    )
    parser.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        help="A prompt that is used during validation to verify that the model is learning (must be embedded).",
    )
    parser.add_argument(
        "--num_validation_images",
        type=int,
        default=4,
        help="Number of images that should be generated during validation with `validation_prompt`.",
    )
    parser.add_argument(
        "--validation_epochs",
        type=int,
        default=50,
        help="Run validation every X epochs, generating `num_validation_images` images with `validation_prompt`.",
    )
    parser.add_argument("--rank", type=int, default=4, help="The dimension of the LoRA update matrices.")
    parser.add_argument(
        "--lora_alpha", type=int, default=None, help="LoRA scaling numerator (scale = alpha / rank); defaults to rank."
    )
    parser.add_argument(
        "--lora_layers",
        type=str,
        default=DEFAULT_LORA_LAYERS,
        help="Comma-separated names of the transformer modules that get LoRA layers.",
    )
    parser.add_argument(
        "--lora_blocks",
        type=str,
        default=None,
        help="Comma-separated indices of the transformer blocks whose --lora_layers get LoRA layers, e.g. '12,30' "
        "(default: every block).",
    )
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout inside the LoRA layers.")
    parser.add_argument("--with_prior_preservation", action="store_true", help="Flag to add prior preservation loss.")
    parser.add_argument("--prior_loss_weight", type=float, default=1.0, help="The weight of prior preservation loss.")
    parser.add_argument(
        "--num_class_images",
        type=int,
        default=100,
        help=(
            "Minimal class images for prior preservation loss. If class_data_dir has fewer, the rest are generated"
            " from the precomputed class prompt embeddings."
        ),
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default="sd3-dreambooth-lora",
        help="The output directory where the model predictions and checkpoints will be written.",
    )
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="The resolution for input images; all images are resized (then cropped) to it. A multiple of 16.",
    )
    parser.add_argument(
        "--aspect_ratio_buckets",
        default=None,
        help="'auto' for buckets of about resolution^2 pixels over common aspect ratios, or 'H,W;H,W;...'. Each "
        "image trains at its nearest bucket; batches never mix buckets. Default: square crops.",
    )
    parser.add_argument(
        "--center_crop",
        action="store_true",
        help="Whether to center crop the input images to the resolution. If not set, the images are randomly cropped.",
    )
    parser.add_argument("--random_flip", action="store_true", help="whether to randomly flip images horizontally")
    parser.add_argument(
        "--train_batch_size", type=int, default=4, help="Batch size (per device) for the training dataloader."
    )
    parser.add_argument(
        "--sample_batch_size", type=int, default=4, help="Batch size (per device) for sampling class images."
    )
    parser.add_argument(
        "--num_inference_steps", type=int, default=28, help="Denoising steps of class, validation and final images."
    )
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total number of training steps to perform.  If provided, overrides num_train_epochs.",
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a checkpoint of the training state every X updates, to resume with `--resume_from_checkpoint`.",
    )
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to store.")
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint saved by `--checkpointing_steps`, or `"latest"` for the last one.',
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Number of updates steps to accumulate before performing a backward/update pass.",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Whether or not to use gradient checkpointing to save memory at the expense of slower backward pass.",
    )
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode the images once, before training, into CPU memory; frees the VAE from the GPU until images are "
        "drawn. Each image keeps the crop and flip it was cached with.",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=1e-4,
        help="Initial learning rate (after the potential warmup period) to use.",
    )
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        help="Scale the learning rate by the number of GPUs, gradient accumulation steps, and batch size.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help=(
            'The scheduler type to use. Choose between ["linear", "cosine", "cosine_with_restarts", "polynomial",'
            ' "constant", "constant_with_warmup"]'
        ),
    )
    parser.add_argument(
        "--lr_warmup_steps", type=int, default=500, help="Number of steps for the warmup in the lr scheduler."
    )
    parser.add_argument(
        "--lr_num_cycles", type=int, default=1, help="Number of hard resets of the lr in cosine_with_restarts."
    )
    parser.add_argument("--lr_power", type=float, default=1.0, help="Power factor of the polynomial scheduler.")
    parser.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Number of subprocesses to use for data loading."
    )
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default="logit_normal",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
    )
    parser.add_argument(
        "--logit_mean", type=float, default=0.0, help="mean to use when using the `'logit_normal'` weighting scheme."
    )
    parser.add_argument(
        "--logit_std", type=float, default=1.0, help="std to use when using the `'logit_normal'` weighting scheme."
    )
    parser.add_argument(
        "--mode_scale",
        type=float,
        default=1.29,
        help="Scale of mode weighting scheme. Only effective when using the `'mode'` as the `weighting_scheme`.",
    )
    parser.add_argument(
        "--precondition_outputs",
        type=int,
        default=1,
        help="Whether the model outputs are preconditioned as in EDM; this decides how the loss target is computed.",
    )
    add_optimizer_args(parser)
    parser.add_argument("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    parser.add_argument("--push_to_hub", action="store_true", help="Whether or not to push the model to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="The token to use to push to the Model Hub.")
    parser.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="The name of the repository to keep in sync with the local `output_dir`.",
    )
    parser.add_argument(
        "--logging_dir", type=str, default="logs", help="TensorBoard log directory, relative to output_dir."
    )
    parser.add_argument(
        "--allow_tf32", action="store_true", help="Whether or not to allow TF32 on Ampere GPUs to speed up training."
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='The integration to report to: "tensorboard" (default), "wandb", "comet_ml", "all" or "none".',
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help=(
            "Precision of the frozen weights (the LoRA parameters stay in fp32). Defaults to the accelerate config"
            " or the flag passed to `accelerate launch`."
        ),
    )
    parser.add_argument(
        "--prior_generation_precision",
        type=str,
        default=None,
        choices=["no", "fp32", "fp16", "bf16"],
        help=(
            "Precision for generating class images. Defaults to the training's mixed precision (the weights then load"
            " without a converted copy), else fp16 on a GPU and fp32 elsewhere."
        ),
    )
    parser.add_argument(
        "--upcast_before_saving",
        action="store_true",
        help="Save the final LoRA in fp32 (default: in the training precision, as diffusers' scripts do).",
    )
    parser.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Not offered: training reads compute_embeddings.py's fixed embeddings (refused).",
    )
    parser.add_argument(
        "--local_rank", type=int, default=-1, help="Set by torch.distributed.launch; accelerate reads the environment."
    )
    add_training_feature_args(parser)
    add_adapter_args(parser)
    args = parser.parse_args(input_args)

    if args.dataset_name is None and args.instance_data_dir is None:
        parser.error("specify either --dataset_name or --instance_data_dir")
    if args.dataset_name is not None and args.instance_data_dir is not None:
        parser.error("specify only one of --dataset_name or --instance_data_dir")
    if args.with_prior_preservation:
        if args.class_data_dir is None:
            parser.error("--with_prior_preservation needs --class_data_dir")
        if args.class_prompt is None:
            parser.error("--with_prior_preservation needs --class_prompt")
    checks = (check_numbers, check_training_features, check_text_encoder, check_paths, check_output_dir)
    for check in (*checks, check_adapter_args):
        message = check(args)
        if message:  # a value that parses but cannot work: one line naming the fix
            parser.exit(2, f"error: {message}\n")
    if args.report_to == "none":
        args.report_to = None
    return args


def add_training_feature_args(parser: argparse.ArgumentParser) -> None:
    """Masked loss, shifted timesteps, caption dropout (the flags train_flux_lora.py has too)."""
    parser.add_argument(
        "--mask_data_dir",
        type=str,
        default=None,
        help="Folder of loss masks: one per instance image, same relative path and name, any image extension. White "
        "trains, black is ignored; an instance image without a mask is an error.",
    )
    parser.add_argument("--mask_column", type=str, default=None, help="Dataset column of loss masks.")
    parser.add_argument(
        "--timestep_sampling",
        type=str,
        default="sigma",
        choices=TIMESTEP_SAMPLING,
        help="'sigma': the --weighting_scheme density on the scheduler's (shifted) timesteps; 'shift': a logit-normal "
        "draw shifted by --discrete_flow_shift; 'flux_shift': shifted by the image's token count, as Flux does.",
    )
    parser.add_argument(
        "--discrete_flow_shift", type=float, default=3.0, help="Shift of --timestep_sampling shift: s*t/(1+(s-1)*t)."
    )
    parser.add_argument(
        "--caption_dropout_rate",
        type=float,
        default=0.0,
        help="Share of instance images trained with the empty prompt (its embedding is in every embeddings file).",
    )
    parser.add_argument(
        "--shuffle_caption",
        action="store_true",
        help="Not available here: each shuffled caption needs its own embedding, and this script trains from the "
        "fixed embeddings of compute_embeddings.py.",
    )
    parser.add_argument(
        "--validation_loss_images",
        type=str,
        default=None,
        help="A folder of held-out images, or a share of the instance images such as 0.1: their loss at fixed "
        "timesteps and noise is logged every --validation_steps and at the end (validation_loss in metrics.jsonl). "
        "A folder's images use their own caption's embedding where the embeddings file has it, else the instance "
        "prompt's.",
    )
    parser.add_argument(
        "--validation_steps", type=int, default=None, help="Measure the validation loss every N steps (and at the end)."
    )


def check_training_features(args: argparse.Namespace) -> str | None:
    if args.shuffle_caption:
        return (
            "--shuffle_caption needs every shuffled caption embedded, and this script trains from the fixed "
            "embeddings of compute_embeddings.py: reorder the tags in your captions before computing them, or drop "
            "--shuffle_caption"
        )
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
    if args.validation_steps is not None and args.validation_steps < 1:
        return f"--validation_steps must be at least 1, got {args.validation_steps}"
    if args.validation_loss_images is None:
        return None
    share, folder = validation_share(args.validation_loss_images), Path(args.validation_loss_images)
    if share is not None and not 0.0 < share < 1.0:
        return f"--validation_loss_images {share:g}: give a share in (0, 1) such as 0.1, or a folder of images"
    if share is None and not (folder.is_dir() and list_images(folder)):
        return f"--validation_loss_images {folder} is neither a share such as 0.1 nor a folder of images"
    return None


def check_numbers(args: argparse.Namespace) -> str | None:
    """Every numeric flag, before anything is loaded: the message for the first bad one, or None."""
    if args.resolution <= 0 or args.resolution % 16:
        return f"--resolution must be a positive multiple of 16 (the VAE's 8x, then 2x2 patches), got {args.resolution}"
    problem = bucket_spec_problem(args.aspect_ratio_buckets)
    if problem:
        return problem
    positive = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "repeats", "rank")
    positive += ("sample_batch_size", "validation_epochs", "num_train_epochs", "num_class_images", "lr_num_cycles")
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    for name in ("max_train_steps", "checkpoints_total_limit", "lora_alpha"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    for name in ("lr_warmup_steps", "dataloader_num_workers", "num_validation_images"):
        if getattr(args, name) < 0:
            return f"--{name} cannot be negative, got {getattr(args, name)}"
    for name in ("learning_rate", "max_grad_norm", "lr_power", "logit_std"):
        if not 0.0 < getattr(args, name) < math.inf:
            return f"--{name} must be a positive number, got {getattr(args, name)}"
    if not 0.0 <= args.prior_loss_weight < math.inf:
        return f"--prior_loss_weight cannot be negative, got {args.prior_loss_weight}"
    if not 0.0 <= args.lora_dropout < 1.0:
        return f"--lora_dropout must be in [0, 1), got {args.lora_dropout}"
    if args.lora_blocks is not None and not all(
        block.strip().isdigit() for block in args.lora_blocks.split(",")
    ):
        return f"--lora_blocks takes comma-separated block indices such as 12,30, got '{args.lora_blocks}'"
    if args.lr_scheduler not in LR_SCHEDULERS:
        return f"--lr_scheduler {args.lr_scheduler} is not one of {', '.join(LR_SCHEDULERS)}"
    return None


def check_text_encoder(args: argparse.Namespace) -> str | None:
    if args.train_text_encoder:
        return (
            "--train_text_encoder is not offered: training reads the fixed embeddings of compute_embeddings.py, "
            "with no text encoder loaded; drop the flag (the transformer's LoRA learns the instance prompt)"
        )
    return None


def is_local_path(name: str) -> bool:
    """Whether a --dataset_name can only mean a folder (a Hub id is `name` or `owner/name`): then it must exist."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_paths(args: argparse.Namespace) -> str | None:
    """Every path flag, before anything is loaded: the message for the first bad one, or None."""
    if args.instance_data_dir is not None and not Path(args.instance_data_dir).is_dir():
        return f"instance image folder {args.instance_data_dir} does not exist: give --instance_data_dir a folder"
    if args.dataset_name is not None and is_local_path(args.dataset_name) and not Path(args.dataset_name).is_dir():
        return f"--dataset_name {args.dataset_name} does not exist: give a local dataset folder or a Hub dataset id"
    if (
        args.class_data_dir is not None
        and Path(args.class_data_dir).exists()
        and not Path(args.class_data_dir).is_dir()
    ):
        return f"--class_data_dir {args.class_data_dir} is a file: give a folder (filled with generated images)"
    output_dir = Path(args.output_dir)
    existing = next(folder for folder in [output_dir, *output_dir.parents] if folder.exists())
    if existing != output_dir and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        return f"--output_dir {output_dir} cannot be created: {existing} is not a writable folder"
    return None


def check_output_dir(args: argparse.Namespace) -> str | None:
    """A folder that holds no other run, unless --resume_from_checkpoint names a checkpoint of it that fits."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return f"--output_dir {output_dir} is a file, not a folder: pass a folder (created if missing)"
    return output_dir_problem(
        output_dir,
        args.resume_from_checkpoint,
        args.rank,
        lora_targets(args),
        lambda checkpoint, shapes: adapter_checkpoint_problem(checkpoint, shapes, args.adapter, args.use_ema)
        or optimizer_checkpoint_problem(checkpoint, chosen_optimizer(args)),
    )


def lora_layer_names(args: argparse.Namespace) -> list[str]:
    return [layer.strip() for layer in args.lora_layers.split(",") if layer.strip()]


def lora_block_indices(args: argparse.Namespace) -> list[int] | None:
    return None if args.lora_blocks is None else sorted({int(block) for block in args.lora_blocks.split(",")})


def lora_targets(args: argparse.Namespace) -> list[str]:
    """The modules that get LoRA layers: --lora_layers in every block, or in the --lora_blocks only (as diffusers'
    script names them: `transformer_blocks.12.attn.to_q`)."""
    blocks = lora_block_indices(args)
    if blocks is None:
        return lora_layer_names(args)
    return [f"transformer_blocks.{block}.{layer}" for block in blocks for layer in lora_layer_names(args)]


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (recursively, hidden ones skipped), in a stable order."""
    extensions = {ext for ext, name in Image.registered_extensions().items() if name in Image.OPEN}
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and path.suffix.lower() in extensions
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def image_key(name: str, data: bytes) -> str:
    """The key compute_embeddings.py recorded for an image: its relative path and content hash."""
    return f"{name}:{hashlib.sha256(data).hexdigest()}"


def read_file(path: Path) -> bytes | OSError:
    """The file's bytes, or the error reading it raised (reported with the images that cannot be decoded)."""
    try:
        return path.read_bytes()
    except OSError as error:
        return error


def instance_image_files(args: argparse.Namespace) -> tuple[list[tuple[str, bytes | OSError]], str]:
    """(name, encoded bytes or read error) of every instance image, and where they came from, for messages."""
    if args.dataset_name is not None:
        from datasets import Image as ImageFeature
        from datasets import load_dataset

        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
        if args.image_column not in dataset.column_names:
            raise UsageError(
                f"column '{args.image_column}' not in dataset {args.dataset_name}; its columns: "
                f"{', '.join(dataset.column_names)}"
            )
        files = []
        for index, image in enumerate(dataset.cast_column(args.image_column, ImageFeature(decode=False))):
            image = image[args.image_column]
            data = image["bytes"] if image["bytes"] is not None else read_file(Path(image["path"]))
            files.append((f"{index:06d}/{Path(image['path']).name if image['path'] else 'image'}", data))
        return files, f"--dataset_name {args.dataset_name}"
    root = Path(args.instance_data_dir)
    if not root.is_dir():
        raise UsageError(f"instance image folder {root} does not exist")
    files = [(path.relative_to(root).as_posix(), read_file(path)) for path in list_images(root)]
    if not files:
        raise UsageError(f"no images found in {root}")
    return files, f"--instance_data_dir {root}"


def usable_images(
    files: list[tuple[str, bytes | OSError]],
    source: str,
    args: argparse.Namespace,
    buckets: list[tuple[int, int]] | None = None,
) -> list[tuple[str, bytes]]:
    """The images that decode; the others are skipped and counted (an error with --strict). Those smaller than their
    training size (the nearest of `buckets`, default the run's) are named."""
    usable, unreadable, small = [], [], []
    buckets = buckets or training_buckets(args.aspect_ratio_buckets, args.resolution)
    for name, data in files:
        try:
            if isinstance(data, OSError):
                raise data
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height = upright_size(image)
            bucket_height, bucket_width = nearest_bucket((width, height), buckets)
            if width < bucket_width or height < bucket_height:  # scaled up to cover its training size
                small.append(f"{name} {width}x{height} < {bucket_width}x{bucket_height}")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            if args.strict:
                raise UsageError(f"cannot read image '{name}' ({error}): fix or remove it, or drop --strict") from None
            unreadable.append(f"{name} ({error})")
        else:
            usable.append((name, data))
    if not usable:
        raise UsageError(f"none of the {len(files)} images of {source} can be read: {'; '.join(unreadable)}")
    if unreadable:
        logger.warning(
            f"Skipped {len(unreadable)} of {len(files)} images of {source} that cannot be read: "
            f"{'; '.join(unreadable)}. Pass --strict to stop instead."
        )
    if small:
        logger.warning(
            f"{len(small)} images of {source} are smaller than their training size and are upscaled "
            f"({', '.join(small)}): larger images or a lower --resolution train sharper."
        )
    return usable


@dataclass
class PromptEmbeddings:
    """The rows of an embeddings file, as tensors, with the lookups training needs."""

    prompt_embeds: list[torch.Tensor]
    pooled_prompt_embeds: list[torch.Tensor]
    labels: list[tuple[str, str]]
    rows: dict[tuple[str, str], int]
    image_rows: dict[str, int]
    metadata: dict

    def row(self, role: str, prompt: str, flag: str | None = None) -> int:
        """The row of a prompt that training needs; `flag` is the compute_embeddings.py option that adds it."""
        if (role, prompt) not in self.rows:
            fix = f" with {flag} {prompt!r}" if flag else ""
            raise UsageError(f"no embeddings for the {role} prompt {prompt!r}: rerun compute_embeddings.py{fix}")
        return self.rows[(role, prompt)]


def check_pipeline(args: argparse.Namespace, plugin: LayerOffloadPlugin) -> None:
    """The model fails in one line before anything is loaded: missing, not an SD3 pipeline, without a transformer,
    or with --lora_layers or offload block_names that name none of its modules.

    Reads model_index.json and the transformer's config, and builds the transformer on the meta device (no memory).
    """
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    from accelerate_offload import BlocksNotFoundError, find_blocks

    model = args.pretrained_model_name_or_path
    try:
        index = DiffusionPipeline.load_config(model, revision=args.revision, cache_dir=args.cache_dir)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot read the model_index.json of {model} ({str(error).splitlines()[0]}): pass "
            "--pretrained_model_name_or_path a folder or Hub id of an SD3 diffusers pipeline"
        ) from None
    family = index.get("_class_name", "")
    if not family.startswith("StableDiffusion3"):
        other = " (train FLUX.1 LoRAs with train_flux_lora.py)" if family.startswith("Flux") else ""
        raise UsageError(f"{model} is a {family or 'pipeline of unknown class'}, not an SD3 diffusers pipeline{other}")
    try:
        config = SD3Transformer2DModel.load_config(
            model, subfolder="transformer", revision=args.revision, cache_dir=args.cache_dir
        )
    except (OSError, ValueError):
        raise UsageError(
            f"{model} has no transformer/ folder with a config.json: give a complete SD3 pipeline"
        ) from None
    with init_empty_weights():
        transformer = SD3Transformer2DModel.from_config(config)
    names = [name for name, _ in transformer.named_modules()]
    blocks = lora_block_indices(args)
    if blocks is not None and blocks[-1] >= len(transformer.transformer_blocks):
        raise UsageError(
            f"--lora_blocks {blocks[-1]}: the transformer has blocks 0 to {len(transformer.transformer_blocks) - 1}"
        )
    for target in lora_layer_names(args):
        if not any(name == target or name.endswith(f".{target}") for name in names):
            raise UsageError(
                f"--lora_layers {target}: the transformer has no such module; use names like attn.to_q, attn.to_out.0"
            )
    if plugin.enabled:
        try:
            find_blocks(transformer, plugin.block_names)
        except BlocksNotFoundError as error:
            raise UsageError(f"offload config: {error}") from None


def load_embeddings(path: Path, args: argparse.Namespace) -> PromptEmbeddings:
    """Reads compute_embeddings.py's file and checks that it fits this transformer; never trusts it blindly."""
    if not path.is_file():
        raise UsageError(
            f"embeddings file {path} not found: run compute_embeddings.py first (or pass --embeddings_path)"
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise UsageError(
            f"{path} is not a readable Parquet file (truncated or corrupt: {str(error).splitlines()[0]});"
            " delete it and rerun compute_embeddings.py"
        ) from None
    raw = (table.schema.metadata or {}).get(EMBEDDINGS_METADATA_KEY)
    metadata = json.loads(raw) if raw else {}
    if metadata.get("format") != EMBEDDINGS_FORMAT or not set(EMBEDDINGS_COLUMNS) <= set(table.column_names):
        raise UsageError(f"{path} is not an SD3 embeddings file written by compute_embeddings.py")
    if metadata.get("version") != EMBEDDINGS_VERSION or metadata.get("num_rows") != table.num_rows:
        raise UsageError(
            f"{path} is incomplete or of another format version: delete it and rerun compute_embeddings.py"
        )

    try:
        config = SD3Transformer2DModel.load_config(
            args.pretrained_model_name_or_path,
            subfolder="transformer",
            revision=args.revision,
            cache_dir=args.cache_dir,
        )
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot read the transformer config of {args.pretrained_model_name_or_path} "
            f"({str(error).splitlines()[0]}): pass --pretrained_model_name_or_path a folder or Hub id of an SD3"
            " diffusers pipeline"
        ) from None
    expected = (config["joint_attention_dim"], config["pooled_projection_dim"])
    records = table.select(list(EMBEDDINGS_COLUMNS)).to_pylist()
    shapes = {(tuple(r["prompt_embeds_shape"]), tuple(r["pooled_prompt_embeds_shape"])) for r in records}
    widths = {(prompt[-1], pooled[-1]) for prompt, pooled in shapes}
    if widths != {expected}:
        found = ", ".join(f"{width}/{pooled}" for width, pooled in sorted(widths))
        raise UsageError(
            f"{path} holds embeddings of {metadata.get('model')} (text/pooled dims {found}) but the transformer of "
            f"{args.pretrained_model_name_or_path} expects {expected[0]}/{expected[1]}: rerun compute_embeddings.py "
            f"with --pretrained_model_name_or_path {args.pretrained_model_name_or_path}"
        )
    if len(shapes) != 1:
        raise UsageError(f"{path} mixes embeddings of different shapes {sorted(shapes)}: rerun compute_embeddings.py")
    if metadata.get("model") != args.pretrained_model_name_or_path:
        logger.warning(
            f"{path} was computed with {metadata.get('model')}, training uses {args.pretrained_model_name_or_path};"
            " the shapes fit, so make sure both are the same model."
        )

    embeddings = PromptEmbeddings([], [], [], {}, {}, metadata)
    for index, record in enumerate(records):
        for column, store in (
            ("prompt_embeds", embeddings.prompt_embeds),
            ("pooled_prompt_embeds", embeddings.pooled_prompt_embeds),
        ):
            values = np.asarray(record[column], dtype=np.float32)
            if values.size != math.prod(record[f"{column}_shape"]):
                raise UsageError(f"{path} is corrupt (row {index}): delete it and rerun compute_embeddings.py")
            store.append(torch.from_numpy(values).reshape(record[f"{column}_shape"]))
        embeddings.labels.append((record["role"], record["prompt"]))
        embeddings.rows[(record["role"], record["prompt"])] = index
        if record["role"] in ("instance", "caption"):
            embeddings.image_rows.update(dict.fromkeys(record["image_keys"], index))
    return embeddings


def instance_rows(
    files: list[tuple[str, bytes]], source: str, embeddings: PromptEmbeddings, args: argparse.Namespace
) -> list[int]:
    """Each instance image's embeddings row, found by its key; an image without one is an error naming it."""
    rows = []
    for name, data in files:
        row = embeddings.image_rows.get(image_key(name, data))
        if row is None:
            raise UsageError(
                f"no embeddings for instance image '{name}' (added or changed since they were computed): rerun "
                f"compute_embeddings.py with {source} --output_path {args.embeddings_path}"
            )
        role, prompt = embeddings.labels[row]
        if role == "instance" and prompt != args.instance_prompt:
            raise UsageError(
                f"instance image '{name}' was embedded with the instance prompt {prompt!r}, not "
                f"{args.instance_prompt!r}: rerun compute_embeddings.py with the same --instance_prompt"
            )
        rows.append(row)
    return rows


def find_mask(mask_dir: Path, name: str) -> Path:
    """The mask of instance image `name` (a relative path): the same path in `mask_dir`, with any image extension."""
    relative = Path(name)
    folder = mask_dir / relative.parent
    extensions = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    found = sorted(
        path
        for path in (folder.iterdir() if folder.is_dir() else ())
        if path.stem == relative.stem and path.suffix.lower() in extensions and path.is_file()
    )
    if not found:
        raise UsageError(
            f"no mask for instance image '{name}' in --mask_data_dir {mask_dir} (looked for "
            f"{folder / relative.stem}.png or another image extension); add one: white trains, black is ignored"
        )
    return found[0]


def load_masks(files: list[tuple[str, bytes]], args: argparse.Namespace) -> list[Image.Image] | None:
    """The loss mask of each instance image (8-bit grayscale, the image's size), or None without masks."""
    if args.mask_data_dir is None and args.mask_column is None:
        return None
    if args.mask_column is not None:
        from datasets import load_dataset

        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
        if args.mask_column not in dataset.column_names:
            raise UsageError(f"--mask_column '{args.mask_column}' not in dataset {args.dataset_name}")
        by_row = dict(enumerate(dataset[args.mask_column]))
    masks = []
    for name, data in files:
        try:
            source = find_mask(Path(args.mask_data_dir), name) if args.mask_column is None else by_row[int(name[:6])]
            if source is None:
                raise ValueError(f"its row has no {args.mask_column}")
            with Image.open(source) if isinstance(source, Path) else nullcontext(source) as opened:
                mask = to_rgb(opened).convert("L")
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read the mask of instance image '{name}' ({error}); replace it") from None
        size = image_size(data)
        if mask.size != size:
            raise UsageError(
                f"the mask of instance image '{name}' is {mask.width}x{mask.height}, the image {size[0]}x{size[1]}; "
                "give a mask of the image's size"
            )
        if mask.getextrema()[1] == 0:
            raise UsageError(f"the mask of instance image '{name}' is black everywhere: nothing would train; fix it")
        masks.append(mask)
    return masks


def derived_seed(*keys: int) -> int:
    """A seed for one use (a step's noise, an image's crop) from the run's seed: the same on resume, in any worker."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) the image has once upright (as `to_rgb` turns it), from its EXIF orientation alone."""
    turned = image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)  # the four quarter-turned ones
    return (image.height, image.width) if turned else image.size


def image_size(data: bytes) -> tuple[int, int]:
    """`upright_size` of an encoded image, read from its header."""
    with Image.open(io.BytesIO(data)) as image:
        return upright_size(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit values scaled (not clipped to white), transparency flattened onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) / 257, 0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    return image.convert("RGB")


def preprocess(
    image: Image.Image, bucket: tuple[int, int], center_crop: bool, random_flip: bool, rng: random.Random
) -> torch.Tensor:
    """Resize to cover the (height, width) `bucket`, crop to it, maybe flip; crops and flips drawn from `rng`."""
    image = fit_to_bucket(to_rgb(image), bucket, center_crop, rng)
    if random_flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1).contiguous()


class DreamBoothDataset(Dataset):
    """Instance images (and class images for prior preservation), each with its precomputed prompt embeddings.

    Each instance image trains at its bucket (the --resolution square without --aspect_ratio_buckets), its mask
    and paired class image cropped to the same one. An example's random crop and flip depend only on the seed, the
    epoch and its index, so a resumed run (or a data-loading worker) draws exactly what an uninterrupted one does.
    """

    def __init__(
        self,
        instance_files: list[tuple[str, bytes]],
        instance_rows: list[int],
        embeddings: PromptEmbeddings,
        args: argparse.Namespace,
        class_files: list[tuple[str, bytes]] | None = None,
        class_row: int | None = None,
        masks: list[Image.Image] | None = None,
        dropout_row: int | None = None,
    ):
        self.instances = list(
            itertools.chain.from_iterable(
                [item] * args.repeats for item in zip(instance_files, instance_rows, strict=True)
            )
        )
        self.masks = None if masks is None else [mask for mask in masks for _ in range(args.repeats)]
        buckets = training_buckets(args.aspect_ratio_buckets, args.resolution)
        self.buckets = [nearest_bucket(image_size(data), buckets) for (_, data), _ in self.instances]
        self.dropout_row = dropout_row  # the empty prompt's row, for --caption_dropout_rate
        self.embeddings = embeddings
        self.class_files = class_files or []
        self.class_row = class_row
        self.args = args
        self.epoch = 0
        self._length = max(len(self.instances), len(self.class_files))

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def bucket_of(self, index: int) -> tuple[int, int]:
        return self.buckets[index % len(self.instances)]

    def _example(
        self, data: bytes, row: int, bucket: tuple[int, int], rng: random.Random
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with Image.open(io.BytesIO(data)) as image:
            pixels = preprocess(image, bucket, self.args.center_crop, self.args.random_flip, rng)
        return pixels, self.embeddings.prompt_embeds[row], self.embeddings.pooled_prompt_embeds[row]

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(derived_seed(self.args.seed, 0, self.epoch, index))
        (_, data), row = self.instances[index % len(self.instances)]
        dropout = random.Random(derived_seed(self.args.seed, 2, self.epoch, index)).random()
        if self.dropout_row is not None and dropout < self.args.caption_dropout_rate:
            row = self.dropout_row
        bucket = self.bucket_of(index)
        crop_state = rng.getstate()
        example = {"index": index, "instance": self._example(data, row, bucket, rng)}
        if self.masks is not None:  # the same crop and flip as the image: its draws replayed
            replay = random.Random()
            replay.setstate(crop_state)
            mask = self.masks[index % len(self.instances)].convert("RGB")
            pixels = preprocess(mask, bucket, self.args.center_crop, self.args.random_flip, replay)
            example["mask"] = (pixels[:1] + 1.0) / 2.0
        if self.class_files:
            _, class_data = self.class_files[index % len(self.class_files)]
            example["class"] = self._example(class_data, self.class_row, bucket, rng)
        return example


def collate_fn(examples: list[dict], with_prior_preservation: bool = False) -> dict:
    """Instance examples first, then class examples: the loss splits the batch in two halves of equal size."""
    parts = [example["instance"] for example in examples]
    if with_prior_preservation:
        parts += [example["class"] for example in examples]
    pixel_values, prompt_embeds, pooled_prompt_embeds = (torch.stack(items) for items in zip(*parts, strict=True))
    batch = {
        "indices": [example["index"] for example in examples],
        "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled_prompt_embeds,
    }
    if "mask" in examples[0]:  # class images train everywhere
        masks = [example["mask"] for example in examples]
        batch["masks"] = torch.stack(masks + [torch.ones_like(masks[0])] * (len(parts) - len(masks)))
    return batch


def shift_and_scale(latents: torch.Tensor, vae_config: FrozenDict) -> torch.Tensor:
    """SD3 latents from the VAE's: shifted, then scaled, exactly what the pipeline undoes before decoding."""
    return (latents - vae_config.shift_factor) * vae_config.scaling_factor


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, pixel_values: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """SD3 latents of `pixel_values`, sampled from the VAE posterior with `generator`."""
    return shift_and_scale(vae.encode(pixel_values).latent_dist.sample(generator), vae.config)


def cached_latents(
    latent_cache: LatentCache,
    indices: list[int],
    vae_config: FrozenDict,
    device: torch.device,
    generator: torch.Generator,
) -> torch.Tensor:
    """SD3 latents of the dataset items `indices` from their cached posterior: the draw `encode_latents` makes."""
    mean, std = (part.to(device) for part in latent_cache.distribution(indices))
    return shift_and_scale(sample_latents((mean, std), generator), vae_config)


def flow_matching_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    weighting: torch.Tensor,
    prior_loss_weight: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted MSE per sample, averaged; with a prior loss weight, the batch is instance half then class half.

    The per-sample weighting is split with the batch, so prior preservation works at any batch size. `mask`
    (B x 1 x h x w, on the latent grid) weights each latent pixel, the loss divided by the mask's mean.
    """

    def mse(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor, mask: torch.Tensor | None):
        squared_error = weighting.float() * (pred.float() - target.float()) ** 2
        if mask is not None:
            return masked_mean(squared_error, mask).mean()
        return squared_error.reshape(target.shape[0], -1).mean(1).mean()

    if prior_loss_weight is None:
        return mse(model_pred, target, weighting, mask)
    model_pred, model_pred_prior = model_pred.chunk(2)
    target, target_prior = target.chunk(2)
    weighting, weighting_prior = weighting.chunk(2)
    mask, mask_prior = mask.chunk(2) if mask is not None else (None, None)
    return mse(model_pred, target, weighting, mask) + prior_loss_weight * mse(
        model_pred_prior, target_prior, weighting_prior, mask_prior
    )


def split_validation_images(
    files: list[tuple[str, bytes]], args: argparse.Namespace
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """The instance images that train, and the held-out ones whose loss --validation_loss_images measures."""
    if args.validation_loss_images is None:
        return files, []
    share = validation_share(args.validation_loss_images)
    if share is None:
        root = Path(args.validation_loss_images)
        held_out = [(path.relative_to(root).as_posix(), read_file(path)) for path in list_images(root)]
        return files, usable_images(
            held_out, f"--validation_loss_images {root}", args, [(args.resolution, args.resolution)]
        )
    chosen = set(held_out_indices(len(files), share, args.seed))
    if len(chosen) >= len(files):
        raise UsageError(
            f"--validation_loss_images {share:g} would hold out all {len(files)} images; give a smaller share"
        )
    return [f for i, f in enumerate(files) if i not in chosen], [f for i, f in enumerate(files) if i in chosen]


def validation_rows(
    files: list[tuple[str, bytes]], embeddings: PromptEmbeddings, args: argparse.Namespace
) -> list[int]:
    """Each held-out image's embeddings row: its own caption's where the file has the image, else the instance
    prompt's (the rows are fixed: compute_embeddings.py embedded every prompt)."""
    rows = []
    for name, data in files:
        row = embeddings.image_rows.get(image_key(name, data))
        rows.append(embeddings.row("instance", args.instance_prompt, "--instance_prompt") if row is None else row)
    return rows


@torch.no_grad()
def encode_validation_latents(
    vae: AutoencoderKL, files: list[tuple[str, bytes]], rows: list[int], args: argparse.Namespace
) -> list[tuple[torch.Tensor, int]]:
    """Each held-out image, center-cropped to --resolution, as SD3 latents of the posterior mean, with its row."""
    encoded = []
    for (_, data), row in zip(files, rows, strict=True):
        with Image.open(io.BytesIO(data)) as image:
            square = (args.resolution, args.resolution)
            pixels = preprocess(image, square, center_crop=True, random_flip=False, rng=random.Random(0))
        mean = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist.mean
        encoded.append((shift_and_scale(mean, vae.config).cpu(), row))
    return encoded


def validation_loss(
    model: torch.nn.Module,
    validation_set: list[tuple[torch.Tensor, int]],
    embeddings: PromptEmbeddings,
    num_train_timesteps: int,
    args: argparse.Namespace,
    accelerator: Accelerator,
    dtype: torch.dtype,
) -> float:
    """Mean loss of the held-out images at the package's fixed noise levels and fixed noise (`fixed_noise_loss`),
    against the training target (--precondition_outputs), unweighted: only the LoRA changes the number. No
    gradient; the model streams as in training."""
    device = accelerator.device

    def loss_at(latents: torch.Tensor, row: int, sigma: float, noise: torch.Tensor) -> float:
        latents, noise = latents.to(device, dtype), noise.to(device, dtype)
        noisy = (1.0 - sigma) * latents + sigma * noise
        prediction = model(
            hidden_states=noisy,
            timestep=torch.full((1,), sigma * num_train_timesteps, device=device),
            encoder_hidden_states=embeddings.prompt_embeds[row][None].to(device, dtype),
            pooled_projections=embeddings.pooled_prompt_embeds[row][None].to(device, dtype),
            return_dict=False,
        )[0]
        if args.precondition_outputs:
            prediction, target = prediction * (-sigma) + noisy, latents
        else:
            target = noise - latents
        return torch.mean((prediction.float() - target.float()) ** 2).item()

    model.eval()
    with torch.no_grad(), accelerator.autocast():
        loss = fixed_noise_loss(validation_set, args.seed, loss_at)
    model.train()
    return loss


def pipeline_from_pretrained(args: argparse.Namespace, dtype: torch.dtype) -> StableDiffusion3Pipeline:
    """The SD3 pipeline without its text encoders: prompts arrive as precomputed embeddings."""
    return StableDiffusion3Pipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        revision=args.revision,
        variant=args.variant,
        dtype=dtype,
    )


def embedding_args(
    embeddings: PromptEmbeddings, row: int, negative: int, count: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Pipeline keyword arguments for `count` images of one embedded prompt, with the empty prompt as negative."""

    def batch(tensors: list[torch.Tensor], index: int) -> torch.Tensor:
        return tensors[index].unsqueeze(0).expand(count, *tensors[index].shape).to(device, dtype)

    return {
        "prompt_embeds": batch(embeddings.prompt_embeds, row),
        "pooled_prompt_embeds": batch(embeddings.pooled_prompt_embeds, row),
        "negative_prompt_embeds": batch(embeddings.prompt_embeds, negative),
        "negative_pooled_prompt_embeds": batch(embeddings.pooled_prompt_embeds, negative),
    }


def generate_class_images(
    args: argparse.Namespace,
    accelerator: Accelerator,
    embeddings: PromptEmbeddings,
    plugin: LayerOffloadPlugin,
) -> None:
    """Tops the class folder up to --num_class_images with images of the precomputed class prompt."""
    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    missing = args.num_class_images - len(list_images(class_dir))
    if missing <= 0:
        return
    precision = args.prior_generation_precision or (
        accelerator.mixed_precision
        if accelerator.mixed_precision in ("fp16", "bf16")
        else ("fp16" if accelerator.device.type == "cuda" else "fp32")
    )
    dtype = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    # frozen and streamed as training streams: from_pretrained's trainable weights would all stay on the GPU
    pipeline = place_pipeline(pipeline_from_pretrained(args, dtype), accelerator.device, plugin)
    plan_vae_passes(pipeline.vae, accelerator.device, plugin.max_vram)
    pipeline.set_progress_bar_config(disable=True)
    class_row = embeddings.row("class", args.class_prompt, "--class_prompt")
    negative = embeddings.row("negative", "")
    logger.info(f"Generating {missing} class images with the class prompt {args.class_prompt!r}.")
    for start in tqdm(range(0, missing, args.sample_batch_size), desc="Generating class images"):
        count = min(args.sample_batch_size, missing - start)
        kwargs = embedding_args(embeddings, class_row, negative, count, accelerator.device, dtype)
        images = pipeline(
            **kwargs, height=args.resolution, width=args.resolution, num_inference_steps=args.num_inference_steps
        ).images
        for image in images:
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            image.save(class_dir / f"{len(list_images(class_dir))}-{digest}.jpg")
    del pipeline  # freed, pinned buffers and all, as the class-images phase ends


def log_validation(
    pipeline: StableDiffusion3Pipeline,
    args: argparse.Namespace,
    accelerator: Accelerator,
    pipeline_args: dict,
    epoch: int,
    weight_dtype: torch.dtype,
    is_final_validation: bool = False,
) -> list[Image.Image]:
    logger.info(
        f"Running validation... \n Generating {args.num_validation_images} images with prompt:"
        f" {args.validation_prompt}."
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed) if args.seed is not None else None
    # fp32 LoRA weights and VAE meet half-precision activations: autocast keeps the dtypes consistent.
    autocast_ctx = (
        torch.autocast(accelerator.device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else nullcontext()
    )
    with autocast_ctx:
        images = [
            pipeline(**pipeline_args, height=args.resolution, width=args.resolution, generator=generator).images[0]
            for _ in range(args.num_validation_images)
        ]

    for tracker in accelerator.trackers:
        phase_name = "test" if is_final_validation else "validation"
        if tracker.name == "tensorboard":
            np_images = np.stack([np.asarray(img) for img in images])
            tracker.writer.add_images(phase_name, np_images, epoch, dataformats="NHWC")
        if tracker.name == "wandb":
            import wandb

            tracker.log(
                {
                    phase_name: [
                        wandb.Image(image, caption=f"{i}: {args.validation_prompt}") for i, image in enumerate(images)
                    ]
                }
            )
    return images


def save_model_card(
    repo_id: str, args: argparse.Namespace, images: list[Image.Image] | None = None, repo_folder: str | None = None
) -> None:
    """A model card with the base model, trigger prompt and the settings that matter to reproduce the run."""
    widget = []
    for i, image in enumerate(images or []):
        image.save(os.path.join(repo_folder, f"image_{i}.png"))
        widget.append({"text": args.validation_prompt or " ", "output": {"url": f"image_{i}.png"}})
    card_data = ModelCardData(
        license="other",
        base_model=args.pretrained_model_name_or_path,
        library_name="diffusers",
        tags=["text-to-image", "diffusers-training", "diffusers", "lora", "sd3", "sd3-diffusers", "template:sd-lora"],
        instance_prompt=args.instance_prompt,
        widget=widget,
    )
    settings = {
        "adapter": args.adapter + (" (DoRA)" if args.use_dora else ""),
        "rank": args.rank,
        "lora_alpha": args.lora_alpha or args.rank,
        "lora_layers": args.lora_layers,
        "lora_blocks": args.lora_blocks or "all",
        "optimizer": chosen_optimizer(args),
        "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_train_steps": args.max_train_steps,
        "resolution": args.resolution,
        "aspect_ratio_buckets": args.aspect_ratio_buckets,
        "mixed_precision": args.mixed_precision,
        "weighting_scheme": args.weighting_scheme,
        "with_prior_preservation": args.with_prior_preservation,
        "class_prompt": args.class_prompt if args.with_prior_preservation else None,
        "seed": args.seed,
        "timestep_sampling": args.timestep_sampling,
        "caption_dropout_rate": args.caption_dropout_rate,
        "masked_loss": args.mask_data_dir is not None or args.mask_column is not None,
        "save_format": args.save_format,
        "use_ema": args.use_ema,
        "ema_decay": args.ema_decay if args.use_ema else None,
        "validation_loss_images": args.validation_loss_images,
    }
    settings_table = "\n".join(f"| {name} | {value} |" for name, value in settings.items())
    content = f"""---
{card_data.to_yaml()}
---

# SD3 DreamBooth LoRA - {repo_id}

<Gallery />

## Model description

These are {repo_id} DreamBooth LoRA weights for {args.pretrained_model_name_or_path}, trained from precomputed
prompt embeddings (`compute_embeddings.py`) so that no text encoder was loaded during training.

## Trigger words

You should use `{args.instance_prompt}` to trigger the image generation.

## Use it with diffusers

{formats_note(args.adapter, save_formats(args.save_format), args.use_ema, LORA_WEIGHT_NAME)}

```py
{usage_snippet(args.adapter, "StableDiffusion3Pipeline", args.pretrained_model_name_or_path, repo_id, LORA_WEIGHT_NAME)}
image = pipeline("{args.instance_prompt}").images[0]
```

## Training settings

| setting | value |
| --- | --- |
{settings_table}

## License

Use of these weights follows the license of the base model, {args.pretrained_model_name_or_path}.
"""
    ModelCard(content).save(os.path.join(repo_folder, "README.md"))


# ----------------------------------------------------------------------------------------------------------------
# Adapters (LoRA, DoRA, LoKr, LoHa), file formats, EMA
# ----------------------------------------------------------------------------------------------------------------


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter", default="lora", choices=ADAPTER_TYPES, help="PEFT adapter type (--rank and --lora_alpha apply)."
    )
    parser.add_argument("--use_dora", action="store_true", help="DoRA: a LoRA with a trained magnitude per output.")
    parser.add_argument(
        "--lokr_factor", type=int, default=-1, help="LoKr: Kronecker factor of each layer's sizes (-1: near square)."
    )
    parser.add_argument(
        "--save_format",
        default="diffusers",
        help="Comma list of diffusers (always written) and kohya (also pytorch_lora_weights_kohya.safetensors, "
        "kohya keys for ComfyUI and sd-scripts).",
    )
    parser.add_argument(
        "--use_ema", action="store_true", help="Keep an average of the adapter in CPU memory; validate and save it."
    )
    parser.add_argument("--ema_decay", type=float, default=0.999, help="Decay of the adapter's average.")


def check_adapter_args(args: argparse.Namespace) -> str | None:
    return flag_problem(
        args.adapter, args.use_dora, args.save_format, args.lora_dropout, args.lokr_factor, args.ema_decay
    )


def new_adapter_config(args: argparse.Namespace):
    return adapter_config(
        args.adapter, args.rank, args.lora_alpha or args.rank, lora_targets(args), dropout=args.lora_dropout,
        use_dora=args.use_dora, lokr_factor=args.lokr_factor,
    )  # fmt: skip


def check_kohya_names(args: argparse.Namespace, transformer: torch.nn.Module) -> None:
    problem = kohya_problem(transformer, "sd3") if "kohya" in save_formats(args.save_format) else None
    if problem:
        raise UsageError(problem)


def make_ema(args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module) -> AdapterEMA | None:
    """The adapter's average in CPU memory, saved in every checkpoint (None without --use_ema)."""
    if not args.use_ema:
        return None
    ema = AdapterEMA(model, args.ema_decay)
    accelerator.register_for_checkpointing(ema)
    return ema


def final_weight_name(args: argparse.Namespace) -> str:
    """The file the final images are drawn with: the average's under --use_ema."""
    return ema_weight_name(LORA_WEIGHT_NAME) if args.use_ema else LORA_WEIGHT_NAME


def save_final_adapter(
    args: argparse.Namespace, model: torch.nn.Module, output_dir: Path, ema, dtype: torch.dtype
) -> None:
    saved_dtype = torch.float32 if args.upcast_before_saving else dtype
    try:
        save_adapter_files(StableDiffusion3Pipeline, "sd3", model, output_dir, args.save_format, ema, saved_dtype)
    except OSError as error:
        raise TrainingFault(
            f"could not write the LoRA to {output_dir} ({error.strerror or error}): free space and rerun with "
            "--resume_from_checkpoint latest"
        ) from None


def main(args: argparse.Namespace) -> None:
    if args.report_to == "wandb" and args.hub_token is not None:
        raise UsageError(
            "--report_to wandb with --hub_token would expose the token; log in with `hf auth login` instead"
        )
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator_project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    kwargs = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=accelerator_project_config,
        kwargs_handlers=[kwargs],
        # the data order of an epoch depends only on the seed and the epoch, so a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    problem = optimizer_problem(args, cuda=accelerator.device.type == "cuda")
    if problem:
        raise UsageError(problem)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()

    # Every input is checked before anything is loaded or written, so a mistake costs seconds and no files; the
    # checkpoint to resume from was checked with the arguments.
    output_dir = Path(args.output_dir)
    resume_from = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint and resume_from is None:
        logger.warning(f"No complete checkpoint in {output_dir}: starting a new training run.")
    if args.seed is None:  # drawn once and stored in every checkpoint, so a resumed run draws the same numbers
        state_file = resume_from / TRAINING_STATE if resume_from else None
        state = json.loads(state_file.read_text()) if state_file and state_file.is_file() else {}
        seed = [state.get("seed", random.SystemRandom().randrange(2**32))]
        broadcast_object_list(seed)
        args.seed = seed[0]
    set_seed(args.seed)

    # Offload settings not given here come from the ACCELERATE_OFFLOAD_* variables of the launch config.
    try:
        offload_plugin = LayerOffloadPlugin(gradient_checkpointing=True if args.gradient_checkpointing else None)
    except OffloadConfigError as error:
        raise UsageError(
            f"offload config: {error} (fix the offload_config section of the accelerate config file, or the "
            "ACCELERATE_OFFLOAD_* variables in the environment)"
        ) from None
    check_pipeline(args, offload_plugin)
    embeddings = load_embeddings(Path(args.embeddings_path), args)
    instance_files, source = instance_image_files(args)
    instance_files = usable_images(instance_files, source, args)
    instance_files, held_out_files = split_validation_images(instance_files, args)
    held_out_rows = validation_rows(held_out_files, embeddings, args)
    rows = instance_rows(instance_files, source, embeddings, args)
    masks = load_masks(instance_files, args)
    class_row = negative_row = validation_row = None
    if args.with_prior_preservation:
        class_row = embeddings.row("class", args.class_prompt, "--class_prompt")
    if args.validation_prompt is not None or args.with_prior_preservation:
        negative_row = embeddings.row("negative", "")
    if args.validation_prompt is not None:
        validation_row = embeddings.row("validation", args.validation_prompt, "--validation_prompt")

    phases = JobPhases(accelerator.device, kept=lambda: kept_outputs(args.output_dir))
    resolution_fix = f"lower --resolution (now {args.resolution})"
    class_files = None
    if args.with_prior_preservation:
        if accelerator.is_local_main_process:
            fixes = [STREAM_MORE, resolution_fix, f"lower --sample_batch_size (now {args.sample_batch_size})"]
            with phases.phase("class images", fixes):
                generate_class_images(args, accelerator, embeddings, offload_plugin)
        accelerator.wait_for_everyone()
        class_dir = Path(args.class_data_dir)
        class_files = [(path.name, read_file(path)) for path in list_images(class_dir)[: args.num_class_images]]
        class_files = usable_images(class_files, f"--class_data_dir {class_dir}", args)

    if accelerator.is_main_process:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"cannot create --output_dir {args.output_dir} ({error.strerror}): pass a folder path"
            ) from None
        if args.push_to_hub:
            name = args.hub_model_id or Path(args.output_dir).name
            try:
                repo_id = create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
            except HUB_ERRORS as error:
                raise UsageError(
                    f"--push_to_hub: cannot create the Hub repository {name} ({hub_error_reason(error)}); log in with "
                    "`hf auth login` or pass a valid --hub_token, or drop --push_to_hub"
                ) from None

    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
    )
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    # SD3's VAE is kept in fp32: it overflows in fp16 and it is small. Loaded so (a cast by `to()` warns).
    vae = AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path,
        subfolder="vae",
        revision=args.revision,
        variant=args.variant,
        dtype=torch.float32,
    )
    # The frozen transformer is only used for inference: half precision when mixed precision is on.
    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16
    if torch.backends.mps.is_available() and weight_dtype == torch.bfloat16:
        raise UsageError("bf16 mixed precision is not supported on MPS; use fp16 or no")
    # loaded in its training dtype: a conversion after loading would hold a second, converted copy in host memory
    transformer = SD3Transformer2DModel.from_pretrained(
        args.pretrained_model_name_or_path,
        subfolder="transformer",
        revision=args.revision,
        variant=args.variant,
        dtype=weight_dtype,
    )
    transformer.requires_grad_(False)
    vae.requires_grad_(False)

    train_dataset = DreamBoothDataset(
        instance_files, rows, embeddings, args, class_files=class_files, class_row=class_row,
        masks=masks,
        dropout_row=embeddings.row("negative", "") if args.caption_dropout_rate else None,
    )  # fmt: skip

    vae.to(accelerator.device)
    plan_vae_passes(vae, accelerator.device, offload_plugin.max_vram)  # each pass fits the budget left as it starts
    validation_set = []  # measured by the main process only
    if accelerator.is_main_process:
        validation_set = encode_validation_latents(vae, held_out_files, held_out_rows, args)
    latent_cache = None
    if args.cache_latents:
        kept = "" if args.center_crop and not args.random_flip else "; each keeps the crop and flip it is cached with"
        logger.info(f"--cache_latents: encoding the {len(train_dataset)} training examples once{kept}")
        with phases.phase("latents", [resolution_fix]):
            latent_cache = cache_latents(
                vae,
                train_dataset,
                lambda example: collate_fn([example], args.with_prior_preservation)["pixel_values"],
                accelerator.is_local_main_process,
            )
            vae.to("cpu")  # back on the GPU only while validation and final images are drawn
        logger.info(
            f"Cached the latents of {len(train_dataset)} examples in {latent_cache.nbytes / 2**20:.1f} MiB of CPU "
            "memory; the VAE is off the GPU for training"
        )

    transformer.add_adapter(new_adapter_config(args))
    check_kohya_names(args, transformer)
    if weight_dtype != torch.float32:
        # only upcast trainable parameters (LoRA) into fp32
        cast_training_params([transformer], dtype=torch.float32)

    # The plugin places the transformer (streaming blocks if configured) and owns gradient checkpointing.
    with phases.phase("load", [STREAM_MORE]):
        transformer = offload_plugin.prepare_model(transformer, accelerator.device)

    def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
        model = accelerator.unwrap_model(model)
        return model._orig_mod if is_compiled_module(model) else model

    def save_model_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                if not isinstance(model, type(unwrap_model(transformer))):
                    raise ValueError(f"unexpected save model: {model.__class__}")
                write_adapter_file(StableDiffusion3Pipeline, model, Path(output_dir), LORA_WEIGHT_NAME)
                # make sure to pop weight so that corresponding model is not saved again
                weights.pop()
            give_default_modes(Path(output_dir) / LORA_WEIGHT_NAME)
            (Path(output_dir) / TRAINING_STATE).write_text(json.dumps({"seed": args.seed}))

    def load_model_hook(models: list, input_dir: str) -> None:
        transformer_ = None
        while len(models) > 0:
            model = models.pop()
            if isinstance(model, type(unwrap_model(transformer))):
                transformer_ = model
            else:
                raise ValueError(f"unexpected save model: {model.__class__}")
        unexpected_keys = set_adapter_state(transformer_, read_adapter_file(Path(input_dir) / LORA_WEIGHT_NAME)[0])
        if unexpected_keys:
            logger.warning(f"Loading adapter weights led to unexpected keys not found in the model: {unexpected_keys}")
        if weight_dtype != torch.float32:
            cast_training_params([transformer_])

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate = (
            args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        )

    transformer_lora_parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(args, transformer_lora_parameters)

    # Square crops keep accelerate's seedable shuffle; buckets batch within one bucket, in a (seed, epoch) order.
    batch_sampler = None
    if args.aspect_ratio_buckets is None:
        batching = {"batch_size": args.train_batch_size, "shuffle": True}
    else:
        batch_sampler = BucketBatchSampler(train_dataset, args.train_batch_size, args.seed)
        batching = {"batch_sampler": batch_sampler}
        logger.info(f"{len(train_dataset)} examples in buckets {sorted(set(train_dataset.buckets))}")
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        **batching,
        collate_fn=lambda examples: collate_fn(examples, args.with_prior_preservation),
        num_workers=args.dataloader_num_workers,
    )

    overrode_max_train_steps = False
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
        overrode_max_train_steps = True

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, train_dataloader, lr_scheduler
    )
    ema = make_ema(args, accelerator, unwrap_model(transformer))

    # The dataloader may have changed size in `prepare`: recompute the number of steps and epochs.
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if overrode_max_train_steps:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-sd3-lora", config=vars(args))

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num batches each epoch = {len(train_dataloader)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    global_step = 0
    if resume_from is not None:
        accelerator.print(f"Resuming from checkpoint {resume_from.name}")
        try:
            accelerator.load_state(str(resume_from))
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UsageError(
                f"cannot resume from {resume_from} ({type(error).__name__}: {reason}); pass an earlier checkpoint-N "
                "to --resume_from_checkpoint"
            ) from None
        global_step = checkpoint_step(resume_from)
    if accelerator.is_main_process:
        remove_unfinished_checkpoints(output_dir)
    metrics = MetricsLog(Path(args.output_dir) / METRICS_FILE, accelerator.is_main_process)
    try:
        metrics.drop_after(global_step)  # steps a stopped run logged after its last checkpoint are trained again
    except MetricsFileError as error:
        raise UsageError(str(error)) from None
    # Where the checkpoint's step falls: its epoch, and the batches of that epoch already trained on.
    first_epoch = global_step // num_update_steps_per_epoch
    batches_done = global_step % num_update_steps_per_epoch * args.gradient_accumulation_steps

    progress_bar = tqdm(
        range(0, args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )

    def get_sigmas(timesteps: torch.Tensor, n_dim: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        sigmas = noise_scheduler_copy.sigmas.to(device=accelerator.device, dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps.to(accelerator.device)
        timesteps = timesteps.to(accelerator.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    def validation_pipeline_args() -> dict:
        count = 1  # one image per call, `num_validation_images` calls: memory stays that of a single image
        embedded = embedding_args(embeddings, validation_row, negative_row, count, accelerator.device, weight_dtype)
        return {**embedded, "num_inference_steps": args.num_inference_steps}

    def training_step(batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Forward and backward of one batch: the loss, the gradient norm, and whether all of it was finite.

        An update whose loss or gradients are not finite (on any process) is not applied.
        """
        with accelerator.accumulate(transformer):
            if latent_cache is None:
                pixel_values = batch["pixel_values"].to(device=accelerator.device, dtype=vae.dtype)
                model_input = encode_latents(vae, pixel_values, generator)
            else:
                model_input = cached_latents(latent_cache, batch["indices"], vae.config, accelerator.device, generator)
            model_input = model_input.to(dtype=weight_dtype)

            # Noise and timesteps come from this batch's own generator (on the CPU: the same numbers on any device).
            noise = torch.randn(model_input.shape, generator=generator).to(model_input)
            bsz = model_input.shape[0]

            if args.timestep_sampling == "sigma":
                # Sample a random timestep for each image; non-uniform for the logit_normal and mode schemes.
                u = compute_density_for_timestep_sampling(
                    weighting_scheme=args.weighting_scheme,
                    batch_size=bsz,
                    logit_mean=args.logit_mean,
                    logit_std=args.logit_std,
                    mode_scale=args.mode_scale,
                    generator=generator,
                )
                indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
                timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
                sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
            else:  # a logit-normal draw, shifted: fixed, or by the image's token count (2x2 patches)
                image_seq_len = model_input.shape[-2] * model_input.shape[-1] // 4
                sigmas = sample_shifted_sigmas(
                    args.timestep_sampling, bsz, image_seq_len, noise_scheduler_copy.config, args.discrete_flow_shift,
                    args.logit_mean, args.logit_std, generator,
                )  # fmt: skip
                timesteps = (sigmas * noise_scheduler_copy.config.num_train_timesteps).to(model_input.device)
                sigmas = sigmas.to(model_input.device, model_input.dtype).view(-1, 1, 1, 1)

            # Add noise according to flow matching: zt = (1 - sigma) * x + sigma * noise.
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise

            prompt_embeds = batch["prompt_embeds"].to(device=accelerator.device, dtype=weight_dtype)
            pooled_prompt_embeds = batch["pooled_prompt_embeds"].to(device=accelerator.device, dtype=weight_dtype)
            model_pred = transformer(
                hidden_states=noisy_model_input,
                timestep=timesteps,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled_prompt_embeds,
                return_dict=False,
            )[0]

            # Preconditioning of the model outputs (section 5 of https://arxiv.org/abs/2206.00364).
            if args.precondition_outputs:
                model_pred = model_pred * (-sigmas) + noisy_model_input
            weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
            target = model_input if args.precondition_outputs else noise - model_input

            prior_loss_weight = args.prior_loss_weight if args.with_prior_preservation else None
            mask = batch.get("masks") if latent_cache is None else latent_cache.batch_masks(batch)
            if mask is not None:  # pixels to the latent grid: each latent pixel by its share of masked-in pixels
                mask = mask_to_latent_grid(mask.to(accelerator.device), 2 ** (len(vae.config.block_out_channels) - 1))
            loss = flow_matching_loss(model_pred, target, weighting, prior_loss_weight, mask)

            accelerator.backward(loss)
            grad_norm, finite = None, True
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(transformer_lora_parameters, args.max_grad_norm)
                # fp16's gradient scaler skips steps with inf gradients by design: there only the loss is checked
                checked = [loss] if grad_norm is None or accelerator.scaler is not None else [loss, grad_norm]
                local = torch.stack([torch.isfinite(value.detach().float()).all() for value in checked]).all()
                finite = not any_process(accelerator, not local)
                if finite:
                    optimizer.step()
                    lr_scheduler.step()
            optimizer.zero_grad()
        return loss, grad_norm, finite

    def non_finite_error(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> TrainingFault:
        grad_text = "" if grad_norm is None else f", gradient norm {float(grad_norm):.4g}"
        return TrainingFault(
            f"step {global_step + 1}: loss {float(loss):.4g}{grad_text}, not finite; stopped before applying it and"
            f" wrote no LoRA. Lower --learning_rate (now {args.learning_rate:g}) or check the data; "
            + last_checkpoint_note(output_dir)
        )

    on_cuda = accelerator.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    stop_request = StopSignals()
    step_started = time.perf_counter()
    for epoch in range(first_epoch, args.num_train_epochs):
        transformer.train()
        if batch_sampler is not None:  # wrapped by `prepare` on several processes: set here, not through the loader
            batch_sampler.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        skip = batches_done if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch_index, batch in enumerate(batches, start=skip):
            generator = torch.Generator().manual_seed(derived_seed(args.seed, 1, epoch, batch_index))
            with phases.phase(f"step {global_step + 1}", step=True):
                try:
                    loss, grad_norm, finite = training_step(batch, generator)
                except torch.OutOfMemoryError:
                    explanation = explain_out_of_memory(
                        unwrap_model(transformer), accelerator.device, args.train_batch_size, args.resolution
                    )
                    raise TrainingFault(f"step {global_step + 1}: {explanation}") from None

            if not finite:
                raise non_finite_error(loss, grad_norm)
            if accelerator.sync_gradients:
                seconds_per_step = time.perf_counter() - step_started
                progress_bar.update(1)
                global_step += 1
                if ema is not None:
                    ema.step(unwrap_model(transformer))
                # logged before a checkpoint of this step is written, so a resumed run's file has every step once
                logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
                postfix = {**logs, "s/step": f"{seconds_per_step:.2f}"}
                record = {"step": global_step, "epoch": epoch, **logs, "seconds_per_step": seconds_per_step}
                record["size"] = list(batch["pixel_values"].shape[-2:])
                if on_cuda:
                    record["peak_vram_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 1024**3
                    postfix["peak_vram_gb"] = f"{record['peak_vram_gb']:.2f}"
                progress_bar.set_postfix(**postfix)
                if validation_set and validation_loss_due(global_step, args.max_train_steps, args.validation_steps):
                    with phases.phase("validation loss", [STREAM_MORE]):
                        logs["validation_loss"] = record["validation_loss"] = validation_loss(
                            unwrap_model(transformer), validation_set, embeddings,
                            noise_scheduler_copy.config.num_train_timesteps, args, accelerator, weight_dtype,
                        )  # fmt: skip
                accelerator.log(logs, step=global_step)
                metrics.write(record)

                stop = stop_request.requested(accelerator)
                if global_step % args.checkpointing_steps == 0 or stop:
                    with phases.phase("save"):
                        saved = save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                if stop:
                    progress_bar.close()
                    accelerator.wait_for_everyone()  # the launcher ends every process once one exits
                    name = signal.Signals(stop_request.received or signal.SIGTERM).name
                    if accelerator.is_main_process:
                        print(
                            f"Stopped by {name} after step {global_step}: saved {saved}. To go on, rerun the same "
                            "command with --resume_from_checkpoint latest",
                            file=sys.stderr,
                        )
                    accelerator.end_training()
                    sys.exit(128 + (stop_request.received or signal.SIGTERM))
                step_started = time.perf_counter()  # checkpoints and the validation loss do not count as step time

            if global_step >= args.max_train_steps:
                break

        if accelerator.is_main_process and args.validation_prompt is not None and epoch % args.validation_epochs == 0:
            pipeline = StableDiffusion3Pipeline(
                scheduler=copy.deepcopy(noise_scheduler),
                vae=vae,
                transformer=unwrap_model(transformer),
                text_encoder=None,
                tokenizer=None,
                text_encoder_2=None,
                tokenizer_2=None,
                text_encoder_3=None,
                tokenizer_3=None,
            )
            transformer.eval()
            vae_device = vae.device  # a cached run's VAE is on the CPU, and goes back there
            with phases.phase("validation", [STREAM_MORE, resolution_fix]), ema_weights(ema, unwrap_model(transformer)):
                place_pipeline(pipeline, accelerator.device)
                log_validation(pipeline, args, accelerator, validation_pipeline_args(), epoch, weight_dtype)
                vae.to(vae_device)
            transformer.train()
            del pipeline
            step_started = time.perf_counter()  # validation images do not count as step time

    stop_request.restore()
    progress_bar.close()  # before any error line of the final save or upload
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with phases.phase("save"):
            save_final_adapter(args, unwrap_model(transformer), Path(args.output_dir), ema, weight_dtype)
        del optimizer, lr_scheduler  # the optimizer's state is freed before the final images are drawn
        accelerator.free_memory()

        # Final inference: the saved LoRA file, loaded by the pipeline's load_lora_weights onto the transformer
        # that trained (its adapter swapped for the file's), which checks that the file loads.
        images = []
        if args.validation_prompt and args.num_validation_images > 0:
            with phases.phase("final images", [STREAM_MORE, resolution_fix]):
                pipeline = StableDiffusion3Pipeline(
                    scheduler=copy.deepcopy(noise_scheduler),
                    vae=vae,
                    transformer=unwrap_model(transformer),
                    text_encoder=None,
                    tokenizer=None,
                    text_encoder_2=None,
                    tokenizer_2=None,
                    text_encoder_3=None,
                    tokenizer_3=None,
                )
                load_lora_file(pipeline, args.output_dir, final_weight_name(args), accelerator.device)
                transformer.eval()
                place_pipeline(pipeline, accelerator.device, offload_plugin)
                images = log_validation(
                    pipeline,
                    args,
                    accelerator,
                    validation_pipeline_args(),
                    epoch,
                    weight_dtype,
                    is_final_validation=True,
                )
                del pipeline

        repo_name = args.hub_model_id or Path(args.output_dir).name
        save_model_card(repo_id if args.push_to_hub else repo_name, args, images=images, repo_folder=args.output_dir)
        if metrics.path.exists():
            title = f"dreambooth-sd3-lora: {Path(args.output_dir).name}"
            plot_losses(metrics.records(), Path(args.output_dir) / LOSS_PLOT, title)
        if args.push_to_hub:
            excludes = ["step_*", "epoch_*", "checkpoint-*", ".*", f"{args.logging_dir}/*"]
            try:
                upload_folder(
                    repo_id=repo_id,
                    folder_path=args.output_dir,
                    commit_message="End of training",
                    ignore_patterns=list(excludes),  # a copy: upload_folder appends its own patterns
                    token=args.hub_token,
                )
            except HUB_ERRORS as error:
                retry = " ".join(f"--exclude '{pattern}'" for pattern in excludes)
                raise TrainingFault(
                    f"the upload to {repo_id} failed ({hub_error_reason(error)}); the LoRA, model card and images are "
                    f"kept in {args.output_dir}. Upload them alone, without training again: hf upload {repo_id} "
                    f"{args.output_dir} {retry} --commit-message 'End of training'"
                ) from None

    accelerator.end_training()


def remove_if_left_empty(folder: Path) -> None:
    """A run that stopped before writing a file leaves no folder behind (called only for a folder it created)."""
    if folder.is_dir() and not any(path.is_file() for path in folder.rglob("*")):
        shutil.rmtree(folder)


if __name__ == "__main__":
    arguments = parse_args()
    created_output_dir = not Path(arguments.output_dir).exists()
    try:
        main(arguments)
    except ScriptError as error:
        error.exit()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("error: interrupted; checkpoints already complete are kept", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        if created_output_dir and os.environ.get("RANK", "0") == "0":
            remove_if_left_empty(Path(arguments.output_dir))
