"""The host-overhead benchmark runs the narrow full-depth Flux through the runtime, whole blocks and token chunks,
and both train the same model (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_host_overhead.py"


def test_whole_and_chunked_blocks_give_the_same_losses(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(SCRIPT), "--cases", "eager", "eager-chunks4", "--warmup", "1", "--steps", "2",
         "--output_dir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    record = json.loads((tmp_path / "host_overhead.json").read_text())
    assert record["double_and_single_blocks"] == [19, 38]  # Flux-dev's depth: the host work of a full step
    whole, chunked = record["results"]
    assert (whole["sequence_chunks"], chunked["sequence_chunks"]) == (None, 4)
    assert all(r["seconds_per_step"] > 0 and len(r["step_times"]) == 2 for r in (whole, chunked))
    assert chunked["losses"] == pytest.approx(whole["losses"], rel=1e-3)  # bf16 autocast rounding, nothing more
    assert chunked["losses"][1] < chunked["losses"][0]  # it trains
