"""The runtime under accelerate: prepare, gradient accumulation, mixed precision, save_state/load_state."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from accelerate_offload import LayerOffloadPlugin, OffloadConfigError, get_conductor, offload_model
from toy_models import ToyTransformer, add_lora

WIDTH = 16


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test builds its own Accelerator (mixed precision differs between them)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def batches(count: int) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(11)
    return [
        (torch.randn(2, 10, WIDTH, generator=generator), torch.randn(2, 4, WIDTH, generator=generator),
         torch.randn(2, WIDTH, generator=generator))
        for _ in range(count)
    ]


def train(model: torch.nn.Module, mixed_precision: str, accumulation: int, steps: int) -> tuple[list[float], dict]:
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for inputs in batches(steps * accumulation):
        with accelerator.accumulate(model):
            loss = model(*inputs).float().square().mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    unwrapped = accelerator.unwrap_model(model)
    return losses, {n: p.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    reference = add_lora(ToyTransformer(WIDTH, 5), ["to_q", "to_out"])
    offloaded = copy.deepcopy(reference)
    offload_model(offloaded, "cpu", block_names=["blocks"], layer_offload_fraction=0.6, activation_offloading=True,
                  activation_min_bytes=0).poison_evicted = True
    return reference, offloaded


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_training_through_accelerate_matches_resident(mixed_precision: str) -> None:
    reference, offloaded = models()
    expected_losses, expected = train(reference, mixed_precision, accumulation=2, steps=3)
    losses, actual = train(offloaded, mixed_precision, accumulation=2, steps=3)
    assert losses == expected_losses
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    assert losses[-1] != losses[0]  # the LoRA did train


def test_save_and_load_state_round_trip(tmp_path) -> None:
    _, model = models()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.backward(model(*batches(1)[0]).square().mean())
    optimizer.step()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    accelerator.save_state(tmp_path / "state")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    accelerator.load_state(tmp_path / "state")
    for name, param in model.named_parameters():
        assert torch.equal(param, saved[name]), name
    conductor = get_conductor(accelerator.unwrap_model(model))
    weights = conductor.weights[4]
    pointer = model.blocks[4].to_q.base_layer.weight.data_ptr()
    assert weights.host.data_ptr() <= pointer < weights.host.data_ptr() + weights.nbytes  # still streamed


@pytest.mark.parametrize(("use_cpu", "level"), [("false", logging.WARNING), ("true", logging.INFO)])
def test_plugin_on_cpu_says_once_it_is_inactive_and_still_checkpoints(
    use_cpu: str, level: int, caplog, monkeypatch
) -> None:
    monkeypatch.setenv("ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION", "0.9")
    monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)  # `accelerate launch --cpu` sets it: the CPU was chosen
    monkeypatch.setattr("accelerate_offload.plugin._warned_inactive", False)
    plugin = LayerOffloadPlugin(block_names=["blocks"])
    assert plugin.layer_offload_fraction == 0.9 and plugin.gradient_checkpointing
    reference, model = models()[0], copy.deepcopy(models()[0])
    with caplog.at_level(logging.INFO):
        plugin.prepare_model(model, "cpu")
        LayerOffloadPlugin(block_names=["blocks"]).prepare_model(copy.deepcopy(reference), "cpu")
    said = [record for record in caplog.records if "offloading are inactive" in record.message]
    assert [record.levelno for record in said] == [level]
    conductor = get_conductor(model)
    assert conductor.weights == {} and conductor.activations is None
    inputs = batches(1)[0]
    assert torch.equal(model(*inputs), reference(*inputs))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"layer_offload_fraction": 1.5}, "must be in 0..1"),
        ({"layer_offload_fraction": "most"}, "must be a number"),
        ({"prefetch_blocks": -1}, "whole number"),
        ({"layer_offload_fraction": 0.5, "gradient_checkpointing": False}, "needs gradient_checkpointing"),
        ({"activation_offloading": True, "gradient_checkpointing": False}, "set gradient_checkpointing"),
        ({"async_offloading": True, "pin_memory": False}, "needs pin_memory"),
        ({"offload_device": "disk"}, "must be 'cpu'"),
        ({"activation_offloading": "maybe"}, "true or false"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(settings: dict, message: str) -> None:
    with pytest.raises(OffloadConfigError, match=message):
        LayerOffloadPlugin(**settings)


def test_unknown_offload_variable_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_OFFLOAD_LAYER_FRACTION", "0.5")
    with pytest.raises(OffloadConfigError, match="unknown offload setting ACCELERATE_OFFLOAD_LAYER_FRACTION"):
        LayerOffloadPlugin()


def test_explicit_values_win_over_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_OFFLOAD_PREFETCH_BLOCKS", "3")
    monkeypatch.setenv("ACCELERATE_OFFLOAD_ACTIVATION_OFFLOADING", "true")
    plugin = LayerOffloadPlugin(prefetch_blocks=2)
    assert plugin.prefetch_blocks == 2 and plugin.activation_offloading is True
    assert LayerOffloadPlugin(**{k: getattr(plugin, k) for k in ("prefetch_blocks",)}).to_env()[
        "ACCELERATE_OFFLOAD_PREFETCH_BLOCKS"
    ] == "2"


def test_out_of_memory_explanation_names_the_settings_to_change() -> None:
    from accelerate_offload.oom import explain_out_of_memory

    _, model = models()
    message = explain_out_of_memory(model, "cpu", batch_size=2, resolution=1024)
    assert "2 of 5 blocks resident" in message and "raise layer_offload_fraction" in message
    assert "--train_batch_size (now 2)" in message and "--resolution (now 1024)" in message
    plain = explain_out_of_memory(torch.nn.Linear(2, 2), "cpu", batch_size=1, resolution=512)
    assert "layer offloading is off" in plain and "set layer_offload_fraction" in plain


def test_sequence_chunks_setting_is_parsed_and_refused_when_wrong(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_OFFLOAD_SEQUENCE_CHUNKS", "auto")
    assert LayerOffloadPlugin().sequence_chunks == "auto" and LayerOffloadPlugin().gradient_checkpointing
    assert LayerOffloadPlugin(sequence_chunks="4").sequence_chunks == 4
    with pytest.raises(OffloadConfigError, match="sequence_chunks must be a whole number >= 1 or 'auto'"):
        LayerOffloadPlugin(sequence_chunks=0)
