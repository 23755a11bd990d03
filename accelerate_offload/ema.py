"""An exponential moving average of the adapter, kept in CPU memory so that it costs no GPU memory.

Modelled on diffusers' `EMAModel` (same decay schedule: 0 at the first update n = 1, then
`min(decay, n / (9 + n))`), but for the trainable tensors only, in fp32 host memory. Each update copies the adapter
into pinned staging buffers with non-blocking copies and records an event; the average itself is taken at the next
update (or when the average is read), so the GPU never waits for the host. The state dict holds the average and the
update count: saved in every checkpoint through accelerate's `register_for_checkpointing`, it resumes bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class AdapterEMA:
    """The average of `model`'s trainable parameters (by name), in fp32 on the CPU."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.optimization_step = 0
        self.names = [name for name, param in model.named_parameters() if param.requires_grad]
        params = dict(model.named_parameters())
        pin = torch.cuda.is_available() and any(params[name].is_cuda for name in self.names)
        self.shadow = {name: params[name].detach().to("cpu", torch.float32, copy=True) for name in self.names}
        self._staging = {name: torch.empty_like(value, pin_memory=pin) for name, value in self.shadow.items()}
        self._pending: tuple[torch.cuda.Event | None, float] | None = None

    def current_decay(self, optimization_step: int) -> float:
        """The decay of update `optimization_step` (counted from 1), as EMAModel's without warm-up: the first
        update takes the adapter as it is, later ones approach `decay`."""
        step = optimization_step - 1
        return 0.0 if step <= 0 else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        """Takes in the adapter as it is after an optimizer step (the copy finishes while the GPU trains on)."""
        self._settle()
        params = dict(model.named_parameters())
        event = None
        for name in self.names:
            self._staging[name].copy_(params[name].detach(), non_blocking=True)
        if any(params[name].is_cuda for name in self.names):
            event = torch.cuda.Event()
            event.record()
        self.optimization_step += 1
        self._pending = (event, 1.0 - self.current_decay(self.optimization_step))

    def _settle(self) -> None:
        """Applies the update whose copy was queued last."""
        if self._pending is None:
            return
        event, weight = self._pending
        if event is not None:
            event.synchronize()
        for name in self.names:
            self.shadow[name].lerp_(self._staging[name], weight)
        self._pending = None

    def state_dict(self) -> dict:
        self._settle()
        return {"decay": self.decay, "optimization_step": self.optimization_step, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["shadow"]) != sorted(self.names):
            raise ValueError("the EMA in the checkpoint is of another adapter")
        self.decay = state["decay"]
        self.optimization_step = state["optimization_step"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self._pending = None

    @contextmanager
    @torch.no_grad()
    def averaged(self, model: nn.Module) -> Iterator[None]:
        """`model` holds the average inside the block, its trained weights again after it (kept in CPU memory)."""
        self._settle()
        params = dict(model.named_parameters())
        trained = {name: params[name].detach().to("cpu", copy=True) for name in self.names}
        try:
            for name in self.names:
                params[name].copy_(self.shadow[name])
            yield
        finally:
            for name in self.names:
                params[name].copy_(trained[name])


@contextmanager
def ema_weights(ema: AdapterEMA | None, model: nn.Module) -> Iterator[None]:
    """`model` holds the adapter's average inside the block when there is one (validation), as it was without."""
    if ema is None:
        yield
        return
    with ema.averaged(model):
        yield
