"""`max_vram` planning from a measured peak: which blocks become resident, and the error when nothing fits.

The measuring itself needs CUDA (`tests/test_cuda.py`); the choice from a given peak is plain arithmetic and is
checked here on CPU against a model offloaded with every block streamed.
"""

from __future__ import annotations

import pytest
import torch

from accelerate_offload import offload_model
from accelerate_offload.planner import SAFETY_MARGIN, VramBudgetError, VramPlanner
from toy_models import ToyTransformer, add_lora

GB = 10**9


def streamed_toy(depth: int = 8, prefetch_blocks: int = 1):
    model = add_lora(ToyTransformer(32, depth), ["to_q"])
    return offload_model(model, "cpu", block_names=["blocks"], layer_offload_fraction=1.0,
                         prefetch_blocks=prefetch_blocks)


def planner_for(usable_bytes: float, remedies: tuple[str, ...] = ()) -> VramPlanner:
    return VramPlanner(int(usable_bytes / (1 - SAFETY_MARGIN)) + 1, torch.device("cpu"), 0, remedies)


def test_room_left_by_the_streamed_peak_fills_with_the_first_blocks() -> None:
    conductor = streamed_toy()
    block = conductor.weights[0].nbytes
    peak = 10 * block
    resident, prefetch = planner_for(peak + 3.5 * block).plan(conductor.weights, conductor.prefetch_blocks, peak)
    assert resident == [0, 1, 2] and prefetch == 1


def test_a_peak_just_over_the_budget_drops_prefetch_rather_than_failing() -> None:
    conductor = streamed_toy(prefetch_blocks=1)
    block = conductor.weights[0].nbytes
    peak = 10 * block
    resident, prefetch = planner_for(peak - 0.5 * block).plan(conductor.weights, conductor.prefetch_blocks, peak)
    assert prefetch == 0 and resident == []  # 0.5 block of room once the prefetched block is gone


def test_budget_below_the_streamed_step_names_every_remedy_left() -> None:
    conductor = streamed_toy(prefetch_blocks=0)
    planner = planner_for(GB, ("turn on activation_offloading", "set sequence_chunks: auto"))
    with pytest.raises(VramBudgetError) as error:
        planner.plan(conductor.weights, conductor.prefetch_blocks, 2 * GB)
    message = str(error.value)
    assert "\n" not in message
    for remedy in ("raise max_vram", "activation_offloading", "sequence_chunks: auto", "resolution or batch size"):
        assert remedy in message, message


def test_dropping_prefetch_counts_only_what_a_backward_prefetch_holds() -> None:
    """A double block is prefetched in backward without its feed-forward piece, and single blocks are smaller:
    the planner must not count a whole double block as freed when prefetch goes, or the budget breaks."""
    from test_models import tiny_flux, with_lora

    conductor = offload_model(with_lora(tiny_flux()), "cpu", layer_offload_fraction=1.0, prefetch_blocks=1)
    largest = max(weights.nbytes for weights in conductor.weights.values())
    held = min(weights.early_nbytes for weights in conductor.weights.values())
    assert held < largest
    peak = 100 * largest
    with pytest.raises(VramBudgetError):  # room only if a whole double block were freed
        planner_for(peak - (held + largest) / 2).plan(conductor.weights, conductor.prefetch_blocks, peak)
    resident, prefetch = planner_for(peak - held).plan(conductor.weights, conductor.prefetch_blocks, peak)
    assert prefetch == 0 and resident == []
