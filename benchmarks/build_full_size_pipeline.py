"""Writes a Flux.1-dev-size `FluxPipeline` (or an SD3-medium-size `StableDiffusion3Pipeline`) with random bf16
weights, so the training scripts run at full size on a GPU without downloading anything. Image quality is
meaningless; memory and time are those of the real models.

Transformers and T5-XXL come from `configs/models/`; the CLIP and VAE shapes are the real models'. Tokenizers are
the project's code-built ones (small vocabularies, so token ids stay in range).

    python benchmarks/build_full_size_pipeline.py --output_dir flux-dev-random
    python benchmarks/build_full_size_pipeline.py --model sd3 --output_dir sd3-medium-random
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from accelerate_offload.testing.tiny_pipelines import (
    FLUX_SCHEDULER_CONFIG,
    SD3_SCHEDULER_CONFIG,
    SD3_VAE_FACTORS,
    build_clip_tokenizer,
    build_t5_tokenizer,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
)
CLIP_G = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
)
SD3_VAE = {**FLUX_VAE, **SD3_VAE_FACTORS}


def model_config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


def clip_config(shape: dict, tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def build_flux(clip_tokenizer, t5_tokenizer, t5_config: T5Config) -> FluxPipeline:
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), vae=AutoencoderKL(**FLUX_VAE),
        text_encoder=CLIPTextModel(clip_config(CLIP_L, clip_tokenizer)), tokenizer=clip_tokenizer,
        text_encoder_2=T5EncoderModel(t5_config), tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(**model_config("flux-dev-transformer.json")),
    )


def build_sd3(clip_tokenizer, t5_tokenizer, t5_config: T5Config) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG), vae=AutoencoderKL(**SD3_VAE),
        text_encoder=CLIPTextModelWithProjection(clip_config(CLIP_L, clip_tokenizer)), tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(CLIP_G, clip_tokenizer)),
        tokenizer_2=build_clip_tokenizer(), text_encoder_3=T5EncoderModel(t5_config), tokenizer_3=t5_tokenizer,
        transformer=SD3Transformer2DModel(**model_config("sd3-medium-transformer.json")),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["flux", "sd3"], default="flux")
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    t5_config = T5Config(**model_config("t5-xxl-encoder.json"), is_encoder_decoder=False,
                         pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id)
    torch.set_default_dtype(torch.bfloat16)  # random init directly in bf16, on the GPU where there is one
    with torch.device(device):
        pipeline = (build_flux if args.model == "flux" else build_sd3)(clip_tokenizer, t5_tokenizer, t5_config)
    torch.set_default_dtype(torch.float32)
    transformer = pipeline.transformer
    print(f"built the models on {device} in {time.perf_counter() - start:.0f} s; writing {args.output_dir}", flush=True)
    pipeline.save_pretrained(args.output_dir, max_shard_size="10GB")
    print(f"wrote {args.output_dir} ({sum(p.numel() for p in transformer.parameters()) / 1e9:.1f} B transformer "
          f"parameters) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
