"""`max_vram`: pick the resident blocks that fit a memory budget, from the first training step's measured peak.

The first step runs with every block streamed. Its peak (the non-block layers, the LoRA and its gradients,
the blocks in flight and one block's working set) is what streaming cannot avoid; the budget left after it
and the optimizer state is filled with resident blocks, so later steps copy less: first ones first, except that
blocks `max_ram` left on disk go first, since each of them costs two disk reads a step.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .block_weights import BlockWeights

logger = logging.getLogger(__name__)

_UNITS = {"": 10**9, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
SAFETY_MARGIN = 0.05  # of the budget: allocator rounding and fragmentation


class VramBudgetError(ValueError):
    """The budget is below what one step needs with every block streamed."""


def parse_memory(value: str | int | float, name: str = "max_vram") -> int:
    """'6GB', '6 GiB', '6000MB' or a number of GB in text -> bytes; an int is already bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{name} must be above zero, got {value!r}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{name} must look like '6GB', '6GiB' or '6000MB', got {value!r}")
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if size <= 0:
        raise ValueError(f"{name} must be above zero, got {value!r}")
    return int(size)


class VramPlanner:
    """Measures the first training step and chooses the resident set and prefetch depth for `budget` bytes."""

    def __init__(
        self, budget: int, device: torch.device, optimizer_state_bytes: int, remedies: tuple[str, ...] = ()
    ) -> None:
        self.budget = budget
        self.device = device
        self.optimizer_state_bytes = optimizer_state_bytes
        self.remedies = remedies  # settings still off that lower the streamed peak, named if the budget is too low
        self.measuring = False

    def start_measuring(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self.measuring = True

    def measured_peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def plan(
        self, streamed: dict[int, BlockWeights], prefetch: int, peak: int, order: list[int] | None = None
    ) -> tuple[list[int], int]:
        """Resident blocks and prefetch depth from `peak`, the allocated peak of the step just finished with the
        `streamed` blocks (index -> weights) and `prefetch` blocks copied ahead; `order` is the order in which
        streamed blocks are made resident while they fit (default: first ones first)."""
        usable = self.budget * (1 - SAFETY_MARGIN) - self.optimizer_state_bytes
        # what a prefetch surely holds at a backward peak: the smallest block, or its part before the late piece
        prefetched = min(weights.early_nbytes for weights in streamed.values())
        if peak > usable and prefetch > 0:
            peak, prefetch = peak - prefetch * prefetched, 0  # one block in flight only: slower, but it may fit
        if peak > usable:
            remedies = ", ".join(("raise max_vram", *self.remedies, "lower the resolution or batch size"))
            raise VramBudgetError(
                f"max_vram {self.budget / 1e9:.2f} GB is below one step with every block streamed "
                f"({(peak + self.optimizer_state_bytes) / 1e9:.2f} GB measured): {remedies}"
            )
        room, resident = usable - peak, []
        for index in order if order is not None else sorted(streamed):
            if streamed[index].nbytes > room:
                break
            room -= streamed[index].nbytes
            resident.append(index)
        logger.info(
            "accelerate-offload: max_vram %.2f GB, first step peaked at %.2f GB streaming everything: "
            "%d more blocks resident, prefetch %d",
            self.budget / 1e9, peak / 1e9, len(resident), prefetch,
        )
        return resident, prefetch
