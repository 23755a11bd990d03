"""`offload_model`: sets a model up so that its blocks stream through the device, and `remove_offload` undoes it."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .activations import ActivationShuttle
from .attention import avoid_cudnn_attention
from .blocks import base_model, find_blocks, late_feed_forward
from .checkpoint_layer import OffloadCheckpointLayer
from .chunking import chunkable, chunked_block_forward
from .conductor import LayerOffloadConductor
from .planner import VramPlanner, parse_memory
from .streams import CopyStreams

logger = logging.getLogger(__name__)

ACTIVATION_MIN_BYTES = 64 * 1024  # smaller tensors cost more in copy latency than they save


def offload_model(
    model: nn.Module,
    device: torch.device | str,
    *,
    layer_offload_fraction: float = 0.0,
    activation_offloading: bool = False,
    async_offloading: bool = True,
    gradient_checkpointing: bool = True,
    prefetch_blocks: int = 1,
    pin_memory: bool = True,
    block_names: list[str] | None = None,
    max_vram: str | int | None = None,
    sequence_chunks: int | str = 1,
    activation_min_bytes: int = ACTIVATION_MIN_BYTES,
) -> LayerOffloadConductor:
    """Streams `model`'s blocks through `device` and places everything else there; returns the conductor.

    Trainable parameters (LoRA) are moved to `device` and stay there, so an optimizer built before or after
    this call keeps training them. Later `model.to(device)` calls (e.g. from `accelerator.prepare`) leave the
    streamed weights alone. A CPU `device` runs the same logic with plain copies, which is how it is tested.
    With `max_vram` (bytes, or text like "6GB") every block starts streamed and the first training step
    decides which become resident. `sequence_chunks` (a count, or "auto") runs Flux and SD3 blocks in token
    chunks, cutting each block's working memory at high resolution.
    """
    if getattr(model, "_offload_conductor", None) is not None:
        raise RuntimeError("this model is already offloaded; call remove_offload(model) first")
    device = _with_index(torch.device(device))
    if max_vram is not None:
        if device.type != "cuda":
            raise ValueError("max_vram measures CUDA memory: it needs a CUDA device; use layer_offload_fraction")
        layer_offload_fraction = 1.0
    blocks = find_blocks(model, block_names)
    _disable_native_checkpointing(model)
    if device.type == "cuda":
        avoid_cudnn_attention()
    pinned = pin_memory and device.type == "cuda"
    streams = CopyStreams(device, async_offloading)
    activations = ActivationShuttle(device, streams, pinned, activation_min_bytes) if activation_offloading else None
    feed_forwards = [late_feed_forward(block) for _, block in blocks]
    conductor = LayerOffloadConductor(
        [block for _, block in blocks],
        device,
        streams,
        layer_offload_fraction,
        prefetch_blocks,
        pinned,
        activations,
        late_modules={index: late for index, (_, late) in enumerate(feed_forwards) if late},
    )
    conductor.layers = [
        OffloadCheckpointLayer(block, index, conductor, gradient_checkpointing, activations, attention, len(late))
        for index, ((_, block), (attention, late)) in enumerate(zip(blocks, feed_forwards))
    ]
    chunked_any = False
    for layer, (_, block) in zip(conductor.layers, blocks):
        chunked = chunked_block_forward(block, sequence_chunks)
        if chunked is not None:
            layer.block_forward, chunked_any = chunked, True
    if max_vram is not None:
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        remedies = (() if activation_offloading else ("turn on activation_offloading",)) + (
            ("set sequence_chunks: auto",) if not chunked_any and chunkable(blocks[0][1]) else ()
        )
        conductor.planner = VramPlanner(parse_memory(max_vram), device, 2 * trainable, remedies)
    model.to(device)
    model._offload_conductor = conductor
    model._ddp_params_and_buffers_to_ignore = _streamed_names(model, blocks, conductor)
    streamed_gb = sum(weights.nbytes for weights in conductor.weights.values()) / 1e9
    _warn_if_mostly_trainable(blocks, conductor, streamed_gb)
    logger.info(
        "accelerate-offload: %d of %d blocks resident on %s, %d streamed from %s memory (%.2f GB); "
        "checkpointing %s, activation offloading %s, prefetch %d, token chunks %s",
        conductor.resident_count,
        len(blocks),
        device,
        len(conductor.weights),
        "pinned" if pinned else "pageable",
        streamed_gb,
        "on" if gradient_checkpointing else "off",
        "on" if activation_offloading else "off",
        prefetch_blocks,
        sequence_chunks,
    )
    return conductor


def remove_offload(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Gives the blocks back their own forward and their weights plain storage on `device`."""
    conductor: LayerOffloadConductor = model.__dict__.pop("_offload_conductor")
    for layer, block in zip(conductor.layers, conductor.blocks):
        layer.remove(block)
    conductor.make_resident(list(conductor.weights), device)
    model.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
    return model.to(device)


def get_conductor(model: nn.Module) -> LayerOffloadConductor | None:
    """The conductor of an offloaded model, also through DDP, torch.compile and PEFT wrappers; else None."""
    for _ in range(8):
        conductor = model.__dict__.get("_offload_conductor")
        if conductor is not None:
            return conductor
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or base_model(model)
        if inner is model:
            return None
        model = inner
    return None


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
