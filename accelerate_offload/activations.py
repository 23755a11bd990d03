"""Activation shuttling: the block inputs that checkpointing keeps for the backward pass wait in CPU memory.

Non-reentrant checkpointing saves each block's positional tensor inputs as saved tensors, so a
`saved_tensors_hooks` pair placed around the `checkpoint` call sees exactly those and nothing inside the block.
Packing copies a tensor to pinned memory on a side stream; the backward pass prefetches the inputs of the
next blocks to recompute, so GPU memory for activations stays flat however many blocks there are.

A packed tensor's device memory can be reused only once its copy has run: until then the caching allocator
holds it back (reserved, no longer allocated). In a forward pass the GPU cannot keep up with (copy-bound at
1024², say), the CPU would queue block after block, and their inputs would wait on the device together; the CPU
therefore waits, as a block starts, until the inputs of the block `blocks_in_flight` back are on the host, as
FSDP's rate limiter does for its all-gathers.
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager

import torch

from .streams import CopyStreams


class SavedActivation:
    """One packed tensor: its host copy, and a device copy while one is prefetched or kept."""

    __slots__ = ("host", "offloaded", "device_tensor", "ready", "kept", "__weakref__")

    def __init__(self, tensor: torch.Tensor, pin_memory: bool, streams: CopyStreams) -> None:
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin_memory)
        self.offloaded = streams.device_to_host(tensor, self.host)
        self.device_tensor: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.kept = False

    def keep(self, tensor: torch.Tensor) -> None:
        """Serves this tensor from the device from now on: it is shared by several blocks and alive anyway."""
        self.device_tensor, self.ready, self.kept = tensor, None, True

    def prefetch(self, device: torch.device, streams: CopyStreams) -> None:
        if self.device_tensor is None:
            self.device_tensor, self.ready = streams.host_to_device(self.host, device, after=self.offloaded)

    def unpack(self, device: torch.device, streams: CopyStreams) -> torch.Tensor:
        if self.device_tensor is None:
            self.prefetch(device, streams)
        tensor = self.device_tensor
        streams.wait(self.ready)
        if not self.kept:
            self.device_tensor, self.ready = None, None  # a second recompute fetches again
        return tensor


class ActivationShuttle:
    """Packs block inputs to host memory during forward and brings them back ahead of recomputation."""

    def __init__(
        self,
        device: torch.device,
        streams: CopyStreams,
        pin_memory: bool,
        min_bytes: int,
        blocks_in_flight: int | None = 2,
    ) -> None:
        self.device = device
        self.streams = streams
        self.pin_memory = pin_memory
        self.min_bytes = min_bytes
        self.blocks_in_flight = blocks_in_flight  # None: the CPU never waits for a copy to the host
        self.packed_bytes = 0
        self._by_block: dict[int, list[weakref.ref[SavedActivation]]] = {}
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], SavedActivation]] = {}

    def saving(self, block_index: int) -> AbstractContextManager:
        """The hooks for one block's checkpoint call; the first block starts a new forward pass."""
        if block_index == 0:
            self._seen.clear()  # identity dedupes tensors within one forward pass only
        self._by_block[block_index] = []
        if self.blocks_in_flight is not None:
            self._wait_for_copies_of(block_index - self.blocks_in_flight)

        def pack(tensor: torch.Tensor) -> torch.Tensor | SavedActivation:
            return self._pack(block_index, tensor)

        return torch.autograd.graph.saved_tensors_hooks(pack, self._unpack)

    def prefetch(self, block_indices: list[int]) -> None:
        for index in block_indices:
            for ref in self._by_block.get(index, ()):
                saved = ref()
                if saved is not None:
                    saved.prefetch(self.device, self.streams)

    def _wait_for_copies_of(self, block_index: int) -> None:
        """Blocks the CPU until the inputs of `block_index` (and, copied in order, all before) are on the host."""
        for ref in reversed(self._by_block.get(block_index, ())):
            saved = ref()
            if saved is not None and saved.offloaded is not None:
                saved.offloaded.synchronize()
                return

    def _pack(self, block_index: int, tensor: torch.Tensor) -> torch.Tensor | SavedActivation:
        if tensor.device != self.device or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        seen = self._seen.get(id(tensor))
        if seen is not None and seen[0]() is tensor:
            seen[1].keep(tensor)
            return seen[1]
        saved = SavedActivation(tensor, self.pin_memory, self.streams)
        self.packed_bytes += saved.host.numel() * saved.host.element_size()
        self._seen[id(tensor)] = (weakref.ref(tensor), saved)
        self._by_block[block_index].append(weakref.ref(saved))
        return saved

    def _unpack(self, packed: torch.Tensor | SavedActivation) -> torch.Tensor:
        if isinstance(packed, SavedActivation):
            return packed.unpack(self.device, self.streams)
        return packed
