"""Explaining a CUDA out-of-memory error: the figures of the failed step or phase and what to change."""

from __future__ import annotations

import re

import torch
from torch import nn

from .offload import get_conductor


def explain_out_of_memory(model: nn.Module, device: torch.device, batch_size: int, resolution: int | str) -> str:
    """One paragraph for the user: memory at the failure, the offload state, and the settings that lower it.

    Args:
        model (`torch.nn.Module`):
            The model that ran out of memory (offloaded or not, wrapped or not).
        device (`torch.device`):
            Its device; the figures are read for CUDA devices.
        batch_size (`int`):
            The batch size, named in the advice.
        resolution (`int` or `str`):
            The resolution, named in the advice.
    """
    figures = memory_figures(torch.device(device))
    conductor = get_conductor(model)
    fixes = []
    if conductor is None:
        state = "layer offloading is off"
        fixes.append("stream blocks: set layer_offload_fraction (e.g. 0.9) or max_vram in the offload config")
    else:
        state = (
            f"{conductor.resident_count} of {conductor.block_count} blocks resident, prefetch "
            f"{conductor.prefetch_blocks}, activation offloading {'on' if conductor.activations else 'off'}"
        )
        if conductor.resident_count:
            fixes.append("stream more blocks: raise layer_offload_fraction toward 1.0 or lower max_vram")
        if conductor.activations is None:
            fixes.append("set activation_offloading: true")
        if conductor.prefetch_blocks > 1:
            fixes.append("set prefetch_blocks: 1")
    fixes.append(f"lower --train_batch_size (now {batch_size}) or --resolution (now {resolution})")
    return f"CUDA ran out of memory{figures}; {state}. To fit: " + "; ".join(fixes) + "."


def memory_figures(device: torch.device) -> str:
    """' with X GB allocated at the peak (Y GB reserved) of Z GB' on CUDA (Z: what this process may use), else ''."""
    if device.type != "cuda":
        return ""
    from .memory import gpu_budget

    return (
        f" with {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB allocated at the peak "
        f"({torch.cuda.memory_reserved(device) / 1e9:.2f} GB reserved) of {gpu_budget(device) / 1e9:.2f} GB"
    )


def requested(error: BaseException) -> str:
    """' asking for 2.00 GiB' from torch's out-of-memory message (the allocation that failed), else ''."""
    found = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(error))
    return f" asking for {found.group(1)}" if found else ""


def explain_phase_out_of_memory(
    phase: str, device: torch.device, fixes: list[str], kept: str, error: BaseException | None = None
) -> str:
    """One line for an out-of-memory error outside a training step: the phase, its peak, the fixes, what is kept."""
    fix_text = " To fit: " + "; ".join(fixes) + "." if fixes else ""
    kept_text = f" Kept on disk: {kept}." if kept else ""
    asked = requested(error) if error is not None else ""
    return f"{phase}: CUDA ran out of memory{asked}{memory_figures(torch.device(device))}.{fix_text}{kept_text}"
