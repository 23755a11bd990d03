"""The offload runtime on CPU: losses and LoRA gradients with offload equal the plain run, exactly, in fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from accelerate_offload import BlocksNotFoundError, get_conductor, offload_model, remove_offload
from accelerate_offload.conductor import resident_block_count
from toy_models import ToyTransformer, add_lora

WIDTH = 16


def toy_inputs(seed: int = 0, batch: int = 2, tokens: int = 12) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, tokens, WIDTH, generator=generator),
        torch.randn(batch, 5, WIDTH, generator=generator),
        torch.randn(batch, WIDTH, generator=generator),
    )


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def toy_pair(depth: int = 6) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    reference = add_lora(ToyTransformer(WIDTH, depth), ["to_q", "to_out", "context_proj"])
    return reference, copy.deepcopy(reference)


def offload(model: torch.nn.Module, **settings) -> torch.nn.Module:
    settings.setdefault("activation_min_bytes", 0)
    conductor = offload_model(model, "cpu", block_names=["blocks"], **settings)
    conductor.poison_evicted = True  # a dropped block read later turns the result into NaN
    return model


def step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    loss = model(*inputs).square().mean()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("activation_offloading", [False, True])
@pytest.mark.parametrize("prefetch_blocks", [0, 1, 2])
def test_toy_gradients_equal_resident(fraction: float, activation_offloading: bool, prefetch_blocks: int) -> None:
    reference, offloaded = toy_pair()
    offload(
        offloaded,
        layer_offload_fraction=fraction,
        activation_offloading=activation_offloading,
        prefetch_blocks=prefetch_blocks,
    )
    for seed in range(2):  # a second step starts from the state the first one left
        inputs = toy_inputs(seed)
        assert torch.equal(step(offloaded, inputs), step(reference, inputs))
    expected, actual = lora_grads(reference), lora_grads(offloaded)
    assert expected.keys() == actual.keys() and len(expected) == 6 * 3 * 2
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    conductor = get_conductor(offloaded)
    assert conductor.streamed_on_device == []  # nothing left on the device between steps
    assert conductor.peak_streamed_on_device <= prefetch_blocks + 1


def test_resident_count_is_the_ceiling_of_the_kept_share() -> None:
    assert resident_block_count(57, 0.9) == 6
    assert resident_block_count(10, 0.7) == 3
    assert resident_block_count(4, 0.0) == 4
    assert resident_block_count(4, 1.0) == 0


def test_load_and_evict_order_forward_then_reverse() -> None:
    _, model = toy_pair(depth=4)
    offload(model, layer_offload_fraction=1.0, prefetch_blocks=1)
    conductor = get_conductor(model)
    conductor.log = []
    step(model, toy_inputs())
    forward = [("load", 0), ("load", 1), ("evict", 0), ("load", 2), ("evict", 1), ("load", 3), ("evict", 2)]
    backward = [("load", 2), ("evict", 3), ("load", 1), ("evict", 2), ("load", 0), ("evict", 1), ("evict", 0)]
    assert conductor.log == forward + backward


def test_resident_blocks_never_move_and_prefetch_crosses_into_streamed_ones() -> None:
    _, model = toy_pair(depth=4)
    offload(model, layer_offload_fraction=0.5, prefetch_blocks=1)
    conductor = get_conductor(model)
    conductor.log = []
    step(model, toy_inputs())
    assert {index for _, index in conductor.log} == {2, 3}
    assert conductor.log[0] == ("load", 2)  # fetched while resident block 1 computes


def test_stale_block_from_stopped_recomputation_is_evicted_first() -> None:
    _, model = toy_pair(depth=6)
    offload(model, layer_offload_fraction=1.0, prefetch_blocks=1)
    conductor = get_conductor(model)
    with torch.no_grad():  # drive the conductor directly: block 5 recomputed, then the run jumps to block 2
        conductor.before_block(5, backward=True)
        conductor.log = []
        conductor.before_block(2, backward=True)
    assert conductor.log == [("evict", 5), ("evict", 4), ("load", 2), ("load", 1)]
    assert conductor.streamed_on_device == [1, 2]
    conductor.evict_all()


def test_checkpoint_early_stop_leaves_no_block_behind() -> None:
    reference, model = toy_pair(depth=4)
    offload(model, layer_offload_fraction=1.0)
    with torch.utils.checkpoint.set_checkpoint_early_stop(True):
        loss = step(model, toy_inputs())
    assert torch.equal(loss, step(reference, toy_inputs()))
    assert get_conductor(model).streamed_on_device == []


def test_activation_offloading_moves_block_inputs_once_each() -> None:
    _, model = toy_pair(depth=4)
    offload(model, layer_offload_fraction=1.0, activation_offloading=True)
    step(model, toy_inputs(batch=2, tokens=12))
    shuttle = get_conductor(model).activations
    hidden, context = 2 * 12 * WIDTH * 4, 2 * 5 * WIDTH * 4
    shared = 2 * 12 * 4 + 2 * WIDTH * 4  # rotary cos and sin, and temb: packed once, then kept on the device
    assert shuttle.packed_bytes == 4 * (hidden + context) + shared


def test_inference_streams_and_matches() -> None:
    reference, model = toy_pair(depth=4)
    offload(model, layer_offload_fraction=1.0, prefetch_blocks=2)
    conductor = get_conductor(model)
    conductor.log = []
    with torch.no_grad():
        assert torch.equal(model(*toy_inputs()), reference(*toy_inputs()))
    assert conductor.streamed_on_device == []
    assert [event for event, _ in conductor.log].count("load") == 4


def test_streamed_block_with_grad_and_no_checkpointing_is_refused() -> None:
    _, model = toy_pair(depth=2)
    offload(model, layer_offload_fraction=1.0, gradient_checkpointing=False)
    with pytest.raises(RuntimeError, match="enable gradient_checkpointing"):
        model(*toy_inputs())


def test_streamed_weights_live_once_in_the_block_buffer() -> None:
    _, model = toy_pair(depth=2)
    offload(model, layer_offload_fraction=1.0)
    weights = get_conductor(model).weights[1]
    start, end = weights.host.data_ptr(), weights.host.data_ptr() + weights.nbytes
    block = model.blocks[1]
    frozen = [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())
    assert frozen and all(start <= t.data_ptr() < end for t in frozen)
    assert all(t.data_ptr() % 256 == 0 for t in frozen)


def test_model_to_leaves_streamed_weights_and_refuses_dtype_changes() -> None:
    _, model = toy_pair(depth=2)
    offload(model, layer_offload_fraction=1.0)
    weights = get_conductor(model).weights[0]
    before = model.blocks[0].to_q.base_layer.weight.data_ptr()
    model.to("cpu")
    assert model.blocks[0].to_q.base_layer.weight.data_ptr() == before
    assert weights.host.data_ptr() <= before < weights.host.data_ptr() + weights.nbytes
    with pytest.raises(RuntimeError, match="cast the model before offloading"):
        model.to(torch.float64)


def test_remove_offload_restores_a_plain_model() -> None:
    reference, model = toy_pair(depth=3)
    offload(model, layer_offload_fraction=1.0)
    remove_offload(model)
    assert get_conductor(model) is None and "forward" not in model.blocks[0].__dict__
    assert torch.equal(step(model, toy_inputs()), step(reference, toy_inputs()))


def test_unknown_blocks_name_the_lists_seen() -> None:
    _, model = toy_pair(depth=3)
    with pytest.raises(BlocksNotFoundError, match=r"blocks \(3 x ToyBlock\)"):
        offload_model(model, "cpu")
    with pytest.raises(BlocksNotFoundError, match="no block list 'layers'"):
        offload_model(model, "cpu", block_names=["layers"])


def test_models_with_accelerate_or_diffusers_offload_hooks_are_refused() -> None:
    """Two runtimes moving the same weights would fight: the model is refused in one line and left as it was."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from diffusers.hooks import apply_group_offloading

    _, model = toy_pair(depth=3)
    add_hook_to_module(model.blocks[1], AlignDevicesHook(execution_device="cpu"))
    refusal = r"^ToyTransformer\.blocks\.1 carries an accelerate hook \(AlignDevicesHook"
    with pytest.raises(RuntimeError, match=refusal) as error:
        offload_model(model, "cpu", block_names=["blocks"])
    assert "\n" not in str(error.value) and get_conductor(model) is None
    remove_hook_from_module(model, recurse=True)
    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(RuntimeError, match="carries diffusers' group offloading"):
        offload_model(model, "cpu", block_names=["blocks"])
    assert get_conductor(model) is None


def test_settings_object_and_keyword_overrides_stream_alike() -> None:
    from accelerate_offload import OffloadSettings

    reference, by_keywords = toy_pair()
    by_object = copy.deepcopy(reference)
    offload(by_keywords, layer_offload_fraction=0.5, activation_offloading=True)
    settings = OffloadSettings(layer_offload_fraction=0.5, activation_offloading=True, block_names=["blocks"])
    conductor = offload_model(by_object, "cpu", settings, activation_min_bytes=0)
    assert conductor.resident_count == get_conductor(by_keywords).resident_count == 3
    assert conductor.activations.min_bytes == 0
    expected = step(reference, toy_inputs())
    assert torch.equal(step(by_object, toy_inputs()), expected)
    assert torch.equal(step(by_keywords, toy_inputs()), expected)
    assert all(torch.equal(a, b) for a, b in zip(lora_grads(by_object).values(), lora_grads(reference).values()))
