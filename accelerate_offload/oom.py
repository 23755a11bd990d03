"""Explaining a CUDA out-of-memory error in offloaded training: the figures of the failed step and what to change."""

from __future__ import annotations

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
    device = torch.device(device)
    figures = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        figures = (
            f" with {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB allocated at the peak "
            f"({torch.cuda.memory_reserved(device) / 1e9:.2f} GB reserved) of {total / 1e9:.2f} GB"
        )
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
