"""What the training scripts must get right and users never edit.

Outputs with the modes of ordinary files, checkpoints that a crash or a full disk never leaves half-written and
that are checked before a run resumes from them, the per-step metrics file continued on resume, finite checks,
stop signals that all processes act on at the same step, and the latent cache of `--cache_latents`, sampled as
the VAE samples so that a cached run trains on the latents an uncached one would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import DistributedType
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .adapters import module_of
from .script_errors import TrainingFault

if TYPE_CHECKING:
    from .ema import AdapterEMA

logger = logging.getLogger(__name__)


@cache
def _umask() -> int:
    """The process's umask, read without changing it where Linux allows; else set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_modes(path: str | os.PathLike) -> None:
    """Gives `path` (a file, or a folder and everything in it) the mode the user's umask gives a new one.

    safetensors creates its files readable by their owner only, so a LoRA would be unreadable to a serving
    process under another user or a teammate's sync; every other output already gets the umask's mode.
    """
    path = Path(path)
    file_mode, folder_mode = 0o666 & ~_umask(), 0o777 & ~_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            item.chmod(folder_mode if item.is_dir() else file_mode)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written aside, synced, renamed into place; pruned only once the new one is complete
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
# The LoRA inside a checkpoint and beside it, in diffusers' format (what `load_lora_weights` reads).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# A checkpoint is written under this suffix and renamed into place once complete; `latest` never picks one up.
PARTIAL_SUFFIX = ".tmp"
# A checkpoint being deleted is renamed to this suffix first, so a crash never leaves a half-deleted checkpoint-N.
DELETING_SUFFIX = ".deleting"


def checkpoint_step(path: Path) -> int:
    """The step N of a `checkpoint-N` folder."""
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The complete `checkpoint-N` folders of `output_dir`, oldest first (one being written or deleted has a suffix)."""
    if not output_dir.is_dir():
        return []
    found = [
        path
        for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if path.is_dir() and path.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=checkpoint_step)


def partial_checkpoint(output_dir: Path, step: int) -> Path:
    """Where checkpoint-`step` is written before it is renamed into place."""
    return output_dir / f"{CHECKPOINT_PREFIX}{step}{PARTIAL_SUFFIX}"


def unfinished_checkpoints(output_dir: Path) -> list[Path]:
    """Folders left by saves or deletions that a crash or a full disk interrupted; never resumed from."""
    if not output_dir.is_dir():
        return []
    return [
        path
        for path in sorted(output_dir.glob(f"{CHECKPOINT_PREFIX}*.*"))
        if path.is_dir() and path.suffix in (PARTIAL_SUFFIX, DELETING_SUFFIX)
    ]


def sync_to_disk(folder: Path) -> None:
    """fsync of every file and of the folder, so the rename that follows publishes complete files."""
    if os.name != "posix":  # folders cannot be opened for fsync on Windows
        return
    for path in [*folder.rglob("*"), folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def remove_folder(path: Path) -> None:
    """Renames, then deletes: a crash mid-way never leaves a half-deleted checkpoint-N for `latest` to pick."""
    doomed = path.with_name(f"{path.name}{DELETING_SUFFIX}")
    path.rename(doomed)
    shutil.rmtree(doomed)


def publish_checkpoint(partial: Path) -> Path:
    """Syncs the written `partial` folder and renames it to its checkpoint-N name (replacing an older one of it)."""
    final = partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX))
    sync_to_disk(partial)
    if final.exists():  # from a run that went further before this one resumed from an earlier checkpoint
        remove_folder(final)
    partial.rename(final)
    sync_to_disk(final.parent)
    return final


def prune_checkpoints(output_dir: Path, keep: int | None, newest: Path) -> list[Path]:
    """Deletes the oldest checkpoints so that `keep` remain with `newest`, which must already be complete."""
    if keep is None:
        return []
    older = [folder for folder in checkpoint_dirs(output_dir) if folder != newest]
    doomed = older[: max(0, len(older) + 1 - keep)]
    for old in doomed:
        remove_folder(old)
    return doomed


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in `output_dir`, if any."""
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def remove_unfinished_checkpoints(output_dir: Path) -> None:
    """Deletes what interrupted saves left (never resumed from); the main process calls it once it has resumed."""
    for unfinished in unfinished_checkpoints(output_dir):
        logger.warning("Removing %s, left by a save that did not finish", unfinished)
        shutil.rmtree(unfinished)


# accelerate shards these states across processes: every process must call save_state.
SHARDED_STATES = (DistributedType.DEEPSPEED, DistributedType.FSDP)


def saves_state(accelerator) -> bool:
    """Whether this process writes checkpoints: the main one, as in diffusers' scripts, or all of them where the
    state is sharded (DeepSpeed, FSDP)."""
    return accelerator.is_main_process or accelerator.distributed_type in SHARDED_STATES


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int | None) -> Path:
    """Saves the training state as `output_dir/checkpoint-<step>`, then deletes the oldest so that `keep` remain.

    Every process calls it; those `saves_state` picks write `checkpoint-<step>.tmp` with accelerate's `save_state`,
    and the main process syncs it and renames it into place. A crash or a full disk mid-save leaves every earlier
    checkpoint as it was (a full disk raises a `TrainingFault` naming the newest one); old checkpoints are deleted
    only once the new one is complete.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    if not saves_state(accelerator):
        return final
    sharded = accelerator.num_processes > 1 and accelerator.distributed_type in SHARDED_STATES
    partial = partial_checkpoint(output_dir, step)
    try:
        if accelerator.is_main_process and partial.exists():  # left by a run that crashed at this step
            shutil.rmtree(partial)
        if sharded:
            accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        if sharded:
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish_checkpoint(partial)
    except (OSError, RuntimeError, SafetensorError) as error:  # how a full disk shows in open, torch.save, safetensors
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        previous = checkpoint_dirs(output_dir)
        kept = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise TrainingFault(
            f"could not save {final.name} at step {step} ({type(error).__name__}: {error}); {kept}. "
            "Free disk space, then run the same command with --resume_from_checkpoint latest"
        ) from None
    if accelerator.is_main_process:
        logger.info("Saved state to %s", final)
        for old in prune_checkpoints(output_dir, keep, final):
            logger.info("Removed %s (--checkpoints_total_limit %d)", old, keep)
    if sharded:
        accelerator.wait_for_everyone()
    return final


def last_checkpoint_note(output_dir: Path) -> str:
    """How a run that stopped on a fault goes on: from its newest complete checkpoint, if it saved one."""
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return "no checkpoint was saved yet"
    return f"the last good checkpoint is {latest}; continue from it with --resume_from_checkpoint latest"


# ----------------------------------------------------------------------------------------------------------------
# Resume checks: read before any model loads, so a checkpoint that cannot resume costs seconds and one line
# ----------------------------------------------------------------------------------------------------------------


def resolve_checkpoint(output_dir: Path, name: str) -> Path | None:
    """The checkpoint `--resume_from_checkpoint name` means: 'latest', a `checkpoint-N` path, or one in `output_dir`."""
    if name == "latest":
        return latest_checkpoint(output_dir)
    for candidate in (Path(name), output_dir / name):
        step = candidate.name.removeprefix(CHECKPOINT_PREFIX)
        if candidate.is_dir() and candidate.name.startswith(CHECKPOINT_PREFIX) and step.isdigit():
            return candidate
    return None


CheckpointCheck = Callable[[Path, dict[str, list[int]]], "str | None"]


def lora_checkpoint_problem(
    checkpoint: Path, rank: int, lora_layers: Sequence[str], adapter_problem: CheckpointCheck | None = None
) -> str | None:
    """What stops `checkpoint` from resuming an adapter of `rank` on `lora_layers` (a file cut short, another rank
    or other layers, or what `adapter_problem(checkpoint, shapes)` finds: another adapter type), if anything."""
    try:
        with safe_open(checkpoint / LORA_WEIGHT_NAME, "pt") as lora:
            shapes = {key: lora.get_slice(key).get_shape() for key in lora.keys()}
    except (OSError, SafetensorError) as error:
        return f"its {LORA_WEIGHT_NAME} cannot be read ({str(error).splitlines()[0]})"
    ranks = sorted({shape[0] for key, shape in shapes.items() if ".lora_A." in key})
    if ranks and ranks != [rank]:
        found = ", ".join(map(str, ranks))
        return f"its LoRA has rank {found}, --rank is {rank} (pass --rank {found} to continue it)"
    problem = adapter_problem(checkpoint, shapes) if adapter_problem is not None else None
    if problem:
        return problem
    modules = {module_of(key) for key in shapes if not key.endswith(".alpha")}

    def trained(module: str, target: str) -> bool:
        return module == target or module.endswith(f".{target}")

    covered = {target for target in lora_layers for module in modules if trained(module, target)}
    stray = sorted(module for module in modules if not any(trained(module, target) for target in lora_layers))
    if stray or covered != set(lora_layers):
        missing = sorted(set(lora_layers) - covered)
        detail = f"LoRA layers not in --lora_layers ({stray[0]}, ...)" if stray else f"no LoRA on {', '.join(missing)}"
        return f"it has {detail}; pass the --lora_layers it was trained with"
    for state in sorted([*checkpoint.glob("*.bin"), *checkpoint.glob("*.pkl")]):
        try:
            torch.load(state, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            return f"its {state.name} cannot be read ({str(error).splitlines()[0][:120]}); it was cut short or damaged"
    return None


def resume_problem(
    checkpoint: Path, rank: int, lora_layers: Sequence[str], adapter_problem: CheckpointCheck | None = None
) -> str | None:
    """Why a run cannot resume from `checkpoint`, with the newest earlier checkpoint that it can resume from."""
    problem = lora_checkpoint_problem(checkpoint, rank, lora_layers, adapter_problem)
    if problem is None:
        return None
    step = checkpoint_step(checkpoint)
    earlier = [path for path in checkpoint_dirs(checkpoint.parent) if checkpoint_step(path) < step]
    fitting = (
        path for path in reversed(earlier) if lora_checkpoint_problem(path, rank, lora_layers, adapter_problem) is None
    )
    usable = next(fitting, None)
    fallback = (
        f"the next usable earlier checkpoint is {usable}: resume with --resume_from_checkpoint {usable}"
        if usable
        else "no earlier checkpoint is usable"
    )
    return f"cannot resume from {checkpoint}: {problem}; {fallback}"


def output_dir_problem(
    output_dir: Path,
    resume_from: str | None,
    rank: int,
    lora_layers: Sequence[str],
    adapter_problem: CheckpointCheck | None = None,
) -> str | None:
    """One rule for an --output_dir that holds another run: continue it from a checkpoint that fits, or use a new
    folder; a new run never writes over or beside an earlier one."""
    found = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    if resume_from is None:
        if not found:
            return None
        return (
            f"--output_dir {output_dir} holds an earlier run ({shown}): add --resume_from_checkpoint latest to "
            "continue it, or choose a new --output_dir"
        )
    checkpoint = resolve_checkpoint(output_dir, resume_from)
    if checkpoint is not None:
        return resume_problem(checkpoint, rank, lora_layers, adapter_problem)
    if resume_from != "latest":
        return f"--resume_from_checkpoint {resume_from} not found; give a checkpoint-N folder or 'latest'"
    if found:
        return (
            f"--output_dir {output_dir} holds an earlier run ({shown}) but no checkpoint to continue from: choose a "
            "new --output_dir"
        )
    return None  # 'latest' in a new folder starts a new run


def write_aside(write: Callable[[Path], None], output_dir: Path, file_name: str) -> Path:
    """Calls `write(folder)` on a folder beside `output_dir/file_name` and renames the file it wrote over that name.

    A crash or a full disk mid-write never leaves a half-written file under the final name; an earlier one stays.
    """
    partial = output_dir / f".{Path(file_name).stem}{PARTIAL_SUFFIX}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write(partial)
        give_default_modes(partial / file_name)
        sync_to_disk(partial)
        os.replace(partial / file_name, output_dir / file_name)
        sync_to_disk(output_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return output_dir / file_name


def save_adapter_files(
    pipeline_class,
    family: str,
    model: torch.nn.Module,
    output_dir: Path,
    save_format: str,
    ema: AdapterEMA | None,
    dtype: torch.dtype | None = None,
) -> None:
    """Every file a run ends with, each written aside and renamed: the adapter, its kohya-keyed copy under
    --save_format kohya, and the same for the adapter's average under --use_ema (`ema`), in `dtype` (None: as
    trained; diffusers' scripts save in the training dtype unless --upcast_before_saving)."""
    from .adapters import KOHYA_WEIGHT_NAME, ema_weight_name, save_formats, write_adapter_file
    from .lora_formats import write_kohya_file

    def write_all(averaged: bool) -> None:
        name = ema_weight_name(LORA_WEIGHT_NAME) if averaged else LORA_WEIGHT_NAME
        write_aside(lambda folder: write_adapter_file(pipeline_class, model, folder, name, dtype), output_dir, name)
        if "kohya" in save_formats(save_format):
            kohya = ema_weight_name(KOHYA_WEIGHT_NAME) if averaged else KOHYA_WEIGHT_NAME
            write_aside(lambda folder: write_kohya_file(model, family, folder / kohya, dtype), output_dir, kohya)

    write_all(averaged=False)
    if ema is not None:
        with ema.averaged(model):
            write_all(averaged=True)


# ----------------------------------------------------------------------------------------------------------------
# metrics.jsonl: one synced line per optimizer step, cut back to the checkpoint a run resumes from
# ----------------------------------------------------------------------------------------------------------------


class MetricsFileError(ValueError):
    """A line before the last one of metrics.jsonl is not JSON: not a torn write, so the user fixes the file."""


class MetricsLog:
    """One JSON line per optimizer step in output_dir/metrics.jsonl, for scripts and for comparing runs."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled  # the main process writes; the others keep no file

    def write(self, record: dict) -> None:
        """Appends one line and syncs it: a crash or a full disk can tear only the line being written."""
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
                file.flush()
                os.fsync(file.fileno())

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def drop_after(self, step: int) -> None:
        """Keeps the records up to `step` (all of them when resuming there; none for a new run).

        A torn last line (the process died while writing it) is dropped; a torn line before it raises
        MetricsFileError. The file is rewritten aside and renamed, so a crash here loses nothing.
        """
        if not self.enabled or not self.path.exists():
            return
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except json.JSONDecodeError:
                if number < len(lines):
                    raise MetricsFileError(
                        f"{self.path} line {number} is not JSON; fix or delete that line, then run again"
                    ) from None
                logger.warning("Dropping the half-written last line of %s", self.path)
        partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        partial.write_text("".join(kept), encoding="utf-8")
        os.replace(partial, self.path)


def validation_loss_due(step: int, max_steps: int, every: int | None) -> bool:
    """The validation loss is measured every `every` steps (--validation_steps) and at the last step."""
    return step >= max_steps or (every is not None and step % every == 0)


# ----------------------------------------------------------------------------------------------------------------
# Finite checks and stop signals
# ----------------------------------------------------------------------------------------------------------------


def step_is_finite(loss: float, grad_norm: float | None = None) -> bool:
    """Whether a step's loss (and gradient norm, where clipped) can be applied."""
    return math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))


def trainable_is_finite(model: torch.nn.Module) -> bool:
    """Whether every trainable parameter (the LoRA) is finite; a huge learning rate can overflow the weights."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` is set on any process, so that all of them act at the same step (one all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(tensor, reduction="sum").item() > 0)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM ask for a checkpoint at the next step boundary; a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}

    def _handle(self, number: int, frame) -> None:
        self.received = signal.Signals(number)
        self.restore()
        # os.write, not print: the signal may arrive while the progress bar holds the stderr buffer
        os.write(2, f"\n{self.received.name}: saving a checkpoint after this step (again to stop now)\n".encode())

    def restore(self) -> None:
        """Puts back the handlers there were before, so that a further signal acts as usual."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def requested(self, accelerator) -> bool:
        """Whether any process got a signal (all of them stop together)."""
        return any_process(accelerator, self.received is not None)


# ----------------------------------------------------------------------------------------------------------------
# --cache_latents: every dataset item encoded once, kept in CPU memory, sampled at every step
# ----------------------------------------------------------------------------------------------------------------

LatentDistribution = tuple[torch.Tensor, torch.Tensor]  # the VAE posterior's mean and std


def encode_latent_distribution(vae: torch.nn.Module, pixels: torch.Tensor) -> LatentDistribution:
    """Mean and std of the VAE posterior of `pixels`; a step samples from them (`sample_latents`), cached or not."""
    with torch.no_grad():
        distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return distribution.mean, distribution.std


def sample_latents(distribution: LatentDistribution, generator: torch.Generator | None = None) -> torch.Tensor:
    """`mean + std * noise`, the noise drawn as the VAE's `latent_dist.sample(generator)` draws it: on the
    generator's device (the mean's default generator without one), so cached latents are the ones encoding gives."""
    mean, std = distribution
    device = mean.device if generator is None else generator.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    return mean + std * noise.to(mean.device)


@dataclass
class LatentCache:
    """Each dataset item's VAE posterior (rows: its instance image, then its class image) and loss mask, on the CPU.

    The VAE then leaves the GPU for the whole of training; each item keeps the crop and flip it was cached with.
    """

    distributions: dict[int, LatentDistribution]
    masks: dict[int, torch.Tensor]  # empty without loss masks

    @property
    def nbytes(self) -> int:
        tensors = [part for pair in self.distributions.values() for part in pair] + list(self.masks.values())
        return sum(tensor.nbytes for tensor in tensors)

    def distribution(self, indices: Sequence[int]) -> LatentDistribution:
        """A batch's posterior, ordered as the scripts collate pixels: every instance image, then every class image."""
        parts = [self.distributions[index] for index in indices]
        means = torch.cat([mean[:1] for mean, _ in parts] + [mean[1:] for mean, _ in parts])
        stds = torch.cat([std[:1] for _, std in parts] + [std[1:] for _, std in parts])
        return means, stds

    def batch_masks(self, batch: dict) -> torch.Tensor | None:
        """The batch's pixel masks as cached (class images all ones), for its `indices`; None without masks."""
        if "masks" not in batch:
            return None
        instance = [self.masks[index] for index in batch["indices"]]
        return torch.stack(instance + [torch.ones_like(instance[0])] * (len(batch["masks"]) - len(instance)))


def cache_latents(
    vae: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    pixels: Callable[[dict], torch.Tensor],
    show_progress: bool = True,
) -> LatentCache:
    """Encodes every item of `dataset` once, as the dataset crops and flips it now; `pixels` gives an item's rows.

    An item's `"mask"`, if it has one, is kept with its latents: cropped and flipped as they were.
    """
    cached = LatentCache({}, {})
    for index in tqdm(range(len(dataset)), desc="Caching latents", disable=not show_progress):
        item = dataset[index]
        mean, std = encode_latent_distribution(vae, pixels(item))
        cached.distributions[index] = (mean.cpu(), std.cpu())
        if "mask" in item:
            cached.masks[index] = item["mask"]
    return cached
