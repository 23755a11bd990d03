"""Data-parallel throughput on the GPUs of one machine: images per second for N processes against one, host memory.

For each setting (every block streamed; `max_vram`) and each N of `--processes` (those the machine has GPUs for),
launches N processes with torchrun, one GPU each, DDP over NCCL, the streamed weights in one host copy shared by
the N processes (`share_host_weights`). Each process trains the full-size Flux transformer (random bf16 weights,
LoRA r16 on the attention projections, batch `--batch_size`) at each resolution. Per row: seconds per step (the
slowest rank's, median), images per second, data-parallel efficiency against N = 1 of the same run, the
host->device rate each rank reaches while all copy at once and the copy floor it sets (streamed GB per step ÷
that rate: a step near its floor is copy-bound), and host memory (RssAnon and RssShmem summed over ranks; the
one shared copy; the growth of the machine's shared memory). JSON to `--output_dir`, a table printed last.

    python benchmarks/bench_multi_gpu.py --resolutions 1024 2048 --max_vram 16GB
    python benchmarks/bench_multi_gpu.py --dry_run   # a tiny model on CPU processes (gloo): checks the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

RESULTS = Path(__file__).resolve().parent / "results" / "multi_gpu"
GB = 1e9


def shmem_of_machine() -> int:
    """Bytes of shared memory on the machine (/proc/meminfo's Shmem)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    return 0


def build(dry_run: bool, device: torch.device) -> torch.nn.Module:
    """The same random weights in every process (seeded), on the CPU, frozen, with the LoRA in fp32."""
    torch.manual_seed(0)
    if dry_run:
        from peft import LoraConfig

        from accelerate_offload.testing.tiny_pipelines import build_flux_transformer

        model = build_flux_transformer().requires_grad_(False)
        model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        return model
    from bench_training_step import build_model

    return build_model("flux", device).to("cpu")


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict, target: torch.Tensor) -> float:
    device_type = target.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        prediction = model(**inputs, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(prediction.float(), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # synchronises


def copy_rate(conductor, device: torch.device, repeats: int = 5) -> float | None:
    """GB/s of one streamed piece's host->device copy in this process while every process copies at once."""
    if not conductor.weights:
        return None
    weights = conductor.weights[min(conductor.weights)]
    host = weights.host_piece(0)
    destination = torch.empty_like(host, device=device)
    rates = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        destination.copy_(host, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(host.numel() / (time.perf_counter() - start) / GB)
    return statistics.median(rates)


def gathered(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def worker(args: argparse.Namespace) -> None:
    """One process of N: trains at each resolution and hands its figures to rank 0, which writes them."""
    from torch.nn.parallel import DistributedDataParallel

    from accelerate_offload import get_conductor, offload_model
    from accelerate_offload.memory import host_memory
    from bench_training_step import make_batch

    cuda = not args.dry_run
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    shmem_before = shmem_of_machine()
    model = build(args.dry_run, device)
    options = {"max_vram": args.setting.removeprefix("max_vram")} if args.setting.startswith("max_vram") else {
        "layer_offload_fraction": 1.0}
    offload_model(model, device, activation_offloading=cuda, share_host_weights=args.share_host_weights, **options)
    conductor = get_conductor(model)
    shared_copy = sum(w.nbytes for w in conductor.weights.values()) if conductor.shared_host else 0
    shmem_growth = shmem_of_machine() - shmem_before
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = []
    for resolution in args.resolutions:
        inputs, target = make_batch("flux", model, resolution, device)
        # tensors of one sample (a leading 1) repeated to the batch; the position ids have no batch dimension
        inputs = {k: v.repeat_interleave(args.batch_size, 0) if v.shape[0] == 1 else v for k, v in inputs.items()}
        target = target.repeat_interleave(args.batch_size, 0)
        losses, times, streamed = [], [], 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for index in range(args.warmup + args.steps):
            loaded = conductor.bytes_loaded
            start = time.perf_counter()
            losses.append(step(ddp, optimizer, inputs, target))
            times.append(time.perf_counter() - start)
            streamed = conductor.bytes_loaded - loaded
        rate = copy_rate(conductor, device)
        figures = {
            "times": times[args.warmup:], "losses": losses, "streamed": streamed, "rate": rate,
            "memory": host_memory(), "peak": torch.cuda.max_memory_allocated(device) if cuda else 0,
            "resident": conductor.resident_count, "shared": conductor.shared_host,
        }
        ranks = gathered(figures)
        if rank == 0:
            per_step = [max(r["times"][i] for r in ranks) for i in range(args.steps)]  # the slowest rank sets it
            seconds = statistics.median(per_step)
            rates = [r["rate"] for r in ranks if r["rate"] is not None]
            rate = statistics.median(rates) if rates else None
            rows.append({
                "resolution": resolution,
                "seconds_per_step": round(seconds, 4),
                "images_per_second": round(len(ranks) * args.batch_size / seconds, 4),
                "streamed_gb_per_step_per_rank": round(streamed / GB, 4),
                "copy_gb_per_s_per_rank": round(rate, 2) if rate else None,
                "copy_floor_seconds": round(streamed / GB / rate, 5) if rate and streamed else None,
                "peak_allocated_gb": round(max(r["peak"] for r in ranks) / GB, 3),
                "resident_blocks": ranks[0]["resident"],
                "shared_host": all(r["shared"] for r in ranks),
                "losses_rank0": [round(loss, 5) for loss in ranks[0]["losses"]],
                "host_rss_anon_gb_sum": round(sum(r["memory"].get("RssAnon", 0) for r in ranks) / GB, 4),
                "host_rss_shmem_gb_sum": round(sum(r["memory"].get("RssShmem", 0) for r in ranks) / GB, 4),
                "host_shared_copy_gb": round(shared_copy / GB, 4),
                "machine_shmem_growth_gb": round(shmem_growth / GB, 4),
            })
    if rank == 0:
        Path(args.worker_result).write_text(json.dumps(rows))
    dist.destroy_process_group()


def launch(args: argparse.Namespace, setting: str, processes: int, result: Path) -> list[dict]:
    """Runs `processes` workers for one setting; their rows, or an error naming the log."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(Path(__file__).resolve()), "--worker", "--setting", setting, "--worker_result", str(result),
               "--resolutions", *map(str, args.resolutions), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--batch_size", str(args.batch_size), "--share_host_weights", args.share_host_weights,
               *(["--dry_run"] if args.dry_run else [])]
    log = args.output_dir / f"{args.prefix}log_{setting}_{processes}.txt"
    with open(log, "w") as handle:
        run = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if run.returncode != 0:
        raise SystemExit(f"error: {processes} processes of {setting} failed with code {run.returncode}: see {log}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--resolutions", type=int, nargs="+", default=None, help="default 1024 2048 (dry run: 64 128)")
    parser.add_argument("--max_vram", nargs="*", default=["16GB"], help="a max_vram setting per value (none: skip)")
    parser.add_argument("--share_host_weights", choices=["auto", "true", "false"], default="true")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--dry_run", action="store_true", help="tiny Flux on CPU processes (gloo), every block streamed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--worker_result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resolutions = args.resolutions or ([64, 128] if args.dry_run else [1024, 2048])
    if args.worker:
        args.share_host_weights = {"true": True, "false": False}.get(args.share_host_weights, "auto")
        worker(args)
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs CUDA GPUs; --dry_run checks it on the CPU")
    available = os.cpu_count() if args.dry_run else torch.cuda.device_count()
    processes = sorted({1, *(n for n in args.processes if n <= available)})
    settings = ["streamed"] + ([] if args.dry_run else [f"max_vram{budget}" for budget in args.max_vram])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    args.prefix = "dry_run_" if args.dry_run else ""
    device_name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for setting in settings:
            for count in processes:
                print(f"{setting}: {count} processes", flush=True)
                for row in launch(args, setting, count, Path(scratch) / f"{setting}_{count}.json"):
                    rows.append({"model": "tiny-flux" if args.dry_run else "flux-dev", "setting": setting,
                                 "processes": count, "device": device_name, "torch": torch.__version__,
                                 "batch_size_per_rank": args.batch_size, **row})
    for row in rows:
        single = next(r for r in rows if r["setting"] == row["setting"] and r["resolution"] == row["resolution"]
                      and r["processes"] == 1)
        row["speedup"] = round(row["images_per_second"] / single["images_per_second"], 3)
        row["efficiency"] = round(row["speedup"] / row["processes"], 3)
        row["floor_ratio"] = (round(row["seconds_per_step"] / row["copy_floor_seconds"], 3)
                              if row["copy_floor_seconds"] else None)
    for setting in settings:
        for resolution in args.resolutions:
            name = f"{args.prefix}flux_{resolution}_{setting}.json"
            chosen = [r for r in rows if r["setting"] == setting and r["resolution"] == resolution]
            (args.output_dir / name).write_text(json.dumps(chosen, indent=2) + "\n")
    print(f"\n{'setting':16} {'res':>5} {'N':>2} {'s/step':>7} {'img/s':>7} {'eff':>5} {'floor s':>7} "
          f"{'GB/s/rk':>7} {'anon GB':>8} {'shmem GB':>8} {'copy GB':>7} shared")
    for r in rows:
        floor = "-" if r["copy_floor_seconds"] is None else f"{r['copy_floor_seconds']:.3f}"
        rate = "-" if r["copy_gb_per_s_per_rank"] is None else f"{r['copy_gb_per_s_per_rank']:.1f}"
        print(f"{r['setting']:16} {r['resolution']:5} {r['processes']:2} {r['seconds_per_step']:7.3f} "
              f"{r['images_per_second']:7.3f} {r['efficiency']:5.2f} {floor:>7} {rate:>7} "
              f"{r['host_rss_anon_gb_sum']:8.2f} {r['host_rss_shmem_gb_sum']:8.2f} {r['host_shared_copy_gb']:7.2f} "
              f"{r['shared_host']}")


if __name__ == "__main__":
    main()
