"""The shared training utilities: checkpoints are published only complete, pruned only after, resumed only whole;
metrics.jsonl is synced line by line and cut back to the step a run resumes from."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from accelerate_offload import training_utils as tu


def write_checkpoint(output_dir: Path, step: int, fail: bool = False) -> Path:
    """A save as the scripts do it: files into the partial folder, then published."""
    partial = tu.partial_checkpoint(output_dir, step)
    partial.mkdir(parents=True)
    (partial / "weights.bin").write_bytes(bytes([step]) * 16)
    if fail:
        raise OSError(errno.ENOSPC, "No space left on device")
    return tu.publish_checkpoint(partial)


def test_failed_save_leaves_earlier_checkpoints_and_latest_skips_it(tmp_path):
    first, second = write_checkpoint(tmp_path, 1), write_checkpoint(tmp_path, 2)
    with pytest.raises(OSError):
        write_checkpoint(tmp_path, 3, fail=True)
    (tmp_path / "checkpoint-4.deleting").mkdir()
    assert tu.checkpoint_dirs(tmp_path) == [first, second]
    assert tu.latest_checkpoint(tmp_path) == second
    assert (second / "weights.bin").read_bytes() == bytes([2]) * 16
    assert [p.name for p in tu.unfinished_checkpoints(tmp_path)] == ["checkpoint-3.tmp", "checkpoint-4.deleting"]


def test_publish_replaces_a_checkpoint_of_the_same_step(tmp_path):
    write_checkpoint(tmp_path, 5)
    (tmp_path / "checkpoint-5" / "stale").write_text("from an earlier run")
    final = write_checkpoint(tmp_path, 5)
    assert sorted(p.name for p in final.iterdir()) == ["weights.bin"]
    assert tu.unfinished_checkpoints(tmp_path) == []


def test_prune_keeps_the_newest_and_never_the_unfinished(tmp_path):
    for step in (2, 4, 10):
        write_checkpoint(tmp_path, step)
    tu.partial_checkpoint(tmp_path, 12).mkdir()  # a save still being written counts for nothing
    newest = write_checkpoint(tmp_path, 11)
    removed = tu.prune_checkpoints(tmp_path, 2, newest)
    assert [p.name for p in removed] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in tu.checkpoint_dirs(tmp_path)] == ["checkpoint-10", "checkpoint-11"]
    assert tu.prune_checkpoints(tmp_path, None, newest) == []


def test_write_aside_keeps_the_earlier_file_when_the_writer_fails(tmp_path):
    (tmp_path / "lora.safetensors").write_bytes(b"earlier")

    def failing(folder: Path) -> None:
        folder.mkdir()
        (folder / "lora.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        tu.write_aside(failing, tmp_path, "lora.safetensors")
    assert (tmp_path / "lora.safetensors").read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]

    def writer(folder: Path) -> None:
        folder.mkdir()
        (folder / "lora.safetensors").write_bytes(b"new")

    tu.write_aside(writer, tmp_path, "lora.safetensors")
    assert (tmp_path / "lora.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_finite_checks():
    assert tu.step_is_finite(0.5, 1.0) and tu.step_is_finite(0.5)
    assert not tu.step_is_finite(float("nan")) and not tu.step_is_finite(0.5, float("inf"))
    layer = torch.nn.Linear(2, 2)
    assert tu.trainable_is_finite(layer)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    assert not tu.trainable_is_finite(layer)
    layer.weight.requires_grad_(False)  # frozen base weights are not checked
    assert tu.trainable_is_finite(layer)


def test_metrics_keep_the_steps_up_to_the_checkpoint_resumed_from(tmp_path: Path) -> None:
    log = tu.MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for step in (1, 2, 3):
        log.write({"step": step})

    log.drop_after(2)
    assert [record["step"] for record in log.records()] == [1, 2]
    log.drop_after(0)  # a new run in the same folder
    assert log.path.read_text() == ""
    tu.MetricsLog(tmp_path / "other.jsonl", enabled=False).write({"step": 1})  # a process that is not the main one
    assert not (tmp_path / "other.jsonl").exists()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path: Path, monkeypatch) -> None:
    log = tu.MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    synced = []  # what the file held each time it was synced
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(log.path.read_text()), real_fsync(fd)))
    for step in (1, 2, 3):
        log.write({"step": step})
    monkeypatch.undo()
    assert synced == ['{"step": 1}\n', '{"step": 1}\n{"step": 2}\n', '{"step": 1}\n{"step": 2}\n{"step": 3}\n']
    with log.path.open("a") as file:
        file.write('{"step": 4, "lo')  # killed, or the disk filled, half-way through a line

    log.drop_after(3)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3]
    log.path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(tu.MetricsFileError, match=r"metrics.jsonl line 2 is not JSON; fix or delete that line"):
        log.drop_after(3)
    assert log.path.read_text() == '{"step": 1}\n{"st\n{"step": 3}\n'  # nothing lost


def test_validation_loss_every_n_steps_and_at_the_last() -> None:
    assert [step for step in range(1, 8) if tu.validation_loss_due(step, 7, 3)] == [3, 6, 7]
    assert [step for step in range(1, 8) if tu.validation_loss_due(step, 7, None)] == [7]
