"""A VRAM timeline of one training step: memory over time, block boundaries, and copies, drawn as a PNG.

`offload.trace_step` records one; `plot_timeline` draws it.

Timestamps are CUDA events on the stream that did the work, so the picture shows what the GPU did, not when
the CPU queued it. Memory is the caching allocator's count as each block starts, and its peak from there to the
next block start; the allocator counts when the CPU allocates and frees, so each block also records how far
ahead of the GPU the CPU queued it (`cpu_lead_ms`), the lead that decides how much memory waits on copies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class StepTrace:
    """Events recorded during one step; `resolve` turns them into milliseconds after synchronising."""

    device: torch.device
    start: torch.cuda.Event = field(default_factory=lambda: torch.cuda.Event(enable_timing=True))
    marks: list[tuple[str, int, torch.cuda.Event, int, float]] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)  # peak allocated up to each mark, from the one before (or start)
    copies: list[tuple[str, torch.cuda.Event, torch.cuda.Event, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        torch.cuda.synchronize(self.device)  # the GPU is idle: its clock and the CPU's start together
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start_seconds = time.perf_counter()
        self.start.record(torch.cuda.current_stream(self.device))

    def mark(self, phase: str, block: int) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self.peaks.append(torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        cpu_ms = (time.perf_counter() - self.start_seconds) * 1e3
        self.marks.append((phase, block, event, torch.cuda.memory_allocated(self.device), cpu_ms))

    def copy(self, direction: str, started: torch.cuda.Event, finished: torch.cuda.Event, nbytes: int) -> None:
        self.copies.append((direction, started, finished, nbytes))

    def resolve(self) -> dict:
        torch.cuda.synchronize(self.device)
        elapsed = self.start.elapsed_time
        until_next = [*self.peaks[1:], self.marks[-1][3]] if self.marks else []
        return {
            "peak_allocated_gb": max(self.peaks, default=0) / 1e9,
            "blocks": [
                {"phase": phase, "block": block, "ms": elapsed(event), "cpu_lead_ms": elapsed(event) - cpu_ms,
                 "allocated_gb": allocated / 1e9, "peak_until_next_gb": peak / 1e9}
                for (phase, block, event, allocated, cpu_ms), peak in zip(self.marks, until_next)
            ],
            "copies": [
                {"direction": direction, "start_ms": elapsed(a), "end_ms": elapsed(b), "gb": nbytes / 1e9}
                for direction, a, b, nbytes in self.copies
            ],
        }


def plot_timeline(timeline: dict, path: str | Path, title: str = "") -> Path:
    """Memory over the step, forward and backward shaded, each block start ticked, copies as bars below; returns the
    path of the PNG written (needs matplotlib).

    Args:
        timeline (`dict`):
            What `trace_step` returned.
        path (`str` or `pathlib.Path`):
            Where to write the PNG.
        title (`str`, *optional*):
            The figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = timeline["blocks"]
    figure, (memory_axis, copy_axis) = plt.subplots(
        2, 1, figsize=(14, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    times = [b["ms"] for b in blocks]
    memory_axis.step(times, [b["allocated_gb"] for b in blocks], where="post", color="tab:blue",
                     label="allocated as each block starts")
    memory_axis.step(times, [b["peak_until_next_gb"] for b in blocks], where="post", color="tab:blue",
                     alpha=0.35, label="peak until the next block")
    memory_axis.axhline(timeline["peak_allocated_gb"], color="tab:red", linestyle="--",
                        label=f"peak {timeline['peak_allocated_gb']:.2f} GB")
    for phase, color in (("forward", "tab:green"), ("backward", "tab:orange")):
        phase_times = [b["ms"] for b in blocks if b["phase"] == phase]
        if phase_times:
            memory_axis.axvspan(min(phase_times), max(phase_times), color=color, alpha=0.08, label=phase)
    for b in blocks[:-1]:
        memory_axis.axvline(b["ms"], color="grey", linewidth=0.3)
    memory_axis.set_ylabel("GB allocated")
    memory_axis.set_ylim(bottom=0)
    memory_axis.legend(loc="upper left")
    memory_axis.set_title(title or "VRAM over one training step")
    lanes = {"host_to_device": 1, "device_to_host": 0}
    for copy in timeline["copies"]:
        copy_axis.barh(lanes[copy["direction"]], copy["end_ms"] - copy["start_ms"], left=copy["start_ms"],
                       height=0.6, color="tab:purple" if copy["direction"] == "host_to_device" else "tab:cyan")
    copy_axis.set_yticks(list(lanes.values()), ["host→device", "device→host"])
    copy_axis.set_xlabel("ms since the step started")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
