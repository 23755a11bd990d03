"""Job phases on CPU: an out-of-memory error in any phase is one line, and every phase leaves a record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from accelerate_offload.phases import PHASE_LOG_VARIABLE, STREAM_MORE, JobPhases, PhaseOutOfMemoryError, kept_outputs


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
