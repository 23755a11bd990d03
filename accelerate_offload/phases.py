"""The phases of a job (load, prompts, latents, class images, steps, validation, save, final images).

Each phase is a context: a CUDA out-of-memory error inside it stops the job with one line naming the phase,
its peak, what to change and what is already on disk (nothing written is touched). A phase that ends frees
what the job no longer references before the next one starts. With `OFFLOAD_JOB_PHASE_LOG` naming a file,
every phase appends one JSON line to it (times, GPU peaks since the phase began, host memory), which is how
`benchmarks/bench_job_memory.py` draws a job; the GPU peak statistics are reset as each phase starts.

What is alive after the first of a run of training steps (the models, the optimizer, compiled blocks' code and
graphs) lives as long as the run: it is frozen out of Python's garbage collector (`gc.freeze`), whose full passes
would otherwise walk all of it again every few steps and stall the GPU while they do. The next phase that is not
a step unfreezes it before it frees memory, so the adapter and optimizer a job has let go of are still collected.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .memory import apply_gpu_cap, host_memory, pinned_cache_bytes, release_host_memory, streamed_host_buffers
from .oom import explain_phase_out_of_memory
from .script_errors import TrainingFault

PHASE_LOG_VARIABLE = "OFFLOAD_JOB_PHASE_LOG"
STREAM_MORE = "stream more blocks (layer_offload_fraction toward 1.0, or a lower max_vram)"


class PhaseOutOfMemoryError(TrainingFault):
    """CUDA ran out of memory in a phase: the job stops with one `error: ...` line and exit status 1."""


def kept_outputs(output_dir: str | Path) -> str:
    """The LoRA files and the newest complete checkpoint in `output_dir`, for the out-of-memory line."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return ""
    files = sorted(path for path in folder.glob("*.safetensors") if path.is_file())
    checkpoints = sorted(
        (path for path in folder.glob("checkpoint-*") if path.is_dir() and path.name.split("-")[-1].isdigit()),
        key=lambda path: int(path.name.split("-")[-1]),
    )
    return ", ".join(str(path) for path in files + checkpoints[-1:])


class JobPhases:
    """Marks the phases of one job on `device`; applies the `OFFLOAD_JOB_GPU_CAP` cap once, as it is created."""

    def __init__(self, device: torch.device | str, kept: Callable[[], str] | None = None) -> None:
        self.device = torch.device(device)
        self.kept = kept or (lambda: "")
        self.gpu_cap = apply_gpu_cap(self.device)
        log = os.environ.get(PHASE_LOG_VARIABLE, "").strip()
        self.log_path = Path(log) if log else None
        self._cuda = self.device.type == "cuda"
        self._frozen = False

    @contextmanager
    def phase(self, name: str, fixes: list[str] | None = None, step: bool = False) -> Iterator[None]:
        """Runs one phase. `step` marks a training step: no memory is released and the record stays light, so
        the step's time is its own."""
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.time()
        try:
            yield
        except torch.OutOfMemoryError as error:
            self._record(name, start, False, step)
            raise PhaseOutOfMemoryError(
                explain_phase_out_of_memory(name, self.device, fixes or [], self.kept(), error)
            ) from None
        except BaseException:
            self._record(name, start, False, step)
            raise
        if step:
            self._freeze_long_lived()
        else:
            self._unfreeze()
            release_host_memory()
        self._record(name, start, True, step)

    def _freeze_long_lived(self) -> None:
        """After the first step of a run of steps: collect once, then keep what survives out of later passes."""
        if not self._frozen:
            gc.collect()
            gc.freeze()
            self._frozen = True

    def _unfreeze(self) -> None:
        if self._frozen:
            gc.unfreeze()
            self._frozen = False

    def _record(self, name: str, start: float, ok: bool, step: bool) -> None:
        if self.log_path is None:
            return
        record = {"phase": name, "start": start, "end": time.time(), "ok": ok, "pid": os.getpid()}
        if self._cuda:
            record["gpu_peak_allocated"] = torch.cuda.max_memory_allocated(self.device)
            record["gpu_peak_reserved"] = torch.cuda.max_memory_reserved(self.device)
            record["gpu_allocated_end"] = torch.cuda.memory_allocated(self.device)
            record["gpu_cap"] = self.gpu_cap
        record["host"] = host_memory()
        if not step:
            record["streamed_host_buffers"], record["streamed_host_bytes"] = streamed_host_buffers()
            record["pinned_cache_bytes"] = pinned_cache_bytes()
        with self.log_path.open("a") as log:
            log.write(json.dumps(record) + "\n")
