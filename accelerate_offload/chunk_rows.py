"""The model-independent half of token-chunked blocks: row jobs, the autograd node that runs them, and spans.

A family's mirror (`accelerate_offload.models.flux`, `.sd3`) splits a block into keys and values of every token
(phase 1) and row jobs that need only their own rows plus those keys and values (phase 2). Phase 2 is one autograd
node (`ChunkedRows`): its forward runs the row chunks without building a graph and keeps only their inputs (block
input, keys, values); its backward recomputes and differentiates one chunk at a time, summing the key, value and
LoRA gradients over the chunks. Inside the offload runtime's per-block checkpoint, the block's recomputation for
backward stops right after phase 1 (see `recompute`): phase 2's outputs would be thrown away.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .recompute import outputs_discarded

ChunkFunction = Callable[..., Any]  # runs one chunk: (rows, temb, ...) -> rows out, or keys and values
Compile = Callable[[ChunkFunction, str], ChunkFunction]  # wraps a stream's chunk function (compile_blocks)


def as_is(function: ChunkFunction, role: str) -> ChunkFunction:
    return function


@dataclass(frozen=True)
class ChunkMirror:
    """A block class's token-chunked forward: `supported(block)` says whether this instance's configuration is the
    one mirrored; `build(block, chunks, whole, wrap)` returns the chunked forward (`whole` runs the block
    unchunked; `wrap`, `compile_blocks`' compiler or `as_is`, wraps each key/value and row function)."""

    block_class: type
    supported: Callable[[nn.Module], bool]
    build: Callable[[nn.Module, int, Callable[..., Any], Compile], Callable[..., Any]]


def spans(length: int, chunks: int) -> list[tuple[int, int]]:
    """`chunks` contiguous spans of `length` differing in size by at most one (as `torch.tensor_split`)."""
    chunks = min(chunks, max(length, 1))
    bounds = [length * i // chunks for i in range(chunks + 1)]
    return list(itertools.pairwise(bounds))


def run_chunk(function: Callable[..., Any], *args: Any, rng: bool) -> Any:
    """Keeps only the chunk's inputs for backward; under no_grad there is nothing to keep.

    Saving and restoring the RNG state costs per chunk; it matters only when dropout draws random numbers.
    """
    if torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=rng)
    return function(*args)


@dataclass(frozen=True)
class BlockScan:
    """What one call needs to know of the block's modules, found in one walk over them: whether a dropout draws
    random numbers (its RNG state must then be replayed exactly), and where each trainable parameter lives
    (owning module, attribute name)."""

    rng: bool
    trainable: tuple[tuple[nn.Module, str], ...]


def scan_block(block: nn.Module) -> BlockScan:
    rng, trainable = False, []
    for module in block.modules():
        rng = rng or (isinstance(module, nn.Dropout) and module.p > 0 and module.training)
        trainable.extend(
            (module, name) for name, parameter in module._parameters.items()
            if parameter is not None and parameter.requires_grad
        )
    return BlockScan(rng, tuple(trainable))


@dataclass(frozen=True)
class RowJob:
    """One chunk of phase 2: `function(rows, *extras)` for rows [start, end) of input `source`, giving the same rows
    of that source's output. An extra is an input index (the tensor passed whole, or None for a None input) or
    `(index, offset)`: rows [offset + start, offset + end) of a RoPE table (RoPE tables get no gradient)."""

    function: ChunkFunction
    source: int
    start: int
    end: int
    extras: tuple[int | tuple[int, int], ...]

    def arguments(self, rows: torch.Tensor, whole: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        arguments = [rows]
        for extra in self.extras:
            if isinstance(extra, int):
                arguments.append(whole[extra])
            else:
                table, offset = whole[extra[0]], extra[1]
                arguments.append(None if table is None else table[offset + self.start : offset + self.end])
        return arguments


class ChunkedRows(torch.autograd.Function):
    """Phase 2 as one autograd node: a graph for one chunk at a time, and only in backward.

    Inputs are `jobs`, the source order of the outputs, the block's trainable parameter slots, then the tensors
    the jobs index and the trainable parameters themselves. Parameters are inputs so that their gradients leave
    this node once per step, as distributed data parallel expects; in backward the chunks write theirs into
    stand-ins (see `_stand_ins`).
    """

    @staticmethod
    def forward(ctx, jobs: tuple[RowJob, ...], sources: tuple[int, ...], slots: tuple, *inputs: Any):
        tensors = list(inputs[: len(inputs) - len(slots)])
        ctx.jobs, ctx.sources, ctx.slots, ctx.tensor_count = jobs, sources, slots, len(tensors)
        device_type = tensors[sources[0]].device.type
        ctx.autocast = dict(device_type=device_type, dtype=torch.get_autocast_dtype(device_type),
                            enabled=torch.is_autocast_enabled(device_type))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        if outputs_discarded():  # a recomputation for backward: keeping the inputs is all it is for
            return tuple(torch.zeros((), dtype=tensors[s].dtype, device=tensors[s].device).expand(tensors[s].shape)
                         for s in sources)
        outputs: dict[int, torch.Tensor] = {}
        for job in jobs:
            source = tensors[job.source]
            rows = job.function(*job.arguments(source[:, job.start : job.end], tensors))
            if job.source not in outputs:
                outputs[job.source] = torch.empty(source.shape, dtype=rows.dtype, device=rows.device)
            outputs[job.source][:, job.start : job.end] = rows
        return tuple(outputs[s] for s in sources)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor | None):
        """Autograd's own accumulation into `.grad` of detached leaves: each chunk's key and value gradients are
        added in place as soon as attention's backward makes them, then freed, as with plain autograd."""
        tensors = list(ctx.saved_tensors)
        needs = ctx.needs_input_grad[3 : 3 + ctx.tensor_count]
        shared = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(tensors, needs)]
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        rows_grads: dict[int, list[tuple[RowJob, torch.Tensor]]] = {}  # joined at the end: no zero-filled whole
        with _stand_ins(ctx.slots) as parameters:
            for job in reversed(ctx.jobs):  # as autograd would: the text rows' gradient does not wait through all
                grad_rows = grad_outputs[ctx.sources.index(job.source)]
                if grad_rows is None:
                    continue
                source = tensors[job.source][:, job.start : job.end].detach().requires_grad_(needs[job.source])
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    rows = job.function(*job.arguments(source, shared))
                whole = [shared[e] for e in dict.fromkeys(e for e in job.extras if isinstance(e, int))]
                inputs = [t for t in [source, *whole, *parameters] if t is not None and t.requires_grad]
                if not inputs or not rows.requires_grad:
                    continue
                torch.autograd.backward(rows, grad_rows[:, job.start : job.end], inputs=inputs)
                del rows  # the chunk's output goes before the next chunk allocates its own
                if source.grad is not None:
                    rows_grads.setdefault(job.source, []).append((job, source.grad))
        for index, pieces in rows_grads.items():
            grads[index] = _join_rows(pieces)
        for index, leaf in enumerate(shared):
            if grads[index] is None and leaf is not None and leaf.grad is not None:
                grads[index] = leaf.grad
        return (None, None, None, *grads, *(p.grad for p in parameters))


def _join_rows(pieces: list[tuple[RowJob, torch.Tensor]]) -> torch.Tensor:
    """A source's gradient from its chunks' row gradients (its jobs tile its rows, and all of them ran)."""
    pieces = sorted(pieces, key=lambda piece: piece[0].start)
    return pieces[0][1] if len(pieces) == 1 else torch.cat([grad for _, grad in pieces], dim=1)


@contextmanager
def _stand_ins(slots: tuple[tuple[nn.Module, str], ...]) -> Iterator[list[nn.Parameter]]:
    """Puts a fresh leaf sharing each trainable parameter's storage in its place while the chunks run backward.

    Their `.grad` sums the chunks' gradients; the real parameters (whose gradient hooks distributed data parallel
    watches) then receive the sum once, from `ChunkedRows`.
    """
    originals = [module._parameters[name] for module, name in slots]
    stand_ins = [nn.Parameter(parameter.detach()) for parameter in originals]
    for (module, name), stand_in in zip(slots, stand_ins, strict=True):
        module._parameters[name] = stand_in
    try:
        yield stand_ins
    finally:
        for (module, name), original in zip(slots, originals, strict=True):
            module._parameters[name] = original


def run_rows(scan: BlockScan, jobs: list[RowJob], sources: tuple[int, ...], tensors: list) -> tuple:
    """Phase 2: one `ChunkedRows` node when training; chunk by chunk without a graph under no_grad; per-chunk
    checkpoints when a dropout draws random numbers."""
    if torch.is_grad_enabled() and not scan.rng:
        parameters = [module._parameters[name] for module, name in scan.trainable]
        return ChunkedRows.apply(tuple(jobs), sources, scan.trainable, *tensors, *parameters)
    run = partial(run_chunk, rng=scan.rng)
    outputs: dict[int, list[torch.Tensor]] = {}
    for job in jobs:
        rows = tensors[job.source][:, job.start : job.end]
        outputs.setdefault(job.source, []).append(run(job.function, *job.arguments(rows, tensors)))
    return tuple(torch.cat(outputs[s], dim=1) for s in sources)


def join_chunks(per_chunk: list[tuple[torch.Tensor, ...]], sequence_dim: int) -> list[torch.Tensor]:
    """Phase 1's results: the chunks' keys (values, ...) each joined along the sequence, in attention order."""
    return [torch.cat(pieces, dim=sequence_dim) for pieces in zip(*per_chunk, strict=True)]

