"""Offload on the real architectures, tiny: Flux and SD3 transformers with PEFT LoRA, T5 and CLIP encoders."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from accelerate_offload import find_blocks, get_conductor, offload_model

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
    )


def with_lora(model: torch.nn.Module, targets: list[str] = LORA_TARGETS) -> torch.nn.Module:
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return model


def flux_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    height = width = 4
    image_ids = torch.zeros(height, width, 3)
    image_ids[..., 1] = torch.arange(height)[:, None]
    image_ids[..., 2] = torch.arange(width)[None, :]
    return {
        "hidden_states": torch.randn(batch, height * width, 16, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 7, 24, generator=generator),
        "pooled_projections": torch.randn(batch, 12, generator=generator),
        "timestep": torch.full((batch,), 0.6),
        "guidance": torch.full((batch,), 3.5),
        "img_ids": image_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(7, 3),
    }


def sd3_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 9, 24, generator=generator),
        "pooled_projections": torch.randn(batch, 12, generator=generator),
        "timestep": torch.full((batch,), 600.0),
    }


def train_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, return_dict=False)[0].square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("activation_offloading", [False, True])
@pytest.mark.parametrize(("build", "inputs"), [(tiny_flux, flux_inputs), (tiny_sd3, sd3_inputs)], ids=["flux", "sd3"])
def test_lora_gradients_equal_resident(build, inputs, fraction: float, activation_offloading: bool) -> None:
    reference = with_lora(build())
    offloaded = copy.deepcopy(reference)
    conductor = offload_model(
        offloaded, "cpu", layer_offload_fraction=fraction, activation_offloading=activation_offloading,
        activation_min_bytes=0,
    )
    conductor.poison_evicted = True
    expected_loss, expected = train_step(reference, inputs())
    loss, actual = train_step(offloaded, inputs())
    assert torch.equal(loss, expected_loss)
    assert len(actual) == len(expected) > 0
    for name, grad in expected.items():
        assert torch.equal(actual[name], grad), name
    assert conductor.streamed_on_device == []


def test_flux_blocks_are_found_in_execution_order() -> None:
    names = [name for name, _ in find_blocks(tiny_flux())]
    assert names == [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(3)]


def test_flux_own_checkpointing_is_replaced() -> None:
    model = with_lora(tiny_flux())
    model.enable_gradient_checkpointing()
    offload_model(model, "cpu", layer_offload_fraction=1.0)
    assert model.gradient_checkpointing is False  # a second checkpoint around ours would recompute twice
    loss, grads = train_step(model, flux_inputs())
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_t5_encoder_streams_in_inference() -> None:
    torch.manual_seed(0)
    config = T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=4, num_heads=4)
    reference = T5EncoderModel(config).eval().requires_grad_(False)
    model = copy.deepcopy(reference)
    conductor = offload_model(model, "cpu", layer_offload_fraction=1.0, gradient_checkpointing=False)
    assert all(weights.nbytes > 0 for weights in conductor.weights.values())
    conductor.log = []
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).last_hidden_state
        actual = model(tokens).last_hidden_state
    assert torch.equal(actual, expected)
    assert [index for event, index in conductor.log if event == "load"] == [0, 1, 2, 3]
    assert get_conductor(model).streamed_on_device == []


def test_clip_text_encoder_streams_in_inference() -> None:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=20)
    reference = CLIPTextModel(config).eval().requires_grad_(False)
    model = copy.deepcopy(reference)
    conductor = offload_model(model, "cpu", layer_offload_fraction=1.0, gradient_checkpointing=False)
    assert len(conductor.weights) == 3 and all(weights.nbytes > 0 for weights in conductor.weights.values())
    tokens = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens, output_hidden_states=True)
        actual = model(tokens, output_hidden_states=True)
    assert torch.equal(actual.pooler_output, expected.pooler_output)
    assert torch.equal(actual.hidden_states[-2], expected.hidden_states[-2])


@pytest.mark.parametrize("sequence_chunks", [3, "auto"])
def test_token_chunks_through_the_runtime_match_the_whole_block(sequence_chunks) -> None:
    reference = with_lora(tiny_flux())
    chunked = copy.deepcopy(reference)
    offload_model(chunked, "cpu", layer_offload_fraction=1.0, activation_offloading=True, activation_min_bytes=0,
                  sequence_chunks=sequence_chunks).poison_evicted = True
    expected_loss, expected = train_step(reference, flux_inputs())
    loss, actual = train_step(chunked, flux_inputs())
    assert torch.allclose(loss, expected_loss, rtol=1e-6, atol=0)
    for name, grad in expected.items():
        assert (actual[name] - grad).norm() <= 1e-6 * grad.norm(), name


def test_unfrozen_model_is_warned_about(caplog) -> None:
    import logging

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4))
    with caplog.at_level(logging.WARNING):
        offload_model(model, "cpu", layer_offload_fraction=1.0, gradient_checkpointing=False)
    assert any("freeze the base model" in record.message for record in caplog.records)


@pytest.mark.parametrize(("build", "inputs"), [(tiny_flux, flux_inputs), (tiny_sd3, sd3_inputs)], ids=["flux", "sd3"])
def test_feed_forward_weights_leave_before_attention_backward(build, inputs) -> None:
    """Double/joint blocks stream in two pieces: in backward the block's feed-forward weights leave as its
    attention backward starts, and only then do the prefetched block's arrive. Gradients stay exact (evicted
    memory is poisoned), and from the first step the prefetch in backward holds back the feed-forward piece."""
    reference = with_lora(build())
    offloaded = copy.deepcopy(reference)
    conductor = offload_model(offloaded, "cpu", layer_offload_fraction=1.0, activation_offloading=True,
                              activation_min_bytes=0)
    conductor.poison_evicted = True
    split = [index for index, weights in conductor.weights.items() if len(weights.pieces) == 2]
    assert split == [i for i, b in enumerate(conductor.blocks) if type(b).__name__ != "FluxSingleTransformerBlock"]
    assert len(split) >= 2
    for _ in range(2):
        expected_loss, expected = train_step(reference, inputs())
        conductor.log = []
        loss, actual = train_step(offloaded, inputs())
        assert torch.equal(loss, expected_loss)
        for name, grad in expected.items():
            assert torch.equal(actual[name], grad), name
        log = conductor.log
        for index in split[1:]:
            evicted = log.index(("evict late", index))
            # the block before it (next in backward) was prefetched without its feed-forward, which comes now
            assert ("load", index - 1) in log[:evicted] and log[evicted + 1] == ("load late", index - 1)
            assert log.count(("load late", index - 1)) == 1
        assert ("evict late", split[0]) in log and conductor.streamed_on_device == []


def test_attention_hooks_leave_no_graph_alive_across_steps() -> None:
    """The hook that signals attention's backward must not hold the step's graph (and its saved activations) in a
    reference cycle: a GPU would fill up between garbage collections, so memory must go by reference counts."""
    import gc

    from live_memory import LiveTensorBytes

    model = with_lora(tiny_flux())
    offload_model(model, "cpu", layer_offload_fraction=1.0, activation_offloading=True, activation_min_bytes=0)
    after_step = []
    gc.collect()
    gc.disable()
    try:
        with LiveTensorBytes() as live:
            for _ in range(4):
                train_step(model, flux_inputs())
                model.zero_grad(set_to_none=True)
                live._release_freed()
                after_step.append(live.bytes)
    finally:
        gc.enable()
    assert after_step[1] == after_step[2] == after_step[3], after_step
