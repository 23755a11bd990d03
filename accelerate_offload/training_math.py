"""What the training scripts compute and users never edit: shifted timesteps, shuffled captions, masks on the
latent grid, the held-out images and fixed noise of the validation loss. Pure functions of their arguments (a seed
in, the same numbers out), in the spirit of `diffusers.training_utils`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

TIMESTEP_SAMPLING = ("sigma", "shift", "flux_shift")
# Keeps the shuffles' draws apart from other draws a script derives from the same (seed, epoch, index).
SHUFFLE_STREAM = 2
# Keeps the validation loss's fixed noise apart from every draw of training.
VALIDATION_STREAM = 3
# Noise levels the validation loss is measured at, each with its own fixed noise: comparable from run to run.
VALIDATION_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)

Key = TypeVar("Key")


# ----------------------------------------------------------------------------------------------------------------
# Timestep sampling: the shifts of FlowMatchEulerDiscreteScheduler, applied to training draws
# ----------------------------------------------------------------------------------------------------------------


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The fixed ("discrete flow") shift: s * t / (1 + (s - 1) * t), as the scheduler's `shift` and kohya's `shift`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift_mu(image_seq_len: int, scheduler_config: Mapping) -> float:
    """The mu FluxPipeline passes the scheduler for `image_seq_len` tokens (diffusers' `calculate_shift`).

    A straight line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) of the config.
    """
    base_len, max_len = scheduler_config["base_image_seq_len"], scheduler_config["max_image_seq_len"]
    base_shift, max_shift = scheduler_config["base_shift"], scheduler_config["max_shift"]
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def exponential_time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """e^mu / (e^mu + (1 / t - 1)): the scheduler's dynamic shift, which Flux uses at inference."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def sample_shifted_sigmas(
    timestep_sampling: str,
    batch_size: int,
    image_seq_len: int,
    scheduler_config: Mapping,
    discrete_flow_shift: float,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise levels in (0, 1) for one batch: a logit-normal draw, then the `shift` or `flux_shift` of it.

    The logit-normal base is what kohya's and musubi's `shift` and `flux_shift` start from (their `sigmoid`).
    """
    if timestep_sampling not in ("shift", "flux_shift"):
        raise ValueError(f"timestep sampling {timestep_sampling!r} is not 'shift' or 'flux_shift'")
    normal = torch.randn(batch_size, generator=generator) * logit_std + logit_mean
    sigmas = torch.sigmoid(normal)
    if timestep_sampling == "shift":
        return shift_sigmas(sigmas, discrete_flow_shift)
    return exponential_time_shift(sigmas, resolution_shift_mu(image_seq_len, scheduler_config))


# ----------------------------------------------------------------------------------------------------------------
# Captions: comma-separated tags, the first ones kept, the rest shuffled per epoch
# ----------------------------------------------------------------------------------------------------------------


def derived_seed(*keys: int) -> int:
    """A seed for one use from the run's seed and where it is used (the same in any process and on resume)."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def caption_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_caption(caption: str, keep_tokens: int, seed: int, epoch: int, index: int) -> str:
    """The caption's tags after the first `keep_tokens`, shuffled by (seed, epoch, index), joined by ", "."""
    tags = caption_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    random.Random(derived_seed(seed, epoch, index, SHUFFLE_STREAM)).shuffle(rest)
    return ", ".join(kept + rest)


def caption_orderings(caption: str, keep_tokens: int) -> int:
    """How many distinct captions shuffling can make of `caption`: the permutations of its shuffled tags."""
    rest = caption_tags(caption)[keep_tokens:]
    count = math.factorial(len(rest))
    for repeats in Counter(rest).values():
        count //= math.factorial(repeats)
    return count


# ----------------------------------------------------------------------------------------------------------------
# Masks: a weight per latent pixel
# ----------------------------------------------------------------------------------------------------------------


def mask_to_tensor(mask) -> torch.Tensor:
    """A PIL mask, already cropped like its image, as a (1, H, W) float tensor in [0, 1] (white trains)."""
    array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def mask_to_latent_grid(mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """(..., H, W) pixel mask -> (..., H / f, W / f): each latent pixel gets the share of its pixels masked in."""
    return F.avg_pool2d(mask, vae_scale_factor)


def masked_mean(squared_error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image mean of `squared_error` (B, C, h, w) weighted by `mask` (B, 1, h, w), divided by the mask's mean.

    Dividing by the mask's mean keeps the loss on the scale of an unmasked one, whatever share of the image trains.
    """
    batch = squared_error.shape[0]
    weighted = (squared_error * mask).reshape(batch, -1).mean(dim=1)
    return weighted / mask.reshape(batch, -1).mean(dim=1).clamp_min(torch.finfo(mask.dtype).tiny)


# ----------------------------------------------------------------------------------------------------------------
# Validation loss: held-out images at fixed noise levels, with fixed noise
# ----------------------------------------------------------------------------------------------------------------


def validation_share(value: str | None) -> float | None:
    """--validation_loss_images as a share of the training images to hold out, or None where it names a folder."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def held_out_indices(count: int, share: float, seed: int) -> list[int]:
    """Which of `count` training images `share` holds out: at least one, drawn from the seed (the same on resume).

    All `count` of them when the share leaves none to train on; the script names that as an error.
    """
    chosen = min(count, max(1, round(share * count)))
    return sorted(random.Random(seed).sample(range(count), chosen))


def fixed_noise_loss(
    items: Sequence[tuple[torch.Tensor, Key]],
    seed: int,
    loss_at: Callable[[torch.Tensor, Key, float, torch.Tensor], float],
) -> float:
    """Mean of `loss_at(latents, key, sigma, noise)` over the held-out `items` (latents and their prompt's key) and
    VALIDATION_SIGMAS.

    The noise comes from one CPU generator seeded from `seed` alone, drawn in the same order at every call, so two
    calls differ only where the model does.
    """
    generator = torch.Generator().manual_seed(derived_seed(seed, VALIDATION_STREAM))
    losses = [
        loss_at(latents, key, sigma, torch.randn(latents.shape, generator=generator))
        for latents, key in items
        for sigma in VALIDATION_SIGMAS
    ]
    return sum(losses) / len(losses)
