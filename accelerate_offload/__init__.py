"""accelerate-offload: stream a diffusion transformer's blocks from pinned CPU memory while a LoRA trains."""

from .blocks import BlocksNotFoundError, find_blocks
from .conductor import LayerOffloadConductor
from .offload import get_conductor, offload_model, remove_offload
from .plugin import LayerOffloadPlugin, OffloadConfigError

__all__ = [
    "BlocksNotFoundError",
    "LayerOffloadConductor",
    "LayerOffloadPlugin",
    "OffloadConfigError",
    "find_blocks",
    "get_conductor",
    "offload_model",
    "remove_offload",
]
__version__ = "0.1.0"
