"""One host copy of the streamed weights per machine: the processes of one machine (CPU, gloo, launched by
`accelerate-offload launch`) share it, train exactly like plain DDP, and leave nothing behind when one dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from accelerate_offload import offload_model
from accelerate_offload.plugin import LayerOffloadPlugin, OffloadConfigError
from toy_models import ToyTransformer

SCRIPT = Path(__file__).parent / "scripts" / "shared_weights_train.py"
SHM = Path("/dev/shm")


def launch(tmp_path: Path, processes: int, offload_config: dict | None, *script_args: str) -> subprocess.CompletedProcess:
    """`accelerate-offload launch` of the training script on `processes` CPU processes of this machine."""
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_processes": processes,
              "use_cpu": True, "mixed_precision": "no"}
    if offload_config is not None:
        config["offload_config"] = offload_config
    config_path = tmp_path / "launch.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_OFFLOAD_")}
    return subprocess.run(
        [sys.executable, "-m", "accelerate_offload.cli", "launch", "--config_file", str(config_path), str(SCRIPT),
         str(tmp_path / "result.json"), *script_args],
        capture_output=True, text=True, timeout=400, env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
    )


@pytest.mark.timeout(450)
@pytest.mark.parametrize(("processes", "offload_config"), [(2, {"share_host_weights": True}), (4, None)],
                         ids=["2-processes-true", "4-processes-auto"])
def test_processes_of_one_machine_share_one_copy_and_train_like_ddp(
    tmp_path: Path, processes: int, offload_config: dict | None
) -> None:
    run = launch(tmp_path, processes, offload_config)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    ranks, copy = result["ranks"], result["streamed_bytes"]
    assert result["processes"] == processes and result["setting"] == (True if offload_config else "auto")
    assert copy > 100e6
    for rank in ranks:
        assert rank["shared_host"] is True and rank["private_host"] is False
        assert rank["shared_trains_like_ddp"] and rank["private_trains_like_ddp"], rank
        assert rank["rss_shmem"] >= 0.99 * copy  # each maps and uses every shared page...
        assert rank["segments"] == ranks[0]["segments"] and len(rank["segments"]) == 4  # ...of the same segments
    # host memory for the streamed weights: anonymous memory of every rank, plus the one shared copy
    shared_total = sum(rank["shared_weights_anon"] for rank in ranks) + copy
    private_total = sum(rank["private_weights_anon"] for rank in ranks)
    assert shared_total <= 1.1 * copy, (shared_total, copy)
    assert private_total >= 0.95 * processes * copy, (private_total, copy)  # the measure sees private copies


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kill", ["setup:0", "setup:1", "train:1"])
def test_a_rank_dying_leaves_no_shared_memory_behind(tmp_path: Path, kill: str) -> None:
    """SIGKILL while local rank 0 or another rank maps the segments, or mid-training: every process ends, nothing
    is left in /dev/shm, and no process still maps a segment."""
    pids = tmp_path / "pids"
    pids.mkdir()
    shm_before = set(SHM.iterdir())
    run = launch(tmp_path, 2, {"share_host_weights": True}, f"kill={kill}", f"pids={pids}")
    assert run.returncode != 0
    assert not (tmp_path / "result.json").exists()
    workers = [int(path.name) for path in pids.iterdir()]
    assert len(workers) == 2
    assert not [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert set(SHM.iterdir()) - shm_before == set()


def test_one_process_keeps_its_own_buffers() -> None:
    """Without a process group, `true` and `auto` place private buffers exactly as before."""
    for setting in (True, "auto"):
        model = ToyTransformer(16, 2).requires_grad_(False)
        conductor = offload_model(model, "cpu", block_names=["blocks"], layer_offload_fraction=1.0,
                                  share_host_weights=setting)
        assert conductor.shared_host is False
        assert all(weights._memory.base is None for weights in conductor.weights.values())  # a numpy allocation


def test_share_host_weights_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LayerOffloadPlugin().share_host_weights == "auto"
    monkeypatch.setenv("ACCELERATE_OFFLOAD_SHARE_HOST_WEIGHTS", "false")
    plugin = LayerOffloadPlugin()
    assert plugin.share_host_weights is False and plugin.offload_settings("cuda").share_host_weights is False
    assert LayerOffloadPlugin(share_host_weights="AUTO").share_host_weights == "auto"
    with pytest.raises(OffloadConfigError, match="share_host_weights must be true, false or auto, got 'sometimes'"):
        LayerOffloadPlugin(share_host_weights="sometimes")
    with pytest.raises(OffloadConfigError, match="share_host_weights: true and max_ram do not combine"):
        LayerOffloadPlugin(share_host_weights=True, max_ram="1GB", offload_dir="blocks", layer_offload_fraction=1.0)
    with pytest.raises(ValueError, match="share_host_weights: true and max_ram do not combine"):
        offload_model(ToyTransformer(16, 2).requires_grad_(False), "cpu", block_names=["blocks"],
                      layer_offload_fraction=1.0, share_host_weights=True, max_ram="1GB", offload_dir="blocks")
