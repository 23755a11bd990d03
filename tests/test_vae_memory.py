"""VAE passes split only when the budget calls for it, and a split pass fits the room it was planned for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from accelerate_offload.vae_memory import (
    SMALLEST_TILE,
    VaePlan,
    apply_vae_plan,
    fit_vae,
    pass_bytes,
    plan_each_pass,
    plan_vae_pass,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_memory import LiveTensorBytes  # noqa: E402

GB = 10**9
FLUX_CHANNELS, FLUX_TILE, BF16 = 128, 1024, 2


def test_a_pass_that_fits_stays_whole() -> None:
    assert plan_vae_pass(FLUX_CHANNELS, FLUX_TILE, 1024, 1024, 1, BF16, 4 * GB, "decode") == VaePlan()


def test_2048_decode_in_a_5gb_card_is_tiled() -> None:
    room = 4 * GB  # a 5 GB budget less what training keeps on the GPU
    assert pass_bytes(FLUX_CHANNELS, 2048, 2048, 1, BF16, "decode") > room
    plan = plan_vae_pass(FLUX_CHANNELS, FLUX_TILE, 2048, 2048, 1, BF16, room, "decode")
    assert plan.tile_size is not None and plan.tile_size < 2048 and not plan.slicing
    assert pass_bytes(FLUX_CHANNELS, plan.tile_size, plan.tile_size, 1, BF16, "decode") < room


def test_a_batch_that_does_not_fit_is_sliced_before_it_is_tiled() -> None:
    one = pass_bytes(FLUX_CHANNELS, 1024, 1024, 1, BF16, "encode")
    plan = plan_vae_pass(FLUX_CHANNELS, FLUX_TILE, 1024, 1024, 4, BF16, 2 * one, "encode")
    assert plan == VaePlan(slicing=True)


def test_no_room_gives_the_smallest_tiles() -> None:
    assert plan_vae_pass(FLUX_CHANNELS, FLUX_TILE, 2048, 2048, 2, BF16, 0, "decode") == VaePlan(True, SMALLEST_TILE)


def small_vae():
    """The Flux VAE's layout (two resnets a stage, four stages) at a quarter of its width, fast on a CPU."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def live_peak(vae, kind: str, size: int) -> int:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), LiveTensorBytes() as live:
        if kind == "decode":
            vae.decode(torch.randn(1, 16, size // 8, size // 8, generator=generator))
        else:
            vae.encode(torch.randn(1, 3, size, size, generator=generator))
    return live.peak


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_the_estimate_covers_the_pass_and_a_planned_split_fits(kind: str) -> None:
    vae = small_vae()
    size = 512
    whole = pass_bytes(32, size, size, 1, 4, kind)
    assert live_peak(vae, kind, size) <= whole
    room = whole // 2
    plan = fit_vae(vae, size, size, 1, room, kind)
    assert plan.tile_size == SMALLEST_TILE and vae.use_tiling
    assert live_peak(vae, kind, size) <= room
    apply_vae_plan(vae, VaePlan())
    assert not vae.use_tiling and vae.tile_sample_min_size == 1024 and vae.tile_latent_min_size == 128


def test_each_pass_is_planned_for_the_room_left_as_it_starts() -> None:
    vae = small_vae()
    whole = pass_bytes(32, 512, 512, 1, 4, "decode")
    room = [whole * 2]
    heard = []
    plan_each_pass(vae, lambda: room[0], lambda kind, shape, plan, left: heard.append((kind, shape, plan, left)))
    plan_each_pass(vae, lambda: 0, lambda *_: heard.append("wrapped twice"))  # once per VAE
    latent = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae.decode(latent)
        assert not vae.use_tiling
        room[0] = whole // 2  # something else took the GPU between two passes
        tiled = vae.decode(latent).sample
        assert vae.use_tiling and vae.tile_sample_min_size == SMALLEST_TILE
        vae.decode(latent)  # the same plan again: not reported twice
    assert heard == [
        ("decode", (1, 512, 512), VaePlan(), whole * 2),
        ("decode", (1, 512, 512), VaePlan(tile_size=SMALLEST_TILE), whole // 2),
    ]
    assert tiled.shape == (1, 3, 512, 512)
