"""Inference placement on CPU: pipelines are frozen and streamed, and the trained transformer takes the saved LoRA."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from accelerate_offload import LayerOffloadPlugin, get_conductor, offload_model
from accelerate_offload.inference import load_lora_file, place_pipeline
from accelerate_offload.memory import release_host_memory, streamed_host_buffers

pytestmark = pytest.mark.timeout(300)
SIZE = 32
LORA_FILE = "pytorch_lora_weights.safetensors"


def flux_pipeline(path: Path):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def draw(pipeline) -> np.ndarray:
    image = pipeline(
        "a sks shape", height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=16,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images[0]
    return image


def trained_transformer_with_lora(path: Path):
    """The tiny transformer with a LoRA whose weights are not zero (as after training)."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return transformer


def save_lora(transformer, folder: Path) -> None:
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))


def test_place_pipeline_freezes_and_streams(tiny_flux_path: Path) -> None:
    pipeline = flux_pipeline(tiny_flux_path)
    assert any(p.requires_grad for p in pipeline.transformer.parameters())  # as from_pretrained gives it
    reference = draw(flux_pipeline(tiny_flux_path))
    plugin = LayerOffloadPlugin(layer_offload_fraction=0.5, async_offloading=False, pin_memory=False)
    place_pipeline(pipeline, "cpu", plugin, stream=True)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert not any(p.requires_grad for p in getattr(pipeline, name).parameters()), name
    transformer = get_conductor(pipeline.transformer)
    assert transformer is not None and transformer.resident_count == transformer.block_count // 2
    t5 = get_conductor(pipeline.text_encoder_2)
    assert t5 is not None and t5.resident_count == 0  # T5 streams whole whatever the fraction
    assert get_conductor(pipeline.text_encoder) is None  # CLIP is small: moved whole
    np.testing.assert_allclose(draw(pipeline), reference, atol=1e-5)


def test_place_pipeline_under_max_vram_streams_every_block(tiny_flux_path: Path) -> None:
    pipeline = flux_pipeline(tiny_flux_path)
    plugin = LayerOffloadPlugin(max_vram="4GB", async_offloading=False, pin_memory=False)
    place_pipeline(pipeline, "cpu", plugin, stream=True)
    assert get_conductor(pipeline.transformer).resident_count == 0


def test_place_pipeline_without_streaming_moves_whole(tiny_flux_path: Path) -> None:
    pipeline = flux_pipeline(tiny_flux_path)
    place_pipeline(pipeline, "cpu", LayerOffloadPlugin(layer_offload_fraction=1.0))  # CPU: no streaming
    assert get_conductor(pipeline.transformer) is None
    assert not any(p.requires_grad for p in pipeline.transformer.parameters())


def test_trained_transformer_draws_with_the_saved_lora_file(tiny_flux_path: Path, tmp_path: Path) -> None:
    """Final images from the streamed, trained transformer equal a fresh pipeline's with load_lora_weights."""
    transformer = trained_transformer_with_lora(tiny_flux_path)
    save_lora(transformer, tmp_path)
    fresh = flux_pipeline(tiny_flux_path)
    fresh.load_lora_weights(tmp_path, weight_name=LORA_FILE)
    expected = draw(fresh)
    del fresh

    offload_model(transformer, "cpu", layer_offload_fraction=1.0, async_offloading=False, pin_memory=False)
    with torch.no_grad():  # training went on after the save: the file, not the adapter in memory, must draw
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(tiny_flux_path, transformer=transformer)
    pipeline.set_progress_bar_config(disable=True)
    load_lora_file(pipeline, tmp_path, LORA_FILE, "cpu")
    place_pipeline(pipeline, "cpu")
    assert get_conductor(pipeline.transformer) is not None  # the same streamed transformer, not a copy
    np.testing.assert_allclose(draw(pipeline), expected, atol=1e-5)
    without_lora = flux_pipeline(tiny_flux_path)
    assert np.abs(draw(without_lora) - expected).max() > 1e-3  # the LoRA changes the image


def test_the_training_adapter_and_its_optimizer_are_freed_before_the_saved_file_loads(
    tiny_flux_path: Path, tmp_path: Path
) -> None:
    """Final images do not carry training's memory: the adapter being replaced and an optimizer let go just before
    (in a reference cycle, as accelerate's wrapper leaves one) are freed as the saved file loads."""
    from diffusers import FluxPipeline

    transformer = trained_transformer_with_lora(tiny_flux_path)
    save_lora(transformer, tmp_path)
    offload_model(transformer, "cpu", layer_offload_fraction=1.0, async_offloading=False, pin_memory=False)
    trained = [param for name, param in transformer.named_parameters() if "lora_" in name]
    optimizer = torch.optim.AdamW(trained)
    sum(param.square().sum() for param in trained).backward()
    optimizer.step()
    adapter, state = weakref.ref(trained[0]), weakref.ref(optimizer.state[trained[0]]["exp_avg"])
    optimizer.holder = optimizer  # only a collection frees it
    pipeline = FluxPipeline.from_pretrained(tiny_flux_path, transformer=transformer)
    gc.disable()  # no collection but the one loading the file makes
    try:
        del optimizer, trained
        load_lora_file(pipeline, tmp_path, LORA_FILE, "cpu")
        assert adapter() is None and state() is None
    finally:
        gc.enable()


def test_nothing_streamed_is_left_after_teardown(tiny_flux_path: Path) -> None:
    release_host_memory()
    before = streamed_host_buffers()
    pipeline = flux_pipeline(tiny_flux_path)
    place_pipeline(pipeline, "cpu", LayerOffloadPlugin(layer_offload_fraction=1.0, async_offloading=False,
                                                       pin_memory=False), stream=True)
    draw(pipeline)
    count, nbytes = streamed_host_buffers()
    assert count > before[0] and nbytes > before[1]
    del pipeline
    release_host_memory()
    assert streamed_host_buffers() == before
