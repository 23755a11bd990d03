"""Host time of a streamed Flux-dev training step with the GPU's work taken away: eager and compiled, whole blocks
and token chunks.

At 1024² a token-chunked Flux-dev step is bound by the host, not the GPU: the CPU queues each chunk's kernels more
slowly than the GPU runs them. This measures that host cost alone. The model has Flux-dev's 19 double and 38
single blocks, but a narrow width and a few tokens, so the arithmetic is negligible and a step's time is the
Python, dispatch and autograd work per block and chunk, which does not depend on width or token count. It runs on
the CPU through the same runtime (every block streamed, per-block checkpointing, the same hooks; plain copies
instead of CUDA streams). Per case: the median seconds per step after warm-up (the first step compiles) and the warm-up's
seconds. One JSON with every case goes to `--output_dir`; a table is printed last.

    python benchmarks/bench_host_overhead.py                       # four cases, a few minutes (compiles once)
    python benchmarks/bench_host_overhead.py --cases eager eager-chunks4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import diffusers
import torch

from accelerate_offload import offload_model, remove_offload
from bench_training_step import build_model, make_batch

STREAMED = {"layer_offload_fraction": 1.0, "activation_offloading": True}
CASES = {  # name -> (sequence_chunks, compiled)
    "eager": (None, False),
    "eager-chunks4": (4, False),
    "compiled": (None, True),
    "compiled-chunks4": (4, True),
}
# Flux-dev's depth and structure at a width whose arithmetic is negligible
NARROW_FLUX = {"num_attention_heads": 2, "attention_head_dim": 32, "joint_attention_dim": 64,
               "pooled_projection_dim": 32, "axes_dims_rope": [8, 12, 12]}


def processor() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict, target: torch.Tensor) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = model(**inputs, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(prediction.float(), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_case(name: str, model: torch.nn.Module, batch: tuple, args: argparse.Namespace) -> dict:
    chunks, compiled = CASES[name]
    torch._dynamo.reset()
    settings = {**STREAMED, "sequence_chunks": chunks} if chunks else dict(STREAMED)
    offload_model(model, "cpu", compile_blocks=compiled, **settings)
    inputs, target = batch
    lora = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in lora]
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    start = time.perf_counter()
    for _ in range(args.warmup):  # the first compiles
        step(model, optimizer, inputs, target)
    warmup_seconds = time.perf_counter() - start
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step(model, optimizer, inputs, target))
        times.append(time.perf_counter() - start)
    with torch.no_grad():
        for param, value in zip(lora, initial, strict=True):
            param.copy_(value)  # the next case starts from the same LoRA
    del optimizer
    remove_offload(model, "cpu")
    result = {"case": name, "sequence_chunks": chunks, "compile_blocks": compiled,
              "seconds_per_step": round(statistics.median(times), 4), "step_times": [round(t, 4) for t in times],
              "warmup_seconds": round(warmup_seconds, 1), "losses": losses}
    print(f"{name}: {result['seconds_per_step']:.3f} s/step", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--resolution", type=int, default=128, help="image side in pixels (128: 64 image tokens)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: host work, not arithmetic)")
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model("flux", torch.device("cpu"), NARROW_FLUX)
    blocks = (model.config.num_layers, model.config.num_single_layers)
    batch = make_batch("flux", model, args.resolution, torch.device("cpu"))
    results = [run_case(name, model, batch, args) for name in args.cases]
    record = {"device": "cpu", "processor": processor(), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "threads": args.threads, "double_and_single_blocks": blocks,
              "image_tokens": (args.resolution // 16) ** 2, "text_tokens": batch[0]["encoder_hidden_states"].shape[1],
              "results": results}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "host_overhead.json").write_text(json.dumps(record, indent=2) + "\n")
    eager = {r["sequence_chunks"]: r["seconds_per_step"] for r in results if not r["compile_blocks"]}
    print(f"\n{'case':18} {'s/step':>8} {'÷ eager':>8} {'warm-up s':>10}")
    for r in results:
        ratio = r["seconds_per_step"] / eager[r["sequence_chunks"]] if r["sequence_chunks"] in eager else None
        print(f"{r['case']:18} {r['seconds_per_step']:8.3f} {'-' if ratio is None else f'{ratio:.2f}':>8} "
              f"{r['warmup_seconds']:10.1f}")


if __name__ == "__main__":
    main()
