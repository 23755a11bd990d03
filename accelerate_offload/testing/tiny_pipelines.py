"""Tiny random Flux and SD3 pipelines and sample images, built in code so tests and demos need no download.

Every component is the real diffusers/transformers class, only with small widths and few layers, so the same
code paths (VAE shift/scale, 2x2 latent packing, guidance embedding, dual CLIP + T5 prompts) run as with the
12B models. The folders load with `FluxPipeline.from_pretrained(path)` / `StableDiffusion3Pipeline.from_pretrained`
offline. Weights come from fixed seeds, so two builds give identical files.

    python -m accelerate_offload.testing.tiny_pipelines flux OUT
    python -m accelerate_offload.testing.tiny_pipelines sd3 OUT
    python -m accelerate_offload.testing.tiny_pipelines images OUT [--captions]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..quiet import quiet_third_party_noise

SEED = 0
# Latent channels of the SD3 and Flux VAEs; the transformers below are shaped around it.
LATENT_CHANNELS = 16
# Four VAE stages give the real models' 8x down-sampling, so resolutions must be multiples of 16 as for Flux.
VAE_BLOCK_OUT_CHANNELS = (8, 16, 16, 16)
CLIP_HIDDEN_SIZE = 32
CLIP_MAX_LENGTH = 77
T5_D_MODEL = 64
# Real shift/scale factors of each family's VAE, so latent normalisation is exercised with realistic values.
FLUX_VAE_FACTORS = {"shift_factor": 0.1159, "scaling_factor": 0.3611}
SD3_VAE_FACTORS = {"shift_factor": 0.0609, "scaling_factor": 1.5305}
# FLUX.1-dev's scheduler settings (resolution-dependent shift).
FLUX_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
SAMPLE_SIZES = ((64, 64), (96, 64), (64, 96), (80, 48), (48, 80), (64, 64))
IMAGE_SUFFIX = ".png"


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build_clip_tokenizer():
    """A byte-level CLIP tokenizer whose vocabulary is single characters: any prompt encodes, nothing is fetched."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = _byte_alphabet()
    pieces = specials + alphabet + [char + "</w>" for char in alphabet]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer():
    """A Unigram T5 tokenizer over printable ASCII characters (with and without the word-start marker)."""
    from transformers import T5Tokenizer

    characters = [chr(code) for code in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + char, -3.0) for char in characters]
    vocab += [(char, -4.0) for char in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_clip_text_model(tokenizer, with_projection: bool):
    """CLIP text encoder; SD3 uses the projection variant (pooled `text_embeds`), Flux the plain one."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN_SIZE,
        intermediate_size=2 * CLIP_HIDDEN_SIZE,
        projection_dim=CLIP_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config)


def build_t5_encoder(tokenizer):
    """T5 v1.1-style encoder (gated GELU), as used by Flux and SD3."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_D_MODEL,
        d_kv=16,
        d_ff=2 * T5_D_MODEL,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def build_vae(factors: dict[str, float]):
    """A 16-channel AutoencoderKL without quant convs, like the SD3 and Flux VAEs."""
    from diffusers import AutoencoderKL

    stages = len(VAE_BLOCK_OUT_CHANNELS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * stages,
        up_block_types=("UpDecoderBlock2D",) * stages,
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=min(VAE_BLOCK_OUT_CHANNELS),
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **factors,
    )


def build_flux_transformer():
    """Two double-stream and two single-stream blocks, with Flux-dev's guidance embedding."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # latents are packed 2x2 before the transformer
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_HIDDEN_SIZE,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def build_sd3_transformer():
    """Three joint blocks; the caption stream takes T5 width, the pooled vector both CLIP projections."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_D_MODEL,
        caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_HIDDEN_SIZE,
        pos_embed_max_size=32,
    )


def _seeded(build, *args):
    """Builds one component right after re-seeding, so each component's weights do not depend on build order."""
    torch.manual_seed(SEED)
    return build(*args)


def build_tiny_flux(path: str | Path) -> Path:
    """Writes a tiny random FLUX.1-dev-shaped `FluxPipeline` to `path` and returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    path = Path(path)
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=_seeded(build_vae, FLUX_VAE_FACTORS),
        text_encoder=_seeded(build_clip_text_model, tokenizer, False),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(build_t5_encoder, tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=_seeded(build_flux_transformer),
    )
    pipeline.save_pretrained(path)
    return path


def build_tiny_sd3(path: str | Path) -> Path:
    """Writes a tiny random `StableDiffusion3Pipeline` (two CLIPs with projection + T5) to `path` and returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    path = Path(path)
    tokenizer, tokenizer_3 = build_clip_tokenizer(), build_t5_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = build_clip_text_model(tokenizer, True)
    text_encoder_2 = build_clip_text_model(tokenizer, True)  # drawn after the first: a different encoder
    pipeline = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=_seeded(build_vae, SD3_VAE_FACTORS),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=_seeded(build_t5_encoder, tokenizer_3),
        tokenizer_3=tokenizer_3,
        transformer=_seeded(build_sd3_transformer),
    )
    pipeline.save_pretrained(path)
    return path


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")


def _gradient(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for row in range(height):
        mix = row / max(height - 1, 1)
        colour = tuple(round(a + (b - a) * mix) for a, b in zip(top, bottom))
        draw.line([(0, row), (width - 1, row)], fill=colour)
    return image


def _draw_shape(image: Image.Image, shape: str, colour: tuple[int, int, int], rng: random.Random) -> None:
    width, height = image.size
    radius = rng.uniform(0.2, 0.35) * min(width, height)
    centre_x = rng.uniform(radius, width - radius)
    centre_y = rng.uniform(radius, height - radius)
    box = [centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius]
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        angles = (-90.0, 30.0, 150.0)  # an upright triangle
        corners = [
            (centre_x + radius * math.cos(math.radians(a)), centre_y + radius * math.sin(math.radians(a)))
            for a in angles
        ]
        draw.polygon(corners, fill=colour)


def write_sample_images(
    path: str | Path,
    sizes: Sequence[tuple[int, int]] = SAMPLE_SIZES,
    captions: bool = False,
    seed: int = SEED,
) -> Path:
    """Draws one PNG per `(width, height)` in `sizes`: a coloured shape on a gradient, a DreamBooth-style folder.

    With `captions`, also writes `metadata.jsonl` (`file_name`, `text`) so the folder loads as a `datasets`
    `imagefolder` with captions.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    records = []
    for index, size in enumerate(sizes):
        shape_colour, top, bottom = rng.sample(names, 3)
        shape = SHAPES[index % len(SHAPES)]
        image = _gradient(tuple(size), COLOURS[top], COLOURS[bottom])
        _draw_shape(image, shape, COLOURS[shape_colour], rng)
        file_name = f"{index:02d}_{shape}{IMAGE_SUFFIX}"
        image.save(path / file_name)
        records.append({"file_name": file_name, "text": f"a {shape_colour} {shape} on a {top} to {bottom} gradient"})
    if captions:
        lines = [json.dumps(record) for record in records]
        (path / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m accelerate_offload.testing.tiny_pipelines",
        description="Write a tiny random pipeline or sample training images to a folder (no download).",
    )
    parser.add_argument("what", choices=("flux", "sd3", "images"))
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument(
        "--captions", action="store_true", help="images: also write metadata.jsonl captions (imagefolder)"
    )
    args = parser.parse_args(argv)
    quiet_third_party_noise()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per few-kB shard of the tiny text encoders says nothing
    builders = {
        "flux": build_tiny_flux,
        "sd3": build_tiny_sd3,
        "images": lambda out: write_sample_images(out, captions=args.captions),
    }
    print(builders[args.what](args.out))


if __name__ == "__main__":
    main()
