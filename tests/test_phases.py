"""Job phases on CPU: an out-of-memory error in any phase is one line, and every phase leaves a record."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

from accelerate_offload.phases import PHASE_LOG_VARIABLE, STREAM_MORE, JobPhases, PhaseOutOfMemoryError, kept_outputs


@pytest.fixture(autouse=True)
def nothing_frozen_around_each_test():
    """A step phase freezes what is alive (`gc.freeze`, process-wide): no test leaves that to the next."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def fail_inside(phases: JobPhases, name: str, fixes: list[str]) -> str:
    with pytest.raises(PhaseOutOfMemoryError) as stopped, phases.phase(name, fixes):
        torch.empty(4)  # the phase's work, then the allocator gives up
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return str(stopped.value)


@pytest.mark.parametrize("name", ["load", "prompts", "latents", "class images", "validation", "save", "final images"])
def test_out_of_memory_in_a_phase_is_one_line(name: str, tmp_path: Path) -> None:
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-12.tmp").mkdir()  # unfinished: not named as kept
    phases = JobPhases("cpu", kept=lambda: kept_outputs(tmp_path))
    message = fail_inside(phases, name, [STREAM_MORE, "lower --resolution (now 2048)"])
    assert "\n" not in message
    assert message.startswith(f"{name}: CUDA ran out of memory asking for 2.00 GiB.")
    assert f"To fit: {STREAM_MORE}; lower --resolution (now 2048)." in message
    kept = message.split("Kept on disk: ")[1]
    assert kept == f"{tmp_path / 'pytorch_lora_weights.safetensors'}, {tmp_path / 'checkpoint-10'}."
    assert (tmp_path / "pytorch_lora_weights.safetensors").read_bytes() == b"lora"


def test_other_errors_pass_through_and_every_phase_is_recorded(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "phases.jsonl"
    monkeypatch.setenv(PHASE_LOG_VARIABLE, str(log))
    phases = JobPhases("cpu")
    with phases.phase("prompts"):
        pass
    with phases.phase("step 1", step=True):
        pass
    with pytest.raises(ValueError, match="bad"), phases.phase("save"):
        raise ValueError("bad")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["phase"], r["ok"]) for r in records] == [("prompts", True), ("step 1", True), ("save", False)]
    assert all(r["end"] >= r["start"] and r["host"]["RssAnon"] > 0 for r in records)
    assert "streamed_host_bytes" in records[0] and "streamed_host_bytes" not in records[1]  # steps stay light


class Cycle:
    """An object in a reference cycle: only the garbage collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_what_outlives_the_first_step_is_frozen_until_the_next_phase() -> None:
    phases = JobPhases("cpu")
    with phases.phase("load"):
        pass
    kept = Cycle()
    alive = weakref.ref(kept)
    with phases.phase("step 1", step=True):
        pass
    assert gc.get_freeze_count() > 0
    del kept
    with phases.phase("step 2", step=True):
        during_steps = Cycle()
    later = weakref.ref(during_steps)
    del during_steps
    gc.collect()
    assert alive() is not None, "frozen: the collector's passes skip it"
    assert later() is None, "made after the freeze: collected as usual"
    with phases.phase("save"):
        pass
    assert alive() is None, "a phase that is not a step unfreezes before it frees memory"
    assert gc.get_freeze_count() == 0
