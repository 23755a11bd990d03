"""The runtime on a CUDA GPU: side streams, pinned memory, bf16; memory bounds and no growth."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from accelerate_offload import LayerOffloadPlugin, get_conductor, offload_model
from test_models import flux_inputs, tiny_flux, with_lora
from toy_models import ToyTransformer, add_lora

pytestmark = pytest.mark.cuda
DEVICE = torch.device("cuda", 0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def bigger_flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    ).to(torch.bfloat16)


def flux_batch(tokens_side: int = 32, text: int = 64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(tokens_side, tokens_side, 3)
    ids[..., 1] = torch.arange(tokens_side)[:, None]
    ids[..., 2] = torch.arange(tokens_side)[None, :]
    batch = {
        "hidden_states": torch.randn(1, tokens_side**2, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, 128, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([3.5]),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
    }
    return {k: v.to(DEVICE) for k, v in batch.items()}


def bf16_step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch, return_dict=False)[0]
    loss = out.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("settings", [
    {"layer_offload_fraction": 1.0, "activation_offloading": True},
    {"layer_offload_fraction": 0.5, "activation_offloading": True, "prefetch_blocks": 2},
    {"layer_offload_fraction": 1.0, "activation_offloading": False, "prefetch_blocks": 0},
    {"layer_offload_fraction": 1.0, "activation_offloading": True, "sequence_chunks": 2},
])
def test_flux_lora_gradients_match_resident_in_bf16(settings: dict) -> None:
    reference = with_lora(bigger_flux())
    for p in reference.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    offloaded = copy.deepcopy(reference)
    offload_model(reference, DEVICE, layer_offload_fraction=0.0)  # all resident, same checkpointing
    conductor = offload_model(offloaded, DEVICE, **settings)
    conductor.poison_evicted = True  # weights read after they left the device (stream order) would show as NaN
    batch = flux_batch()
    for _ in range(3):  # double blocks' feed-forward weights arrive late in every backward; pinned memory reused
        expected_loss, expected = bf16_step(reference, batch)
        loss, actual = bf16_step(offloaded, batch)
    assert relative_error(loss, expected_loss) < 1e-3
    for name, grad in expected.items():
        assert torch.isfinite(actual[name]).all(), name
        assert relative_error(actual[name], grad) < 2e-2, name
    assert conductor.peak_streamed_on_device <= conductor.prefetch_blocks + 1
    assert conductor.streamed_on_device == []


def test_streamed_blocks_on_the_gpu_never_exceed_prefetch_plus_one() -> None:
    model = with_lora(bigger_flux())
    conductor = offload_model(model, DEVICE, layer_offload_fraction=1.0, activation_offloading=True, prefetch_blocks=1)
    counts = []
    original = conductor.before_block

    def counting(index: int, backward: bool) -> None:
        original(index, backward)
        counts.append(len(conductor.streamed_on_device))
        on_gpu = [i for i, block in enumerate(conductor.blocks)
                  if next(p for p in block.parameters() if not p.requires_grad).device.type == "cuda"]
        assert len(on_gpu) <= conductor.prefetch_blocks + 1, (index, backward, on_gpu)

    conductor.before_block = counting
    bf16_step(model, flux_batch())
    assert max(counts) == 2 and len(counts) == 2 * conductor.block_count


def toy_on_cpu(depth: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = add_lora(ToyTransformer(width, depth), ["to_q", "to_out"], rank=8).to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def toy_batch(width: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(DEVICE).manual_seed(0)
    return (torch.randn(1, 256, width, device=DEVICE, generator=generator),
            torch.randn(1, 64, width, device=DEVICE, generator=generator),
            torch.randn(1, width, device=DEVICE, generator=generator))


def toy_train(model: torch.nn.Module, width: int, steps: int, peaks: list[int] | None = None) -> list[int]:
    """Trains `steps` steps; returns memory allocated after each, and appends each step's peak to `peaks`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = toy_batch(width)
    allocated = []
    for _ in range(steps):
        if peaks is not None:
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(*inputs).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
        if peaks is not None:
            peaks.append(torch.cuda.max_memory_allocated())
    return allocated


def test_sixteen_block_toy_peak_stays_under_bound_and_flat_over_200_steps() -> None:
    width, depth = 2048, 16
    model = toy_on_cpu(depth, width)
    block_bytes = sum(t.numel() * t.element_size() for t in model.blocks[0].parameters() if not t.requires_grad)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    hidden = 256 * width * 2
    gc.collect()  # models of earlier tests, freed by a later cycle collection mid-run, would move the figures
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    conductor = offload_model(model, DEVICE, block_names=["blocks"], layer_offload_fraction=1.0,
                              activation_offloading=True)
    peaks: list[int] = []
    allocated = toy_train(model, width, steps=200, peaks=peaks)
    peak = max(peaks) - base
    # stated bound: two blocks (current + prefetched), LoRA with grads and Adam state, embed/head, and the
    # working set of one block (about a dozen hidden-sized tensors in fp32 under autocast)
    non_block = sum(t.numel() * t.element_size() for m in (model.embed, model.head) for t in m.parameters())
    bound = 2 * block_bytes + 4 * trainable + non_block + 24 * hidden
    assert peak < bound, (peak / 2**20, bound / 2**20)
    assert peak < depth * block_bytes / 3  # far below what the blocks alone would take resident
    early, late = slice(10, 30), slice(-20, None)
    print(f"above base, steps 11-30 vs 181-200: peak {max(peaks[early]) - base} vs {max(peaks[late]) - base} B, "
          f"allocated after a step {max(allocated[early]) - base} vs {max(allocated[late]) - base} B; "
          f"distinct allocated values {sorted(set(a - base for a in allocated[10:]))}")
    # a leak of 50 KiB a step would add 9.3 MiB from the first window to the last
    assert max(allocated[late]) - max(allocated[early]) < 8 * 2**20, (allocated[early], allocated[late])
    assert max(peaks[late]) - max(peaks[early]) < 8 * 2**20, (max(peaks[early]), max(peaks[late]))
    assert conductor.streamed_on_device == []


@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_plugin_on_cuda_prepares_for_accelerate_and_keeps_streamed_weights_on_the_host(
    monkeypatch, mixed_precision: str
) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION", "0.75")
    monkeypatch.setenv("ACCELERATE_OFFLOAD_ACTIVATION_OFFLOADING", "true")
    accelerator = Accelerator(mixed_precision=mixed_precision)
    model = toy_on_cpu(8, 256)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model = LayerOffloadPlugin(block_names=["blocks"]).prepare_model(model, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    streamed = accelerator.unwrap_model(model).blocks[7].to_q.base_layer.weight
    assert streamed.device.type == "cpu" and streamed.is_pinned()
    assert accelerator.unwrap_model(model).blocks[0].to_q.base_layer.weight.device.type == "cuda"
    losses = []
    inputs = toy_batch(256)
    for _ in range(5):
        loss = model(*inputs).float().square().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert get_conductor(model).activations.packed_bytes > 0


def test_flash_or_efficient_attention_backward_is_finite_in_bf16() -> None:
    LayerOffloadPlugin().prepare_model(torch.nn.Linear(2, 2), DEVICE)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    generator = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, 24, 4608, 128, device=DEVICE, dtype=torch.bfloat16, generator=generator,
                           requires_grad=True) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.float().square().mean().backward()
    reference = [t.detach().float().requires_grad_() for t in (q, k, v)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        torch.nn.functional.scaled_dot_product_attention(*reference).square().mean().backward()
    for tensor, exact in zip((q, k, v), reference):
        assert torch.isfinite(tensor.grad).all()
        assert relative_error(tensor.grad, exact.grad) < 2e-2


def test_tiny_flux_inference_streams_without_grad() -> None:
    model = tiny_flux().to(torch.bfloat16)
    reference = copy.deepcopy(model).to(DEVICE)
    offload_model(model, DEVICE, layer_offload_fraction=1.0, gradient_checkpointing=False)
    batch = {k: v.to(DEVICE, torch.bfloat16) for k, v in flux_inputs().items()}
    with torch.no_grad():
        assert torch.equal(model(**batch, return_dict=False)[0], reference(**batch, return_dict=False)[0])
    assert get_conductor(model).streamed_on_device == []


def test_max_vram_fills_the_budget_with_resident_blocks_and_stays_within_it() -> None:
    from accelerate_offload import VramBudgetError

    width, depth = 2048, 24
    probe = toy_on_cpu(depth, width)
    offload_model(probe, DEVICE, block_names=["blocks"], layer_offload_fraction=1.0, activation_offloading=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    toy_train(probe, width, steps=2)
    streamed_peak = torch.cuda.max_memory_allocated()
    block_bytes = get_conductor(probe).weights[0].nbytes
    del probe
    torch.cuda.empty_cache()
    resident_counts = []
    for extra_blocks in (4, 12):
        budget = int((streamed_peak + extra_blocks * block_bytes) / 0.95)
        model = toy_on_cpu(depth, width)
        conductor = offload_model(model, DEVICE, block_names=["blocks"], max_vram=budget, activation_offloading=True)
        toy_train(model, width, steps=1)  # the measuring step
        torch.cuda.reset_peak_memory_stats()
        toy_train(model, width, steps=3)
        assert torch.cuda.max_memory_allocated() <= budget, (torch.cuda.max_memory_allocated(), budget)
        resident_counts.append(conductor.resident_count)
        del model, conductor
        torch.cuda.empty_cache()
    assert 1 <= resident_counts[0] < resident_counts[1], resident_counts
    model = toy_on_cpu(depth, width)
    offload_model(model, DEVICE, block_names=["blocks"], max_vram=base + block_bytes, activation_offloading=True)
    with pytest.raises(VramBudgetError, match="raise max_vram"):
        toy_train(model, width, steps=1)


def test_max_ram_with_max_vram_trains_like_ram_and_makes_disk_blocks_resident(tmp_path) -> None:
    width, depth = 2048, 16
    probe = toy_on_cpu(depth, width)
    conductor = offload_model(probe, DEVICE, block_names=["blocks"], layer_offload_fraction=1.0,
                              activation_offloading=True)
    torch.cuda.reset_peak_memory_stats()
    toy_train(probe, width, steps=2)
    streamed_peak, block_bytes = torch.cuda.max_memory_allocated(), conductor.weights[0].nbytes
    del probe, conductor
    torch.cuda.empty_cache()
    budget = int((streamed_peak + 4 * block_bytes) / 0.95)
    losses, disk_blocks = [], None
    for max_ram in (None, 8 * block_bytes):
        model = toy_on_cpu(depth, width)
        disk = {"max_ram": max_ram, "offload_dir": str(tmp_path)} if max_ram else {}
        conductor = offload_model(model, DEVICE, block_names=["blocks"], max_vram=budget, activation_offloading=True,
                                  **disk)
        if max_ram:
            disk_blocks = sorted(conductor.disk.offsets)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        run = []
        for _ in range(3):  # the first step measures, then the planner makes blocks resident
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(*toy_batch(width)).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses.append(run)
        if max_ram:
            resident = sorted(set(range(depth)) - set(conductor.weights))
            assert resident and set(resident) <= set(disk_blocks)  # the room went to blocks read from disk
        del model, conductor, optimizer
        torch.cuda.empty_cache()
    assert losses[1][0] == losses[0][0]  # the measuring step: every block streamed, from RAM or from disk
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)  # then other blocks resident: bf16 rounding at most


def test_vram_timeline_records_every_block_and_copy(tmp_path) -> None:
    from accelerate_offload import plot_timeline, trace_step

    width = 1024
    model = toy_on_cpu(6, width)
    conductor = offload_model(model, DEVICE, block_names=["blocks"], layer_offload_fraction=1.0,
                              activation_offloading=True)
    inputs = toy_batch(width)

    def one_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(*inputs).float().square().mean()
        loss.backward()

    one_step()
    timeline = trace_step(model, one_step)
    phases = [b["phase"] for b in timeline["blocks"]]
    assert phases.count("forward") == 6 and phases.count("backward") == 6
    assert all(b["peak_until_next_gb"] >= b["allocated_gb"] for b in timeline["blocks"])
    assert timeline["peak_allocated_gb"] >= max(b["peak_until_next_gb"] for b in timeline["blocks"])
    uploads = [c for c in timeline["copies"] if c["direction"] == "host_to_device"]
    assert len(uploads) >= 2 * 6 and all(c["end_ms"] >= c["start_ms"] >= 0 for c in uploads)
    assert abs(sum(c["gb"] for c in uploads[:6]) - 6 * conductor.weights[0].nbytes / 1e9) < 1e-6
    picture = plot_timeline(timeline, tmp_path / "timeline.png")
    assert picture.stat().st_size > 10_000


def test_forward_waits_for_host_copies_so_block_inputs_do_not_pile_up() -> None:
    """A slow GPU and a fast CPU: without the rate limit every block's inputs would wait on the device for their
    copies to the host (memory the allocator cannot reuse). With it, as a block starts, at most the two blocks
    before it still have copies to run."""
    width, depth, tokens = 1024, 16, 8192
    most_pending = {}
    for blocks_in_flight in (None, 2):
        model = toy_on_cpu(depth, width)
        conductor = offload_model(model, DEVICE, block_names=["blocks"], layer_offload_fraction=1.0,
                                  activation_offloading=True)
        conductor.activations.blocks_in_flight = blocks_in_flight
        copies: list[tuple[int, torch.cuda.Event]] = []  # (block, its copy's event) for every copy to the host
        started: list[int] = []  # for each block started, how many earlier blocks had copies still to run
        device_to_host = conductor.streams.device_to_host

        def recording_copy(tensor: torch.Tensor, host: torch.Tensor) -> torch.cuda.Event:
            event = device_to_host(tensor, host)
            copies.append((len(started), event))
            return event

        conductor.streams.device_to_host = recording_copy

        def count_pending_then_sleep(module, args) -> None:
            started.append(len({block for block, event in copies if not event.query()}))
            torch.cuda._sleep(20_000_000)  # about 10 ms of GPU time; the CPU queues a block in well under 1 ms

        for block in model.blocks:
            block.register_forward_pre_hook(count_pending_then_sleep)
        generator = torch.Generator(DEVICE).manual_seed(0)
        inputs = (torch.randn(1, tokens, width, device=DEVICE, generator=generator),
                  torch.randn(1, 64, width, device=DEVICE, generator=generator),
                  torch.randn(1, width, device=DEVICE, generator=generator))
        for _ in range(2):  # the second step reuses pinned host memory, as training does
            copies.clear()
            started.clear()
            torch.cuda.synchronize()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(*inputs).float().square().mean()
            most_pending[blocks_in_flight] = max(started[:depth])
            loss.backward()
        assert len(copies) >= depth
        del model, conductor, loss
        gc.collect()
        torch.cuda.empty_cache()
    assert most_pending[2] <= 2, most_pending
    assert most_pending[None] >= 8, most_pending
