"""`offload_model`: sets a model up so that its blocks stream through the device, and `remove_offload` undoes it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .activations import ActivationShuttle
from .block_compiler import BlockCompiler, compile_mode
from .block_hook import OffloadBlockHook
from .block_weights import BlockWeights
from .chunking import chunkable, chunked_block_forward
from .conductor import LayerOffloadConductor
from .disk_tier import DISK_LOOKAHEAD, DiskTier, blocks_past_budget
from .planner import VramPlanner, parse_memory
from .registry import base_model, find_blocks, late_feed_forward
from .settings import OffloadSettings
from .streams import CopyStreams
from .timeline import StepTrace

logger = logging.getLogger(__name__)

# diffusers' hook names for its own offloading (`enable_group_offload`)
_DIFFUSERS_OFFLOAD_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading")


def offload_model(
    model: nn.Module, device: torch.device | str, settings: OffloadSettings | None = None, **options: Any
) -> LayerOffloadConductor:
    """Streams `model`'s blocks through `device` and places everything else there; returns the conductor.

    Trainable parameters (LoRA) are moved to `device` and stay there, so an optimizer built before or after
    this call keeps training them. Later `model.to(device)` calls (e.g. from `accelerator.prepare`) leave the
    streamed weights alone. A CPU `device` runs the same logic with plain copies, which is how it is tested.

    Args:
        model (`torch.nn.Module`):
            The model (or its PEFT wrapper), on the CPU, cast, with its base weights frozen.
        device (`torch.device` or `str`):
            The compute device.
        settings (`OffloadSettings`, *optional*):
            How to stream; defaults to `OffloadSettings()` (nothing streamed, every block checkpointed).
        **options:
            `OffloadSettings` fields that override `settings`, e.g. `layer_offload_fraction=1.0`.
    """
    settings = replace(settings or OffloadSettings(), **options)
    if getattr(model, "_offload_conductor", None) is not None:
        raise RuntimeError("this model is already offloaded; call remove_offload(model) first")
    _refuse_other_offloading(model)
    device = _with_index(torch.device(device))
    fraction = settings.layer_offload_fraction
    if settings.max_vram is not None:
        if device.type != "cuda":
            raise ValueError("max_vram measures CUDA memory: it needs a CUDA device; use layer_offload_fraction")
        fraction = 1.0
    blocks = find_blocks(model, settings.block_names)
    _disable_native_checkpointing(model)
    if device.type == "cuda":
        avoid_cudnn_attention()
    pinned = settings.pin_memory and device.type == "cuda"
    streams = CopyStreams(device, settings.async_offloading)
    activations = (
        ActivationShuttle(device, streams, pinned, settings.activation_min_bytes)
        if settings.activation_offloading
        else None
    )
    feed_forwards = [late_feed_forward(block) for _, block in blocks]
    if settings.max_ram is not None and settings.share_host_weights is True:
        raise ValueError(
            "share_host_weights: true and max_ram do not combine (the disk tier keeps a copy per process): set "
            "share_host_weights: auto or false, or remove max_ram"
        )
    conductor = LayerOffloadConductor(
        [block for _, block in blocks],
        device,
        streams,
        fraction,
        settings.prefetch_blocks,
        pinned,
        activations,
        late_modules={index: late for index, (_, late) in enumerate(feed_forwards) if late},
        share_host_weights=settings.share_host_weights if settings.max_ram is None else False,
        disk_tier=None if settings.max_ram is None else lambda weights: _disk_tier(
            model, weights, settings, pinned, {index: name for index, (name, _) in enumerate(blocks)}
        ),
    )
    if conductor.disk is not None:
        logger.info(
            "accelerate-offload: max_ram %s: %d streamed blocks in host memory, %d read from disk (%.2f GB), %d of "
            "them in place from the model's files, the rest from %s (%s)",
            settings.max_ram, len(conductor.weights) - len(conductor.disk.offsets), len(conductor.disk.offsets),
            conductor.disk.nbytes / 1e9, len(conductor.disk.in_place), conductor.disk.path,
            "written" if conductor.disk.written else "reused",
        )
    mode = compile_mode(settings.compile_blocks)
    if mode is not None:
        conductor.compiler = BlockCompiler(mode, settings.compile_backend)
    # A compiled block backpropagates as one graph, with no moment between its feed-forward's and its attention's
    # backward to signal in: its neighbour is then prefetched whole.
    hooks = [
        OffloadBlockHook(
            block, index, conductor, settings.gradient_checkpointing, activations,
            attention if mode is None else None, len(late),
        )
        for index, ((_, block), (attention, late)) in enumerate(zip(blocks, feed_forwards))
    ]
    chunked_any = False
    for hook, (_, block) in zip(hooks, blocks):
        chunked = chunked_block_forward(block, settings.sequence_chunks, conductor.compiler)
        if chunked is not None:
            hook.block_forward, chunked_any = chunked, True
        elif conductor.compiler is not None:
            hook.block_forward = conductor.compiler.block(hook.block_forward)
    if settings.max_vram is not None:
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        remedies = (() if settings.activation_offloading else ("turn on activation_offloading",)) + (
            ("set sequence_chunks: auto",) if not chunked_any and chunkable(blocks[0][1]) else ()
        )
        conductor.planner = VramPlanner(parse_memory(settings.max_vram), device, 2 * trainable, remedies)
    model.to(device)
    model._offload_conductor = conductor
    model._offload_hooks = hooks
    model._ddp_params_and_buffers_to_ignore = _streamed_names(model, blocks, conductor)
    streamed_gb = sum(weights.nbytes for weights in conductor.weights.values()) / 1e9
    _warn_if_mostly_trainable(blocks, conductor, streamed_gb)
    logger.info(
        "accelerate-offload: %d of %d blocks resident on %s, %d streamed from %s%s memory (%.2f GB); "
        "checkpointing %s, activation offloading %s, prefetch %d, token chunks %s, compiled blocks %s",
        conductor.resident_count,
        len(blocks),
        device,
        len(conductor.weights),
        "shared " if conductor.shared_host else "",
        "pinned" if pinned else "pageable",
        streamed_gb,
        "on" if settings.gradient_checkpointing else "off",
        "on" if settings.activation_offloading else "off",
        settings.prefetch_blocks,
        settings.sequence_chunks,
        mode or "off",
    )
    return conductor


def _disk_tier(
    model: nn.Module, weights: dict[int, BlockWeights], settings: OffloadSettings, pinned: bool, names: dict[int, str]
) -> DiskTier | None:
    """The block file for the streamed blocks past `max_ram` (the first ones that fit stay in host memory), and the
    model's files, where `names` (the blocks' paths in the model) find their tensors there."""
    ring_size = settings.prefetch_blocks + 1 + DISK_LOOKAHEAD
    on_disk = blocks_past_budget(weights, parse_memory(settings.max_ram, "max_ram"), ring_size)
    if not on_disk:
        return None
    if settings.offload_dir is None:
        raise ValueError(
            f"max_ram {settings.max_ram} leaves {len(on_disk)} streamed blocks for disk: set offload_dir to a folder "
            "for their file, or raise max_ram"
        )
    config = getattr(base_model(model), "config", None)
    source = getattr(config, "_name_or_path", None) if config is not None else None
    return DiskTier({i: weights[i] for i in on_disk}, settings.offload_dir, ring_size, pinned, source,
                    {i: names[i] for i in on_disk})


def remove_offload(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Gives the blocks back their own forward and their weights plain storage on `device`; returns the model.

    Args:
        model (`torch.nn.Module`):
            A model set up by `offload_model`.
        device (`torch.device` or `str`, defaults to `"cpu"`):
            Where every weight lives afterwards.
    """
    conductor: LayerOffloadConductor = model.__dict__.pop("_offload_conductor")
    for hook, block in zip(model.__dict__.pop("_offload_hooks"), conductor.blocks):
        hook.remove(block)
    conductor.make_resident(list(conductor.weights), device)
    model.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
    return model.to(device)


def get_conductor(model: nn.Module) -> LayerOffloadConductor | None:
    """The conductor of an offloaded model, also through DDP, torch.compile and PEFT wrappers; else None.

    Args:
        model (`torch.nn.Module`):
            The model, or a wrapper of it.
    """
    for _ in range(8):
        conductor = model.__dict__.get("_offload_conductor")
        if conductor is not None:
            return conductor
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or base_model(model)
        if inner is model:
            return None
        model = inner
    return None


def trace_step(model: nn.Module, step: Callable[[], None]) -> dict:
    """Runs `step` once with tracing on and returns its VRAM timeline (see `StepTrace.resolve`; draw it with
    `plot_timeline`). Each block start resets the allocator's peak statistics, so a peak read after the step covers
    its last block only.

    Args:
        model (`torch.nn.Module`):
            A model offloaded to a CUDA device (also through DDP, torch.compile and PEFT wrappers).
        step (`Callable[[], None]`):
            One training step: forward, backward, optimizer.
    """
    conductor = get_conductor(model)
    if conductor is None or conductor.device.type != "cuda":
        raise RuntimeError("a VRAM timeline needs a model offloaded to a CUDA device")
    trace = StepTrace(conductor.device)
    conductor.trace = conductor.streams.trace = trace
    try:
        step()
        trace.mark("end", -1)
    finally:
        conductor.trace = conductor.streams.trace = None
    return trace.resolve()


def avoid_cudnn_attention() -> None:
    """Turns the cuDNN SDPA backend off so flash / memory-efficient attention serve training.

    With torch 2.11 on H100, scaled_dot_product_attention's cuDNN backend failed in backward (NaN gradients or a
    `mha_graph.execute` error). Flash and memory-efficient attention are correct and as fast for these shapes.
    """
    if torch.cuda.is_available() and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        logger.info("accelerate-offload: cuDNN attention disabled (its backward is unreliable); using flash/efficient SDPA")


def _refuse_other_offloading(model: nn.Module) -> None:
    """Accelerate's and diffusers' offload hooks move weights on their own schedule; two runtimes would fight."""
    for name, module in model.named_modules():
        where = f"{type(model).__name__}.{name}" if name else type(model).__name__
        if getattr(module, "_hf_hook", None) is not None:
            raise RuntimeError(
                f"{where} carries an accelerate hook ({type(module._hf_hook).__name__}, from device_map or "
                "enable_*_cpu_offload): load the model without them, or call "
                "accelerate.hooks.remove_hook_from_module(model, recurse=True), before offload_model"
            )
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and any(hook in registry.hooks for hook in _DIFFUSERS_OFFLOAD_HOOKS):
            raise RuntimeError(
                f"{where} carries diffusers' group offloading (enable_group_offload): load the model without it "
                "before offload_model"
            )


def _with_index(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _disable_native_checkpointing(model: nn.Module) -> None:
    """The model's own checkpointing would wrap our wrapper in a second checkpoint: ours replaces it."""
    model = base_model(model)
    if getattr(model, "gradient_checkpointing", False) is True and hasattr(model, "disable_gradient_checkpointing"):
        model.disable_gradient_checkpointing()
        logger.info("accelerate-offload: the model's own gradient checkpointing is replaced by per-block checkpointing")
    if getattr(model, "is_gradient_checkpointing", False) and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()


def _warn_if_mostly_trainable(
    blocks: list[tuple[str, nn.Module]], conductor: LayerOffloadConductor, streamed_gb: float
) -> None:
    """Parameters that require grad stay on the device; a base model left unfrozen would not stream at all."""
    trainable_gb = sum(
        p.numel() * p.element_size() for index in conductor.weights for p in blocks[index][1].parameters()
        if p.requires_grad
    ) / 1e9
    if trainable_gb > streamed_gb:
        logger.warning(
            "accelerate-offload: %.2f GB of the streamed blocks' parameters require grad and stay on %s (only "
            "%.2f GB stream); freeze the base model with model.requires_grad_(False) before offloading it",
            trainable_gb, conductor.device, streamed_gb,
        )


def _streamed_names(model: nn.Module, blocks: list[tuple[str, nn.Module]], conductor: LayerOffloadConductor) -> list[str]:
    """Names of streamed tensors as seen from `model`, for DistributedDataParallel to leave alone."""
    root = base_model(model)
    prefix = next((f"{name}." if name else "" for name, module in model.named_modules() if module is root), "")
    return [
        f"{prefix}{blocks[index][0]}.{name}"
        for index, weights in conductor.weights.items()
        for name in weights.names()
    ]
