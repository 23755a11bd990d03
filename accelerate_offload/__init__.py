"""accelerate-offload: stream a diffusion transformer's blocks from pinned CPU memory while a LoRA trains.

The names below load on first use, so `accelerate-offload launch` can check a config (and the training scripts
can quiet their dependencies) before diffusers, transformers or peft are imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .blocks import BlocksNotFoundError, find_blocks
    from .conductor import LayerOffloadConductor
    from .offload import get_conductor, offload_model, remove_offload
    from .plugin import LayerOffloadPlugin, OffloadConfigError

_EXPORTS = {
    "BlocksNotFoundError": ".blocks",
    "find_blocks": ".blocks",
    "LayerOffloadConductor": ".conductor",
    "get_conductor": ".offload",
    "offload_model": ".offload",
    "remove_offload": ".offload",
    "LayerOffloadPlugin": ".plugin",
    "OffloadConfigError": ".plugin",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
