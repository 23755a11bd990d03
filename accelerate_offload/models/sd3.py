"""SD3 joint blocks in token chunks: diffusers 0.42's `JointTransformerBlock` forward, op for op, split into keys
and values of every token and per-chunk rows.

SD3's joint sequence is [image, text]; `attn2` (SD3.5 dual attention) attends over image rows only. Other
attention processors, feed-forward chunking or attention kwargs make the block run whole. Imported by the
registry only when an SD3 block is chunked.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch import nn

from ..chunk_rows import (
    ChunkFunction, ChunkMirror, Compile, RowJob, join_chunks, run_chunk, run_rows, scan_block, spans,
)


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


def _sd3_joint(
    block: JointTransformerBlock, chunks: int, whole: Callable[..., Any], wrap: Compile
) -> Callable[..., Any]:
    """SD3's joint sequence is [image, text]; `attn2` (SD3.5 dual attention) attends over image rows only."""
    image_key_value = wrap(_sd3_image_key_value(block), "image")
    text_key_value = wrap(_sd3_text_key_value(block), "text")
    image_rows, text_rows = wrap(_sd3_image_rows(block), "image"), wrap(_sd3_text_rows(block), "text")

    def forward(
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if joint_attention_kwargs or not _sd3_supported(block):
            return whole(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
        image = [hidden_states[:, a:b] for a, b in spans(hidden_states.shape[1], chunks)]
        scan = scan_block(block)
        run = partial(run_chunk, rng=scan.rng)
        image_kv = [run(image_key_value, rows, temb) for rows in image]
        text_kv = run(text_key_value, encoder_hidden_states, temb)
        key, value = join_chunks([kv[:2] for kv in image_kv] + [text_kv], sequence_dim=2)
        self_kv = join_chunks([kv[2:] for kv in image_kv], sequence_dim=2)  # attn2's, with dual attention
        tensors = [hidden_states, encoder_hidden_states, temb, key, value, *self_kv]
        extras = (2, 3, 4) + tuple(range(5, len(tensors)))
        jobs = [RowJob(image_rows, 0, start, end, extras) for start, end in spans(hidden_states.shape[1], chunks)]
        if block.context_pre_only:
            return None, run_rows(scan, jobs, (0,), tensors)[0]
        jobs.append(RowJob(text_rows, 1, 0, encoder_hidden_states.shape[1], (2, 3, 4)))
        image_output, context = run_rows(scan, jobs, (0, 1), tensors)
        return context, image_output

    return forward


MIRRORS = {"JointTransformerBlock": ChunkMirror(JointTransformerBlock, _sd3_supported, _sd3_joint)}
