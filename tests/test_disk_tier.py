"""`max_ram`: streamed blocks past the budget read from a block file give the all-RAM run's gradients exactly,
the file is reused while the model is unchanged, and reading it leaves the page cache as it was."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest
import torch

from accelerate_offload import get_conductor
from accelerate_offload.disk_tier import DiskRoomError, RamBudgetError
from test_runtime import lora_grads, offload, step, toy_inputs, toy_pair

DEPTH = 16  # toy blocks are 4.5 KiB: enough of them to outgrow the page-aligned staging ring


def block_bytes() -> int:
    _, model = toy_pair(DEPTH)
    return get_conductor(offload(model, layer_offload_fraction=1.0)).weights[0].nbytes


def budget_keeping(in_ram: int, prefetch_blocks: int = 1) -> int:
    """A `max_ram` that keeps `in_ram` blocks in host memory beside the staging ring."""
    nbytes = block_bytes()
    return (prefetch_blocks + 3) * -(-nbytes // 4096) * 4096 + in_ram * nbytes


def resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache, from mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as file:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
        vector = (ctypes.c_ubyte * pages)()
        try:
            if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    return sum(page & 1 for page in vector)


@pytest.mark.parametrize("fraction", [1.0, 0.75])
@pytest.mark.parametrize("activation_offloading", [False, True])
@pytest.mark.parametrize("prefetch_blocks", [0, 1, 2])
def test_disk_blocks_give_the_ram_run_bit_for_bit(
    tmp_path: Path, fraction: float, activation_offloading: bool, prefetch_blocks: int
) -> None:
    reference, on_disk = toy_pair(DEPTH)
    budget = budget_keeping(1, prefetch_blocks)
    offload(reference, layer_offload_fraction=fraction, activation_offloading=activation_offloading,
            prefetch_blocks=prefetch_blocks)
    offload(on_disk, layer_offload_fraction=fraction, activation_offloading=activation_offloading,
            prefetch_blocks=prefetch_blocks, max_ram=budget, offload_dir=str(tmp_path))
    conductor = get_conductor(on_disk)
    streamed = len(conductor.weights)
    assert len(conductor.disk.offsets) == streamed - 1
    for seed in range(2):
        inputs = toy_inputs(seed)
        assert torch.equal(step(on_disk, inputs), step(reference, inputs))
    expected, actual = lora_grads(reference), lora_grads(on_disk)
    assert expected.keys() == actual.keys() and expected
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    # every disk block read for its forward and its recomputation, bar the last one (kept for backward), two steps
    last = conductor.disk.nbytes // len(conductor.disk.offsets)
    assert conductor.disk.bytes_read >= 2 * (2 * conductor.disk.nbytes - last)
    with torch.no_grad():
        assert torch.equal(on_disk(*toy_inputs(3)), reference(*toy_inputs(3)))


def test_block_file_is_reused_and_rebuilt_when_the_model_changes(tmp_path: Path) -> None:
    budget = budget_keeping(1)
    _, first = toy_pair(DEPTH)
    disk = get_conductor(offload(first, layer_offload_fraction=1.0, max_ram=budget, offload_dir=str(tmp_path))).disk
    assert disk.written
    _, second = toy_pair(DEPTH)
    again = get_conductor(offload(second, layer_offload_fraction=1.0, max_ram=budget, offload_dir=str(tmp_path))).disk
    assert not again.written and again.path == disk.path
    reference, changed = toy_pair(DEPTH)
    with torch.no_grad():
        for model in (reference, changed):
            model.blocks[15].to_q.base_layer.weight.add_(1.0)
    rebuilt = get_conductor(offload(changed, layer_offload_fraction=1.0, max_ram=budget, offload_dir=str(tmp_path))).disk
    assert rebuilt.written
    assert torch.equal(step(changed, toy_inputs()), step(reference, toy_inputs()))


def test_reading_blocks_leaves_the_page_cache_alone(tmp_path: Path) -> None:
    _, model = toy_pair(DEPTH)
    budget = budget_keeping(1)
    disk = get_conductor(offload(model, layer_offload_fraction=1.0, max_ram=budget, offload_dir=str(tmp_path))).disk
    assert resident_pages(disk.path) == 0  # the write dropped its pages too
    step(model, toy_inputs())
    assert disk.bytes_read > 0 and resident_pages(disk.path) == 0
    disk.path.read_bytes()  # an ordinary read: the check sees pages it leaves behind
    assert resident_pages(disk.path) > 0


def test_a_disk_without_room_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    _, model = toy_pair(DEPTH)
    with pytest.raises(DiskRoomError, match=r"^offload_dir .* has 0.00 GB free but the block file needs") as error:
        offload(model, layer_offload_fraction=1.0, max_ram=4 * 8192, offload_dir=str(tmp_path))
    assert "\n" not in str(error.value) and list(tmp_path.iterdir()) == []


def test_budget_below_the_staging_ring_is_refused() -> None:
    _, model = toy_pair(DEPTH)
    with pytest.raises(RamBudgetError, match="below the .* staging ring"):
        offload(model, layer_offload_fraction=1.0, max_ram=1000, offload_dir="unused")


def test_plugin_reads_max_ram_and_offload_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate_offload import LayerOffloadPlugin, OffloadConfigError

    monkeypatch.setenv("ACCELERATE_OFFLOAD_MAX_RAM", "12GB")
    monkeypatch.setenv("ACCELERATE_OFFLOAD_OFFLOAD_DIR", "blocks")
    plugin = LayerOffloadPlugin(layer_offload_fraction=1.0)
    settings = plugin.offload_settings("cuda")
    assert (settings.max_ram, settings.offload_dir) == ("12GB", "blocks")
    assert plugin.offload_settings("cpu").max_ram is None  # nothing streams without CUDA
    monkeypatch.delenv("ACCELERATE_OFFLOAD_OFFLOAD_DIR")
    with pytest.raises(OffloadConfigError, match="set offload_dir"):
        LayerOffloadPlugin(layer_offload_fraction=1.0)
    with pytest.raises(OffloadConfigError, match="max_ram must look like"):
        LayerOffloadPlugin(layer_offload_fraction=1.0, max_ram="lots", offload_dir="blocks")
