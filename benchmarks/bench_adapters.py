"""Adapter benchmark on a GPU: one full-size Flux.1-dev training step under `configs/offload_flux_lowvram.yaml`
with a plain LoRA, a LoKr and a LoRA with the CPU EMA, in one process on one batch.

Each adapter goes on the script's default layers (attention and feed-forward, rank 16) of the same random bf16
base, which is streamed with the lowvram config's settings; forward + backward + AdamW (+ the EMA update) are timed
after a warm-up step. Peak allocated / reserved memory, seconds per step and whether the loss falls go to one JSON
in `--output_dir`; a table is printed last.

    python benchmarks/bench_adapters.py --resolution 1024
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from bench_training_step import build_model, make_batch, training_step

from accelerate_offload import offload_model, remove_offload
from accelerate_offload.adapters import adapter_config
from accelerate_offload.ema import AdapterEMA

REPO = Path(__file__).resolve().parent.parent
TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]  # fmt: skip  # train_flux_lora.py's default --lora_layers
VARIANTS = {"lora": ("lora", False), "lokr": ("lokr", False), "lora+ema": ("lora", True)}


def lowvram_settings() -> dict:
    config = yaml.safe_load((REPO / "configs" / "offload_flux_lowvram.yaml").read_text())
    return dict(config["offload_config"])


def run_variant(model, adapter: str, use_ema: bool, inputs, target, device, steps: int) -> dict:
    """Adds the adapter, streams the base with the lowvram settings, times `steps` steps after one warm-up."""
    model.add_adapter(adapter_config(adapter, 16, 16, TARGETS), adapter_name="bench")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(device, torch.float32)  # the adapter in fp32, as the scripts train it
    offload_model(model, device, **lowvram_settings())
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ema = AdapterEMA(model, 0.999) if use_ema else None
    losses, times = [], []
    for index in range(1 + steps):
        if index == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = training_step(model, optimizer, inputs, target)
        if ema is not None:
            ema.step(model)
        losses.append(loss.item())  # synchronises
        times.append(time.perf_counter() - start)
    result = {
        "seconds_per_step": statistics.median(times[1:]),
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
        "trainable_gb": sum(p.numel() * p.element_size() for p in trainable) / 1e9,
        "ema_on_cpu": ema is None or all(value.device.type == "cpu" for value in ema.state_dict()["shadow"].values()),
        "losses": losses,
        "loss_falls": losses[-1] < losses[0],
    }
    del optimizer, ema, trainable
    remove_offload(model, device)
    model.delete_adapters("bench")
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per adapter, after one warm-up step.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output_dir", default=str(REPO / "benchmarks" / "results" / "adapters"))
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build_model("flux", device)
    model.delete_adapters(list(model.peft_config))  # the benchmark's own LoRA goes; each variant adds its own
    inputs, target = make_batch("flux", model, args.resolution, device)
    results = {}
    for name in args.variants:
        adapter, use_ema = VARIANTS[name]
        results[name] = run_variant(model, adapter, use_ema, inputs, target, device, args.steps)
    record = {
        "model": "flux-dev",
        "resolution": args.resolution,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "offload_settings": lowvram_settings(),
        "results": results,
    }
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"flux_{args.resolution}_adapters.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'adapter':10} {'alloc GB':>9} {'reserved GB':>12} {'s/step':>7} {'loss falls':>10}")
    for name, result in results.items():
        print(
            f"{name:10} {result['peak_allocated_gb']:9.2f} {result['peak_reserved_gb']:12.2f} "
            f"{result['seconds_per_step']:7.2f} {str(result['loss_falls']):>10}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
