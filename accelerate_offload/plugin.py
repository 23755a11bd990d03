"""`LayerOffloadPlugin`: the offload settings, read like accelerate's own plugins.

Accelerate has no hook for third-party plugins, but `accelerate launch` hands the shell environment to every
worker. So, like `TorchDynamoPlugin` or `FullyShardedDataParallelPlugin`, this dataclass fills every field left
unset from an `ACCELERATE_OFFLOAD_*` variable in `__post_init__`; explicit arguments win.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env

from .block_compiler import compile_mode
from .offload import avoid_cudnn_attention, offload_model
from .planner import parse_memory
from .settings import OffloadSettings

ENV_PREFIX = "ACCELERATE_OFFLOAD_"

logger = logging.getLogger(__name__)

_DEFAULTS = OffloadSettings()  # the plugin's defaults are the runtime's
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class OffloadConfigError(ValueError):
    """A setting is out of range, contradicts another, or is unknown."""


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise OffloadConfigError(f"{name} must be true or false, got {value!r}")


def _parse_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return [str(name) for name in value]


@dataclass
class LayerOffloadPlugin:
    """Streams a model's sequential blocks from pinned CPU memory so that only a few sit on the GPU.

    Every field left as `None` is read from `ACCELERATE_OFFLOAD_<FIELD NAME IN CAPITALS>`, then falls back to
    its default. `accelerate-offload launch` exports those variables from the `offload_config:` section of the
    accelerate config file.

    Args:
        layer_offload_fraction (`float`, defaults to `0.0`):
            Share of the blocks that live on the CPU and are streamed in; the first
            ceil((1 - fraction) * number of blocks) stay resident on the GPU.
        activation_offloading (`bool`, defaults to `False`):
            Move the tensors that checkpointing keeps between blocks to CPU memory and bring them back before the
            backward pass recomputes the block.
        async_offloading (`bool`, defaults to `True`):
            Copy on side CUDA streams so that copies overlap compute.
        gradient_checkpointing (`bool`, defaults to `True` when anything is offloaded, else `False`):
            Wrap each block in non-reentrant `torch.utils.checkpoint`. Required to train with offloaded blocks.
        prefetch_blocks (`int`, defaults to `1`):
            How many offloaded blocks are copied ahead of the one computing.
        pin_memory (`bool`, defaults to `True`):
            Keep offloaded weights and activations in page-locked memory (7x faster copies than pageable memory).
        offload_device (`str`, defaults to `"cpu"`):
            Where offloaded weights live.
        max_vram (`str`, defaults to `None`):
            A GPU memory budget such as "6GB" instead of a fraction: the first training step streams every block
            and measures its peak; then as many blocks as fit become resident.
        max_ram (`str`, defaults to `None`):
            A host memory budget such as "12GB" for the streamed blocks: as many as fit stay in pinned memory, the
            rest are read from a block file in `offload_dir` each time they are needed (slower: see the README).
        offload_dir (`str`, defaults to `None`):
            Folder of the block file that `max_ram` spills to; written once from the model, reused on later runs.
        sequence_chunks (`int` or `"auto"`, defaults to `1`):
            Run Flux and SD3 blocks in this many checkpointed chunks along the image tokens (the same function in
            less memory; "auto" keeps chunks at most 4096 tokens, i.e. 4 at 2048², whole at 1024²).
        block_names (`list[str]`, defaults to the model registry's lists, else the model's declared blocks):
            Dotted paths of the `nn.ModuleList`s that hold the model's sequential blocks, for models that neither the
            registry knows nor declare their repeated blocks (`_repeated_blocks`, `_no_split_modules`).
        share_host_weights (`bool` or `"auto"`, defaults to `"auto"`):
            The processes of one machine (`accelerate launch --multi_gpu`) share one pinned host copy of the streamed
            weights instead of one each; "auto" when the machine runs more than one, true refuses a copy per
            process if sharing fails. Not with `max_ram`.
        compile_blocks (`bool` or `str`, defaults to `False`):
            Compile each block's own computation with torch.compile, once per block class (`true`, or the mode
            "default" or "max-autotune-no-cudagraphs"); streamed, resident and token-chunked blocks alike.
    """

    layer_offload_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Share of blocks streamed from CPU memory, 0..1.",
            "default": _DEFAULTS.layer_offload_fraction,
        },
    )
    activation_offloading: bool | None = field(
        default=None,
        metadata={"help": "Move checkpointed block inputs to CPU memory.", "default": _DEFAULTS.activation_offloading},
    )
    async_offloading: bool | None = field(
        default=None,
        metadata={"help": "Copy on side CUDA streams, overlapping compute.", "default": _DEFAULTS.async_offloading},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Non-reentrant checkpointing around every block.", "default": None},
    )
    prefetch_blocks: int | None = field(
        default=None, metadata={"help": "Offloaded blocks copied ahead of use.", "default": _DEFAULTS.prefetch_blocks}
    )
    pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Page-locked host memory for offloaded tensors.", "default": _DEFAULTS.pin_memory},
    )
    offload_device: str | None = field(
        default=None, metadata={"help": "Where offloaded weights live.", "default": "cpu"}
    )
    max_vram: str | None = field(
        default=None,
        metadata={"help": "GPU memory budget, e.g. '6GB': resident blocks chosen to fit it.", "default": None},
    )
    max_ram: str | None = field(
        default=None,
        metadata={"help": "Host memory budget for streamed blocks, e.g. '12GB': the rest read from offload_dir.",
                  "default": None},
    )
    offload_dir: str | None = field(
        default=None, metadata={"help": "Folder for the block file that max_ram spills to.", "default": None}
    )
    sequence_chunks: int | str | None = field(
        default=None,
        metadata={
            "help": "Token chunks per Flux/SD3 block (a number, or 'auto').",
            "default": _DEFAULTS.sequence_chunks,
        },
    )
    block_names: list[str] | None = field(
        default=None,
        metadata={"help": "Comma-separated paths of the block lists, for models not found.", "default": None},
    )
    compile_blocks: bool | str | None = field(
        default=None,
        metadata={
            "help": "torch.compile each block's computation: true, or a mode (default, max-autotune-no-cudagraphs).",
            "default": _DEFAULTS.compile_blocks,
        },
    )

    share_host_weights: bool | str | None = field(
        default=None,
        metadata={"help": "One host copy of the streamed weights per machine (true, false or auto).",
                  "default": "auto"},  # the runtime's default is off: the plugin offloads in every process
    )

    def __post_init__(self) -> None:
        check_environment()
        for spec in fields(self):
            if getattr(self, spec.name) is None:
                raw = os.environ.get(env_name(spec.name))
                setattr(self, spec.name, spec.metadata["default"] if raw is None else raw)
        self.layer_offload_fraction = _parse_fraction(self.layer_offload_fraction)
        self.activation_offloading = parse_bool("activation_offloading", self.activation_offloading)
        self.async_offloading = parse_bool("async_offloading", self.async_offloading)
        self.pin_memory = parse_bool("pin_memory", self.pin_memory)
        self.prefetch_blocks = _parse_prefetch(self.prefetch_blocks)
        self.sequence_chunks = _parse_chunks(self.sequence_chunks)
        self.share_host_weights = _parse_sharing(self.share_host_weights)
        self.compile_blocks = _parse_compile(self.compile_blocks)
        self.offload_device = str(self.offload_device).strip().lower()
        if self.block_names is not None:
            self.block_names = _parse_names(self.block_names)
        if self.max_vram is not None:
            self.max_vram = str(self.max_vram).strip()
            _parse_budget(self.max_vram)
        if self.max_ram is not None:
            self.max_ram = str(self.max_ram).strip()
            _parse_budget(self.max_ram, "max_ram")
        if self.offload_dir is not None:
            self.offload_dir = str(self.offload_dir).strip()
        offloads = (
            self.layer_offload_fraction > 0
            or self.activation_offloading
            or self.max_vram is not None
            or self.sequence_chunks != 1
        )
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = offloads
        self.gradient_checkpointing = parse_bool("gradient_checkpointing", self.gradient_checkpointing)
        self._validate()

    def _validate(self) -> None:
        if self.max_vram is not None and self.layer_offload_fraction > 0:
            raise OffloadConfigError(
                "max_vram chooses the resident blocks itself: set either max_vram or layer_offload_fraction"
            )
        if self.max_vram is not None and not self.gradient_checkpointing:
            raise OffloadConfigError("max_vram streams blocks, which needs gradient_checkpointing: true")
        if self.max_ram is not None and not self.offload_dir:
            raise OffloadConfigError("max_ram spills the blocks past it to disk: set offload_dir to a folder for them")
        if self.max_ram is not None and self.layer_offload_fraction == 0 and self.max_vram is None:
            raise OffloadConfigError(
                "max_ram budgets the streamed blocks, and none stream: set layer_offload_fraction or max_vram"
            )
        if self.max_ram is not None and self.share_host_weights is True:
            raise OffloadConfigError(
                "share_host_weights: true and max_ram do not combine (the disk tier keeps a copy per process): set "
                "share_host_weights: auto or false, or remove max_ram"
            )
        if self.offload_device != "cpu":
            raise OffloadConfigError(f"offload_device must be 'cpu', got {self.offload_device!r}")
        if self.layer_offload_fraction > 0 and not self.gradient_checkpointing:
            raise OffloadConfigError(
                "layer_offload_fraction > 0 needs gradient_checkpointing: true (streamed blocks are recomputed "
                "in the backward pass); remove gradient_checkpointing: false or set the fraction to 0"
            )
        if self.activation_offloading and not self.gradient_checkpointing:
            raise OffloadConfigError(
                "activation_offloading moves the tensors kept by gradient checkpointing: set "
                "gradient_checkpointing: true or activation_offloading: false"
            )
        if self.async_offloading and not self.pin_memory:
            raise OffloadConfigError(
                "async_offloading needs pin_memory: true (copies from pageable memory cannot overlap compute); "
                "set pin_memory: true or async_offloading: false"
            )

    @property
    def enabled(self) -> bool:
        """Whether the plugin changes the model at all."""
        return (
            self.layer_offload_fraction > 0
            or self.activation_offloading
            or self.gradient_checkpointing
            or self.max_vram is not None
            or self.sequence_chunks != 1
            or self.compile_blocks is not False
        )

    def to_env(self) -> dict[str, str]:
        """The `ACCELERATE_OFFLOAD_*` variables that reproduce these settings in a worker."""
        env = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, list):
                value = ",".join(value)
            env[env_name(spec.name)] = str(value)
        return env

    def offload_settings(self, device: torch.device | str) -> OffloadSettings:
        """The settings `prepare_model` streams with on `device`: without CUDA nothing streams (layer and activation
        offloading and `max_vram` are CUDA-only), and the rest holds.

        Args:
            device (`torch.device` or `str`):
                The device the model trains on.
        """
        streaming = torch.device(device).type == "cuda"
        return OffloadSettings(
            layer_offload_fraction=self.layer_offload_fraction if streaming else 0.0,
            activation_offloading=self.activation_offloading and streaming,
            async_offloading=self.async_offloading,
            gradient_checkpointing=self.gradient_checkpointing,
            prefetch_blocks=self.prefetch_blocks,
            pin_memory=self.pin_memory,
            block_names=self.block_names,
            max_vram=self.max_vram if streaming else None,
            max_ram=self.max_ram if streaming else None,
            offload_dir=self.offload_dir,
            sequence_chunks=self.sequence_chunks,
            share_host_weights=self.share_host_weights,
            compile_blocks=self.compile_blocks,
        )

    def prepare_model(self, model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
        """Sets the model up for offloaded training on `device` and returns it; call before `accelerator.prepare`.

        On a machine without CUDA, layer and activation offloading say once that they are inactive and the
        model trains as usual (with gradient checkpointing if asked for).

        Args:
            model (`torch.nn.Module`):
                The model (or its PEFT wrapper) on the CPU, cast, with its base weights frozen and the LoRA added.
            device (`torch.device` or `str`):
                The device the model trains on, usually `accelerator.device`.
        """
        device = torch.device(device)
        streaming = device.type == "cuda"
        if streaming:
            avoid_cudnn_attention()
        budgets = self.max_vram or self.max_ram
        if not streaming and (self.layer_offload_fraction > 0 or self.activation_offloading or budgets):
            _warn_inactive_once(device)
        if not self.enabled:
            return model
        offload_model(model, device, self.offload_settings(device))
        return model


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def setting_names() -> list[str]:
    return [spec.name for spec in fields(LayerOffloadPlugin)]


def check_environment() -> None:
    """Refuses `ACCELERATE_OFFLOAD_*` variables that name no setting (a typo would otherwise be ignored)."""
    known = {env_name(name) for name in setting_names()}
    unknown = sorted(key for key in os.environ if key.startswith(ENV_PREFIX) and key not in known)
    if unknown:
        raise OffloadConfigError(
            f"unknown offload setting {', '.join(unknown)}; known settings: {', '.join(setting_names())}"
        )


def _parse_fraction(value: Any) -> float:
    if isinstance(value, bool):  # YAML `true` would otherwise pass as 1.0
        raise OffloadConfigError(f"layer_offload_fraction must be a number in 0..1, got {value!r}")
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise OffloadConfigError(f"layer_offload_fraction must be a number in 0..1, got {value!r}") from None
    if not 0.0 <= fraction <= 1.0:
        raise OffloadConfigError(f"layer_offload_fraction must be in 0..1, got {fraction}")
    return fraction


def _parse_chunks(value: Any) -> int | str:
    text = str(value).strip().lower()
    if text == "auto":
        return text
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise OffloadConfigError(f"sequence_chunks must be a whole number >= 1 or 'auto', got {value!r}")
    return int(text)


def _parse_sharing(value: Any) -> bool | str:
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return parse_bool("share_host_weights", value)
    except OffloadConfigError:
        raise OffloadConfigError(f"share_host_weights must be true, false or auto, got {value!r}") from None


def _parse_compile(value: Any) -> bool | str:
    """False, or the torch.compile mode; `true` is "default"."""
    if not isinstance(value, bool):
        text = str(value).strip().lower()
        value = True if text in _TRUE else False if text in _FALSE else text
    try:
        mode = compile_mode(value)
    except ValueError as error:
        raise OffloadConfigError(str(error)) from None
    return False if mode is None else mode


def _parse_budget(value: str, name: str = "max_vram") -> int:
    try:
        return parse_memory(value, name)
    except ValueError as error:
        raise OffloadConfigError(str(error)) from None


def _parse_prefetch(value: Any) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise OffloadConfigError(f"prefetch_blocks must be a whole number >= 0, got {value!r}")
    return int(text)


_warned_inactive = False


def _warn_inactive_once(device: torch.device) -> None:
    """Says once that the offload settings do nothing off CUDA: a warning, unless the launch asked for the CPU
    (`--cpu` or `use_cpu: true`), where it is what the user chose and only a note."""
    global _warned_inactive
    if not _warned_inactive:
        say = logger.info if parse_flag_from_env("ACCELERATE_USE_CPU") else logger.warning
        say(
            "accelerate-offload: the model trains on %s, not CUDA: layer and activation offloading are inactive "
            "and the model trains as usual.",
            device,
        )
        _warned_inactive = True
