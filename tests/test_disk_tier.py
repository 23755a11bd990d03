"""`max_ram`: streamed blocks past the budget read from a block file give the all-RAM run's gradients exactly,
the file is reused while the model is unchanged, and reading it leaves the page cache as it was."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accelerate_offload import get_conductor, offload_model
from accelerate_offload.disk_tier import DiskRoomError, RamBudgetError
from accelerate_offload.planner import SAFETY_MARGIN, VramPlanner
from test_models import flux_inputs, tiny_flux, with_lora
from test_runtime import lora_grads, offload, step, toy_inputs, toy_pair
from toy_models import ToyTransformer, add_lora

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


def test_max_vram_makes_the_disk_blocks_resident_first(tmp_path: Path) -> None:
    """With `max_vram` too, the planner's room goes to blocks read from disk: each saves two reads a step, and the
    pinned blocks stay streamed from RAM. The gradients stay the all-RAM run's."""
    reference, on_disk = toy_pair(DEPTH)
    offload(reference, layer_offload_fraction=1.0)
    offload(on_disk, layer_offload_fraction=1.0, max_ram=budget_keeping(4), offload_dir=str(tmp_path))
    conductor = get_conductor(on_disk)
    on_file = sorted(conductor.disk.offsets)
    in_ram = sorted(set(conductor.weights) - set(on_file))
    assert len(in_ram) == 4 and conductor.residency_order() == on_file + in_ram
    block, read_per_block = conductor.weights[0].nbytes, conductor.disk.nbytes // len(on_file)  # reads are aligned
    planner = VramPlanner(int((10 * block + 3.5 * block) / (1 - SAFETY_MARGIN)) + 1, torch.device("cpu"), 0)
    resident, _ = planner.plan(conductor.weights, conductor.prefetch_blocks, 10 * block, conductor.residency_order())
    assert resident == on_file[:3]
    conductor.make_resident(resident)
    assert sorted(i for i in conductor.weights if conductor.is_on_disk(i)) == on_file[3:]
    read_before = conductor.disk.bytes_read
    for seed in range(2):
        inputs = toy_inputs(seed)
        assert torch.equal(step(on_disk, inputs), step(reference, inputs))
    expected, actual = lora_grads(reference), lora_grads(on_disk)
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    # two steps read each block still on disk twice at most (forward and recomputation), the resident ones never
    assert 0 < conductor.disk.bytes_read - read_before <= 2 * 2 * (len(on_file) - 3) * read_per_block


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


SETUP_PROBE = """
import sys, threading, time
import torch
from accelerate_offload import get_conductor, offload_model
from accelerate_offload.memory import host_memory
from toy_models import ToyTransformer, add_lora

width, depth, in_ram, folder, weights_file = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
with torch.device("meta"):
    model = add_lora(ToyTransformer(width, depth), ["to_q"])
model.load_state_dict(torch.load(weights_file, mmap=True, weights_only=True), assign=True)  # file-backed pages
block = sum(-(-t.numel() * t.element_size() // 256) * 256 for name, t in model.blocks[0].state_dict().items()
            if "lora" not in name)
ring = 4 * -(-block // 4096) * 4096
budget = ring + in_ram * block
peak, before, done = [0], host_memory()["RssAnon"], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], host_memory()["RssAnon"])
        time.sleep(0.0005)

sampler = threading.Thread(target=sample)
sampler.start()
offload_model(model, "cpu", block_names=["blocks"], layer_offload_fraction=1.0, max_ram=budget, offload_dir=folder)
done.set()
sampler.join()
print(peak[0] - before, budget, block, len(get_conductor(model).disk.offsets))
"""


def test_setup_holds_no_more_than_the_budget_and_one_block(tmp_path: Path) -> None:
    """Blocks bound for disk are filled, written and dropped one at a time: the whole model never sits in host
    memory, here with weights memory-mapped from their file, as a low-memory load leaves them."""
    width, depth, in_ram = 1024, 16, 2
    torch.manual_seed(0)
    weights_file = tmp_path / "weights.pt"
    torch.save(add_lora(ToyTransformer(width, depth), ["to_q"]).state_dict(), weights_file)
    tests = Path(__file__).resolve().parent
    probe = subprocess.run(
        [sys.executable, "-c", SETUP_PROBE, str(width), str(depth), str(in_ram), str(tmp_path / "blocks"),
         str(weights_file)],
        capture_output=True, text=True, check=True, cwd=tests, env={**os.environ, "PYTHONPATH": str(tests)},
    )
    growth, budget, block, on_disk = map(int, probe.stdout.split())
    assert on_disk == depth - in_ram
    assert growth <= budget + 2 * block  # the budget, the block being written, and allocator slack
    assert growth < depth * block / 2  # far below the whole model, which filling every buffer first would hold


def test_the_ring_is_sized_by_the_blocks_on_disk() -> None:
    """Large blocks first, small ones after (Flux's double, then single blocks): a budget that cannot hold a ring of
    large slots beside the large blocks still keeps them all when only small blocks spill."""
    from accelerate_offload.block_weights import BlockWeights
    from accelerate_offload.disk_tier import blocks_past_budget

    layers = [torch.nn.Linear(64, 64) for _ in range(4)] + [torch.nn.Linear(16, 16) for _ in range(16)]
    weights = {i: BlockWeights(layer.requires_grad_(False)) for i, layer in enumerate(layers)}
    large, small = weights[0].nbytes, weights[4].nbytes
    ring_size = 4
    budget = 4 * large + 2 * small + ring_size * 4096  # small blocks fit a page each; a large one takes five
    assert large > 4096 >= small
    assert blocks_past_budget(weights, budget, ring_size) == list(range(6, 20))
    assert blocks_past_budget(weights, budget - 1, ring_size) == list(range(5, 20))
    with pytest.raises(RamBudgetError):
        blocks_past_budget(weights, ring_size * 4096 - 1, ring_size)


def flux_from_files(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The Flux transformer as `from_pretrained` loads it from `folder`, with a LoRA (the same each time)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(1)
    return with_lora(FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype))


def flux_step(model: torch.nn.Module) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):  # LoRA is fp32
        loss = model(**flux_inputs(), return_dict=False)[0].float().square().mean()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("change", ["none", "one block edited", "another dtype"])
def test_blocks_the_model_files_hold_are_read_in_place(tmp_path: Path, change: str) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    files = tmp_path / "transformer"
    FluxTransformer2DModel(**{**tiny_flux().config, "num_single_layers": 8}).save_pretrained(files)
    dtype = torch.bfloat16 if change == "another dtype" else torch.float32
    reference, on_disk = flux_from_files(files, dtype), flux_from_files(files, dtype)
    if change == "one block edited":  # as a fused or merged weight would be: the files no longer hold it
        with torch.no_grad():
            for model in (reference, on_disk):
                model.single_transformer_blocks[-1].proj_out.weight.add_(1.0)
    offload_model(reference, "cpu", layer_offload_fraction=1.0)
    budget = sum(w.nbytes for w in get_conductor(reference).weights.values()) - 1
    folder = tmp_path / "offload"
    offload_model(on_disk, "cpu", layer_offload_fraction=1.0, prefetch_blocks=0, max_ram=budget,
                  offload_dir=str(folder))
    disk = get_conductor(on_disk).disk
    last = len(get_conductor(on_disk).blocks) - 1
    expected = {"none": sorted(disk.offsets), "one block edited": sorted(disk.offsets)[:-1], "another dtype": []}
    assert len(disk.offsets) >= 2 and last in disk.offsets and sorted(disk.in_place) == expected[change]
    copied = sum(-(-disk.sizes[i] // 4096) * 4096 for i in disk.offsets if i not in disk.in_place)
    assert disk.path.stat().st_size == disk.nbytes and disk.path.stat().st_blocks * 512 <= copied + 4096
    for _ in range(2):
        assert torch.equal(flux_step(on_disk), flux_step(reference))
    expected_grads, actual = lora_grads(reference), lora_grads(on_disk)
    assert expected_grads and all(torch.equal(actual[name], expected_grads[name]) for name in expected_grads)
    assert disk.bytes_read >= 2 * sum(disk.sizes[i] for i in disk.in_place)
    again = offload_model(flux_from_files(files, dtype), "cpu", layer_offload_fraction=1.0, prefetch_blocks=0,
                          max_ram=budget, offload_dir=str(folder)).disk
    if change != "one block edited":  # a fresh load holds the file's bytes, no longer the edited ones: rewritten
        assert not again.written and sorted(again.in_place) == expected[change]


def test_t5_blocks_past_the_budget_give_the_same_embeddings(tmp_path: Path) -> None:
    """T5 under `max_ram`, as `compute_embeddings.py --t5_mode stream --max_ram` places it: in place from its file."""
    from transformers import T5Config, T5EncoderModel

    from accelerate_offload.inference import place_pipeline

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=8, num_heads=4)
    T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    plain = T5EncoderModel.from_pretrained(tmp_path / "t5").requires_grad_(False)
    streamed = T5EncoderModel.from_pretrained(tmp_path / "t5")
    block = sum(p.numel() * 4 for p in plain.encoder.block[1].parameters())
    pipeline = type("Pipeline", (), {"components": {"text_encoder_3": streamed}})()
    place_pipeline(pipeline, "cpu", stream=True, max_ram=6 * block, offload_dir=str(tmp_path / "offload"))
    disk = get_conductor(streamed).disk
    assert len(disk.offsets) >= 2 and sorted(disk.in_place) == sorted(disk.offsets)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(tokens).last_hidden_state, plain(tokens).last_hidden_state)
    assert disk.bytes_read == sum(nbytes for plan in disk.in_place.values() for *_, nbytes in plan)  # each once


def test_inference_placement_keeps_the_plugins_host_budget(tmp_path: Path) -> None:
    """Class images from a fresh pipeline stay inside the launch config's `max_ram`, as training does."""
    from transformers import T5Config, T5EncoderModel

    from accelerate_offload import LayerOffloadPlugin
    from accelerate_offload.inference import place_pipeline

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=8, num_heads=4)
    T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    block = sum(p.numel() * 4 for p in T5EncoderModel(config).encoder.block[1].parameters())
    plugin = LayerOffloadPlugin(layer_offload_fraction=1.0, async_offloading=False, pin_memory=False,
                                max_ram=f"{6 * block}B", offload_dir=str(tmp_path / "offload"))  # fmt: skip
    streamed = T5EncoderModel.from_pretrained(tmp_path / "t5")
    place_pipeline(type("Pipeline", (), {"components": {"text_encoder_3": streamed}})(), "cpu", plugin, stream=True)
    assert len(get_conductor(streamed).disk.offsets) >= 2
