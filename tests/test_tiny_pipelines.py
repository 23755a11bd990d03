"""The tiny pipelines load offline through diffusers' own `from_pretrained` and generate images."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: prove nothing is fetched

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from accelerate_offload.testing import tiny_pipelines

pytestmark = pytest.mark.timeout(120)


def _generate(pipeline, height: int, width: int, seed: int = 0) -> np.ndarray:
    image = pipeline(
        "a photo of a red circle",
        height=height,
        width=width,
        num_inference_steps=2,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    assert image.size == (width, height)
    return np.asarray(image)


def _assert_flow_matching_vae(vae) -> None:
    assert vae.config.latent_channels == 16
    assert vae.config.shift_factor is not None and vae.config.scaling_factor is not None
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8


def test_flux_loads_offline_and_generates(tiny_flux_path: Path) -> None:
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    pipeline = FluxPipeline.from_pretrained(tiny_flux_path)

    transformer = pipeline.transformer
    assert transformer.config.guidance_embeds
    assert len(transformer.transformer_blocks) >= 2 and len(transformer.single_transformer_blocks) >= 2
    assert isinstance(pipeline.text_encoder, CLIPTextModel)
    assert isinstance(pipeline.text_encoder_2, T5EncoderModel)
    _assert_flow_matching_vae(pipeline.vae)
    first = _generate(pipeline, height=32, width=48)
    assert first.std() > 0, "a blank image means the decoder produced nothing"
    np.testing.assert_array_equal(first, _generate(pipeline, height=32, width=48))
    assert not np.array_equal(first, _generate(pipeline, height=32, width=48, seed=1))


def test_sd3_loads_offline_and_generates(tiny_sd3_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)

    assert len(pipeline.transformer.transformer_blocks) >= 3
    assert isinstance(pipeline.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipeline.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipeline.text_encoder_3, T5EncoderModel)
    _assert_flow_matching_vae(pipeline.vae)
    assert _generate(pipeline, height=64, width=32).std() > 0


def test_tokenizers_reload_and_encode_any_prompt(tiny_flux_path: Path) -> None:
    from transformers import AutoTokenizer

    clip = AutoTokenizer.from_pretrained(tiny_flux_path / "tokenizer")
    t5 = AutoTokenizer.from_pretrained(tiny_flux_path / "tokenizer_2")

    prompt = "A photo of sks dog, 4K!"
    clip_ids = clip(prompt).input_ids  # CLIP's unknown token is its end token: look inside the prompt only
    assert clip_ids[0] == clip.bos_token_id and clip_ids[-1] == clip.eos_token_id
    assert clip.unk_token_id not in clip_ids[1:-1] and clip.model_max_length == 77
    t5_ids = t5(prompt).input_ids
    assert t5_ids[-1] == t5.eos_token_id and t5.unk_token_id not in t5_ids


def test_builds_are_deterministic(tmp_path: Path, tiny_flux_path: Path) -> None:
    again = tiny_pipelines.build_tiny_flux(tmp_path / "again")

    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        (weights,) = (tiny_flux_path / component).glob("*.safetensors")
        assert weights.read_bytes() == (again / component / weights.name).read_bytes(), component


def test_sample_images_have_several_shapes_and_load_as_imagefolder(tmp_path: Path) -> None:
    from datasets import load_dataset

    folder = tiny_pipelines.write_sample_images(tmp_path / "images", captions=True)

    files = sorted(folder.glob("*.png"))
    sizes = {Image.open(file).size for file in files}
    assert len(files) == len(tiny_pipelines.SAMPLE_SIZES)
    assert len({width / height for width, height in sizes}) >= 3
    assert all(Image.open(file).mode == "RGB" for file in files)
    dataset = load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert len(dataset) == len(files) and all(text.startswith("a ") for text in dataset["text"])


def test_command_line_writes_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_pipelines.main(["images", str(tmp_path / "out")])

    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*.png"))) == len(tiny_pipelines.SAMPLE_SIZES)
    assert not (tmp_path / "out" / "metadata.jsonl").exists()
