"""Several processes: DistributedDataParallel over an offloaded model (CPU, gloo) trains like over a plain one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_ddp_over_an_offloaded_model_matches_plain_ddp(tmp_path: Path) -> None:
    result_file = tmp_path / "ddp.json"
    script = Path(__file__).parent / "scripts" / "ddp_offload_train.py"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(result_file)],
        capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result == {"processes": 2, "equal_to_plain": True, "ranks_agree": True, "trained": True,
                      "chunked_flux_close_to_plain": True}
