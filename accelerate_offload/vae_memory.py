"""Whole-image, sliced or tiled VAE passes, chosen from the GPU memory a pass would need and the room left.

A VAE pass peaks at its full-resolution stage: a few activations of the widest full-resolution layer
(`block_out_channels[0]` channels at every pixel) are alive at once, and CUDA's group norm adds an fp32 copy of
one. At 2048² that is gigabytes for a Flux or SD3 VAE, more than a small card has left beside a streamed
transformer, so the pass splits into images (slicing) or overlapping tiles (tiling) only when it must: tiles
blend at their seams, so a pass that fits stays whole. The room is read as each pass starts, not before a
pipeline runs: what streamed blocks and the pipeline's own tensors hold on the GPU changes in between.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Full-resolution activations of `block_out_channels[0]` channels alive at a pass's peak, as measured on CUDA
# (kernels' scratch included) for the Flux and SD3 VAEs in bf16 and fp32 (see benchmarks/NOTES.md).
PASS_TENSORS = {"decode": 10, "encode": 6}
IMAGE_COPIES = 3  # a tiled pass also holds the output image and its tiles, at 3 channels
SMALLEST_TILE = 256
ROOM_SHARE = 0.9  # the caching allocator cannot always place one large block in free memory split among segments


@dataclass(frozen=True)
class VaePlan:
    """How a VAE pass runs: per image or whole batch, and in square tiles of `tile_size` pixels or whole."""

    slicing: bool = False
    tile_size: int | None = None


def pass_bytes(channels: int, height: int, width: int, batch: int, itemsize: int, kind: str) -> int:
    """Peak bytes of one VAE pass over `batch` images of `height` x `width` pixels."""
    per_pixel = channels * PASS_TENSORS[kind] * itemsize
    return batch * height * width * per_pixel


def plan_vae_pass(
    channels: int, default_tile: int, height: int, width: int, batch: int, itemsize: int, room: int, kind: str
) -> VaePlan:
    """The least split pass that fits in `room` bytes: whole, then per image, then ever smaller tiles."""
    room = int(room * ROOM_SHARE)
    if pass_bytes(channels, height, width, batch, itemsize, kind) <= room:
        return VaePlan()
    slicing = batch > 1
    if pass_bytes(channels, height, width, 1, itemsize, kind) <= room:
        return VaePlan(slicing=slicing)
    output = IMAGE_COPIES * 3 * height * width * itemsize
    tile = default_tile
    while tile > SMALLEST_TILE and (
        tile >= max(height, width) or pass_bytes(channels, tile, tile, 1, itemsize, kind) + output > room
    ):
        tile //= 2
    return VaePlan(slicing=slicing, tile_size=max(tile, SMALLEST_TILE))


def apply_vae_plan(vae: torch.nn.Module, plan: VaePlan) -> None:
    """Sets an `AutoencoderKL`'s slicing and tiling (and its tile size) as `plan` says."""
    vae.use_slicing = plan.slicing
    vae.use_tiling = plan.tile_size is not None
    tile = plan.tile_size or vae.config.sample_size
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)


def fit_vae(vae: torch.nn.Module, height: int, width: int, batch: int, room: int, kind: str) -> VaePlan:
    """Plans and applies the pass for images of this size given `room` bytes of GPU memory; returns the plan."""
    plan = plan_vae_pass(
        vae.config.block_out_channels[0], vae.config.sample_size, height, width, batch, vae.dtype.itemsize, room, kind
    )
    apply_vae_plan(vae, plan)
    return plan


def plan_each_pass(vae: torch.nn.Module, room: Callable[[], int], on_plan: Callable[[str, tuple, VaePlan, int], None]):
    """Makes every `encode` and `decode` of `vae` plan its pass for `room()` bytes as it starts.

    The methods are wrapped on the instance (once), so pipelines and scripts that call `vae.decode` get the plan
    without knowing of it; `on_plan(kind, (batch, height, width), plan, room)` hears of each plan that changed.
    """
    if getattr(vae, "_plans_each_pass", False):
        return
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    last: dict[str, VaePlan] = {}

    def planned(kind: str, method: Callable):
        @functools.wraps(method)
        def run(sample: torch.Tensor, *args, **kwargs):
            factor = 1 if kind == "encode" else scale
            batch, height, width = sample.shape[0], sample.shape[-2] * factor, sample.shape[-1] * factor
            left = room()
            plan = fit_vae(vae, height, width, batch, left, kind)
            if last.get(kind) != plan:
                last[kind] = plan
                on_plan(kind, (batch, height, width), plan, left)
            return method(sample, *args, **kwargs)

        return run

    for kind in ("encode", "decode"):
        setattr(vae, kind, planned(kind, getattr(vae, kind)))
    vae._plans_each_pass = True
