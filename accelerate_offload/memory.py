"""Host and GPU memory of a whole job: what a process holds, what the runtime pins, and the GPU budget left.

A training job runs phases one after another (prompts, latents, class images, training, images). What one
phase leaves behind is memory the next cannot use: `release_host_memory` gives freed host memory back to the
system between phases (Python's cycles, torch's pinned-memory cache, and glibc's free lists, which otherwise
keep the freed pages of a 9.5 GB text encoder). The GPU budget is the device, or less: `max_vram`, or a
per-process cap (`OFFLOAD_JOB_GPU_CAP`, e.g. "5GB", how the job-memory benchmark plays a smaller card).
"""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import torch

from .block_weights import live_block_weights
from .planner import parse_memory

GPU_CAP_VARIABLE = "OFFLOAD_JOB_GPU_CAP"
STATUS_FIELDS = ("RssAnon", "RssFile", "RssShmem", "VmHWM")


def host_memory(pid: int | str = "self") -> dict[str, int]:
    """Bytes of a process's anonymous, file-backed and shared resident memory (from /proc; {} elsewhere)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    figures = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in STATUS_FIELDS:
            figures[name] = int(value.split()[0]) * 1024
    return figures


def streamed_host_buffers() -> tuple[int, int]:
    """How many streamed-block host buffers are alive, and their bytes: after a job's teardown, none."""
    buffers = live_block_weights()
    return len(buffers), sum(weights.nbytes for weights in buffers)


def pinned_cache_bytes() -> int:
    """Bytes torch's pinned host allocator holds (offloaded activations), 0 without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    stats = torch.cuda.host_memory_stats()
    return int(stats.get("reserved_bytes.current", stats.get("allocated_bytes.current", 0)))


def release_host_memory() -> None:
    """Frees what nothing references any more and returns it to the system, before the next phase."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):
            empty_host_cache = getattr(torch._C, name, None)
            if empty_host_cache is not None:
                empty_host_cache()
                break
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns memory on its own terms
        pass


def gpu_cap() -> int | None:
    """The per-process GPU cap asked for through `OFFLOAD_JOB_GPU_CAP`, in bytes, or None."""
    text = os.environ.get(GPU_CAP_VARIABLE, "").strip()
    if not text:
        return None
    try:
        return parse_memory(text)
    except ValueError:
        raise ValueError(f"{GPU_CAP_VARIABLE} must look like '5GB', got {text!r}") from None


def cuda_index(device: torch.device) -> int:
    """The CUDA device's index: the per-process memory calls refuse a bare `cuda`."""
    return torch.cuda.current_device() if device.index is None else device.index


def apply_gpu_cap(device: torch.device) -> int | None:
    """Caps this process's CUDA allocations at `OFFLOAD_JOB_GPU_CAP` (the CUDA context is not counted)."""
    cap = gpu_cap()
    if cap is None or device.type != "cuda":
        return None
    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
    return cap


def gpu_budget(device: torch.device, max_vram: str | int | None = None) -> int:
    """Bytes this process may allocate on `device`: the device's memory, less where max_vram or a cap says so."""
    index = cuda_index(device)
    properties = torch.cuda.get_device_properties(index)
    budget = int(properties.total_memory * torch.cuda.get_per_process_memory_fraction(index))
    free, _ = torch.cuda.mem_get_info(index)  # other processes' memory is not ours to use
    budget = min(budget, free + torch.cuda.memory_reserved(device))
    if max_vram is not None:
        budget = min(budget, parse_memory(max_vram))
    return budget


def gpu_room(device: torch.device, max_vram: str | int | None = None) -> int:
    """Bytes left of the budget now: what a pass that starts here may still allocate."""
    return max(0, gpu_budget(device, max_vram) - torch.cuda.memory_allocated(device))
