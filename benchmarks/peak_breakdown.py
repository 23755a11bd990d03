"""What is on the GPU at a training step's peak, and who put it there.

Records the caching allocator's history over one forward + backward (`torch.cuda.memory._record_memory_history`),
replays it to the highest point of allocated memory, and groups what was live there: memory that was already
allocated when the step began (non-block layers, LoRA parameters, Adam state, the batch) by the tensors that own
it, and memory allocated during the step by what it is (streamed block buffers by their size, LoRA gradients by
address, the rest activations), with the largest allocations listed by size. This is how a floor is
named, tensor by tensor, instead of guessed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

MAX_EVENTS = 2_000_000


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """Bytes by storage address, each storage once."""
    sizes: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None and tensor.is_cuda:
            storage = tensor.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
    return sizes


def _origin(size: int, piece_sizes: set[int]) -> str:
    """What an allocation made during the step is, from its size: each streamed weight piece has its own."""
    if any(0 <= size - nbytes < 512 for nbytes in piece_sizes):
        return "streamed block weights (the block computing and what is prefetched)"
    return "activations and their gradients (block working set, block inputs and outputs)"


def _replay(trace: list[dict], before: int, stop: int | None = None) -> tuple[int, int, dict[int, int], int]:
    """Replays allocations and frees (up to event `stop`): the peak of allocated bytes and the event that reached
    it, the step's own allocations live at the end, and how much of the memory allocated before it was live."""
    live: dict[int, int] = {}
    total = pre_step = peak = before
    peak_event = -1
    for index, event in enumerate(trace[:stop]):
        action, address, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[address] = size
            total += size
            if total > peak:
                peak, peak_event = total, index
        elif action == "free_completed":
            if address in live:
                total -= live.pop(address)
            else:  # allocated before the recording began
                total -= size
                pre_step -= size
    return peak, peak_event, live, pre_step


def _record(run_forward_backward: Callable[[], None], device: torch.device) -> list[dict]:
    """The allocator's events over one forward + backward, without stacks: in torch 2.11 gathering Python frames
    during a checkpoint's recomputation fails ("error return without exception set")."""
    torch.cuda.memory._record_memory_history(max_entries=MAX_EVENTS, context=None)
    try:
        run_forward_backward()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return snapshot["device_traces"][device.index or 0]


def peak_breakdown(
    run_forward_backward: Callable[[], None],
    persistent: dict[str, Iterable[torch.Tensor]],
    gradients: Callable[[], Iterable[torch.Tensor]],
    piece_sizes: set[int],
    device: torch.device,
) -> dict:
    """Runs one forward + backward under the allocator's recorder and returns the peak split into groups (GB).

    `persistent` names the tensors that exist before the step (weights, LoRA, optimizer state, batch);
    `gradients` gives, after the step, the gradients it made (matched by address among the step's allocations);
    `piece_sizes` are the byte sizes of the streamed blocks' weight pieces (one device allocation each).
    """
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    trace = _record(run_forward_backward, device)
    peak, peak_event, _, _ = _replay(trace, before)
    _, _, live, pre_step = _replay(trace, before, stop=peak_event + 1)

    groups: dict[str, int] = defaultdict(int)
    claimed: set[int] = set()
    for name, tensors in persistent.items():
        for address, size in _storage_bytes(tensors).items():
            if address not in claimed:
                claimed.add(address)
                groups[f"before the step: {name}"] += size
    groups["before the step: other"] = pre_step - sum(groups.values())
    gradient_addresses = set(_storage_bytes(gradients()))
    for address, size in live.items():
        label = "LoRA gradients" if address in gradient_addresses else _origin(size, piece_sizes)
        groups[label] += size
    if len(trace) >= MAX_EVENTS:
        raise RuntimeError(f"the step made over {MAX_EVENTS} allocator events: the recorder dropped the oldest")
    ordered = sorted(groups.items(), key=lambda item: -item[1])
    largest = sorted(((size, _origin(size, piece_sizes)) for size in live.values()), reverse=True)[:16]
    copies = [event["size"] for event in trace[: peak_event + 1] if event["action"] == "alloc"
              and _origin(event["size"], piece_sizes).startswith("streamed")]
    return {
        "peak_allocated_gb": round(peak / 1e9, 3),
        "weight_copies_before_peak": len(copies),  # the forward pass's come first, then backward's
        "weight_copies_before_peak_gb": round(sum(copies) / 1e9, 2),
        "recorded_events": len(trace),
        "groups_gb": {label: round(size / 1e9, 4) for label, size in ordered if size},
        "largest_live_mb": [[round(size / 1e6, 1), label] for size, label in largest],
    }


def print_breakdown(breakdown: dict, title: str) -> None:
    print(f"\npeak breakdown, {title}: {breakdown['peak_allocated_gb']:.2f} GB allocated, after "
          f"{breakdown['weight_copies_before_peak_gb']:.1f} GB of weights were copied in")
    for label, size in breakdown["groups_gb"].items():
        print(f"  {size:7.3f} GB  {label}")
    print("  largest allocations live at the peak (MB):")
    for size, label in breakdown["largest_live_mb"]:
        print(f"  {size:9.1f}  {label}")
