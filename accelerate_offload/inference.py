"""Inference inside the training budget: class images, validation and final images with streamed weights.

A pipeline loaded with `from_pretrained` has trainable parameters, and the runtime keeps trainable parameters
on the GPU, so nothing of such a transformer would stream. `place_pipeline` freezes the denoiser and T5 first
and streams them as the launch config streams training (a fraction, or every block under `max_vram`: inference
has no training step to measure). A transformer that is already streamed (the one being trained) is reused
as it is, and `load_lora_file` swaps its training adapter for the saved LoRA file, read by the pipeline's own
`load_lora_weights`, so final images prove the file without a second copy of the base weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_parameters, load_adapter_file
from .memory import gpu_room, release_host_memory
from .offload import get_conductor, offload_model
from .vae_memory import VaePlan, plan_each_pass

logger = logging.getLogger(__name__)

T5_CLASSES = ("T5EncoderModel", "UMT5EncoderModel")


def streams_for_inference(plugin) -> bool:
    """Whether the launch config streams weights: then inference streams them too."""
    return plugin is not None and (plugin.layer_offload_fraction > 0 or plugin.max_vram is not None)


def place_pipeline(
    pipeline,
    device: torch.device | str,
    plugin=None,
    *,
    stream: bool | None = None,
    max_ram: str | None = None,
    offload_dir: str | None = None,
):
    """Puts every model of `pipeline` on `device` for inference and returns the pipeline.

    The denoiser and T5 encoders are frozen (a model with a PEFT adapter keeps its flags: its base is frozen
    already and the adapter may be training) and, where the plugin streams (on CUDA; `stream=True` forces it,
    on CPU too), streamed block by block with the plugin's fraction and prefetch, the denoiser's blocks compiled as
    `compile_blocks` says; everything else is frozen and moved whole. A component already streamed is left
    streamed, its adapter moved to `device`. `max_ram` and `offload_dir` budget each streamed component's host
    memory, as the plugin's do in training.

    Args:
        pipeline (`DiffusionPipeline`):
            A diffusers pipeline, its models on the CPU (or already streamed); components that are not
            `torch.nn.Module`s (schedulers, tokenizers, `None`) are left as they are.
        device (`torch.device` or `str`):
            The device inference runs on, usually `accelerator.device`.
        plugin (`LayerOffloadPlugin`, *optional*):
            The launch config's settings: the transformer streams its `layer_offload_fraction` (every block under
            `max_vram`) with its prefetch, pinning, copy streams and `block_names`; T5 streams whole. Defaults to
            `None`: nothing streams unless `stream=True`, which then streams every block.
        stream (`bool`, *optional*):
            Whether to stream the transformer and T5; defaults to `None`, meaning on CUDA when the plugin streams.
        max_ram (`str`, *optional*):
            A host budget such as `"12GB"` for each streamed component: blocks past it are read from disk.
            Defaults to the plugin's, so class images keep the budget training keeps.
        offload_dir (`str`, *optional*):
            The folder for the blocks read from disk; needed when `max_ram` leaves blocks for it. Defaults to the
            plugin's.
    """
    device = torch.device(device)
    if stream is None:
        stream = device.type == "cuda" and streams_for_inference(plugin)
    if plugin is not None:
        max_ram = max_ram if max_ram is not None else plugin.max_ram
        offload_dir = offload_dir if offload_dir is not None else plugin.offload_dir
    for name, component in pipeline.components.items():
        if not isinstance(component, nn.Module):
            continue
        if get_conductor(component) is not None:
            component.to(device)  # trainable tensors follow; streamed weights stay in host memory
            continue
        if not _has_adapter(component):  # an adapter's flags are its owner's: it may be training
            component.requires_grad_(False)
        if stream and _streamed(name, component):
            offload_model(
                component,
                device,
                layer_offload_fraction=_fraction(name, plugin),
                gradient_checkpointing=False,
                prefetch_blocks=max(1, plugin.prefetch_blocks) if plugin is not None else 1,
                pin_memory=plugin.pin_memory if plugin is not None else True,
                async_offloading=plugin.async_offloading if plugin is not None else device.type == "cuda",
                block_names=plugin.block_names if plugin is not None and name == "transformer" else None,
                max_ram=max_ram,
                offload_dir=offload_dir,
                compile_blocks=plugin.compile_blocks if plugin is not None and name == "transformer" else False,
            )
        component.to(device)
    return pipeline


def load_lora_file(pipeline, folder: str | Path, weight_name: str, device: torch.device | str) -> None:
    """Replaces the transformer's adapters by the adapter in `folder`/`weight_name`, loaded as its users load it.

    LoRA, DoRA and LoKr files go through diffusers' `load_lora_adapter` (only the transformer's loader is called,
    since `load_lora_weights` also offers the file to every text encoder and warns for each one it has no keys
    for); LoHa, which diffusers does not read, through PEFT. The new adapter's weights are created beside the base
    weights they wrap, which for a streamed block are in host memory: they are moved to `device`, where the block
    computes.
    """
    transformer = pipeline.transformer
    adapters = list(getattr(transformer, "peft_config", {}) or {})
    if adapters:
        transformer.delete_adapters(adapters)
    release_host_memory()  # the deleted adapter, and an optimizer let go just before, often sit in reference cycles
    load_adapter_file(transformer, Path(folder) / weight_name)
    transformer.requires_grad_(False)
    device = torch.device(device)
    with torch.no_grad():
        for _, param in adapter_parameters(transformer):
            if param.device != device:
                param.data = param.data.to(device)


def plan_vae_passes(vae, device: torch.device | str, max_vram: str | None = None) -> None:
    """On CUDA, makes every pass of `vae` run whole, sliced or tiled for what is left of the GPU budget as it starts."""
    device = torch.device(device)
    if device.type != "cuda":
        return

    def report(kind: str, shape: tuple[int, int, int], plan: VaePlan, room: int) -> None:
        if plan != VaePlan():
            batch, height, width = shape
            logger.info(
                "accelerate-offload: VAE %s of %d x %dx%d in %.2f GB left: slicing %s, tiles %s",
                kind, batch, height, width, room / 1e9, "on" if plan.slicing else "off", plan.tile_size or "none",
            )

    plan_each_pass(vae, lambda: gpu_room(device, max_vram), report)


def _fraction(name: str, plugin) -> float:
    """The transformer streams the share training streams; T5, and everything under max_vram, streams whole."""
    if name != "transformer" or plugin is None or plugin.max_vram is not None:
        return 1.0
    return plugin.layer_offload_fraction


def _has_adapter(component: nn.Module) -> bool:
    return bool(getattr(component, "peft_config", None))


def _streamed(name: str, component: nn.Module) -> bool:
    return name == "transformer" or type(component).__name__ in T5_CLASSES
