"""Token-chunked execution of Flux and SD3 transformer blocks: the same function in a fraction of the memory.

Everything in these blocks except the attention core is token-wise (AdaLN modulation, norms, RoPE, projections,
MLP, residuals), yet run on the whole sequence it holds several full-sequence fp32 intermediates at once. Here a
block runs in two phases over token chunks, each chunk under its own non-reentrant checkpoint so that only its
inputs and outputs outlive it:

1. keys and values of every token (after the key norm and RoPE), chunk by chunk;
2. per query chunk: modulation and norm, query, attention against all keys and values, out-projection, gated
   residual, second norm and modulation, MLP, gated residual.

Phase 2 is one autograd node (`chunk_rows.ChunkedRows`): its forward runs the row chunks without building a graph
and keeps only their inputs (block input, keys, values); its backward recomputes and differentiates one chunk at a
time, summing the key, value and LoRA gradients over the chunks. Inside the offload runtime's per-block checkpoint, the
block's recomputation for backward stops right after phase 1 (see `recompute`): phase 2's outputs would be thrown
away, so the rows cost one forward more than an unchunked block, not two.
The text stream (512 tokens for Flux) is one chunk; `chunks` splits the image tokens. Each family's mirror
(`accelerate_offload.models.flux`, `.sd3`, found through the registry) follows diffusers 0.42.1 op for op (same
modules, same order, same dtypes), calling modules rather than their weights so that PEFT LoRA layers work
unchanged. Attention processors, fused projections, context parallelism, feed-forward chunking or attention
kwargs that a mirror does not follow make the block run whole.

Exactness: each output row goes through the same ops as unchunked, so the forward pass is bitwise equal wherever
the kernels give a row the same bits whatever the number of rows around it (CPU GEMM and flash-attention kernels
block rows by count, so uneven chunks may differ in the last bit). Gradients of weights, keys and values are sums
over tokens that chunking splits into per-chunk partial sums: they differ by reassociation (about 1e-7 relative
in fp32; in bf16 the key/value gradients are summed across query chunks in bf16). One deliberate difference: SD3's
last block (`context_pre_only`) discards its text queries' attention output, so they are not computed here and a
LoRA on that block's `add_q_proj` gets no gradient (None) where the whole block gives it zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from .block_compiler import BlockCompiler
from .chunk_rows import as_is
from .registry import chunk_mirror

MAX_CHUNK_TOKENS = 4096


def auto_chunks(image_tokens: int, max_chunk_tokens: int = MAX_CHUNK_TOKENS) -> int:
    """The fewest chunks that keep each under `max_chunk_tokens` image tokens.

    Chunking leaves a floor it cannot lower: full-sequence keys and values, their gradients, the block's input,
    output and input gradient (together roughly the 0.9 GB the attention alone peaks at for a Flux-dev block at
    2048²). The token-wise working set is about (3.15 − 0.9) GB / 16 896 tokens ≈ 0.13 MB per token there, so a
    4096-token chunk's (≈ 0.55 GB) is already below the floor: smaller chunks buy little memory for more launches.
    1024² (4096 image tokens) runs whole, 2048² in 4 chunks.
    """
    return max(1, math.ceil(image_tokens / max_chunk_tokens))


def chunked_forward(
    block: nn.Module, chunks: int, compiler: BlockCompiler | None = None
) -> Callable[..., Any] | None:
    """A function with `block.forward`'s signature and result, run in `chunks` image-token chunks; with a
    `compiler` (`compile_blocks`), the unchunked forward and each chunk function are compiled.

    None for a block no mirror follows (run it whole). For `chunks == 1` it is the block class's own
    forward, which bypasses any wrapper installed on the instance (such as the offload hook's), so it can
    replace `OffloadBlockHook.block_forward` without recursing.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    if not chunkable(block):
        return None
    whole = type(block).forward.__get__(block)
    if compiler is not None:
        whole = compiler.block(whole)
    if chunks == 1:
        return whole
    return chunk_mirror(block).build(block, chunks, whole, as_is if compiler is None else compiler.rows)


def chunkable(block: nn.Module) -> bool:
    """Whether `block` is of a type and configuration that a family's mirror follows (others run whole)."""
    mirror = chunk_mirror(block)
    return mirror is not None and mirror.supported(block)


def chunked_block_forward(
    block: nn.Module, sequence_chunks: int | str, compiler: BlockCompiler | None = None
) -> Callable[..., Any] | None:
    """`chunked_forward` for a fixed count; for "auto", one that picks the count from each call's image tokens.

    None where chunking does not apply (one chunk, or a block type run whole).
    """
    if sequence_chunks != "auto":
        return chunked_forward(block, int(sequence_chunks), compiler) if int(sequence_chunks) > 1 else None
    if not chunkable(block):
        return None
    by_count: dict[int, Callable[..., Any]] = {}

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        chunks = auto_chunks(hidden_states.shape[1])
        if chunks not in by_count:
            by_count[chunks] = chunked_forward(block, chunks, compiler)
        return by_count[chunks](*args, **kwargs)

    return forward
