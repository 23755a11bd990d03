"""The frozen tensors of one streamed block, kept once in one flat host buffer.

One buffer per block means one host-to-device copy per load (large copies reach full bandwidth; many small ones
do not) and no second CPU copy: the model's own parameters are re-pointed at views of the buffer. Trainable
parameters (LoRA) never enter it: they stay on the compute device where the optimizer holds them.

Each host view is its own storage over the shared memory (`torch.frombuffer`), so state dicts of a streamed
model serialise like any other: safetensors refuses tensors that share one storage.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

ALIGNMENT = 256  # bytes; keeps every view aligned for vectorised kernels


@dataclass(frozen=True)
class _Slot:
    module: nn.Module
    name: str
    qualified_name: str
    is_parameter: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


class BlockWeights:
    """Owns a block's frozen parameters and buffers and points them at host or device storage."""

    def __init__(self, block: nn.Module, pin_memory: bool) -> None:
        self._slots: list[_Slot] = []
        sources: list[torch.Tensor | None] = []
        offsets: dict[int, int] = {}  # a tensor shared by two modules is stored once
        offset = 0
        for prefix, module in block.named_modules(remove_duplicate=False):
            for is_parameter, tensors in ((True, module._parameters), (False, module._buffers)):
                for name, tensor in tensors.items():
                    if tensor is None or (is_parameter and tensor.requires_grad):
                        continue
                    nbytes = tensor.numel() * tensor.element_size()
                    shared = id(tensor) in offsets
                    if not shared:
                        offsets[id(tensor)] = offset
                        offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
                    qualified = f"{prefix}.{name}" if prefix else name
                    self._slots.append(
                        _Slot(module, name, qualified, is_parameter, offsets[id(tensor)], nbytes, tensor.dtype,
                              tensor.shape)
                    )
                    sources.append(None if shared else tensor)
        self.nbytes = offset
        self._memory = np.empty(offset + ALIGNMENT, dtype=np.uint8)
        self._base = -self._memory.ctypes.data % ALIGNMENT
        self.host = self._host_tensor(torch.uint8, offset, 0)
        if pin_memory:
            _pin_in_place(self._memory, self.host)
        self._host_views = [
            self._host_tensor(slot.dtype, slot.nbytes // slot.dtype.itemsize, slot.offset).view(slot.shape)
            for slot in self._slots
        ]
        for view, source in zip(self._host_views, sources):
            if source is not None:
                view.copy_(source)
        self.point_at_host()

    def _host_tensor(self, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self._memory, dtype=dtype, count=count, offset=self._base + offset)

    def point_at_host(self) -> None:
        """Re-points every managed tensor at its host view (dropping the block from the device)."""
        self._assign(self._host_views)

    def point_at(self, buffer: torch.Tensor) -> None:
        """Re-points every managed tensor at its place in `buffer`, a device copy of the host buffer."""
        self._assign(
            [buffer[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self._slots]
        )

    def _assign(self, tensors: list[torch.Tensor]) -> None:
        for slot, tensor in zip(self._slots, tensors):
            if slot.is_parameter:
                slot.module._parameters[slot.name].data = tensor
            else:
                slot.module._buffers[slot.name] = tensor

    def dtypes(self) -> set[torch.dtype]:
        return {slot.dtype for slot in self._slots}

    def names(self) -> list[str]:
        """Names of the managed tensors relative to the block."""
        return [slot.qualified_name for slot in self._slots]

    def release_to(self, device: torch.device | str) -> None:
        """Gives every managed tensor its own plain copy on `device` (tensors shared in the block stay shared)."""
        copies: dict[int, torch.Tensor] = {}
        for slot, view in zip(self._slots, self._host_views):
            if slot.offset not in copies:
                copies[slot.offset] = view.to(device, copy=True)
        self._assign([copies[slot.offset] for slot in self._slots])


def _pin_in_place(memory: np.ndarray, buffer: torch.Tensor) -> None:
    """Page-locks `buffer` with cudaHostRegister.

    torch's pinned allocator rounds every allocation up to a power of two (a 0.68 GB Flux block would take
    1 GiB); registering an ordinary allocation pins exactly its size.
    """
    if buffer.numel() == 0 or not torch.cuda.is_available():
        return
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if int(error) != 0:
        raise RuntimeError(f"cudaHostRegister of {buffer.numel() / 2**20:.0f} MiB failed with error {int(error)}")
    weakref.finalize(memory, cudart.cudaHostUnregister, buffer.data_ptr())


def guard_device_moves(block: nn.Module, weights: BlockWeights) -> None:
    """Makes `.to(device)` on a streamed block move only its trainable tensors.

    `accelerator.prepare` calls `model.to(device)`; without this guard it would copy every streamed weight to
    the GPU. A dtype change is refused: it would silently leave the streamed weights in their old dtype.
    """

    def guarded_apply(fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        for dtype in weights.dtypes():
            if fn(torch.empty(0, dtype=dtype)).dtype != dtype:
                raise RuntimeError(
                    "cannot change the dtype of a streamed block; cast the model before offloading it"
                )
        with torch.no_grad():
            for module in block.modules():
                for param in module._parameters.values():
                    if param is not None and param.requires_grad:
                        param.data = fn(param)
                        if param.grad is not None:
                            param.grad.data = fn(param.grad)
        return block

    block._apply = guarded_apply
