"""`LayerOffloadConductor`: which blocks sit on the device, and when streamed ones are loaded and dropped.

The first ceil((1 - fraction) * N) blocks stay resident; the rest live in host memory and are copied in just
before they run, `prefetch_blocks` ahead, in forward order during the forward pass and in reverse order during
the backward pass. Frozen weights are never copied back: dropping a block is re-pointing its parameters at the
host buffer. A block loaded for a recomputation that non-reentrant checkpointing stopped early is left behind
(nothing after the early stop runs), so every `before_block` first evicts whatever it does not need.

Blocks whose feed-forward follows attention (Flux double blocks, SD3 joint blocks) are stored in two pieces. In
backward, once a block's attention backward starts (`late_piece_done`), its feed-forward is done with its
weights: they leave, and only then do the prefetched block's feed-forward weights arrive. At a block's
backward, the peak of a streamed step, the prefetched block is then on the device without its feed-forward.
The forward pass arms that signal (`signal_armed`); a block whose forward did not (run in token chunks, say)
has its neighbour prefetched whole, so the first step peaks no higher than the ones after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .activations import ActivationShuttle
from .block_compiler import BlockCompiler
from .block_weights import BlockWeights, guard_device_moves
from .disk_tier import DiskTier
from .planner import VramPlanner
from .shared_weights import share_host_buffers
from .streams import CopyStreams
from .timeline import StepTrace


@dataclass
class _Loaded:
    """One piece of a block on the device: its buffer, and the copy the compute stream must wait for."""

    buffer: torch.Tensor
    ready: torch.cuda.Event | None
    waited: bool = False


def resident_block_count(block_count: int, layer_offload_fraction: float) -> int:
    # round first: (1 - 0.7) * 10 is 3.0000000000000004 in floating point
    return math.ceil(round((1.0 - layer_offload_fraction) * block_count, 9))


class LayerOffloadConductor:
    """Keeps a model's sequential blocks on the device as they are needed, and no longer."""

    def __init__(
        self,
        blocks: list[nn.Module],
        device: torch.device,
        streams: CopyStreams,
        layer_offload_fraction: float,
        prefetch_blocks: int,
        pin_memory: bool,
        activations: ActivationShuttle | None = None,
        late_modules: dict[int, tuple[nn.Module, ...]] | None = None,
        share_host_weights: bool | str = False,
        disk_tier: Callable[[dict[int, BlockWeights]], DiskTier | None] | None = None,
    ) -> None:
        self.device = device
        self.streams = streams
        self.blocks = blocks
        self.block_count = len(blocks)
        self.prefetch_blocks = prefetch_blocks
        self.activations = activations
        resident_count = resident_block_count(len(blocks), layer_offload_fraction)
        late_modules = late_modules or {}
        self.weights: dict[int, BlockWeights] = {
            index: BlockWeights(block, late_modules.get(index, ()))
            for index, block in enumerate(blocks)
            if index >= resident_count
        }
        # max_ram: the streamed blocks past the budget, read from disk; chosen from the layouts, before any buffer
        self.disk: DiskTier | None = disk_tier(self.weights) if disk_tier is not None else None
        self.shared_host = share_host_buffers(self.weights, pin_memory, share_host_weights)
        if not self.shared_host:
            for index, weights in self.weights.items():
                if self.is_on_disk(index):  # one disk block in host memory at a time: filled, stored, dropped
                    weights.place_in_private_memory(pin_memory=False)
                    self.disk.store(index, weights.host)
                    weights.drop_host()
                else:
                    weights.place_in_private_memory(pin_memory)
        for index, weights in self.weights.items():
            guard_device_moves(blocks[index], weights)
        if self.disk is not None:
            self.disk.open()
        self.planner: VramPlanner | None = None  # set for max_vram: picks resident blocks after the first step
        self.trace: StepTrace | None = None  # set while a step is traced for the VRAM timeline
        self.compiler: BlockCompiler | None = None  # set for compile_blocks: reports compiling as a forward starts
        self.log: list[tuple[str, int]] | None = None  # ("load" | "evict" | "load late" | "evict late", block)
        self.poison_evicted = False  # fill dropped device copies with NaN bytes: use-after-evict shows in tests
        self.peak_streamed_on_device = 0
        self.bytes_loaded = 0  # host->device weight traffic since the model was offloaded
        self._loaded: dict[int, dict[int, _Loaded]] = {}  # block -> piece -> its device copy
        self._armed: set[int] = set()  # blocks whose forward armed the attention-backward signal
        self._end_of_backward_queued = False

    def is_streamed(self, index: int) -> bool:
        return index in self.weights

    def is_on_disk(self, index: int) -> bool:
        return self.disk is not None and index in self.disk.offsets and index in self.weights

    @property
    def resident_count(self) -> int:
        return self.block_count - len(self.weights)

    def make_resident(self, indices: list[int], device: torch.device | str | None = None) -> None:
        """Stops streaming these blocks: their weights get plain storage on `device` (default: the compute device)."""
        for index in indices:
            if index in self._loaded:
                self._evict(index)
            if self.is_on_disk(index):
                self.disk.release(index)
                self.weights[index].restore_host(self.disk.read_whole(index))
            self.weights.pop(index).release_to(device or self.device)
            del self.blocks[index]._apply  # the device-move guard

    def residency_order(self) -> list[int]:
        """The streamed blocks in the order `max_vram` makes them resident: those read from disk first (each one
        resident saves two disk reads a step and keeps the pinned blocks where they are), then the first ones."""
        return sorted(self.weights, key=lambda index: (not self.is_on_disk(index), index))

    @property
    def streamed_on_device(self) -> list[int]:
        return sorted(self._loaded)

    def before_block(self, index: int, backward: bool) -> None:
        """Called as block `index` starts to run (forward, inference, or recomputation in backward)."""
        if self.trace is not None:
            self.trace.mark("backward" if backward else "forward", index)
        if index == 0 and not backward and self.compiler is not None:
            self.compiler.report()
        if index == 0 and not backward and self.planner is not None and torch.is_grad_enabled():
            self.planner.start_measuring()
        if not backward:
            self._armed.discard(index)  # armed again if its attention runs in this forward
        targets = self._upcoming(index, backward)
        for stale in [i for i in self._loaded if i != index and i not in targets]:
            self._evict(stale)
        if self.disk is not None:
            self.disk.prefetch(self._disk_order(index, backward))
        if self.is_streamed(index):
            self._wait_for(index, backward)
        for target in targets:
            late_follows = backward and index in self._armed
            self._load(target, self.weights[target].early_pieces if late_follows else None)
        self.peak_streamed_on_device = max(self.peak_streamed_on_device, len(self._loaded))
        if self.activations is not None and backward:
            self.activations.prefetch(self._neighbours(index, backward))
        if backward and not self._end_of_backward_queued and torch._C._current_graph_task_id() != -1:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._end_of_backward_queued = True

    def signal_armed(self, index: int) -> None:
        """Called in block `index`'s forward: `late_piece_done(index)` will come in backward."""
        self._armed.add(index)

    def late_piece_done(self, index: int) -> None:
        """Called as block `index`'s attention backward starts: its feed-forward backward is over. Its late piece
        leaves the device and the prefetched blocks' late pieces are copied in its place."""
        late = self.weights[index].late_piece if index in self._loaded else None
        if late is not None and late in self._loaded[index]:
            self._evict(index, (late,))
            self._record("evict late", index)
        for target in self._upcoming(index, backward=True):
            if self._missing_late_piece(target):
                self._record("load late", target)
            self._load(target)

    def after_block(self, index: int) -> None:
        """Called when block `index` has run forward. Not called after a recomputation (which may stop early)."""
        last_before_backward = index == self.block_count - 1 and torch.is_grad_enabled()
        if index in self._loaded and not last_before_backward:  # backward starts with the last block
            self._evict(index)

    def evict_all(self) -> None:
        for index in list(self._loaded):
            self._evict(index)

    def _end_of_backward(self) -> None:
        self._end_of_backward_queued = False
        self.evict_all()
        if self.planner is not None and self.planner.measuring:
            resident, self.prefetch_blocks = self.planner.plan(
                self.weights, self.prefetch_blocks, self.planner.measured_peak(), self.residency_order()
            )
            self.make_resident(resident)
            self.planner = None

    def _neighbours(self, index: int, backward: bool) -> list[int]:
        step = -1 if backward else 1
        depth = max(self.prefetch_blocks, 1)
        return [i for i in range(index + step, index + step * (depth + 1), step) if 0 <= i < self.block_count]

    def _upcoming(self, index: int, backward: bool) -> list[int]:
        """The streamed blocks to have on the device while `index` runs: the next `prefetch_blocks` of them."""
        step = -1 if backward else 1
        upcoming = []
        position = index + step
        while len(upcoming) < self.prefetch_blocks and 0 <= position < self.block_count:
            if self.is_streamed(position):
                upcoming.append(position)
            position += step
        return upcoming

    def _disk_order(self, index: int, backward: bool) -> list[int]:
        """Disk blocks to have in staging, soonest first: this one and those after it not yet whole on the device,
        as many as the ring holds (deeper than the device prefetch: disk reads take longer)."""
        step, order, position = (-1 if backward else 1), [], index
        while len(order) < len(self.disk.slots) and 0 <= position < self.block_count:
            whole = position in self._loaded and len(self._loaded[position]) == len(self.weights[position].pieces)
            if self.is_on_disk(position) and not whole:
                order.append(position)
            position += step
        return order

    def _missing_late_piece(self, index: int) -> bool:
        """Whether `index` is on the device with its late piece still to come."""
        late = self.weights[index].late_piece
        return late is not None and index in self._loaded and late not in self._loaded[index]

    def _load(self, index: int, pieces: tuple[int, ...] | None = None) -> None:
        weights = self.weights[index]
        if index not in self._loaded:
            self._loaded[index] = {}
            self._record("load", index)
        loaded = self._loaded[index]
        on_disk = self.is_on_disk(index)
        for piece in range(len(weights.pieces)) if pieces is None else pieces:
            if piece in loaded:
                continue
            span = weights.pieces[piece]
            host = self.disk.host(index)[span.start : span.start + span.nbytes] if on_disk else weights.host_piece(piece)
            buffer, ready = self.streams.host_to_device(host, self.device)
            weights.point_at(buffer, piece)
            loaded[piece] = _Loaded(buffer, ready)
            self.bytes_loaded += span.nbytes
            if on_disk:
                self.disk.copied(index, ready)
        if on_disk and len(loaded) == len(weights.pieces):
            self.disk.release(index)

    def _wait_for(self, index: int, backward: bool) -> None:
        self._load(index)  # also the late piece of a block prefetched without it whose signal never came
        for loaded in self._loaded[index].values():
            if not loaded.waited:
                self.streams.wait(loaded.ready)
                loaded.waited = True

    def _evict(self, index: int, pieces: tuple[int, ...] | None = None) -> None:
        loaded = self._loaded[index]
        for piece in list(loaded) if pieces is None else pieces:
            copy = loaded.pop(piece)
            if not copy.waited:  # a prefetch never used: its copy must finish before the memory is reused
                self.streams.wait(copy.ready)
            self.weights[index].point_at_host(piece)
            if self.poison_evicted:
                copy.buffer.fill_(255)
        if not loaded:
            del self._loaded[index]
            self._record("evict", index)
            if self.is_on_disk(index):
                self.disk.release(index)

    def _record(self, event: str, index: int) -> None:
        if self.log is not None:
            self.log.append((event, index))
