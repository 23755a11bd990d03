"""The frozen tensors of one streamed block, kept once in one flat host buffer.

One buffer per block means few, large host-to-device copies (large copies reach full bandwidth; many small ones
do not) and no second CPU copy: the model's own parameters are re-pointed at views of the buffer. Trainable
parameters (LoRA) never enter it: they stay on the compute device where the optimizer holds them.

A block whose feed-forward runs after its attention keeps those weights in a second, "late" piece of the
buffer. Each piece is copied to its own device allocation, so in backward the late piece can leave the device as
soon as the feed-forward's backward is done, and the next block's late piece arrive only then.

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
_LIVE: weakref.WeakSet[BlockWeights] = weakref.WeakSet()


@dataclass(frozen=True)
class Piece:
    """A contiguous range of the host buffer, copied to the device as one allocation."""

    start: int
    nbytes: int


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
    piece: int


def live_block_weights() -> list[BlockWeights]:
    """The streamed blocks' host buffers still alive: after a job's teardown, none."""
    return list(_LIVE)


class BlockWeights:
    """Owns a block's frozen parameters and buffers and points them at host or device storage.

    `late_modules` (submodules of the block) go into a second piece when no tensor is shared across the two.
    Construction lays the buffer out only; `place_in_private_memory` (or `attach`, `fill_from_sources` and
    `settle`, for a buffer shared between processes) gives it memory and takes the tensors over.
    """

    def __init__(self, block: nn.Module, late_modules: tuple[nn.Module, ...] = ()) -> None:
        late = {id(module) for root in late_modules for module in root.modules()}
        frozen = [
            (prefix, module, is_parameter, name, tensor)
            for prefix, module in block.named_modules(remove_duplicate=False)
            for is_parameter, tensors in ((True, module._parameters), (False, module._buffers))
            for name, tensor in tensors.items()
            if tensor is not None and not (is_parameter and tensor.requires_grad)
        ]
        piece_of = [int(id(module) in late) for _, module, _, _, _ in frozen]
        pieces_by_tensor: dict[int, set[int]] = {}
        for (_, _, _, _, tensor), piece in zip(frozen, piece_of):
            pieces_by_tensor.setdefault(id(tensor), set()).add(piece)
        if any(len(pieces) > 1 for pieces in pieces_by_tensor.values()) or 1 not in piece_of or 0 not in piece_of:
            piece_of = [0] * len(frozen)  # a tensor in both pieces, or one piece empty: keep the block whole

        _LIVE.add(self)
        self._slots: list[_Slot] = []
        sources: list[torch.Tensor | None] = []
        offsets: dict[int, int] = {}  # a tensor shared by two modules is stored once
        self.pieces: list[Piece] = []
        offset = 0
        for piece in sorted(set(piece_of)):
            start = offset
            for (prefix, module, is_parameter, name, tensor), tensor_piece in zip(frozen, piece_of):
                if tensor_piece != piece:
                    continue
                nbytes = tensor.numel() * tensor.element_size()
                shared = id(tensor) in offsets
                if not shared:
                    offsets[id(tensor)] = offset
                    offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
                qualified = f"{prefix}.{name}" if prefix else name
                self._slots.append(
                    _Slot(module, name, qualified, is_parameter, offsets[id(tensor)], nbytes, tensor.dtype,
                          tensor.shape, piece)
                )
                sources.append(None if shared else tensor)
            self.pieces.append(Piece(start, offset - start))
        self.pieces = self.pieces or [Piece(0, 0)]
        self.late_piece: int | None = 1 if len(self.pieces) > 1 else None  # the feed-forward's, if split
        self.early_pieces: tuple[int, ...] = (0,)  # what a backward prefetch copies before the late piece
        self.nbytes = offset
        self.memory_nbytes = offset + ALIGNMENT  # room to align the start; the padding is zeros too
        self._sources = sources  # the model's own tensors, until `settle`
        self.host = torch.empty(0, dtype=torch.uint8)  # no memory yet

    def place_in_private_memory(self, pin_memory: bool) -> None:
        """Copies the block's tensors into a buffer of this process and points them at it."""
        self.attach(np.zeros(self.memory_nbytes, dtype=np.uint8), pin_memory)  # zeros: block files compare alike
        self.fill_from_sources()
        self.settle()

    def attach(self, memory: np.ndarray, pin_memory: bool) -> None:
        """Lays the host buffer and its views over `memory` (`memory_nbytes` bytes), page-locked if asked."""
        self._memory = memory
        self._base = -self._memory.ctypes.data % ALIGNMENT
        self.host = self._host_tensor(torch.uint8, self.nbytes, 0)
        if pin_memory:
            pin_in_place(self._memory, self.host)
        self._host_views = [
            self._host_tensor(slot.dtype, slot.nbytes // slot.dtype.itemsize, slot.offset).view(slot.shape)
            for slot in self._slots
        ]

    def fill_from_sources(self) -> None:
        """Copies the model's own tensors into the host buffer."""
        for view, source in zip(self._host_views, self._sources):
            if source is not None:
                view.copy_(source)

    def first_difference(self, samples: int = 64) -> str | None:
        """The name of the first tensor whose sampled elements differ from the host buffer's, or None: a cheap
        check that a buffer filled by another process holds this process's weights."""
        for slot, view, source in zip(self._slots, self._host_views, self._sources):
            if source is None or source.numel() == 0:
                continue
            picks = torch.linspace(0, source.numel() - 1, min(samples, source.numel())).long()
            if not torch.equal(source.reshape(-1)[picks].view(torch.uint8), view.reshape(-1)[picks].view(torch.uint8)):
                return slot.qualified_name
        return None

    def settle(self) -> None:
        """Points the tensors at their host views; the model's own copies are let go."""
        self._sources = []
        self.point_at_host()

    def drop_host(self) -> None:
        """Frees the host buffer of a block kept on disk; its tensors point at a one-element placeholder per slot
        (NaN bytes, so a read of an evicted disk block shows) until a device copy or `restore_host`."""
        filler = torch.full((16,), 255, dtype=torch.uint8)
        self._host_views = [filler[: s.dtype.itemsize].view(s.dtype).reshape(()).expand(s.shape) for s in self._slots]
        self._memory = np.empty(0, dtype=np.uint8)
        self.host = torch.empty(0, dtype=torch.uint8)
        self.point_at_host()

    def restore_host(self, host: torch.Tensor) -> None:
        """Points the block back at a host copy of its bytes (read back from disk)."""
        self.host = host
        self._host_views = [host[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in self._slots]
        self.point_at_host()

    def _host_tensor(self, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self._memory, dtype=dtype, count=count, offset=self._base + offset)

    @property
    def early_nbytes(self) -> int:
        """Bytes a backward prefetch copies: all but the late piece (the late one comes once the block before is
        done with its own)."""
        return sum(self.pieces[piece].nbytes for piece in self.early_pieces)

    def host_piece(self, piece: int) -> torch.Tensor:
        """The host bytes of one piece, for copying it to the device."""
        return self.host[self.pieces[piece].start : self.pieces[piece].start + self.pieces[piece].nbytes]

    def point_at_host(self, piece: int | None = None) -> None:
        """Re-points the managed tensors (of one piece, or all) at their host views, dropping them from the device."""
        self._assign(self._host_views, piece)

    def point_at(self, buffer: torch.Tensor, piece: int) -> None:
        """Re-points one piece's tensors at their places in `buffer`, a device copy of `host_piece(piece)`."""
        start = self.pieces[piece].start
        self._assign(
            [buffer[s.offset - start : s.offset - start + s.nbytes].view(s.dtype).view(s.shape)
             if s.piece == piece else None for s in self._slots],
            piece,
        )

    def _assign(self, tensors: list[torch.Tensor | None], piece: int | None = None) -> None:
        for slot, tensor in zip(self._slots, tensors):
            if piece is not None and slot.piece != piece:
                continue
            if slot.is_parameter:
                slot.module._parameters[slot.name].data = tensor
            else:
                slot.module._buffers[slot.name] = tensor

    def dtypes(self) -> set[torch.dtype]:
        return {slot.dtype for slot in self._slots}

    def tensors(self) -> list[tuple[str, int, int, torch.dtype, torch.Size]]:
        """(name relative to the block, offset, bytes, dtype, shape) of each stored tensor, a shared one once."""
        seen, stored = set(), []
        for slot in self._slots:
            if slot.offset not in seen:
                seen.add(slot.offset)
                stored.append((slot.qualified_name, slot.offset, slot.nbytes, slot.dtype, slot.shape))
        return stored

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


def pin_in_place(memory: np.ndarray, buffer: torch.Tensor) -> None:
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
