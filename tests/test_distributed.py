"""Several processes: DistributedDataParallel over an offloaded model (CPU, gloo) trains like over a plain one, its
streamed weights in one host copy shared by both processes (`share_host_weights="auto"`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launching import environment, run, torchrun_command


def run_two_processes(tmp_path: Path, *script_args: str) -> dict:
    result_file = tmp_path / "ddp.json"
    script = Path(__file__).parent / "scripts" / "ddp_offload_train.py"
    command = torchrun_command(script, result_file, *script_args, processes=2)
    result = run(command, tmp_path, environment(OMP_NUM_THREADS="1"), timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result_file.read_text())


@pytest.mark.timeout(300)
def test_ddp_over_an_offloaded_model_matches_plain_ddp(tmp_path: Path) -> None:
    result = run_two_processes(tmp_path)
    assert result == {"processes": 2, "device": "cpu", "offloaded_error": 0.0, "ranks_agree": True, "trained": True,
                      "chunked_flux_error": result["chunked_flux_error"], "shared_host": True}
    assert result["chunked_flux_error"] < 1e-5


@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_ddp_over_nccl_on_two_gpus_matches_plain_ddp(tmp_path: Path) -> None:
    """Side streams, NCCL's gradient hooks and one page-locked host copy shared by both processes."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    result = run_two_processes(tmp_path, "cuda")
    assert {k: result[k] for k in ("processes", "device", "ranks_agree", "trained", "shared_host")} == {
        "processes": 2, "device": "cuda", "ranks_agree": True, "trained": True, "shared_host": True}
    assert result["offloaded_error"] < 1e-5 and result["chunked_flux_error"] < 1e-4, result
