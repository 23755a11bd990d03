"""Host<->device copies on side CUDA streams, ordered against the compute stream with events.

Without CUDA (or with async copies off) the same calls copy synchronously, so the whole runtime runs — and is
tested — on a CPU compute device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .timeline import StepTrace


class CopyStreams:
    """One stream per direction: host->device and device->host copies then run at once (39 GB/s each on H100)."""

    def __init__(self, device: torch.device, async_copies: bool) -> None:
        self.device = device
        side_streams = device.type == "cuda" and async_copies
        self.upload = torch.cuda.Stream(device) if side_streams else None
        self.download = torch.cuda.Stream(device) if side_streams else None
        self.trace: StepTrace | None = None

    def host_to_device(
        self, host: torch.Tensor, device: torch.device, after: torch.cuda.Event | None = None
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Starts copying `host` to a new device tensor; compute must `wait` for the returned event before use.

        The destination is allocated on the compute stream and the copy waits for the work already queued
        there, so memory freed by that work is never overwritten while it may still be read.
        """
        out = torch.empty_like(host, device=device)
        if self.upload is None:
            out.copy_(host)
            return out, None
        self.upload.wait_stream(torch.cuda.current_stream(self.device))
        if after is not None:
            self.upload.wait_event(after)
        with torch.cuda.stream(self.upload):
            started = self._timing_event()
            out.copy_(host, non_blocking=True)
            ready = torch.cuda.Event(enable_timing=started is not None)
            ready.record(self.upload)
        if started is not None:
            self.trace.copy("host_to_device", started, ready, host.numel() * host.element_size())
        return out, ready

    def device_to_host(self, tensor: torch.Tensor, host: torch.Tensor) -> torch.cuda.Event | None:
        """Starts copying `tensor` into `host`; the returned event marks the host copy complete."""
        if self.download is None:
            host.copy_(tensor)
            return None
        self.download.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.download):
            started = self._timing_event()
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event(enable_timing=started is not None)
            done.record(self.download)
        if started is not None:
            self.trace.copy("device_to_host", started, done, host.numel() * host.element_size())
        tensor.record_stream(self.download)  # its memory is not reused before the copy has read it
        return done

    def _timing_event(self) -> torch.cuda.Event | None:
        """An event marking where a copy starts on the current side stream, while a step is traced."""
        if self.trace is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wait(self, event: torch.cuda.Event | None) -> None:
        """Makes the compute stream wait for a copy (the CPU never blocks)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
