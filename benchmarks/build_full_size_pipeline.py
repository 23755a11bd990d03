"""Writes a Flux.1-dev-size `FluxPipeline` with random bf16 weights, so the training script runs at full size on
a GPU without downloading anything. Image quality is meaningless; memory and time are those of the real model.

Transformer and T5-XXL come from `configs/models/`; the CLIP-L and VAE shapes are Flux.1-dev's. Tokenizers are
the project's code-built ones (small vocabularies, so token ids stay in range).

    python benchmarks/build_full_size_pipeline.py --output_dir flux-dev-random
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from accelerate_offload.testing.tiny_pipelines import FLUX_SCHEDULER_CONFIG, build_clip_tokenizer, build_t5_tokenizer

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


def model_config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    torch.set_default_dtype(torch.bfloat16)  # random init directly in bf16, on the GPU where there is one
    with torch.device(device):
        transformer = FluxTransformer2DModel(**model_config("flux-dev-transformer.json"))
        t5_config = T5Config(**model_config("t5-xxl-encoder.json"), is_encoder_decoder=False,
                             pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id)
        text_encoder_2 = T5EncoderModel(t5_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, bos_token_id=clip_tokenizer.bos_token_id,
                                                    eos_token_id=clip_tokenizer.eos_token_id,
                                                    pad_token_id=clip_tokenizer.pad_token_id))
        vae = AutoencoderKL(**FLUX_VAE)
    torch.set_default_dtype(torch.float32)
    print(f"built the models on {device} in {time.perf_counter() - start:.0f} s; writing {args.output_dir}", flush=True)
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), vae=vae, text_encoder=text_encoder,
        tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipeline.save_pretrained(args.output_dir, max_shard_size="10GB")
    print(f"wrote {args.output_dir} ({sum(p.numel() for p in transformer.parameters()) / 1e9:.1f} B transformer "
          f"parameters) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
