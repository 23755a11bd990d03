"""Token-chunked execution of Flux and SD3 transformer blocks: the same function in a fraction of the memory.

Everything in these blocks except the attention core is token-wise (AdaLN modulation, norms, RoPE, projections,
MLP, residuals), yet run on the whole sequence it holds several full-sequence fp32 intermediates at once. Here a
block runs in two phases over token chunks, each chunk under its own non-reentrant checkpoint so that only its
inputs and outputs outlive it:

1. keys and values of every token (after the key norm and RoPE), chunk by chunk;
2. per query chunk: modulation and norm, query, attention against all keys and values, out-projection, gated
   residual, second norm and modulation, MLP, gated residual.

Phase 2 is one autograd node (`_ChunkedRows`): its forward runs the row chunks without building a graph and keeps
only their inputs (block input, keys, values); its backward recomputes and differentiates one chunk at a time,
summing the key, value and LoRA gradients over the chunks. Inside the offload runtime's per-block checkpoint, the
block's recomputation for backward stops right after phase 1 (see `recompute`): phase 2's outputs would be thrown
away, so the rows cost one forward more than an unchunked block, not two.
The text stream (512 tokens for Flux) is one chunk; `chunks` splits the image tokens. The math mirrors
diffusers 0.42.1 op for op (same modules, same order, same dtypes), calling modules rather than their weights so
that PEFT LoRA layers work unchanged. Attention processors, fused projections, context parallelism, feed-forward
chunking or attention kwargs that this file does not mirror make the block run whole.

Exactness: each output row goes through the same ops as unchunked, so the forward pass is bitwise equal wherever
the kernels give a row the same bits whatever the number of rows around it (CPU GEMM and flash-attention kernels
block rows by count, so uneven chunks may differ in the last bit). Gradients of weights, keys and values are sums
over tokens that chunking splits into per-chunk partial sums: they differ by reassociation (about 1e-7 relative
in fp32; in bf16 the key/value gradients are summed across query chunks in bf16). One deliberate difference: SD3's
last block (`context_pre_only`) discards its text queries' attention output, so they are not computed here and a
LoRA on that block's `add_q_proj` gets no gradient (None) where the whole block gives it zeros.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from .recompute import outputs_discarded

MAX_CHUNK_TOKENS = 4096

ChunkFunction = Callable[..., Any]  # runs one chunk: (rows, temb, ...) -> rows out, or keys and values


def auto_chunks(image_tokens: int, max_chunk_tokens: int = MAX_CHUNK_TOKENS) -> int:
    """The fewest chunks that keep each under `max_chunk_tokens` image tokens.

    Chunking leaves a floor it cannot lower: full-sequence keys and values, their gradients, the block's input,
    output and input gradient (together roughly the 0.9 GB the attention alone peaks at for a Flux-dev block at
    2048²). The token-wise working set is about (3.15 − 0.9) GB / 16 896 tokens ≈ 0.13 MB per token there, so a
    4096-token chunk's (≈ 0.55 GB) is already below the floor: smaller chunks buy little memory for more launches.
    1024² (4096 image tokens) runs whole, 2048² in 4 chunks.
    """
    return max(1, math.ceil(image_tokens / max_chunk_tokens))


def chunked_forward(block: nn.Module, chunks: int) -> Callable[..., Any] | None:
    """A function with `block.forward`'s signature and result, run in `chunks` image-token chunks.

    None for a block this module does not know (run it whole). For `chunks == 1` it is the block class's own
    forward, which bypasses any wrapper installed on the instance (such as the offload layer's), so it can
    replace `OffloadCheckpointLayer.block_forward` without recursing.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    if not chunkable(block):
        return None
    whole = type(block).forward.__get__(block)
    return whole if chunks == 1 else _BLOCKS[type(block)][1](block, chunks, whole)


def chunkable(block: nn.Module) -> bool:
    """Whether `block` is of a type and configuration that this module mirrors (others run whole)."""
    supported, _ = _BLOCKS.get(type(block), (None, None))
    return supported is not None and supported(block)


def chunked_block_forward(block: nn.Module, sequence_chunks: int | str) -> Callable[..., Any] | None:
    """`chunked_forward` for a fixed count; for "auto", one that picks the count from each call's image tokens.

    None where chunking does not apply (one chunk, or a block type run whole).
    """
    if sequence_chunks != "auto":
        return chunked_forward(block, int(sequence_chunks)) if int(sequence_chunks) > 1 else None
    if not chunkable(block):
        return None
    by_count: dict[int, Callable[..., Any]] = {}

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        chunks = auto_chunks(hidden_states.shape[1])
        if chunks not in by_count:
            by_count[chunks] = chunked_forward(block, chunks)
        return by_count[chunks](*args, **kwargs)

    return forward


# ---- shared pieces ----


@dataclass(frozen=True)
class _Chunk:
    """One run of rows in attention order: which stream they belong to, the rows, and their RoPE rows."""

    stream: str
    rows: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None


def _spans(length: int, chunks: int) -> list[tuple[int, int]]:
    """`chunks` contiguous spans of `length` differing in size by at most one (as `torch.tensor_split`)."""
    chunks = min(chunks, max(length, 1))
    bounds = [length * i // chunks for i in range(chunks + 1)]
    return list(itertools.pairwise(bounds))


def _run_chunk(function: Callable[..., Any], *args: Any, rng: bool) -> Any:
    """Keeps only the chunk's inputs for backward; under no_grad there is nothing to keep.

    Saving and restoring the RNG state costs per chunk; it matters only when dropout draws random numbers.
    """
    if torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=rng)
    return function(*args)


@dataclass(frozen=True)
class _BlockScan:
    """What one call needs to know of the block's modules, found in one walk over them: whether a dropout draws
    random numbers (its RNG state must then be replayed exactly), and where each trainable parameter lives
    (owning module, attribute name)."""

    rng: bool
    trainable: tuple[tuple[nn.Module, str], ...]


def _scan(block: nn.Module) -> _BlockScan:
    rng, trainable = False, []
    for module in block.modules():
        rng = rng or (isinstance(module, nn.Dropout) and module.p > 0 and module.training)
        trainable.extend(
            (module, name) for name, parameter in module._parameters.items()
            if parameter is not None and parameter.requires_grad
        )
    return _BlockScan(rng, tuple(trainable))


@dataclass(frozen=True)
class _RowJob:
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


class _ChunkedRows(torch.autograd.Function):
    """Phase 2 as one autograd node: a graph for one chunk at a time, and only in backward.

    Inputs are `jobs`, the source order of the outputs, the block's trainable parameter slots, then the tensors
    the jobs index and the trainable parameters themselves. Parameters are inputs so that their gradients leave
    this node once per step, as distributed data parallel expects; in backward the chunks write theirs into
    stand-ins (see `_stand_ins`).
    """

    @staticmethod
    def forward(ctx, jobs: tuple[_RowJob, ...], sources: tuple[int, ...], slots: tuple, *inputs: Any):
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
        rows_grads: dict[int, list[tuple[_RowJob, torch.Tensor]]] = {}  # joined at the end: no zero-filled whole
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


def _join_rows(pieces: list[tuple[_RowJob, torch.Tensor]]) -> torch.Tensor:
    """A source's gradient from its chunks' row gradients (its jobs tile its rows, and all of them ran)."""
    pieces = sorted(pieces, key=lambda piece: piece[0].start)
    return pieces[0][1] if len(pieces) == 1 else torch.cat([grad for _, grad in pieces], dim=1)


@contextmanager
def _stand_ins(slots: tuple[tuple[nn.Module, str], ...]) -> Iterator[list[nn.Parameter]]:
    """Puts a fresh leaf sharing each trainable parameter's storage in its place while the chunks run backward.

    Their `.grad` sums the chunks' gradients; the real parameters (whose gradient hooks distributed data parallel
    watches) then receive the sum once, from `_ChunkedRows`.
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


def _run_rows(scan: _BlockScan, jobs: list[_RowJob], sources: tuple[int, ...], tensors: list) -> tuple:
    """Phase 2: one `_ChunkedRows` node when training; chunk by chunk without a graph under no_grad; per-chunk
    checkpoints when a dropout draws random numbers."""
    if torch.is_grad_enabled() and not scan.rng:
        parameters = [module._parameters[name] for module, name in scan.trainable]
        return _ChunkedRows.apply(tuple(jobs), sources, scan.trainable, *tensors, *parameters)
    run = partial(_run_chunk, rng=scan.rng)
    outputs: dict[int, list[torch.Tensor]] = {}
    for job in jobs:
        rows = tensors[job.source][:, job.start : job.end]
        outputs.setdefault(job.source, []).append(run(job.function, *job.arguments(rows, tensors)))
    return tuple(torch.cat(outputs[s], dim=1) for s in sources)


def _text_then_image(
    encoder_hidden_states: torch.Tensor,
    hidden_states: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    chunks: int,
) -> list[_Chunk]:
    """Flux's joint sequence is [text, image]; its RoPE table covers both in that order."""
    text = encoder_hidden_states.shape[1]

    def rope_rows(start: int, end: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if rope is None else (rope[0][start:end], rope[1][start:end])

    parts = [_Chunk("text", encoder_hidden_states, *rope_rows(0, text))]
    for start, end in _spans(hidden_states.shape[1], chunks):
        parts.append(_Chunk("image", hidden_states[:, start:end], *rope_rows(text + start, text + end)))
    return parts


def _join(per_chunk: list[tuple[torch.Tensor, ...]], sequence_dim: int) -> list[torch.Tensor]:
    """Phase 1's results: the chunks' keys (values, ...) each joined along the sequence, in attention order."""
    return [torch.cat(pieces, dim=sequence_dim) for pieces in zip(*per_chunk, strict=True)]


# ---- Flux ----


@dataclass(frozen=True)
class _FluxStream:
    """The modules one stream of a Flux double block uses, so both streams share one code path."""

    norm1: nn.Module
    to_q: nn.Module
    to_k: nn.Module
    to_v: nn.Module
    norm_q: nn.Module
    norm_k: nn.Module
    to_out: Callable[[torch.Tensor], torch.Tensor]
    norm2: nn.Module
    ff: nn.Module
    clip_fp16: bool


def _flux_supported(block: nn.Module) -> bool:
    """The default processor, unfused projections, no context parallelism: what this file mirrors."""
    attn = block.attn
    processor = attn.processor
    return (
        type(processor) is FluxAttnProcessor
        and not getattr(attn, "fused_projections", False)
        and processor._parallel_config is None
    )


def _flux_heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))


def _flux_rope(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    return x if cos is None else apply_rotary_emb(x, (cos, sin), sequence_dim=1)


def _flux_attend(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """FluxAttnProcessor's attention core for a query chunk against the whole sequence."""
    hidden_states = dispatch_attention_fn(
        query,
        key,
        value,
        attn_mask=None,
        backend=attn.processor._attention_backend,
        parallel_config=attn.processor._parallel_config,
    )
    return hidden_states.flatten(2, 3).to(query.dtype)


def _flux_key_value(
    attn: nn.Module,
    normed: torch.Tensor,
    to_k: nn.Module,
    to_v: nn.Module,
    norm_k: nn.Module,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = norm_k(_flux_heads(attn, to_k(normed)))
    return _flux_rope(key, cos, sin), _flux_heads(attn, to_v(normed))


def _flux_query(
    attn: nn.Module,
    normed: torch.Tensor,
    to_q: nn.Module,
    norm_q: nn.Module,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> torch.Tensor:
    return _flux_rope(norm_q(_flux_heads(attn, to_q(normed))), cos, sin)


def _flux_double_streams(block: FluxTransformerBlock) -> dict[str, _FluxStream]:
    attn = block.attn
    return {
        "text": _FluxStream(
            block.norm1_context, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
            attn.norm_added_k, attn.to_add_out, block.norm2_context, block.ff_context, clip_fp16=True,
        ),
        "image": _FluxStream(
            block.norm1, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k,
            lambda x: attn.to_out[1](attn.to_out[0](x)), block.norm2, block.ff, clip_fp16=False,
        ),
    }


def _flux_double_key_value(attn: nn.Module, stream: _FluxStream) -> ChunkFunction:
    def key_value(x: torch.Tensor, temb: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
        normed = stream.norm1(x, emb=temb)[0]
        return _flux_key_value(attn, normed, stream.to_k, stream.to_v, stream.norm_k, cos, sin)

    return key_value


def _flux_double_rows(attn: nn.Module, stream: _FluxStream) -> ChunkFunction:
    """FluxTransformerBlock.forward for the rows of one stream, given every token's keys and values."""

    def rows(
        x: torch.Tensor,
        temb: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
    ) -> torch.Tensor:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = stream.norm1(x, emb=temb)
        query = _flux_query(attn, normed, stream.to_q, stream.norm_q, cos, sin)
        attn_output = stream.to_out(_flux_attend(attn, query, key, value))
        x = x + gate_msa.unsqueeze(1) * attn_output
        normed = stream.norm2(x)
        normed = normed * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp.unsqueeze(1) * stream.ff(normed)
        if stream.clip_fp16 and x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x

    return rows


def _flux_chunked(
    block: nn.Module,
    chunks: int,
    whole: Callable[..., Any],
    key_value: dict[str, ChunkFunction],
    rows: dict[str, ChunkFunction],
) -> Callable[..., Any]:
    """The chunked forward shared by both Flux block types; `key_value` and `rows` per stream ("text", "image")."""

    def forward(
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if joint_attention_kwargs or not _flux_supported(block):
            return whole(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
        parts = _text_then_image(encoder_hidden_states, hidden_states, image_rotary_emb, chunks)
        scan = _scan(block)
        run = partial(_run_chunk, rng=scan.rng)
        keys_values = [run(key_value[p.stream], p.rows, temb, p.cos, p.sin) for p in parts]
        key, value = _join(keys_values, sequence_dim=1)
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        tensors = [hidden_states, encoder_hidden_states, temb, key, value, cos, sin]
        text = encoder_hidden_states.shape[1]
        jobs = [_RowJob(rows["text"], 1, 0, text, (2, 3, 4, (5, 0), (6, 0)))] + [
            _RowJob(rows["image"], 0, start, end, (2, 3, 4, (5, text), (6, text)))
            for start, end in _spans(hidden_states.shape[1], chunks)
        ]
        return _run_rows(scan, jobs, (1, 0), tensors)

    return forward


def _flux_double(block: FluxTransformerBlock, chunks: int, whole: Callable[..., Any]) -> Callable[..., Any]:
    streams = _flux_double_streams(block)
    key_value = {name: _flux_double_key_value(block.attn, stream) for name, stream in streams.items()}
    rows = {name: _flux_double_rows(block.attn, stream) for name, stream in streams.items()}
    return _flux_chunked(block, chunks, whole, key_value, rows)


def _flux_single_key_value(block: FluxSingleTransformerBlock) -> ChunkFunction:
    attn = block.attn

    def key_value(x: torch.Tensor, temb: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None):
        normed = block.norm(x, emb=temb)[0]
        return _flux_key_value(attn, normed, attn.to_k, attn.to_v, attn.norm_k, cos, sin)

    return key_value


def _flux_single_rows(block: FluxSingleTransformerBlock) -> ChunkFunction:
    """FluxSingleTransformerBlock.forward for some rows of the joint sequence, given all keys and values."""
    attn = block.attn

    def rows(
        x: torch.Tensor,
        temb: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
    ) -> torch.Tensor:
        normed, gate = block.norm(x, emb=temb)
        mlp_hidden_states = block.act_mlp(block.proj_mlp(normed))
        attn_output = _flux_attend(attn, _flux_query(attn, normed, attn.to_q, attn.norm_q, cos, sin), key, value)
        hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
        hidden_states = gate.unsqueeze(1) * block.proj_out(hidden_states)
        hidden_states = x + hidden_states
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states

    return rows


def _flux_single(block: FluxSingleTransformerBlock, chunks: int, whole: Callable[..., Any]) -> Callable[..., Any]:
    """Text and image rows of a single block go through the same modules."""
    key_value, rows = _flux_single_key_value(block), _flux_single_rows(block)
    streams = ("text", "image")
    return _flux_chunked(block, chunks, whole, dict.fromkeys(streams, key_value), dict.fromkeys(streams, rows))


# ---- SD3 ----


def _sd3_supported(block: nn.Module) -> bool:
    """The default processor and no feed-forward chunking of its own: what this file mirrors."""
    attentions = [block.attn] + ([block.attn2] if block.use_dual_attention else [])
    return block._chunk_size is None and all(type(attn.processor) is JointAttnProcessor2_0 for attn in attentions)


def _sd3_heads(attn: nn.Module, projected: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """(B, S, H·D) → (B, H, S, D), then the optional QK norm, as JointAttnProcessor2_0 does."""
    head_dim = projected.shape[-1] // attn.heads
    heads = projected.view(projected.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
    return heads if norm is None else norm(heads)


def _sd3_attend(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """JointAttnProcessor2_0's attention core for a query chunk against the whole sequence."""
    hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    batch, _, _, head_dim = query.shape
    return hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


def _sd3_self_attention(attn: nn.Module, normed: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The output of `attn` (no context) for query rows `normed`."""
    query = _sd3_heads(attn, attn.to_q(normed), attn.norm_q)
    return attn.to_out[1](attn.to_out[0](_sd3_attend(attn, query, key, value)))


def _sd3_text_norm(block: JointTransformerBlock, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if block.context_pre_only:
        return (block.norm1_context(x, temb),)
    return block.norm1_context(x, emb=temb)


def _sd3_image_key_value(block: JointTransformerBlock) -> ChunkFunction:
    """Keys and values of image rows for the joint attention and, with dual attention, for `attn2`."""
    attn, attn2 = block.attn, block.attn2

    def key_value(x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normed = block.norm1(x, emb=temb)
        pair = (_sd3_heads(attn, attn.to_k(normed[0]), attn.norm_k), _sd3_heads(attn, attn.to_v(normed[0]), None))
        if not block.use_dual_attention:
            return pair
        return pair + (
            _sd3_heads(attn2, attn2.to_k(normed[5]), attn2.norm_k),
            _sd3_heads(attn2, attn2.to_v(normed[5]), None),
        )

    return key_value


def _sd3_text_key_value(block: JointTransformerBlock) -> ChunkFunction:
    attn = block.attn

    def key_value(x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normed = _sd3_text_norm(block, x, temb)[0]
        return (
            _sd3_heads(attn, attn.add_k_proj(normed), attn.norm_added_k),
            _sd3_heads(attn, attn.add_v_proj(normed), None),
        )

    return key_value


def _sd3_image_rows(block: JointTransformerBlock) -> ChunkFunction:
    """JointTransformerBlock.forward for image rows, given the joint (and `attn2`) keys and values."""

    def rows(x: torch.Tensor, temb: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *self_kv: torch.Tensor):
        normed = block.norm1(x, emb=temb)
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = normed[:5]
        x = x + gate_msa.unsqueeze(1) * _sd3_self_attention(block.attn, norm_hidden_states, key, value)
        if block.use_dual_attention:
            x = x + normed[6].unsqueeze(1) * _sd3_self_attention(block.attn2, normed[5], *self_kv)
        norm_hidden_states = block.norm2(x)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * block.ff(norm_hidden_states)

    return rows


def _sd3_text_rows(block: JointTransformerBlock) -> ChunkFunction:
    """JointTransformerBlock.forward for the context rows (blocks that update the context)."""
    attn = block.attn

    def rows(x: torch.Tensor, temb: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        normed, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(x, emb=temb)
        query = _sd3_heads(attn, attn.add_q_proj(normed), attn.norm_added_q)
        context_attn_output = attn.to_add_out(_sd3_attend(attn, query, key, value))
        x = x + c_gate_msa.unsqueeze(1) * context_attn_output
        normed = block.norm2_context(x)
        normed = normed * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        return x + c_gate_mlp.unsqueeze(1) * block.ff_context(normed)

    return rows


def _sd3_joint(block: JointTransformerBlock, chunks: int, whole: Callable[..., Any]) -> Callable[..., Any]:
    """SD3's joint sequence is [image, text]; `attn2` (SD3.5 dual attention) attends over image rows only."""
    image_key_value, text_key_value = _sd3_image_key_value(block), _sd3_text_key_value(block)
    image_rows, text_rows = _sd3_image_rows(block), _sd3_text_rows(block)

    def forward(
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if joint_attention_kwargs or not _sd3_supported(block):
            return whole(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
        image = [hidden_states[:, a:b] for a, b in _spans(hidden_states.shape[1], chunks)]
        scan = _scan(block)
        run = partial(_run_chunk, rng=scan.rng)
        image_kv = [run(image_key_value, rows, temb) for rows in image]
        text_kv = run(text_key_value, encoder_hidden_states, temb)
        key, value = _join([kv[:2] for kv in image_kv] + [text_kv], sequence_dim=2)
        self_kv = _join([kv[2:] for kv in image_kv], sequence_dim=2)  # attn2's, with dual attention
        tensors = [hidden_states, encoder_hidden_states, temb, key, value, *self_kv]
        extras = (2, 3, 4) + tuple(range(5, len(tensors)))
        jobs = [_RowJob(image_rows, 0, start, end, extras) for start, end in _spans(hidden_states.shape[1], chunks)]
        if block.context_pre_only:
            return None, _run_rows(scan, jobs, (0,), tensors)[0]
        jobs.append(_RowJob(text_rows, 1, 0, encoder_hidden_states.shape[1], (2, 3, 4)))
        image_output, context = _run_rows(scan, jobs, (0, 1), tensors)
        return context, image_output

    return forward


_BLOCKS: dict[type, tuple[Callable[[Any], bool], Callable[[Any, int, Callable[..., Any]], Callable[..., Any]]]] = {
    FluxTransformerBlock: (_flux_supported, _flux_double),
    FluxSingleTransformerBlock: (_flux_supported, _flux_single),
    JointTransformerBlock: (_sd3_supported, _sd3_joint),
}
