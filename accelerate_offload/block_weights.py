"""The frozen tensors of one streamed block, kept once in one flat host buffer.

One buffer per block means one host-to-device copy per load (large copies reach full bandwidth; many small ones
do not) and no second CPU copy: the model's own parameters are re-pointed at views of the buffer. Trainable
parameters (LoRA) never enter it: they stay on the compute device where the optimizer holds them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

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
        self.host = torch.empty(offset, dtype=torch.uint8)
        if pin_memory:
            _pin_in_place(self.host)
        for slot, source in zip(self._slots, sources):
            if source is not None:
                self._view(self.host, slot).copy_(source)
        self.point_at(self.host)

    @staticmethod
    def _view(buffer: torch.Tensor, slot: _Slot) -> torch.Tensor:
        return buffer[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)

    def point_at(self, buffer: torch.Tensor) -> None:
        """Re-points every managed tensor at `buffer` (the host buffer or a device copy of it)."""
        for slot in self._slots:
            view = self._view(buffer, slot)
            if slot.is_parameter:
                slot.module._parameters[slot.name].data = view
            else:
                slot.module._buffers[slot.name] = view

    def dtypes(self) -> set[torch.dtype]:
        return {slot.dtype for slot in self._slots}

    def names(self) -> list[str]:
        """Names of the managed tensors relative to the block."""
        return [slot.qualified_name for slot in self._slots]

    def release_to(self, device: torch.device | str) -> None:
        """Moves the managed tensors to a plain copy on `device` and lets the pinned buffer go."""
        self.point_at(self.host.to(device, copy=True))
        self.host = torch.empty(0, dtype=torch.uint8)


def _pin_in_place(buffer: torch.Tensor) -> None:
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
    weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr())
