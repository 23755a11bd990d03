"""One host copy of the streamed weights per machine, shared by the data-parallel processes that train on it.

Every rank holds the same frozen weights, so a private host buffer per rank multiplies host memory by the ranks of
a machine. Instead the machine's first rank puts each streamed block's buffer in an anonymous shared memory file
(`memfd_create`) and fills it; the machine's other ranks map the same pages, opened through that rank's
`/proc/<pid>/fd`, and compare a sample of their own weights with them. Nobody writes to them afterwards. The files
have no name in any filesystem and every descriptor is closed once mapped, so a rank dying at any moment leaves
nothing behind: the kernel frees the pages when the last process mapping them ends, and a block that every rank
has made resident (`max_vram`) is freed as the last one unmaps it. Each process page-locks its mapping
(`cudaHostRegister`), as it would a private buffer.

The ranks meet in five small collectives of the default process group, in every process's `offload_model`.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.distributed as dist

if TYPE_CHECKING:
    from .block_weights import BlockWeights

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "accelerate-offload-block"  # how the segments show in /proc/<pid>/maps


class HostSharingError(RuntimeError):
    """`share_host_weights: true` cannot be honoured: the processes of a machine cannot share their weights."""


def local_world_size() -> int:
    """Processes of this machine in the job, as torchrun (and so `accelerate launch`) sets it; 1 otherwise."""
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def machine_key() -> str:
    """The same string in processes that see each other's /proc: this boot of the kernel, and the PID namespace."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"


def share_host_buffers(weights: dict[int, BlockWeights], pin_memory: bool, setting: bool | str) -> bool:
    """Places the streamed blocks' host buffers in memory shared by the processes of this machine.

    Returns False, placing nothing, when nothing is to be shared: `setting` false, a single process, or ("auto")
    no process group or no second process on this machine; the caller then gives each block private memory.
    Called by every process of the job with the same `setting` and layout of blocks.

    Args:
        weights (`dict[int, BlockWeights]`):
            The streamed blocks, laid out but not yet placed.
        pin_memory (`bool`):
            Page-lock each process's mapping (CUDA).
        setting (`bool` or `"auto"`):
            `share_host_weights`: true refuses to fall back to private copies.
    """
    if setting is False or not weights:
        return False
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised or not hasattr(os, "memfd_create"):
        if setting is True and local_world_size() > 1:
            raise HostSharingError(
                "share_host_weights: true needs Linux and the job's process group before the model is offloaded: "
                "create the Accelerator before prepare_model (or offload_model), or set share_host_weights: auto"
            )
        return False
    if dist.get_world_size() == 1 or (setting == "auto" and local_world_size() == 1):
        return False
    order = sorted(weights)
    sizes = [weights[index].memory_nbytes for index in order]
    key, rank = machine_key(), dist.get_rank()

    # 1. the first rank of each machine creates the segments and tells the others where they are
    leaders = _gather((key, rank))
    leader = min(r for k, r in leaders if k == key)
    local_ranks = sum(k == key for k, _ in leaders)
    fds: list[int] = []
    error = None
    if rank == leader:
        try:
            for index, size in zip(order, sizes):
                fds.append(os.memfd_create(f"{SEGMENT_PREFIX}{index}", os.MFD_CLOEXEC))
                os.ftruncate(fds[-1], size)
        except OSError as failure:
            error = f"local rank 0 could not create shared memory: {failure}"
    offers = _gather((os.getpid(), fds, sizes, error) if rank == leader else None)
    leader_pid, leader_fds, leader_sizes, leader_error = offers[leader]

    # 2. every rank maps them (the leader its own descriptors, the others through the leader's /proc)
    memories: list[np.ndarray] = []
    if leader_error is not None:
        error = leader_error
    elif leader_sizes != sizes:
        error = "this process's model differs from local rank 0's (its streamed blocks have other sizes)"
    else:
        try:
            for fd, size in zip(leader_fds, sizes):
                memories.append(_map(fd if rank == leader else f"/proc/{leader_pid}/fd/{fd}", size))
        except OSError as failure:
            error = f"could not map local rank 0's shared memory: {failure}"
    errors = [e for e in _gather(error) if e is not None]
    for fd in fds:
        os.close(fd)  # every rank has its mapping now (or gave up): the pages live as long as the mappings
    if errors:
        if setting is True:
            raise HostSharingError(f"share_host_weights: {errors[0]}; set share_host_weights: false")
        logger.warning("accelerate-offload: share_host_weights: %s; every process keeps its own copy", errors[0])
        return False

    # 3. the leader fills the segments while the others page-lock theirs; then the others check a sample
    for index, memory in zip(order, memories):
        weights[index].attach(memory, pin_memory)
        if rank == leader:
            weights[index].fill_from_sources()
    _gather(None)  # the leader has filled every segment
    difference = None
    if rank != leader:
        difference = next(
            (f"block {index} {name}" for index in order if (name := weights[index].first_difference()) is not None),
            None,
        )
    differences = [d for d in _gather(difference) if d is not None]
    if differences:
        raise HostSharingError(
            f"share_host_weights: {differences[0]} differs from local rank 0's copy: every process must load the "
            "same weights (or set share_host_weights: false)"
        )
    for index in order:
        weights[index].settle()
    if rank == leader:
        logger.info(
            "accelerate-offload: the %d processes of this machine share one host copy of the streamed weights "
            "(%.2f GB)", local_ranks, sum(sizes) / 1e9,
        )
    return True


def _gather(value: Any) -> list[Any]:
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _map(source: int | str, size: int) -> np.ndarray:
    """A shared, writable mapping of a segment, by descriptor or by /proc path (the descriptor closed once mapped)."""
    fd = source if isinstance(source, int) else os.open(source, os.O_RDWR | os.O_CLOEXEC)
    try:
        return np.frombuffer(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE), dtype=np.uint8)
    finally:
        if not isinstance(source, int):
            os.close(fd)
