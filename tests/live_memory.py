"""Peak bytes of live tensors on any device, CPU included: a dispatch mode that sees every op, backward too.

Each op's new output storages count from their creation until they are freed; views and in-place results add
nothing. Memory used inside an op (kernel scratch space) is not seen. Lets CPU tests assert what a GPU's
allocator would report as the peak of a block's forward and backward.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.bytes = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for index, tensor in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(tensor, torch.Tensor) or (index < len(returns) and returns[index].alias_info):
                continue
            storage = tensor.untyped_storage()
            if not storage.nbytes():
                continue
            self._release_freed()  # first: a new storage may take the address of one freed since the last op
            if storage.data_ptr() not in self._live:
                self._live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                self.bytes += storage.nbytes()
                self.peak = max(self.peak, self.bytes)
        return out

    def _release_freed(self) -> None:
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self.bytes -= self._live.pop(key)[1]
