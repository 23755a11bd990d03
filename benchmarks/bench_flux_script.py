"""`train_flux_lora.py` itself at full size on a GPU: the Flux.1-dev architecture with random weights, trained
through `accelerate-offload launch` once per launch config, one after the other on the same machine.

Builds the pipeline with `build_full_size_pipeline.py` (unless `--pipeline_dir` holds one) and a folder of sample
images, runs the script for `--max_train_steps` steps per config, and reads each run's `metrics.jsonl`: median
seconds per step after the warm-up steps and the slowest of them, peak allocated GB (the script's own
`torch.cuda.max_memory_allocated`), first and last losses, and the wall time of the whole run (loading,
embeddings, latents, training, saving, the final image). One JSON to `--output_dir`; a table printed last.

    python benchmarks/bench_flux_script.py --resolution 1024 --configs offload_flux_lowvram.yaml resident
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from accelerate_offload.testing.tiny_pipelines import write_sample_images

ROOT = Path(__file__).resolve().parent.parent
RESIDENT = "resident"  # plain `accelerate launch`, every block on the GPU, checkpointing on (the reference)


def launch_command(config: str, args: argparse.Namespace, images: Path, output: Path) -> tuple[list[str], dict]:
    script = [
        str(ROOT / "train_flux_lora.py"), "--pretrained_model_name_or_path", str(args.pipeline_dir),
        "--instance_data_dir", str(images), "--instance_prompt", "a photo of sks shape",
        "--resolution", str(args.resolution), "--train_batch_size", "1", "--max_train_steps", str(args.max_train_steps),
        "--learning_rate", "1e-4", "--rank", "16", "--gradient_checkpointing", "--cache_latents",
        "--checkpointing_steps", str(args.max_train_steps + 1), "--num_validation_images", "1",
        "--seed", "0", "--output_dir", str(output), "--mixed_precision", "bf16",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if config == RESIDENT:
        env["ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION"] = "0"
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16",
                *script], env
    return [sys.executable, "-m", "accelerate_offload.cli", "launch", "--config_file", str(ROOT / "configs" / config),
            *script], env


def summarize(config: str, output: Path, seconds: float, warmup: int, returncode: int) -> dict:
    metrics_path = output / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    timed = [r["seconds_per_step"] for r in records[warmup:]]
    return {
        "config": config,
        "returncode": returncode,
        "steps": len(records),
        "seconds_per_step": statistics.median(timed) if timed else None,
        "slowest_timed_step_seconds": max(timed) if timed else None,
        # the script logs GiB; benchmarks speak GB (1e9 bytes)
        "peak_allocated_gb": max((r["peak_vram_gb"] * 2**30 / 1e9 for r in records if "peak_vram_gb" in r),
                                 default=None),
        "first_losses": [r["loss"] for r in records[:3]],
        "last_losses": [r["loss"] for r in records[-3:]],
        "wall_seconds": seconds,
        "lora_written": (output / "pytorch_lora_weights.safetensors").exists(),
        "final_image_written": (output / "final-0.png").exists(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline_dir", type=Path, default=Path("flux-dev-random"))
    parser.add_argument("--work_dir", type=Path, default=Path("flux-script-runs"))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--max_train_steps", type=int, default=20)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["offload_flux_lowvram.yaml", RESIDENT])
    parser.add_argument("--output_dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not (args.pipeline_dir / "model_index.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "build_full_size_pipeline.py"),
                        "--output_dir", str(args.pipeline_dir)], check=True)
    images = write_sample_images(args.work_dir / "images", sizes=[(args.resolution, args.resolution)] * 4)
    rows = []
    result_path = args.output_dir / f"flux_script_{args.resolution}.json"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for config in args.configs:
        output = args.work_dir / Path(config).stem
        command, env = launch_command(config, args, images, output)
        print("$", " ".join(command), flush=True)
        start = time.perf_counter()
        returncode = subprocess.run(command, env=env, cwd=ROOT).returncode
        rows.append(summarize(config, output, time.perf_counter() - start, args.warmup_steps, returncode))
        rows[-1]["settings_from_environment"] = {
            key: value for key, value in env.items() if key.startswith("ACCELERATE_OFFLOAD_")
        }
        rows[-1].update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__, resolution=args.resolution)
        result_path.write_text(json.dumps(rows, indent=2) + "\n")  # after each run: a later failure loses nothing
    print(f"\n{'config':28} {'peak GB':>8} {'s/step':>7} {'wall s':>7}  loss first → last")
    for row in rows:
        peak = f"{row['peak_allocated_gb']:.2f}" if row["peak_allocated_gb"] is not None else "—"
        step = f"{row['seconds_per_step']:.3f}" if row["seconds_per_step"] is not None else "—"
        losses = f"{row['first_losses'][:1]} → {row['last_losses'][-1:]}"
        print(f"{row['config']:28} {peak:>8} {step:>7} {row['wall_seconds']:7.0f}  {losses}")
    if any(row["returncode"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
