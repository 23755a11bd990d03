"""Host→device copy speed by kind of host memory, on a GPU: what one streamed weight piece can arrive at.

A streamed step at 1024² is copy-bound, so the rate of one large host→device copy sets its pace. This times
copies of one Flux-dev weight piece (377.6 MB) from: torch's pinned allocator (`cudaHostAlloc`); an ordinary
allocation page-locked in place with `cudaHostRegister`, as the runtime stores blocks (with and without
transparent huge pages asked for); and pageable memory. Each alone, and each while device→host copies of block
inputs (28 MB each) run on another stream, as in a forward pass. JSON to `--output_dir`; a table printed last.

    python benchmarks/bench_host_copies.py
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import statistics
from pathlib import Path

import numpy as np
import torch

from accelerate_offload.block_weights import ALIGNMENT, pin_in_place

PIECE_BYTES = 377_600_000
INPUT_BYTES = 28_000_000
MADV_HUGEPAGE = 14


def host_buffer(kind: str, nbytes: int) -> tuple[torch.Tensor, object]:
    """A host tensor of `nbytes` bytes of the given kind, and the object that owns its memory."""
    if kind == "cudaHostAlloc (torch pinned)":
        tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return tensor, tensor
    if kind == "pageable":
        tensor = torch.empty(nbytes, dtype=torch.uint8)
        return tensor, tensor
    memory = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -memory.ctypes.data % ALIGNMENT
    if kind.endswith("huge pages"):
        libc = ctypes.CDLL(None)
        page = mmap.PAGESIZE
        first = memory.ctypes.data + start
        aligned = first - first % page
        libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(nbytes), MADV_HUGEPAGE)
    tensor = torch.from_numpy(memory[start:start + nbytes])
    tensor.fill_(1)  # touch every page before it is locked
    pin_in_place(memory, tensor)
    return tensor, memory


def time_copies(source: torch.Tensor, repeats: int, with_downloads: bool) -> float:
    """Median GB/s of host→device copies of `source`, optionally beside device→host copies on another stream."""
    device = torch.device("cuda", 0)
    destination = torch.empty(source.numel(), dtype=torch.uint8, device=device)
    upload, download = torch.cuda.Stream(device), torch.cuda.Stream(device)
    inputs = torch.empty(INPUT_BYTES, dtype=torch.uint8, device=device)
    input_hosts = [torch.empty(INPUT_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(4)]
    rates = []
    for index in range(repeats + 2):
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(upload):
            start.record(upload)
            destination.copy_(source, non_blocking=True)
            end.record(upload)
        if with_downloads:
            with torch.cuda.stream(download):
                for host in input_hosts * 2:
                    host.copy_(inputs, non_blocking=True)
        torch.cuda.synchronize(device)
        if index >= 2:
            rates.append(source.numel() / (start.elapsed_time(end) / 1e3) / 1e9)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    kinds = ["cudaHostAlloc (torch pinned)", "cudaHostRegister", "cudaHostRegister, huge pages", "pageable"]
    rows = []
    for kind in kinds:
        source, owner = host_buffer(kind, PIECE_BYTES)
        for with_downloads in (False, True):
            rate = time_copies(source, args.repeats, with_downloads)
            rows.append({"host_memory": kind, "beside_device_to_host": with_downloads, "gb_per_s": round(rate, 1)})
            print(json.dumps(rows[-1]), flush=True)
        del source, owner
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "piece_bytes": PIECE_BYTES,
              "copies": rows}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "host_copies.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'host memory':32} {'alone GB/s':>10} {'beside D2H':>10}")
    for kind in kinds:
        alone, beside = (r["gb_per_s"] for r in rows if r["host_memory"] == kind)
        print(f"{kind:32} {alone:10.1f} {beside:10.1f}")


if __name__ == "__main__":
    main()
