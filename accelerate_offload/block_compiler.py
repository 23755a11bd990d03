"""`compile_blocks`: regional compilation of each block's own computation, as diffusers' `compile_repeated_blocks`.

Only what a block computes is compiled: its class's forward, or a token-chunked block's key/value and row
functions. The hook around it (checkpointing, the conductor's loads and drops, activation shuttling) stays in
Python, outside the compiled region, so none of it breaks a graph. Dynamo caches compiled code on the function's
code object and guards on the shapes, strides and dtypes of its tensors, parameters included (parameters are
graph inputs, read from the module at each call): every block of a class shares one compiled graph, and a streamed
block's parameters re-pointed at a fresh device copy on each visit call it again without recompiling.

Modes that record CUDA graphs are refused: a graph replays at the addresses it recorded, while streamed weights
move on every visit and a checkpointed block runs again in backward, with other tensors, before its graph's
outputs are done with.
"""

from __future__ import annotations

import logging
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

_live: weakref.WeakSet[BlockCompiler] = weakref.WeakSet()
_role_codes: dict[tuple[types.CodeType, str], types.CodeType] = {}  # a chunk function's code object per role
_started: list[float] = []  # when the compile in progress started (dynamo nests them: the outermost counts)


def compile_mode(value: bool | str) -> str | None:
    """`compile_blocks` as a torch.compile mode: None for off, "default" for true; a mode that cannot work is
    refused with the fix."""
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if value in CUDA_GRAPH_MODES:
        raise ValueError(
            f"compile_blocks: {value} records CUDA graphs, which replay at fixed addresses, but streamed weights "
            "move on every visit and checkpointed blocks run again in backward: use true (default) or "
            "max-autotune-no-cudagraphs"
        )
    if value not in COMPILE_MODES:
        raise ValueError(f"compile_blocks must be true, false or one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return value


class BlockCompiler:
    """Compiles block functions with one torch.compile mode and keeps the time spent compiling apart.

    Args:
        mode (`str`):
            A torch.compile mode (see `compile_mode`).
        backend (`str`, defaults to `"inductor"`):
            The torch.compile backend.
    """

    def __init__(self, mode: str, backend: str = "inductor") -> None:
        self.mode = mode
        self.backend = backend
        self.compiles = 0  # graphs compiled while this compiler was live: frames traced, backward passes compiled
        self.compile_seconds = 0.0
        self._reported = (0, 0.0)
        _enable_module_inlining()
        _register_callbacks()
        _live.add(self)

    def block(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """A block's forward compiled, its tensor inputs passed as contiguous tensors.

        Flux single blocks return views into one joint tensor, which the next block gets as inputs with other
        strides than the first one's: without a copy, dynamo would compile those blocks again, with dynamic strides.
        """
        compiled = self._compile(function)

        def call(*args: Any, **kwargs: Any) -> Any:
            return compiled(*tree_map_only(torch.Tensor, _plain, args), **tree_map_only(torch.Tensor, _plain, kwargs))

        return call

    def _compile(self, function: Callable[..., Any]) -> Callable[..., Any]:
        options = {"backend": self.backend}
        if self.backend == "inductor":
            options["mode"] = self.mode
        return torch.compile(function, **options)

    def rows(self, function: Callable[..., Any], role: str) -> Callable[..., Any]:
        """A token-chunk function compiled for one `role` (a stream: "text" or "image"), its row slices passed as
        contiguous copies.

        Dynamo keeps at most 8 graphs per code object. One chunk function serves both streams (other modules,
        other row counts) in forward (no grad) and backward, so each role gets a code object of its own, shared
        by every block. Dynamo also guards on a view's storage offset and strides: the first chunk (offset 0) and
        the others would each need a graph; a chunk's rows are a small copy next to the work done on them.
        """
        key = (function.__code__, role)
        code = _role_codes.setdefault(key, function.__code__.replace())
        globals_, closure = function.__globals__, function.__closure__
        compiled = self._compile(types.FunctionType(code, globals_, function.__name__, function.__defaults__, closure))

        def call(*args: Any) -> Any:
            return compiled(*(_plain(a) if isinstance(a, torch.Tensor) else a for a in args))

        return call

    def report(self) -> None:
        """Logs the compiling done since the last report (the first one: the first step's), if any; called as a
        forward pass starts."""
        compiles, seconds = self.compiles - self._reported[0], self.compile_seconds - self._reported[1]
        if compiles == 0:
            return
        what = "the first step" if self._reported[0] == 0 else "the last pass (new shapes, dtypes or grad mode)"
        logger.info(
            "accelerate-offload: compiled blocks: %d graphs compiled in %.1f s in %s; steps after it reuse them",
            compiles, seconds, what,
        )
        self._reported = (self.compiles, self.compile_seconds)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or a contiguous copy of a view that starts inside its storage or skips elements of it."""
    if tensor.storage_offset() == 0 and tensor.is_contiguous():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _compile_started(*args: Any) -> None:
    _started.append(time.perf_counter())


def _compile_ended(*args: Any) -> None:
    if not _started:
        return
    seconds = time.perf_counter() - _started.pop()
    for compiler in list(_live):
        compiler.compiles += 1
        compiler.compile_seconds += seconds


def _register_callbacks() -> None:
    """Dynamo's compile callbacks: every frame traced and every backward compiled on first use (registered again
    after `torch._dynamo.reset()`, which clears them)."""
    from torch._dynamo.callback import callback_handler

    if _compile_started not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_compile_started)
        callback_handler.register_end_callback(_compile_ended)


def _enable_module_inlining() -> None:
    """Parameters as graph inputs rather than constants of one module instance (always so since torch 2.5, where
    reading the flag warns): without it, dynamo would guard on each block's identity and recompile per block."""
    if torch.__version__ < (2, 5):
        torch._dynamo.config.inline_inbuilt_nn_modules = True
