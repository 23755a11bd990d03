"""Disk-tier benchmark on a GPU: Flux-dev LoRA steps with every streamed block in pinned RAM, then under `max_ram`.

One process, one batch, one seed: the RAM-backed run (all 57 blocks streamed from pinned memory, activation
offloading on) first, then each `--budgets` value, the blocks past it read from a block file in `--offload_dir`
(a folder on a real disk: the point is the disk). Each setting builds the same random full-size model on the GPU
(as `bench_training_step.py` does), offloads it, runs one forward + backward whose LoRA gradients are compared with
the RAM-backed run's, then `--steps` timed training steps. Recorded per setting: the host's RssAnon peak and page
cache growth (sampled through setup and through the steps), s/step, bytes read from disk per step, the disk's
direct-read bandwidth measured on the block file in this run, the disk floor (bytes per step / bandwidth), the
ratio of the step to it, and the step a 7 GB/s NVMe would give under the same model, max(RAM-backed step, bytes /
7 GB/s). One JSON per setting goes to `--output_dir`; a table is printed last. The block files are removed after
their setting.

    python benchmarks/bench_disk_tier.py --offload_dir /mnt/disk/offload
    python benchmarks/bench_disk_tier.py --model tiny-flux --resolution 64 --budgets 8MB 6MB --offload_dir offload
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import platform
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import diffusers
import numpy as np
import torch

import accelerate_offload
from accelerate_offload import get_conductor, offload_model
from accelerate_offload.memory import host_memory, pinned_cache_bytes, release_host_memory
from accelerate_offload.planner import parse_memory
from bench_training_step import build_model, make_batch

GB = 1e9
NVME_BANDWIDTH = 7e9  # bytes/s: a fast PCIe 4 NVMe drive's sequential reads, for the stated model
BANDWIDTH_CHUNK = 256 << 20
# `--model tiny-flux`: the same code path on a CPU in seconds (nothing about its figures carries over)
TINY_FLUX = {"num_layers": 3, "num_single_layers": 6, "num_attention_heads": 2, "attention_head_dim": 64,
             "joint_attention_dim": 64, "pooled_projection_dim": 32, "axes_dims_rope": [8, 28, 28]}
RAM_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs"}


@dataclass
class Result:
    setting: str
    model: str
    resolution: int
    device: str
    torch: str
    diffusers: str
    accelerate_offload: str
    max_ram_gb: float | None
    blocks_in_ram: int
    blocks_on_disk: int
    disk_file_gb: float
    staging_ring_gb: float
    seconds_per_step: float
    step_times: list[float]
    disk_read_gb_per_step: float
    disk_bandwidth_gbps: float | None
    disk_floor_seconds: float | None
    ratio_to_floor: float | None
    nvme_model_seconds: float | None
    host_baseline_rss_anon_gb: float  # the process with the model on the GPU, before offloading
    setup_rss_anon_growth_peak_gb: float
    setup_page_cache_growth_peak_gb: float
    rss_anon_peak_gb: float
    rss_anon_growth_peak_gb: float
    page_cache_growth_peak_gb: float
    block_file_cached_gb: float  # pages of the block file in the page cache after the steps (mincore)
    pinned_activation_cache_gb: float
    weights_host_gb: float  # RssAnon growth + page-cache growth - the pinned activation cache
    within_budget_plus_1gb: bool | None
    peak_allocated_gb: float
    peak_reserved_gb: float
    lora_grad_max_abs_diff: float
    lora_grad_max_abs: float
    losses: list[float]
    setup_seconds: float
    settings: dict = field(default_factory=dict)


def meminfo(field: str) -> int:
    """One /proc/meminfo figure in bytes: `Cached` (the page cache, where reads would leave pages), `MemTotal`."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def show(value: float | None, spec: str) -> str:
    return "-".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)


class HostSampler:
    """Peak RssAnon of this process and peak growth of the page cache while the `with` body runs."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.rss_peak = self.cache_peak = self.cache_start = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        self.rss_peak = max(self.rss_peak, host_memory().get("RssAnon", 0))
        self.cache_peak = max(self.cache_peak, meminfo("Cached"))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> HostSampler:
        self.cache_start = meminfo("Cached")
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cache_growth(self) -> int:
        return self.cache_peak - self.cache_start


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache, from mincore(2)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as file:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
        try:
            if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    return sum(page & 1 for page in vector) * mmap.PAGESIZE


def filesystem_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount holding `path`."""
    path, best = path.resolve(), ("/", "unknown")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) >= len(best[0]):
            best = (mount, kind)
    return best


def direct_read_bandwidth(path: Path, limit: int) -> float:
    """Bytes/s of O_DIRECT reads of `path` (up to `limit` bytes from its start) into an aligned buffer: the disk,
    not the page cache."""
    memory = np.empty(BANDWIDTH_CHUNK + 4096, dtype=np.uint8)
    base = -memory.ctypes.data % 4096
    view = memoryview(memory[base : base + BANDWIDTH_CHUNK])
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        total, start = 0, time.perf_counter()
        while total < min(limit, path.stat().st_size):
            done = os.preadv(fd, [view], total)
            if done <= 0:
                break
            total += done
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return total / seconds


def forward_backward(model: torch.nn.Module, inputs: dict, target: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        prediction = model(**inputs, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(prediction.float(), target)
    loss.backward()
    return loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_setting(args: argparse.Namespace, budget: str | None, device: torch.device, reference: dict | None):
    """One setting from a fresh model: setup, the gradient step(s), the timed steps; returns (figures, grads)."""
    release_host_memory()
    torch.manual_seed(0)
    model = build_model("flux", device, TINY_FLUX if args.model == "tiny-flux" else None)
    inputs, target = make_batch("flux", model, args.resolution, device)
    synchronize(device)
    baseline = host_memory().get("RssAnon", 0)
    label = "ram" if budget is None else f"max_ram{budget}"
    folder = args.offload_dir / f"bench-{label}"
    options = {"layer_offload_fraction": 1.0, "activation_offloading": True}
    if budget is not None:
        options.update(max_ram=budget, offload_dir=str(folder))
    with HostSampler() as setup:
        start = time.perf_counter()
        offload_model(model, device, **options)
        synchronize(device)
        setup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the build's GPU copies of the streamed weights
    conductor = get_conductor(model)
    disk = conductor.disk
    bandwidth = direct_read_bandwidth(disk.path, int(args.bandwidth_gb * GB)) if disk is not None else None
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    grads, losses, times = [], [], []
    with HostSampler() as steps:
        # untimed: the first step's LoRA gradients (no optimizer step), twice in the RAM-backed run for the
        # run-to-run noise of the GPU's kernels; further warm-up steps train
        for _ in range(1 if reference is not None else 2):
            losses.append(forward_backward(model, inputs, target, device).item())
            grads.append({name: p.grad.detach().clone() for name, p in lora.items()})
            optimizer.zero_grad(set_to_none=True)
        for _ in range(args.warmup - 1):
            losses.append(forward_backward(model, inputs, target, device).item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        read_before = disk.bytes_read if disk is not None else 0
        for _ in range(args.steps):
            start = time.perf_counter()
            losses.append(forward_backward(model, inputs, target, device).item())  # .item() synchronises
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - start)
        read_per_step = ((disk.bytes_read - read_before) / args.steps) if disk is not None else 0
    against = reference if reference is not None else grads[1]
    difference = max((grads[0][name].float() - against[name].float()).abs().max().item() for name in against)
    largest = max(against[name].float().abs().max().item() for name in against)
    seconds = statistics.median(times)
    pinned = pinned_cache_bytes()
    weights_host = steps.rss_peak - baseline + steps.cache_growth - pinned
    budget_bytes = parse_memory(budget, "max_ram") if budget is not None else None
    floor = read_per_step / bandwidth if disk is not None else None
    result = Result(
        setting=label, model=args.model, resolution=args.resolution,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, diffusers=diffusers.__version__, accelerate_offload=accelerate_offload.__version__,
        max_ram_gb=round(budget_bytes / GB, 3) if budget_bytes else None,
        blocks_in_ram=len(conductor.weights) - (len(disk.offsets) if disk else 0),
        blocks_on_disk=len(disk.offsets) if disk else 0,
        disk_file_gb=round(disk.nbytes / GB, 3) if disk else 0.0,
        staging_ring_gb=round(disk.staging_nbytes / GB, 3) if disk else 0.0,
        seconds_per_step=round(seconds, 3), step_times=[round(t, 3) for t in times],
        disk_read_gb_per_step=round(read_per_step / GB, 3),
        disk_bandwidth_gbps=round(bandwidth / GB, 3) if bandwidth else None,
        disk_floor_seconds=round(floor, 3) if floor else None,
        ratio_to_floor=round(seconds / floor, 3) if floor else None,
        nvme_model_seconds=None,  # filled from the RAM-backed step in main
        host_baseline_rss_anon_gb=round(baseline / GB, 3),
        setup_rss_anon_growth_peak_gb=round((setup.rss_peak - baseline) / GB, 3),
        setup_page_cache_growth_peak_gb=round(setup.cache_growth / GB, 3),
        rss_anon_peak_gb=round(steps.rss_peak / GB, 3),
        rss_anon_growth_peak_gb=round((steps.rss_peak - baseline) / GB, 3),
        page_cache_growth_peak_gb=round(steps.cache_growth / GB, 3),
        block_file_cached_gb=round(resident_bytes(disk.path) / GB, 3) if disk else 0.0,
        pinned_activation_cache_gb=round(pinned / GB, 3),
        weights_host_gb=round(weights_host / GB, 3),
        within_budget_plus_1gb=weights_host <= budget_bytes + GB if budget_bytes else None,
        peak_allocated_gb=round(torch.cuda.max_memory_allocated(device) / GB, 3) if device.type == "cuda" else 0.0,
        peak_reserved_gb=round(torch.cuda.max_memory_reserved(device) / GB, 3) if device.type == "cuda" else 0.0,
        lora_grad_max_abs_diff=difference, lora_grad_max_abs=largest, losses=[round(l, 5) for l in losses],
        setup_seconds=round(setup_seconds, 1),
        settings={**options, "prefetch_blocks": conductor.prefetch_blocks, "warmup": args.warmup,
                  "steps": args.steps, "offload_dir_filesystem": filesystem_of(args.offload_dir)[1]},
    )
    del model, optimizer, conductor, disk, lora
    gc.collect()
    release_host_memory()
    shutil.rmtree(folder, ignore_errors=True)
    return result, grads[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offload_dir", type=Path, required=True,
                        help="a folder on a real disk (not tmpfs) for the block files; each is removed after its run")
    parser.add_argument("--model", choices=["flux", "tiny-flux"], default="flux",
                        help="tiny-flux: a few small blocks, to run the benchmark's code on a CPU")
    parser.add_argument("--budgets", nargs="+", default=["16GB", "12GB", "8GB"],
                        help="max_ram values, after the RAM-backed run (24GB would hold every block: that run)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps; the first one's gradients are compared")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--bandwidth_gb", type=float, default=4.0, help="GB of each block file read to measure the disk")
    parser.add_argument("--output_dir", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "disk_tier")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("error: --warmup and --steps must be at least 1")
    if args.model == "flux" and not torch.cuda.is_available():
        raise SystemExit("error: the full-size benchmark needs a CUDA GPU; --model tiny-flux runs on a CPU")
    args.offload_dir.mkdir(parents=True, exist_ok=True)
    mount, kind = filesystem_of(args.offload_dir)
    if kind in RAM_FILESYSTEMS:
        raise SystemExit(f"error: --offload_dir {args.offload_dir} is on {kind} ({mount}), not a disk: point it at "
                         "a folder on a local disk")
    device = torch.device("cuda", 0) if args.model == "flux" else torch.device("cpu")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results, reference = [], None
    for budget in [None, *args.budgets]:
        result, grads = run_setting(args, budget, device, reference)
        reference = reference or grads
        results.append(result)
        print(json.dumps(asdict(result)), flush=True)
    ram_step = results[0].seconds_per_step
    for result in results:
        if result.blocks_on_disk:
            result.nvme_model_seconds = round(max(ram_step, result.disk_read_gb_per_step * GB / NVME_BANDWIDTH), 3)
        name = f"{args.model}_{args.resolution}_{result.setting}.json"
        (args.output_dir / name).write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(f"\n{args.model} {args.resolution}², {results[0].device}, torch {torch.__version__}, host RAM "
          f"{meminfo('MemTotal') / GB:.0f} GB, offload_dir on {kind}; {time.perf_counter() - started:.0f} s in all")
    print(f"{'setting':13} {'ram/disk':>8} {'s/step':>7} {'read GB':>8} {'disk GB/s':>9} {'floor s':>8} "
          f"{'÷floor':>7} {'7GB/s s':>8} {'RssAnon+':>9} {'cache+':>7} {'weights':>8} {'in budget':>9} "
          f"{'setup+':>7} {'alloc':>6} {'grad diff':>10}")
    for r in results:
        print(f"{r.setting:13} {f'{r.blocks_in_ram}/{r.blocks_on_disk}':>8} {r.seconds_per_step:7.2f} "
              f"{r.disk_read_gb_per_step:8.2f} {show(r.disk_bandwidth_gbps, '9.2f')} "
              f"{show(r.disk_floor_seconds, '8.2f')} {show(r.ratio_to_floor, '7.2f')} "
              f"{show(r.nvme_model_seconds, '8.2f')} {r.rss_anon_growth_peak_gb:9.2f} "
              f"{r.page_cache_growth_peak_gb:7.2f} {r.weights_host_gb:8.2f} {str(r.within_budget_plus_1gb):>9} "
              f"{r.setup_rss_anon_growth_peak_gb:7.2f} {r.peak_allocated_gb:6.2f} {r.lora_grad_max_abs_diff:10.3g}")


if __name__ == "__main__":
    main()
