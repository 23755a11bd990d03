"""Token-chunked blocks on a GPU: one Flux-dev double block and one single block, memory and time per chunk count.

Each block is built at full size (hidden 3072, 24 heads × 128, MLP ratio 4) with random bf16 weights and a
rank-16 fp32 LoRA on its attention projections, and run as the runtime runs it: forward and backward under bf16
autocast inside one non-reentrant checkpoint, with inputs of the real shapes (image tokens of a 1024² or 2048²
Flux latent, 512 text tokens, Flux RoPE). For each chunk count it reports the peak memory allocated above the
block's weights and inputs, the median seconds of forward + backward, and how far the LoRA gradients are from
the whole block's (bf16 rounding is expected, not more). A table is printed last; JSON goes to `--output_dir`.

    python benchmarks/bench_block_chunks.py                      # H100: 2048² and 1024², chunks 1 2 4 8
    python benchmarks/bench_block_chunks.py --device cpu --tiny  # smoke test of the script's logic
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from peft import LoraConfig, inject_adapter_in_model
from torch.utils.checkpoint import checkpoint

from accelerate_offload.chunking import chunked_forward
from accelerate_offload.recompute import recomputation

TEXT_TOKENS = 512
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass(frozen=True)
class Shape:
    """Block width and RoPE axes: Flux-dev's, or a tiny one for the CPU smoke test."""

    hidden: int
    heads: int
    head_dim: int
    rope_axes: tuple[int, int, int]
    text_tokens: int


FLUX_DEV = Shape(hidden=3072, heads=24, head_dim=128, rope_axes=(16, 56, 56), text_tokens=TEXT_TOKENS)
TINY = Shape(hidden=64, heads=2, head_dim=32, rope_axes=(8, 12, 12), text_tokens=8)


@dataclass
class Result:
    block: str
    resolution: int
    image_tokens: int
    chunks: int
    peak_above_inputs_gb: float | None
    seconds: float
    lora_grad_rel_error: float  # against the whole block (chunks=1), both under bf16 autocast
    lora_grad_error_vs_fp32: float  # against the whole block in fp32: bf16's own error is the scale to judge by


def build_block(kind: str, shape: Shape, device: torch.device) -> torch.nn.Module:
    """Random bf16 weights made on `device`; LoRA in fp32 with non-zero B so every LoRA weight gets a gradient."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            block_class = FluxTransformerBlock if kind == "double" else FluxSingleTransformerBlock
            block = block_class(dim=shape.hidden, num_attention_heads=shape.heads, attention_head_dim=shape.head_dim)
    finally:
        torch.set_default_dtype(default_dtype)
    block.requires_grad_(False)
    block = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS), block)
    generator = torch.Generator(device).manual_seed(3)
    for name, param in block.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
            if "lora_B" in name:
                param.data = torch.randn(param.shape, device=device, generator=generator) * 0.01
    return block


def flux_rope(shape: Shape, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's RoPE over text ids (zeros) then image ids (row, column) of a `side` × `side` token grid."""
    image_ids = torch.zeros(side, side, 3, device=device)
    image_ids[..., 1] = torch.arange(side, device=device)[:, None]
    image_ids[..., 2] = torch.arange(side, device=device)[None, :]
    ids = torch.cat([torch.zeros(shape.text_tokens, 3, device=device), image_ids.reshape(-1, 3)])
    return FluxPosEmbed(theta=10000, axes_dim=list(shape.rope_axes))(ids)


def make_inputs(shape: Shape, side: int, device: torch.device) -> tuple[dict, list[torch.Tensor]]:
    """Block inputs (the token streams need gradients, as inside a LoRA model) and gradients for its outputs."""
    generator = torch.Generator(device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, generator=generator, dtype=torch.bfloat16)

    inputs = {
        "hidden_states": randn(1, side * side, shape.hidden).requires_grad_(),
        "encoder_hidden_states": randn(1, shape.text_tokens, shape.hidden).requires_grad_(),
        "temb": randn(1, shape.hidden),
        "image_rotary_emb": flux_rope(shape, side, device),
    }
    output_grads = [randn(1, shape.text_tokens, shape.hidden), randn(1, side * side, shape.hidden)]
    return inputs, output_grads


def forward_backward(
    block: torch.nn.Module,
    forward: Callable,
    inputs: dict,
    output_grads: list[torch.Tensor],
    device: torch.device,
    autocast: bool = True,
) -> None:
    """One checkpointed forward and backward from cleared gradients, as the offload runtime runs each block."""
    clear_grads(block, inputs)
    tensors = {k: v for k, v in inputs.items() if k != "image_rotary_emb"}
    runs = 0

    def run(**kwargs: torch.Tensor) -> Any:  # the second run is the recomputation for backward, as in the runtime
        nonlocal runs
        runs += 1
        with recomputation(runs > 1):
            return forward(**kwargs)

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        outputs = checkpoint(run, **tensors, image_rotary_emb=inputs["image_rotary_emb"], use_reentrant=False)
    torch.autograd.backward(outputs, output_grads)


def lora_grads(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in block.named_parameters() if p.requires_grad}


def clear_grads(block: torch.nn.Module, inputs: dict) -> None:
    block.zero_grad(set_to_none=True)
    for tensor in inputs.values():
        if isinstance(tensor, torch.Tensor):
            tensor.grad = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_above_inputs(run: Callable[[], None], device: torch.device) -> float | None:
    """GB allocated at the peak of `run` beyond what was allocated before it (weights, inputs, output grads)."""
    if device.type != "cuda":
        run()
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 1e9


def median_seconds(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """The worst LoRA weight's ‖actual − expected‖ / ‖expected‖."""
    return max(((actual[n].float() - e.float()).norm() / e.float().norm()).item() for n, e in expected.items())


def fp32_lora_grads(block: torch.nn.Module, inputs: dict, output_grads: list[torch.Tensor],
                    device: torch.device) -> dict[str, torch.Tensor]:
    """The whole block's LoRA gradients in fp32 throughout (casts the block: run it last)."""
    block.float()
    as_fp32 = {k: v.detach().float().requires_grad_(v.requires_grad) for k, v in inputs.items()
               if k != "image_rotary_emb"}
    as_fp32["image_rotary_emb"] = inputs["image_rotary_emb"]
    forward_backward(block, chunked_forward(block, 1), as_fp32, [g.float() for g in output_grads], device,
                     autocast=False)
    return lora_grads(block)


def bench_block(kind: str, shape: Shape, resolution: int, chunk_counts: list[int], device: torch.device,
                repeats: int) -> list[Result]:
    side = resolution // 16  # VAE downsamples 8×, Flux packs 2 × 2 latents into one token
    block = build_block(kind, shape, device)
    inputs, output_grads = make_inputs(shape, side, device)
    results, all_grads, reference = [], [], None
    for chunks in chunk_counts:
        run = partial(forward_backward, block, chunked_forward(block, chunks), inputs, output_grads, device)
        run()  # warm-up: kernels chosen, allocator pools grown
        clear_grads(block, inputs)
        peak = peak_above_inputs(run, device)
        grads = lora_grads(block)
        if reference is None:
            reference = grads
        seconds = median_seconds(run, device, repeats)
        results.append(Result(kind, resolution, side * side, chunks, peak, seconds, relative_error(grads, reference),
                              lora_grad_error_vs_fp32=float("nan")))
        all_grads.append(grads)
        print(f"{kind:6} {resolution:5}² chunks {chunks}: done", flush=True)
    exact = fp32_lora_grads(block, inputs, output_grads, device)
    for result, grads in zip(results, all_grads, strict=True):
        result.lora_grad_error_vs_fp32 = relative_error(grads, exact)
    return results


def print_table(results: list[Result]) -> None:
    print("\n| block | resolution | image tokens | chunks | peak above inputs GB | seconds "
          "| LoRA grad error vs chunks=1 | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        peak = "n/a" if r.peak_above_inputs_gb is None else f"{r.peak_above_inputs_gb:.2f}"
        print(f"| {r.block} | {r.resolution}² | {r.image_tokens} | {r.chunks} | {peak} | {r.seconds:.4f} "
              f"| {r.lora_grad_rel_error:.1e} | {r.lora_grad_error_vs_fp32:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[2048, 1024])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small block and 64²/128² images: checks the script")
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward is unreliable on H100; the runtime turns it off
    shape, resolutions = (TINY, [128, 64]) if args.tiny else (FLUX_DEV, args.resolutions)
    chunk_counts = sorted(set(args.chunks) | {1})  # chunks=1 (the whole block) is the reference
    results = [
        result
        for resolution in resolutions
        for kind in ("double", "single")
        for result in bench_block(kind, shape, resolution, chunk_counts, device, args.repeats)
    ]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    name = "block_chunks_tiny.json" if args.tiny else "block_chunks.json"
    record = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "results": [asdict(r) for r in results],
    }
    (args.output_dir / name).write_text(json.dumps(record, indent=2) + "\n")
    print_table(results)


if __name__ == "__main__":
    main()
