"""`OffloadSettings`: how one model is streamed, in one object that `LayerOffloadPlugin` builds and passes down."""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATION_MIN_BYTES = 64 * 1024  # smaller tensors cost more in copy latency than they save


@dataclass(frozen=True)
class OffloadSettings:
    """The settings of `offload_model`, checked and resolved (the plugin reads and validates the user's).

    Args:
        layer_offload_fraction (`float`, defaults to `0.0`):
            Share of the blocks streamed from host memory; the first ceil((1 - fraction) * number of blocks) stay
            resident on the device.
        activation_offloading (`bool`, defaults to `False`):
            Move the block inputs kept by checkpointing to host memory until the backward pass needs them.
        async_offloading (`bool`, defaults to `True`):
            Copy on side CUDA streams so that copies overlap compute.
        gradient_checkpointing (`bool`, defaults to `True`):
            Non-reentrant `torch.utils.checkpoint` around every block; needed to train with streamed blocks.
        prefetch_blocks (`int`, defaults to `1`):
            Streamed blocks copied ahead of the one computing.
        pin_memory (`bool`, defaults to `True`):
            Page-locked host memory for streamed weights and activations (on CUDA devices).
        block_names (`list[str]`, *optional*):
            Dotted paths of the block lists; by default the registry's, or those the model's class declares.
        max_vram (`str` or `int`, *optional*):
            A device memory budget ("6GB", or bytes) instead of a fraction: every block starts streamed and the
            first training step decides which become resident. Needs a CUDA device.
        max_ram (`str` or `int`, *optional*):
            A host memory budget ("12GB", or bytes) for the streamed blocks: the first ones that fit stay in host
            memory, the rest are read from a block file in `offload_dir` each time they are needed.
        offload_dir (`str`, *optional*):
            Folder of the block file that `max_ram` spills to; the file is written once and reused.
        sequence_chunks (`int` or `"auto"`, defaults to `1`):
            Run Flux and SD3 blocks in this many image-token chunks ("auto": at most 4096 tokens a chunk).
        activation_min_bytes (`int`, defaults to 64 KiB):
            Saved tensors smaller than this stay on the device under activation offloading.
        share_host_weights (`bool` or `"auto"`, defaults to `False`):
            The processes of one machine share one host copy of the streamed weights ("auto": when the machine
            runs more than one; true also refuses to fall back to a copy per process). Not with `max_ram`. Every
            process of the job must then offload the model at the same time (they meet in collectives), so it is
            off here, for models placed by one process alone (validation images), and "auto" in the plugin.
        compile_blocks (`bool` or `str`, defaults to `False`):
            Compile each block's own computation with torch.compile (`True`, or a mode: "default",
            "max-autotune-no-cudagraphs"); one compiled graph serves every block of a class.
        compile_backend (`str`, defaults to `"inductor"`):
            torch.compile's backend for `compile_blocks`; "aot_eager" traces and differentiates the same graphs
            without generating kernels (how CPU tests check guards and recompiles quickly).
    """

    layer_offload_fraction: float = 0.0
    activation_offloading: bool = False
    async_offloading: bool = True
    gradient_checkpointing: bool = True
    prefetch_blocks: int = 1
    pin_memory: bool = True
    block_names: list[str] | None = None
    max_vram: str | int | None = None
    max_ram: str | int | None = None
    offload_dir: str | None = None
    sequence_chunks: int | str = 1
    activation_min_bytes: int = ACTIVATION_MIN_BYTES
    share_host_weights: bool | str = False
    compile_blocks: bool | str = False
    compile_backend: str = "inductor"
