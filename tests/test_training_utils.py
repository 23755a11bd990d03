"""The shared training utilities: checkpoints are published only complete, pruned only after, resumed only whole;
the scripts' one-line errors; metrics.jsonl is synced line by line and cut back to the step a run resumes from."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from safetensors.torch import save_file

from accelerate_offload import training_utils as tu
from accelerate_offload.script_errors import TrainingFault, UsageError


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


def test_script_errors_are_one_line_with_their_exit_status(capsys):
    for error, status in ((UsageError("pass --rank 4"), 2), (TrainingFault("step 3: the loss is nan"), 1)):
        with pytest.raises(SystemExit) as stopped:
            error.exit()
        assert stopped.value.code == status
        assert capsys.readouterr().err == f"error: {error}\n"


def test_the_main_process_saves_and_every_one_where_the_state_is_sharded():
    for kind, main, saves in (
        (DistributedType.MULTI_GPU, True, True),
        (DistributedType.MULTI_GPU, False, False),
        (DistributedType.DEEPSPEED, False, True),
        (DistributedType.FSDP, False, True),
    ):
        assert tu.saves_state(SimpleNamespace(is_main_process=main, distributed_type=kind)) is saves, kind


@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    accelerator.prepare(model, optimizer)
    yield accelerator
    AcceleratorState._reset_state(True)


def test_save_checkpoint_publishes_prunes_and_survives_a_full_disk(accelerator, tmp_path, monkeypatch):
    for step in (1, 2, 3):
        assert tu.save_checkpoint(accelerator, tmp_path, step, keep=2) == tmp_path / f"checkpoint-{step}"
    assert [p.name for p in tu.checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / "optimizer.bin").is_file()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(TrainingFault, match=r"^could not save checkpoint-4 at step 4 \(OSError: .*No space") as fault:
        tu.save_checkpoint(accelerator, tmp_path, 4, keep=2)
    assert f"{tmp_path / 'checkpoint-3'} is intact" in str(fault.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def write_lora(checkpoint: Path, rank: int, layers: list[str]) -> Path:
    """A checkpoint's LoRA file as diffusers writes it: transformer.<module>.lora_A/B.weight."""
    checkpoint.mkdir(parents=True)
    tensors = {}
    for layer in layers:
        tensors[f"transformer.blocks.0.{layer}.lora_A.weight"] = torch.zeros(rank, 8)
        tensors[f"transformer.blocks.0.{layer}.lora_B.weight"] = torch.zeros(8, rank)
    save_file(tensors, checkpoint / tu.LORA_WEIGHT_NAME)
    return checkpoint


def test_resume_checks_name_the_problem_and_the_next_usable_checkpoint(tmp_path):
    layers = ["attn.to_q", "attn.to_k"]
    assert tu.output_dir_problem(tmp_path / "new", None, 4, layers) is None
    assert tu.output_dir_problem(tmp_path / "new", "latest", 4, layers) is None  # a new run
    two = write_lora(tmp_path / "checkpoint-2", 4, layers)
    four = write_lora(tmp_path / "checkpoint-4", 4, layers)
    tu.partial_checkpoint(tmp_path, 6).mkdir()  # never resumed from
    assert tu.resolve_checkpoint(tmp_path, "latest") == four
    assert tu.resolve_checkpoint(tmp_path, "checkpoint-2") == tu.resolve_checkpoint(tmp_path, str(two)) == two
    assert tu.resolve_checkpoint(tmp_path, "checkpoint-6.tmp") is None
    assert tu.output_dir_problem(tmp_path, "latest", 4, layers) is None

    assert "holds an earlier run (checkpoint-2, checkpoint-4, checkpoint-6.tmp)" in tu.output_dir_problem(
        tmp_path, None, 4, layers
    )
    assert tu.output_dir_problem(tmp_path, "checkpoint-7", 4, layers) == (
        "--resume_from_checkpoint checkpoint-7 not found; give a checkpoint-N folder or 'latest'"
    )
    assert tu.output_dir_problem(tmp_path, "latest", 8, layers) == (
        f"cannot resume from {four}: its LoRA has rank 4, --rank is 8 (pass --rank 4 to continue it); no earlier "
        "checkpoint is usable"
    )
    assert "it has no LoRA on attn.to_v; pass the --lora_layers" in tu.resume_problem(four, 4, [*layers, "attn.to_v"])
    assert "it has LoRA layers not in --lora_layers (blocks.0.attn.to_k" in tu.resume_problem(four, 4, ["attn.to_q"])
    (four / "optimizer.bin").write_bytes(b"cut short")
    problem = tu.resume_problem(four, 4, layers)
    assert problem.startswith(f"cannot resume from {four}: its optimizer.bin cannot be read (")
    assert problem.endswith(f"the next usable earlier checkpoint is {two}: resume with --resume_from_checkpoint {two}")
    assert tu.last_checkpoint_note(tmp_path).startswith(f"the last good checkpoint is {four}; continue from it")
    assert tu.last_checkpoint_note(tmp_path / "new") == "no checkpoint was saved yet"


def test_the_error_line_comes_after_the_progress_bar_of_the_failed_run(tmp_path):
    """The bar a failed run held closes before `exit` prints, also when the error replaced another one."""
    script = tmp_path / "fails.py"
    script.write_text(
        "from tqdm.auto import tqdm\n"
        "from accelerate_offload.script_errors import ScriptError, TrainingFault\n"
        "def main():\n"
        "    bar = tqdm(range(4))\n"
        "    try:\n"
        "        raise torch_error\n"
        "    except RuntimeError:\n"
        "        raise TrainingFault('step 1: out of memory') from None\n"
        "torch_error = RuntimeError('CUDA out of memory')\n"
        "try:\n"
        "    main()\n"
        "except ScriptError as error:\n"
        "    error.exit()\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: step 1: out of memory"
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
