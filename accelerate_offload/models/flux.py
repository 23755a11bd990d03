"""Flux double and single blocks in token chunks: diffusers 0.42's `FluxTransformerBlock` and
`FluxSingleTransformerBlock` forwards, op for op, split into keys and values of every token and per-chunk rows.

Flux's joint sequence is [text, image]; the text stream (512 tokens for Flux) is one chunk, and `chunks` splits
the image tokens. Other attention processors, fused projections, context parallelism or attention kwargs make the
block run whole. Imported by the registry only when a Flux block is chunked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from ..chunk_rows import (
    ChunkFunction, ChunkMirror, Compile, RowJob, join_chunks, run_chunk, run_rows, scan_block, spans,
)


@dataclass(frozen=True)
class _Chunk:
    """One run of rows in attention order: which stream they belong to, the rows, and their RoPE rows."""

    stream: str
    rows: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None


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
    for start, end in spans(hidden_states.shape[1], chunks):
        parts.append(_Chunk("image", hidden_states[:, start:end], *rope_rows(text + start, text + end)))
    return parts


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
        scan = scan_block(block)
        run = partial(run_chunk, rng=scan.rng)
        keys_values = [run(key_value[p.stream], p.rows, temb, p.cos, p.sin) for p in parts]
        key, value = join_chunks(keys_values, sequence_dim=1)
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        tensors = [hidden_states, encoder_hidden_states, temb, key, value, cos, sin]
        text = encoder_hidden_states.shape[1]
        jobs = [RowJob(rows["text"], 1, 0, text, (2, 3, 4, (5, 0), (6, 0)))] + [
            RowJob(rows["image"], 0, start, end, (2, 3, 4, (5, text), (6, text)))
            for start, end in spans(hidden_states.shape[1], chunks)
        ]
        return run_rows(scan, jobs, (1, 0), tensors)

    return forward


def _flux_double(
    block: FluxTransformerBlock, chunks: int, whole: Callable[..., Any], wrap: Compile
) -> Callable[..., Any]:
    streams = _flux_double_streams(block)
    key_value = {name: wrap(_flux_double_key_value(block.attn, stream), name) for name, stream in streams.items()}
    rows = {name: wrap(_flux_double_rows(block.attn, stream), name) for name, stream in streams.items()}
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


def _flux_single(
    block: FluxSingleTransformerBlock, chunks: int, whole: Callable[..., Any], wrap: Compile
) -> Callable[..., Any]:
    """Text and image rows of a single block go through the same modules."""
    key_value, rows = _flux_single_key_value(block), _flux_single_rows(block)
    streams = ("text", "image")
    return _flux_chunked(
        block, chunks, whole, {s: wrap(key_value, s) for s in streams}, {s: wrap(rows, s) for s in streams}
    )


MIRRORS = {
    "FluxTransformerBlock": ChunkMirror(FluxTransformerBlock, _flux_supported, _flux_double),
    "FluxSingleTransformerBlock": ChunkMirror(FluxSingleTransformerBlock, _flux_supported, _flux_single),
}
