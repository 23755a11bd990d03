"""`max_ram`: streamed blocks past a host memory budget live in one block-ordered file and are read back per use.

The file holds each block's host buffer, 4 KiB aligned, in block order, written once from the model's weights
(block by block, each synced and dropped from the page cache before the next is filled) and reused while its key
(the blocks' tensor names, shapes and dtypes, a sample of their bytes, and the model files' sizes and modification
times where known) still matches. A block whose tensors the model's own safetensors files hold in the training dtype
(checked byte for byte once, then trusted while the files and the key are unchanged) is read in place from them
instead, tensor by tensor, and leaves a hole in the block file that takes no disk space. Reads go into a small ring
of staging buffers (pinned on CUDA), ahead of use on a worker thread, with O_DIRECT where the filesystem allows it
(the block file; the model's files are not page aligned) and `posix_fadvise(DONTNEED)` after every read either way:
the page cache must not grow, or it would push the pinned buffers toward swap and defeat the budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .block_weights import BlockWeights, pin_in_place

PAGE = 4096  # O_DIRECT wants offsets, lengths and addresses aligned to the logical block size; 4 KiB covers it
SAMPLE_STRIDE = 1 << 20  # bytes between the 64-byte samples hashed into the key


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class DiskRoomError(OSError):
    """The offload folder's disk lacks room for the block file."""


def _aligned(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def _fingerprint(host: torch.Tensor) -> str:
    """A sample of the block's bytes: every tensor's change of values shows unless it spares all sampled bytes."""
    data = host.numpy()
    digest = hashlib.sha256(data[:PAGE].tobytes())
    digest.update(data[PAGE::SAMPLE_STRIDE // 64 * 64][: 1 << 16].tobytes())
    digest.update(data[-PAGE:].tobytes())
    return digest.hexdigest()


def source_identity(source: str | os.PathLike | None) -> list:
    """Sizes and modification times of the weight files in a model folder (empty when the folder is unknown)."""
    if source is None or not Path(source).is_dir():
        return []
    files = sorted(p for p in Path(source).rglob("*") if p.suffix in {".safetensors", ".bin", ".pt", ".gguf"})
    return [[str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def safetensors_index(source: str | os.PathLike | None) -> dict[str, list[tuple[Path, str, list[int], int, int]]]:
    """Every tensor of the safetensors files in a model folder: name -> [(file, dtype, shape, offset, bytes)]."""
    index: dict[str, list[tuple[Path, str, list[int], int, int]]] = {}
    if source is None or not Path(source).is_dir():
        return index
    for path in sorted(Path(source).rglob("*.safetensors")):
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                entries = index.setdefault(name, [])
                entries.append((path, entry["dtype"], entry["shape"], 8 + length + start, end - start))
    return index


def in_place_plan(weights: BlockWeights, prefix: str, index: dict) -> list[tuple[Path, int, int, int]] | None:
    """(file, file offset, block offset, bytes) of each of the block's tensors where one file entry of its name (a
    PEFT layer's base weight under its plain name), dtype and shape holds it; None unless every tensor has one."""
    plan = []
    for name, offset, nbytes, dtype, shape in weights.tensors():
        key = f"{prefix}.{name}".replace(".base_layer.", ".")
        entries = [(path, start) for path, kind, dims, start, length in index.get(key, ())
                   if kind == SAFETENSORS_DTYPES.get(dtype) and dims == list(shape) and length == nbytes]
        if len(entries) != 1:
            return None
        plan.append((entries[0][0], entries[0][1], offset, nbytes))
    return plan


def _read_range(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count <= 0:
            break
        done += count
    return done


@dataclass
class _Staged:
    slot: int
    read: Future
    copied: torch.cuda.Event | None = None  # the last device copy out of the slot


class DiskTier:
    """The block file of the streamed blocks past the budget, and the staging ring they are read through.

    Built from the blocks' layouts (no host buffers yet); `store` then takes each block's bytes in block order,
    writing those the file on disk does not already hold, and `open` readies the reads once all are stored.
    """

    def __init__(
        self,
        weights: dict[int, BlockWeights],
        folder: str | os.PathLike,
        ring_size: int,
        pin_memory: bool,
        source: str | os.PathLike | None = None,
        prefixes: dict[int, str] | None = None,
    ) -> None:
        self.offsets: dict[int, int] = {}
        position = 0
        for index in sorted(weights):
            self.offsets[index] = position
            position += _aligned(weights[index].nbytes)
        self.nbytes = position
        self.sizes = {index: weights[index].nbytes for index in weights}
        layout = [[index, weights[index].names(), [str(d) for d in sorted(weights[index].dtypes(), key=str)],
                   weights[index].nbytes] for index in sorted(weights)]
        name = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]
        self._key = {"layout": layout, "source": source_identity(source), "content": [], "in_place": []}
        self.folder = Path(folder)
        self.path = self.folder / f"blocks-{name}.bin"
        self._stored = self._stored_key()
        files = safetensors_index(source) if prefixes else {}
        plans = {index: in_place_plan(weights[index], prefixes[index], files) for index in weights} if files else {}
        self._candidates = {index: plan for index, plan in plans.items() if plan is not None}
        self.in_place: dict[int, list[tuple[int, int, int, int]]] = {}  # block -> (fd, file offset, offset, bytes)
        self._source_fds: dict[Path, int] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_room(sum(_aligned(self.sizes[i]) for i in self.sizes if i not in self._candidates))
        self._ring_size, self._pin_memory = ring_size, pin_memory
        self._writer: int | None = None
        self.written = False
        self.bytes_read = 0

    def _check_room(self, needed: int) -> None:
        """Room for `needed` more bytes of block file (a file there already gives back what it holds)."""
        reclaimable = self.path.stat().st_blocks * 512 if self.path.is_file() else 0
        free = shutil.disk_usage(self.folder).free + reclaimable
        if free < needed:
            raise DiskRoomError(
                f"offload_dir {self.folder} has {free / 1e9:.2f} GB free but the block file needs {needed / 1e9:.2f} "
                "GB: free space there, point offload_dir at a larger disk, or raise max_ram"
            )

    def _stored_key(self) -> dict | None:
        """The key beside a complete file of this layout and source, else None."""
        sidecar = self.path.with_suffix(".json")
        if not (self.path.is_file() and self.path.stat().st_size == self.nbytes and sidecar.is_file()):
            return None
        stored = json.loads(sidecar.read_text())
        if [stored.get("layout"), stored.get("source")] != [self._key["layout"], self._key["source"]]:
            return None
        return stored

    def store(self, index: int, host: torch.Tensor) -> None:
        """Takes one block's host bytes (blocks in order): read in place from the model's files where they hold
        them, else written unless the block file holds them already."""
        position = len(self._key["content"])
        fingerprint = _fingerprint(host)
        self._key["content"].append(fingerprint)
        same = self._stored is not None and self._stored["content"][position] == fingerprint
        was_in_place = same and index in self._stored.get("in_place", [])
        if index in self._candidates and (was_in_place or self._matches_files(index, host)):
            self.in_place[index] = [(self._source_fd(path), start, offset, nbytes)
                                    for path, start, offset, nbytes in self._candidates[index]]
            self._key["in_place"].append(index)
            return
        if same and not was_in_place:
            return
        if self._writer is None:
            if index in self._candidates:  # not counted in the first check: its files differ from the model
                self._check_room(_aligned(self.sizes[index]))
            self.path.with_suffix(".json").unlink(missing_ok=True)  # a file cut short is never taken as valid
            self._writer = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        view, offset = memoryview(host.numpy()), self.offsets[index]
        while view:
            done = os.pwrite(self._writer, view, offset)
            view, offset = view[done:], offset + done
        os.fdatasync(self._writer)  # written back now, so its pages can leave the page cache now
        os.posix_fadvise(self._writer, self.offsets[index], _aligned(self.sizes[index]), os.POSIX_FADV_DONTNEED)
        self.written = True

    def _source_fd(self, path: Path) -> int:
        if path not in self._source_fds:
            self._source_fds[path] = os.open(path, os.O_RDONLY)
        return self._source_fds[path]

    def _matches_files(self, index: int, host: torch.Tensor) -> bool:
        """Whether the model's files hold exactly the block's bytes (read once, a tensor at a time)."""
        data = host.numpy()
        for path, start, offset, nbytes in self._candidates[index]:
            fd = self._source_fd(path)
            found = np.empty(nbytes, dtype=np.uint8)
            done = _read_range(fd, memoryview(found), start)
            os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
            if done != nbytes or not np.array_equal(found, data[offset : offset + nbytes]):
                return False
        return True

    def open(self) -> None:
        """Completes the file (its key beside it) once every block is stored, and readies the staging ring."""
        if len(self._key["content"]) != len(self.sizes):
            raise RuntimeError(f"{len(self._key['content'])} of {len(self.sizes)} blocks stored before open")
        if self._writer is None and self._key != self._stored:  # blocks newly in place: no bytes, a new key
            self.path.with_suffix(".json").unlink(missing_ok=True)
            self._writer = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        if self._writer is not None:
            os.ftruncate(self._writer, self.nbytes)  # blocks read in place are holes: no disk space
            os.fsync(self._writer)
            os.posix_fadvise(self._writer, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(self._writer)
            self._writer = None
            self.path.with_suffix(".json").write_text(json.dumps(self._key))
        self._direct = hasattr(os, "O_DIRECT")
        self._fds = [self._open()]  # one holder, so a reopen is what the finalizer closes
        slot_bytes = max(_aligned(n) for n in self.sizes.values())
        self._memory = np.empty(self._ring_size * slot_bytes + PAGE, dtype=np.uint8)
        base = -self._memory.ctypes.data % PAGE
        ring = torch.frombuffer(self._memory, dtype=torch.uint8, count=self._ring_size * slot_bytes, offset=base)
        if self._pin_memory:
            pin_in_place(self._memory, ring)
        self.staging_nbytes = self._ring_size * slot_bytes
        self.slots = [ring[i * slot_bytes : (i + 1) * slot_bytes] for i in range(self._ring_size)]
        self._free = list(range(self._ring_size))
        self._staged: dict[int, _Staged] = {}
        self._last_copy: dict[int, torch.cuda.Event | None] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="accelerate-offload-disk")
        weakref.finalize(self, _close, self._reader, self._fds, self._source_fds)

    def _open(self) -> int:
        if self._direct:
            try:
                return os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # tmpfs and some network filesystems refuse O_DIRECT
                self._direct = False
        return os.open(self.path, os.O_RDONLY)

    def _read_into(self, index: int, buffer: torch.Tensor, wait: torch.cuda.Event | None) -> None:
        if wait is not None:
            wait.synchronize()  # the slot's previous block is still being copied to the device
        if index in self.in_place:
            view = memoryview(buffer.numpy())
            for fd, start, offset, nbytes in self.in_place[index]:
                if _read_range(fd, view[offset : offset + nbytes], start) != nbytes:
                    raise OSError(f"short read of block {index}'s tensors from the model's files")
                os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
                self.bytes_read += nbytes
            return
        length, offset = _aligned(self.sizes[index]), self.offsets[index]
        view = memoryview(buffer.numpy())[:length]
        try:
            done = os.preadv(self._fds[0], [view], offset)
        except OSError:  # O_DIRECT refused at read time: reopen buffered
            if not self._direct:
                raise
            os.close(self._fds[0])
            self._direct = False
            self._fds = [self._open()]  # one holder, so a reopen is what the finalizer closes
            done = os.preadv(self._fds[0], [view], offset)
        if done < self.sizes[index]:
            raise OSError(f"short read of block {index} from {self.path}: {done} of {self.sizes[index]} bytes")
        os.posix_fadvise(self._fds[0], offset, length, os.POSIX_FADV_DONTNEED)
        self.bytes_read += length

    def prefetch(self, order: list[int]) -> None:
        """Starts reads for the disk blocks of `order` (soonest first) as slots allow; drops staged blocks not in it."""
        for index in [i for i in self._staged if i not in order]:
            self.release(index)
        for index in order:
            if index in self._staged:
                continue
            if not self._free:
                break
            slot = self._free.pop(0)
            self._staged[index] = _Staged(slot, self._reader.submit(
                self._read_into, index, self.slots[slot], self._last_copy.pop(slot, None)))

    def host(self, index: int) -> torch.Tensor:
        """The block's bytes in its staging slot, read now if no read was started."""
        if index not in self._staged:
            if not self._free:  # every slot holds a later block: the farthest gives way
                self.release(next(reversed(self._staged)))
            self.prefetch([index, *self._staged])
        staged = self._staged[index]
        staged.read.result()
        return self.slots[staged.slot][: self.sizes[index]]

    def copied(self, index: int, event: torch.cuda.Event | None) -> None:
        self._staged[index].copied = event

    def release(self, index: int) -> None:
        """Gives the block's slot back once its read is over; the next read into it waits for its device copy."""
        staged = self._staged.pop(index, None)
        if staged is None:
            return
        staged.read.result()
        self._last_copy[staged.slot] = staged.copied
        self._free.append(staged.slot)

    def read_whole(self, index: int) -> torch.Tensor:
        """A fresh host copy of one block, for making it resident."""
        memory = torch.empty(_aligned(self.sizes[index]) + PAGE, dtype=torch.uint8)
        base = -memory.data_ptr() % PAGE
        buffer = memory[base : base + _aligned(self.sizes[index])]
        self._reader.submit(self._read_into, index, buffer, None).result()
        return buffer[: self.sizes[index]]


def _close(reader: ThreadPoolExecutor, fds: list[int], source_fds: dict[Path, int]) -> None:
    reader.shutdown(wait=True)
    for fd in [fds[0], *source_fds.values()]:
        os.close(fd)


DISK_LOOKAHEAD = 2  # staging slots beyond the device prefetch: disk reads start this many blocks earlier


class RamBudgetError(ValueError):
    """`max_ram` is below the staging ring the disk blocks are read through."""


def blocks_past_budget(weights: dict[int, BlockWeights], budget: int, ring_size: int) -> list[int]:
    """The streamed blocks left for disk when the first ones fill `budget` bytes of host memory, the staging ring
    counted in when any block spills. The ring's slots hold the largest block on disk (Flux's single blocks are
    0.4x its double blocks), so the split that keeps the most blocks in host memory is searched for."""
    order = sorted(weights)
    sizes = [weights[i].nbytes for i in order]
    if sum(sizes) <= budget:
        return []
    for in_ram in range(len(order) - 1, -1, -1):
        ring = ring_size * max(_aligned(n) for n in sizes[in_ram:])
        if sum(sizes[:in_ram]) + ring <= budget:
            return order[in_ram:]
    raise RamBudgetError(
        f"max_ram {budget / 1e9:.2f} GB is below the {ring / 1e9:.2f} GB staging ring that disk blocks are read "
        "through: raise max_ram or lower prefetch_blocks"
    )
