"""Compiled blocks on a GPU: eager and `compile_blocks` training steps of full-size Flux.1-dev and SD3-medium, in one
process, on the same batch as the training-step benchmark (`bench_training_step.py`'s model, LoRA and batch).

Each case records seconds per step after warm-up, peak allocated/reserved memory, the first step's time and the part
of it spent compiling, graphs compiled in the first step and after it (recompiles: 0 expected), graph breaks, and
the losses against the eager all-resident case of the same model and resolution. Each step also records what
could explain a slow one: the caching allocator's retries (a cudaFree of cached blocks, then a new cudaMalloc)
and the time Python's garbage collector paused the step. Dynamo's caches are reset before
each case, as in a new training run; inductor's on-disk cache is not, so a case whose graphs an earlier case
compiled compiles faster. One JSON per case goes to `--output_dir`, a summary beside them; a table is printed last.

    python benchmarks/bench_compiled_blocks.py                      # the default cases, about 9 minutes on an H200
    python benchmarks/bench_compiled_blocks.py --cases flux-1024-eager-resident flux-1024-streamed-chunks4-compiled
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import diffusers
import torch
from torch._dynamo.utils import counters

from accelerate_offload import get_conductor, offload_model, remove_offload
from bench_training_step import build_model, make_batch, training_step

STREAMED = {"layer_offload_fraction": 1.0, "activation_offloading": True}
# name -> (model, resolution, offload settings, compiled)
CASES = {
    "flux-2048-eager-resident": ("flux", 2048, {"layer_offload_fraction": 0.0}, False),
    "flux-2048-compiled-resident": ("flux", 2048, {"layer_offload_fraction": 0.0}, True),
    "flux-2048-streamed-compiled": ("flux", 2048, STREAMED, True),
    "flux-2048-streamed-chunks4-compiled": ("flux", 2048, {**STREAMED, "sequence_chunks": 4}, True),
    "flux-1024-eager-resident": ("flux", 1024, {"layer_offload_fraction": 0.0}, False),
    "flux-1024-streamed-chunks4-compiled": ("flux", 1024, {**STREAMED, "sequence_chunks": 4}, True),
    "sd3-1024-eager-resident": ("sd3", 1024, {"layer_offload_fraction": 0.0}, False),
    "sd3-1024-streamed-compiled": ("sd3", 1024, STREAMED, True),
    # not run by default: the eager counterparts, for a same-process comparison when time allows
    "flux-2048-streamed-eager": ("flux", 2048, STREAMED, False),
    "flux-2048-streamed-chunks4-eager": ("flux", 2048, {**STREAMED, "sequence_chunks": 4}, False),
    "flux-1024-compiled-resident": ("flux", 1024, {"layer_offload_fraction": 0.0}, True),
    "flux-1024-streamed-compiled": ("flux", 1024, STREAMED, True),
    "flux-1024-streamed-chunks4-eager": ("flux", 1024, {**STREAMED, "sequence_chunks": 4}, False),
    "sd3-1024-compiled-resident": ("sd3", 1024, {"layer_offload_fraction": 0.0}, True),
    "sd3-1024-streamed-eager": ("sd3", 1024, STREAMED, False),
}
DEFAULT_CASES = list(CASES)[:8]


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


class CollectorPauses:
    """Seconds Python's cyclic garbage collector has run since this was made (via `gc.callbacks`)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def alloc_retries() -> int:
    return torch.cuda.memory_stats().get("num_alloc_retries", 0)


def run_case(name: str, model: torch.nn.Module, batch: tuple, args: argparse.Namespace, device: torch.device) -> dict:
    model_name, resolution, settings, compiled = CASES[name]
    resident = settings["layer_offload_fraction"] == 0.0
    if not resident and next(model.parameters()).device.type == "cuda":
        model.to("cpu")
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    offload_model(model, device, compile_blocks=args.mode if compiled else False, **settings)
    conductor = get_conductor(model)
    inputs, target = batch
    lora = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().to("cpu", copy=True) for p in lora]
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    breaks_before = graph_breaks()
    pauses = CollectorPauses()
    steps = []
    torch.cuda.reset_peak_memory_stats()
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        frames = counters["frames"]["ok"]
        compile_seconds = conductor.compiler.compile_seconds if conductor.compiler is not None else 0.0
        retries, paused = alloc_retries(), pauses.seconds
        start = time.perf_counter()
        loss = training_step(model, optimizer, inputs, target).item()  # .item() synchronises
        seconds = time.perf_counter() - start
        steps.append({
            "seconds": round(seconds, 4),
            "loss": loss,
            "frames_compiled": counters["frames"]["ok"] - frames,
            "compile_seconds": round(
                (conductor.compiler.compile_seconds if conductor.compiler is not None else 0.0) - compile_seconds, 2
            ),
            "alloc_retries": alloc_retries() - retries,
            "gc_seconds": round(pauses.seconds - paused, 4),
        })
        print(f"{name} step {index}: {seconds:.3f} s, loss {loss:.5f}, {steps[-1]['frames_compiled']} frames compiled, "
              f"{steps[-1]['alloc_retries']} allocator retries, gc {steps[-1]['gc_seconds']:.3f} s", flush=True)
    pauses.close()
    with torch.no_grad():
        for param, value in zip(lora, initial):
            param.copy_(value)  # the next case starts from the same LoRA
    timed = steps[args.warmup :]
    result = {
        "case": name,
        "model": model_name,
        "resolution": resolution,
        "settings": settings,
        "compile_blocks": args.mode if compiled else False,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "seconds_per_step": round(statistics.median(s["seconds"] for s in timed), 4),
        "timed_seconds_min_max": [min(s["seconds"] for s in timed), max(s["seconds"] for s in timed)],
        "first_step_seconds": steps[0]["seconds"],
        "first_step_compile_seconds": steps[0]["compile_seconds"],
        "graphs_compiled_first_step": steps[0]["frames_compiled"],
        "recompiles_after_first_step": sum(s["frames_compiled"] for s in steps[1:]),
        "graph_breaks": graph_breaks() - breaks_before,
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3),
        "losses": [round(s["loss"], 6) for s in steps],
        "loss_falls": steps[-1]["loss"] < steps[0]["loss"],
        "steps": steps,
    }
    del optimizer
    gc.collect()
    remove_offload(model, device if resident else "cpu")
    torch.cuda.empty_cache()
    return result


def compare(results: list[dict]) -> None:
    """Ratios and loss differences against the eager and compiled all-resident cases of the same model and size."""
    for result in results:
        for kind in ("eager", "compiled"):
            name = f"{result['model']}-{result['resolution']}-{kind}-resident"
            base = next((r for r in results if r["case"] == name), None)
            if base is None:
                continue
            result[f"ratio_to_{kind}_resident"] = round(result["seconds_per_step"] / base["seconds_per_step"], 3)
            if kind == "eager":
                result["max_loss_diff_vs_eager_resident"] = max(
                    abs(a - b) for a, b in zip(result["losses"], base["losses"])
                )
                result["first_loss_relative_diff_vs_eager_resident"] = abs(
                    result["losses"][0] - base["losses"][0]
                ) / abs(base["losses"][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES),
                        help="cases to run, in this order within each model (default: the eight of the issue)")
    parser.add_argument("--mode", default="default", help="compile_blocks mode of the compiled cases")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing; the first compiles")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output_dir", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "compiled_blocks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    device = torch.device("cuda", 0)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for model_name in dict.fromkeys(CASES[name][0] for name in args.cases):
        model = build_model(model_name, device)
        batches = {}
        for name in [n for n in args.cases if CASES[n][0] == model_name]:
            resolution = CASES[name][1]
            if resolution not in batches:
                batches[resolution] = make_batch(model_name, model, resolution, device)
            results.append(run_case(name, model, batches[resolution], args, device))
            compare(results)
            (args.output_dir / f"{name}.json").write_text(json.dumps(results[-1], indent=2) + "\n")
        del model, batches
        gc.collect()
        torch.cuda.empty_cache()
    compare(results)
    for result in results:
        (args.output_dir / f"{result['case']}.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = [{k: v for k, v in result.items() if k != "steps"} for result in results]
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(results)


def print_table(results: list[dict]) -> None:
    print(f"\n{'case':38} {'s/step':>7} {'eager×':>6} {'comp×':>6} {'alloc GB':>8} {'resv GB':>8} {'1st s':>7} "
          f"{'compile s':>9} {'graphs':>6} {'recomp':>6} {'breaks':>6} {'loss diff':>9}")
    for r in results:
        eager = f"{r['ratio_to_eager_resident']:.3f}" if "ratio_to_eager_resident" in r else "-"
        compiled = f"{r['ratio_to_compiled_resident']:.3f}" if "ratio_to_compiled_resident" in r else "-"
        diff = f"{r['max_loss_diff_vs_eager_resident']:.2e}" if "max_loss_diff_vs_eager_resident" in r else "-"
        print(f"{r['case']:38} {r['seconds_per_step']:7.3f} {eager:>6} {compiled:>6} {r['peak_allocated_gb']:8.2f} "
              f"{r['peak_reserved_gb']:8.2f} {r['first_step_seconds']:7.1f} {r['first_step_compile_seconds']:9.1f} "
              f"{r['graphs_compiled_first_step']:6d} {r['recompiles_after_first_step']:6d} {r['graph_breaks']:6d} "
              f"{diff:>9}", flush=True)


if __name__ == "__main__":
    main()
