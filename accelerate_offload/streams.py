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
        return out, self._copy_on(self.upload, "host_to_device", out, host)

    def device_to_host(self, tensor: torch.Tensor, host: torch.Tensor) -> torch.cuda.Event | None:
        """Starts copying `tensor` into `host`; the returned event marks the host copy complete."""
        if self.download is None:
            host.copy_(tensor)
            return None
        self.download.wait_stream(torch.cuda.current_stream(self.device))
        done = self._copy_on(self.download, "device_to_host", host, tensor)
        tensor.record_stream(self.download)  # its memory is not reused before the copy has read it
        return done

    def _copy_on(
        self, stream: torch.cuda.Stream, direction: str, destination: torch.Tensor, source: torch.Tensor
    ) -> torch.cuda.Event:
        """Queues one copy on a side stream; returns the event that marks it done (timed while tracing)."""
        tracing = self.trace is not None
        with torch.cuda.stream(stream):
            started = torch.cuda.Event(enable_timing=True) if tracing else None
            if started is not None:
                started.record(stream)
            destination.copy_(source, non_blocking=True)
            finished = torch.cuda.Event(enable_timing=tracing)
            finished.record(stream)
        if started is not None:
            self.trace.copy(direction, started, finished, destination.numel() * destination.element_size())
        return finished

    def wait(self, event: torch.cuda.Event | None) -> None:
        """Makes the compute stream wait for a copy (the CPU never blocks)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
