"""Training-step benchmark on a GPU: a full-size transformer with random bf16 weights, all-resident vs offloaded.

Builds the architecture from `configs/models/`, adds a rank-16 LoRA on the attention projections and times
forward + backward + AdamW step (gradient checkpointing on) on random latents and text embeddings of the real
shapes. Every setting runs in this one process against the all-resident run, on the same batch: peak memory,
seconds per step, the ratio to resident, and whether the loss falls (a runtime that does not train is a
failure, not a fast result). One JSON per run goes to `--output_dir`; a table is printed last.

    python benchmarks/bench_training_step.py --model flux --resolutions 1024 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import diffusers
import torch
from peft import LoraConfig

from accelerate_offload import get_conductor, offload_model, plot_timeline, remove_offload, trace_step
from accelerate_offload.planner import parse_memory
from peak_breakdown import peak_breakdown, print_breakdown

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
MODELS = {
    "flux": ("FluxTransformer2DModel", "flux-dev-transformer.json"),
    "sd3": ("SD3Transformer2DModel", "sd3-medium-transformer.json"),
}
SETTINGS = {
    "resident": {"layer_offload_fraction": 0.0},
    "fraction0.5": {"layer_offload_fraction": 0.5, "activation_offloading": True},
    "fraction0.9": {"layer_offload_fraction": 0.9, "activation_offloading": True},
    "fraction1.0": {"layer_offload_fraction": 1.0, "activation_offloading": True},
    # the runtime without its forward rate limit (A/B): the CPU queues blocks as fast as it can
    "fraction1.0-unthrottled": {"layer_offload_fraction": 1.0, "activation_offloading": True,
                                "blocks_in_flight": None},
    "fraction1.0-prefetch2": {"layer_offload_fraction": 1.0, "activation_offloading": True, "prefetch_blocks": 2},
    "fraction1.0-no-activations": {"layer_offload_fraction": 1.0},
    "fraction1.0-chunks2": {"layer_offload_fraction": 1.0, "activation_offloading": True, "sequence_chunks": 2},
    "fraction1.0-chunks4": {"layer_offload_fraction": 1.0, "activation_offloading": True, "sequence_chunks": 4},
    "fraction1.0-chunks8": {"layer_offload_fraction": 1.0, "activation_offloading": True, "sequence_chunks": 8},
    "max_vram4GB": {"max_vram": "4GB", "activation_offloading": True},
    "max_vram8GB": {"max_vram": "8GB", "activation_offloading": True},
    "max_vram16GB": {"max_vram": "16GB", "activation_offloading": True},
}


@dataclass
class Result:
    model: str
    setting: str
    resolution: int
    device: str
    torch: str
    diffusers: str
    seconds_per_step: float
    peak_allocated_gb: float
    peak_reserved_gb: float
    first_step_peak_allocated_gb: float  # the step that warms up (and, for max_vram, measures and plans)
    allocated_between_steps_gb: float  # non-block layers, LoRA, its Adam state and the batch: the step's floor
    ratio_to_resident: float | None
    losses: list[float]
    loss_falls: bool
    streamed_gb_per_step: float
    resident_blocks: int
    within_budget: bool | None
    settings: dict = field(default_factory=dict)


def build_model(name: str, device: torch.device, config_overrides: dict | None = None) -> torch.nn.Module:
    """Random bf16 weights created directly on `device` (initialising 12B parameters on a CPU takes minutes)."""
    class_name, config_file = MODELS[name]
    config = {k: v for k, v in json.loads((CONFIGS / config_file).read_text()).items() if not k.startswith("_")}
    config.update(config_overrides or {})
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = getattr(diffusers, class_name)(**config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # LoRA in fp32, base in bf16, as the training scripts do
    return model


def make_batch(name: str, model: torch.nn.Module, resolution: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(0)
    config = model.config
    side = resolution // 8
    if name == "flux":
        tokens = (side // 2) ** 2
        image_ids = torch.zeros(side // 2, side // 2, 3, device=device)
        image_ids[..., 1] = torch.arange(side // 2, device=device)[:, None]
        image_ids[..., 2] = torch.arange(side // 2, device=device)[None, :]
        inputs = {
            "hidden_states": torch.randn(1, tokens, config.in_channels, device=device, generator=generator),
            "encoder_hidden_states": torch.randn(1, 512, config.joint_attention_dim, device=device, generator=generator),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, device=device, generator=generator),
            "timestep": torch.tensor([0.7], device=device),
            "guidance": torch.tensor([3.5], device=device),
            "img_ids": image_ids.reshape(-1, 3),
            "txt_ids": torch.zeros(512, 3, device=device),
        }
        target = torch.randn(1, tokens, config.in_channels, device=device, generator=generator)
    else:
        inputs = {
            "hidden_states": torch.randn(1, config.in_channels, side, side, device=device, generator=generator),
            "encoder_hidden_states": torch.randn(1, 333, config.joint_attention_dim, device=device, generator=generator),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, device=device, generator=generator),
            "timestep": torch.tensor([700.0], device=device),
        }
        target = torch.randn(1, config.out_channels, side, side, device=device, generator=generator)
    return inputs, target


def forward_backward(model: torch.nn.Module, inputs: dict, target: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        prediction = model(**inputs, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(prediction.float(), target)
    loss.backward()
    return loss


def training_step(model: torch.nn.Module, optimizer, inputs: dict, target: torch.Tensor) -> torch.Tensor:
    loss = forward_backward(model, inputs, target)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(model: torch.nn.Module, inputs: dict, target: torch.Tensor, warmup: int, steps: int) -> tuple:
    """Median step time and the steady-state peak (after warm-up, which includes max_vram's planning step)."""
    lora = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().to("cpu", copy=True) for p in lora]  # on the host: not part of the step's memory
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    conductor = get_conductor(model)
    losses, times = [], []
    streamed_bytes = 0
    between_steps = first_peak = 0
    torch.cuda.reset_peak_memory_stats()
    for index in range(warmup + steps):
        if index == 1:
            first_peak = torch.cuda.max_memory_allocated()
        if index == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            between_steps = torch.cuda.memory_allocated()
        loaded_before = conductor.bytes_loaded if conductor is not None else 0
        start = time.perf_counter()
        losses.append(training_step(model, optimizer, inputs, target).item())  # .item() synchronises
        times.append(time.perf_counter() - start)
        if conductor is not None:
            streamed_bytes = conductor.bytes_loaded - loaded_before
    with torch.no_grad():
        for param, value in zip(lora, initial):
            param.copy_(value)  # the next setting starts from the same LoRA
    peak = (torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9, between_steps / 1e9,
            first_peak / 1e9)
    return statistics.median(times[warmup:]), peak, losses, streamed_bytes / 1e9, optimizer


def write_timeline(model, optimizer, inputs: dict, target: torch.Tensor, path: Path, title: str) -> None:
    timeline = trace_step(model, lambda: training_step(model, optimizer, inputs, target).item())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(timeline) + "\n")
    plot_timeline(timeline, path, title)
    print(f"timeline: {path} (peak {timeline['peak_allocated_gb']:.2f} GB)", flush=True)


def write_peak_breakdown(model, optimizer, inputs: dict, target: torch.Tensor, path: Path, title: str) -> None:
    """One more forward + backward under the allocator's recorder: what is live at its peak, by origin."""
    lora = [p for p in model.parameters() if p.requires_grad]
    frozen = [t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad]
    state = [t for per_param in optimizer.state.values() for t in per_param.values() if isinstance(t, torch.Tensor)]
    batch = [t for t in [*inputs.values(), target] if isinstance(t, torch.Tensor)]
    breakdown = peak_breakdown(
        lambda: forward_backward(model, inputs, target),
        {"non-block and resident weights": frozen, "LoRA parameters": lora, "Adam state": state, "the batch": batch},
        lambda: [p.grad for p in lora],
        {piece.nbytes for weights in get_conductor(model).weights.values() for piece in weights.pieces},
        torch.device("cuda", torch.cuda.current_device()),
    )
    optimizer.zero_grad(set_to_none=True)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"peak_breakdown_{title.replace(' ', '_').replace('²', '')}.json").write_text(
        json.dumps({"title": title, **breakdown}, indent=2) + "\n"
    )
    print_breakdown(breakdown, title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="flux")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024])
    parser.add_argument("--settings", nargs="+", default=["resident", "fraction0.9", "fraction1.0"],
                        choices=sorted(SETTINGS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--timeline", type=Path, default=None,
                        help="write a VRAM timeline (PNG + JSON) of one step of each streamed setting, named from "
                             "this path")
    parser.add_argument("--peak_breakdown", action="store_true",
                        help="after timing each streamed setting, record one more step and write what is live at "
                             "its peak, by origin, to --output_dir")
    parser.add_argument("--expandable_segments", action="store_true",
                        help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: reserved memory closer to allocated "
                             "where blocks of different sizes and token chunks fragment the caching allocator")
    args = parser.parse_args()
    if args.expandable_segments:  # read when the allocator first runs: nothing has touched the GPU yet
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    device = torch.device("cuda", 0)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, device)
    batches = {r: make_batch(args.model, model, r, device) for r in args.resolutions}
    results: list[Result] = []
    resident_time: dict[int, float] = {}
    for setting in args.settings:
        options = SETTINGS[setting]
        if setting != "resident" and next(model.parameters()).device.type == "cuda":
            model.to("cpu")
            torch.cuda.empty_cache()
        setup_start = time.perf_counter()
        offload_options = {k: v for k, v in options.items() if k != "blocks_in_flight"}
        offload_model(model, device, **offload_options)
        if "blocks_in_flight" in options:
            get_conductor(model).activations.blocks_in_flight = options["blocks_in_flight"]
        setup_seconds = time.perf_counter() - setup_start
        for resolution in args.resolutions:
            inputs, target = batches[resolution]
            seconds, (allocated, reserved, between_steps, first_peak), losses, streamed, optimizer = measure(
                model, inputs, target, args.warmup, args.steps
            )
            conductor = get_conductor(model)
            if args.timeline is not None and setting != "resident":
                path = args.timeline.with_name(f"{args.timeline.stem}_{args.model}_{resolution}_{setting}.png")
                write_timeline(model, optimizer, inputs, target, path, f"{args.model} {resolution}² {setting}")
            if args.peak_breakdown and setting != "resident":
                write_peak_breakdown(model, optimizer, inputs, target, args.output_dir,
                                     f"{args.model} {resolution}² {setting}")
            if setting == "resident":
                resident_time[resolution] = seconds
            base = resident_time.get(resolution)
            result = Result(
                model=args.model, setting=setting, resolution=resolution, device=torch.cuda.get_device_name(),
                torch=torch.__version__, diffusers=diffusers.__version__, seconds_per_step=round(seconds, 4),
                peak_allocated_gb=round(allocated, 3), peak_reserved_gb=round(reserved, 3),
                allocated_between_steps_gb=round(between_steps, 3), first_step_peak_allocated_gb=round(first_peak, 3),
                ratio_to_resident=round(seconds / base, 3) if base else None, losses=[round(l, 5) for l in losses],
                loss_falls=losses[-1] < losses[0], streamed_gb_per_step=round(streamed, 2),
                resident_blocks=conductor.resident_count,
                within_budget=allocated * 1e9 <= parse_memory(options["max_vram"]) if "max_vram" in options else None,
                settings={**options, "setup_seconds": round(setup_seconds, 1),
                          "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")},
            )
            results.append(result)
            print(json.dumps(asdict(result)), flush=True)
            name = f"{args.model}_{resolution}_{setting}{'-expandable' if args.expandable_segments else ''}.json"
            (args.output_dir / name).write_text(json.dumps(asdict(result), indent=2) + "\n")
            del optimizer  # its Adam state would otherwise sit on the GPU through the next setting's steps
            gc.collect()
        remove_offload(model, device if setting == "resident" else "cpu")
        torch.cuda.empty_cache()  # the next setting's reserved peak counts its own memory only
    print(f"\n{'model':5} {'res':>5} {'setting':28} {'s/step':>7} {'ratio':>6} {'alloc GB':>9} {'resv GB':>8} "
          f"{'H2D GB':>7} {'resident':>8} loss falls  in budget")
    for r in results:
        ratio = f"{r.ratio_to_resident:.2f}" if r.ratio_to_resident else "-"
        budget = "-" if r.within_budget is None else str(r.within_budget)
        print(f"{r.model:5} {r.resolution:5} {r.setting:28} {r.seconds_per_step:7.3f} {ratio:>6} "
              f"{r.peak_allocated_gb:9.2f} {r.peak_reserved_gb:8.2f} {r.streamed_gb_per_step:7.1f} "
              f"{r.resident_blocks:8d} {str(r.loss_falls):10} {budget}")


if __name__ == "__main__":
    main()
