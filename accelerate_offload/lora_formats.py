"""A diffusers-keyed LoRA rewritten with kohya keys (`lora_unet_...`), the layout ComfyUI, Forge and sd-scripts load.

Kohya names follow the original checkpoints' modules, where Flux and SD3 fuse the attention projections: Flux's
`img_attn.qkv` is diffusers' `to_q`, `to_k`, `to_v`; a single block's `linear1` is those three and `proj_mlp`;
SD3's `x_block.attn.qkv` likewise. A fused module gets one LoRA whose down matrix stacks the parts' downs and whose
up matrix is block-diagonal (a part without a LoRA gets zero rows), so its update equals the parts' updates exactly.
This is how sd-scripts itself writes and reads fused LoRAs, and diffusers' Flux reader
(`_convert_kohya_flux_lora_to_diffusers`) splits them back. `alpha` is stored per module: scale = alpha / rank.

diffusers 0.42 reads kohya Flux files (its reader assumes Flux.1's sizes for a single block's `linear1`: 3 x 3072
+ 12288 rows) and has no reader for kohya SD3 files, which ComfyUI and sd-scripts read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .adapters import adapter_state_dict, module_of

KOHYA_PREFIX = "lora_unet_"
KOHYA_FAMILIES = ("flux", "sd3")

# (diffusers module pattern, kohya module, part index within a fused module); {0} is the block number
_FLUX = (
    (r"transformer_blocks\.(\d+)\.attn\.to_q", "double_blocks_{0}_img_attn_qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", "double_blocks_{0}_img_attn_qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", "double_blocks_{0}_img_attn_qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", "double_blocks_{0}_txt_attn_qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", "double_blocks_{0}_txt_attn_qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", "double_blocks_{0}_txt_attn_qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks_{0}_img_attn_proj", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks_{0}_txt_attn_proj", 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "double_blocks_{0}_img_mlp_0", 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "double_blocks_{0}_img_mlp_2", 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "double_blocks_{0}_txt_mlp_0", 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "double_blocks_{0}_txt_mlp_2", 0),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "double_blocks_{0}_img_mod_lin", 0),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "double_blocks_{0}_txt_mod_lin", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_q", "single_blocks_{0}_linear1", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_k", "single_blocks_{0}_linear1", 1),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_v", "single_blocks_{0}_linear1", 2),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", "single_blocks_{0}_linear1", 3),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks_{0}_linear2", 0),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", "single_blocks_{0}_modulation_lin", 0),
    (r"x_embedder", "img_in", 0),
    (r"context_embedder", "txt_in", 0),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in_in_layer", 0),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in_out_layer", 0),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in_in_layer", 0),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in_out_layer", 0),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in_in_layer", 0),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in_out_layer", 0),
    (r"proj_out", "final_layer_linear", 0),
)
_SD3 = (
    (r"transformer_blocks\.(\d+)\.attn\.to_q", "joint_blocks_{0}_x_block_attn_qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", "joint_blocks_{0}_x_block_attn_qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", "joint_blocks_{0}_x_block_attn_qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", "joint_blocks_{0}_context_block_attn_qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", "joint_blocks_{0}_context_block_attn_qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", "joint_blocks_{0}_context_block_attn_qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "joint_blocks_{0}_x_block_attn_proj", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "joint_blocks_{0}_context_block_attn_proj", 0),
    (r"transformer_blocks\.(\d+)\.attn2\.to_q", "joint_blocks_{0}_x_block_attn2_qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn2\.to_k", "joint_blocks_{0}_x_block_attn2_qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn2\.to_v", "joint_blocks_{0}_x_block_attn2_qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0", "joint_blocks_{0}_x_block_attn2_proj", 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "joint_blocks_{0}_x_block_mlp_fc1", 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "joint_blocks_{0}_x_block_mlp_fc2", 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "joint_blocks_{0}_context_block_mlp_fc1", 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "joint_blocks_{0}_context_block_mlp_fc2", 0),
    (r"context_embedder", "context_embedder", 0),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder_mlp_0", 0),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder_mlp_2", 0),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder_mlp_0", 0),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder_mlp_2", 0),
    (r"proj_out", "final_layer_linear", 0),
)
_TABLES = {"flux": _FLUX, "sd3": _SD3}
# the diffusers modules of each fused part, in order; "{0}" is the block number
_PARTS = {
    "flux": {
        "img_attn_qkv": ("transformer_blocks.{0}.attn.to_q", "transformer_blocks.{0}.attn.to_k",
                         "transformer_blocks.{0}.attn.to_v"),
        "txt_attn_qkv": ("transformer_blocks.{0}.attn.add_q_proj", "transformer_blocks.{0}.attn.add_k_proj",
                         "transformer_blocks.{0}.attn.add_v_proj"),
        "linear1": ("single_transformer_blocks.{0}.attn.to_q", "single_transformer_blocks.{0}.attn.to_k",
                    "single_transformer_blocks.{0}.attn.to_v", "single_transformer_blocks.{0}.proj_mlp"),
    },
    "sd3": {
        "x_block_attn_qkv": ("transformer_blocks.{0}.attn.to_q", "transformer_blocks.{0}.attn.to_k",
                             "transformer_blocks.{0}.attn.to_v"),
        "context_block_attn_qkv": ("transformer_blocks.{0}.attn.add_q_proj", "transformer_blocks.{0}.attn.add_k_proj",
                                   "transformer_blocks.{0}.attn.add_v_proj"),
        "x_block_attn2_qkv": ("transformer_blocks.{0}.attn2.to_q", "transformer_blocks.{0}.attn2.to_k",
                              "transformer_blocks.{0}.attn2.to_v"),
    },
}  # fmt: skip


def kohya_name(module: str, family: str) -> tuple[str, int] | None:
    """(kohya module, part index) of a diffusers module of the `family` transformer; None where kohya has none."""
    for pattern, name, part in _TABLES[family]:
        match = re.fullmatch(pattern, module)
        if match:
            return KOHYA_PREFIX + name.format(*match.groups()), part
    return None


def unmapped_modules(modules, family: str) -> list[str]:
    """The adapter's modules that have no kohya name (checked before training, so the save cannot fail on them)."""
    return sorted(module for module in modules if kohya_name(module, family) is None)


def _fused_parts(kohya: str, family: str) -> tuple[str, ...] | None:
    """The diffusers modules of a fused kohya module, in order, or None for a module that is not fused."""
    body = kohya.removeprefix(KOHYA_PREFIX)
    for suffix, parts in _PARTS[family].items():
        match = re.fullmatch(rf"[a-z]+_blocks_(\d+)_{suffix}", body)
        if match:
            return tuple(part.format(match.group(1)) for part in parts)
    return None


def to_kohya(
    lora: dict[str, torch.Tensor], scale: float, family: str, out_features: dict[str, int]
) -> dict[str, torch.Tensor]:
    """The kohya-keyed state dict of a diffusers-keyed LoRA (`module.lora_A.weight` / `.lora_B.weight`, no prefix).

    `scale` is the LoRA's alpha / rank; `out_features` gives each linear module's output size (the rows a fused
    part without a LoRA fills with zeros).
    """
    modules = sorted({key.rpartition(".lora_")[0] for key in lora})
    missing = unmapped_modules(modules, family)
    if missing:
        raise ValueError(f"no kohya name for {', '.join(missing[:3])}")
    grouped: dict[str, list[str]] = {}
    for module in modules:
        grouped.setdefault(kohya_name(module, family)[0], []).append(module)
    converted: dict[str, torch.Tensor] = {}
    for kohya, members in grouped.items():
        parts = _fused_parts(kohya, family) or tuple(members)
        downs = [lora[f"{module}.lora_A.weight"] for module in parts if module in members]
        rank = sum(down.shape[0] for down in downs)
        up = torch.zeros(sum(out_features[module] for module in parts), rank)
        row = column = 0
        for module in parts:
            if module in members:
                part_up = lora[f"{module}.lora_B.weight"]
                up[row : row + part_up.shape[0], column : column + part_up.shape[1]] = part_up
                column += part_up.shape[1]
            row += out_features[module]
        converted[f"{kohya}.lora_down.weight"] = torch.cat(downs).contiguous()
        converted[f"{kohya}.lora_up.weight"] = up
        converted[f"{kohya}.alpha"] = torch.tensor(scale * rank)
    return converted


def linear_out_features(model: torch.nn.Module) -> dict[str, int]:
    """Each linear module's output size by its name, with PEFT's wrappers looked through."""
    sizes = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear):
            sizes[name.removesuffix(".base_layer")] = base.out_features
    return sizes


def kohya_problem(model: torch.nn.Module, family: str) -> str | None:
    """Why the model's LoRA has no kohya file (a module kohya has no name for), checked before training."""
    missing = unmapped_modules({module_of(key) for key in adapter_state_dict(model)}, family)
    if not missing:
        return None
    return (
        f"--save_format kohya: kohya files have no name for {', '.join(missing[:3])}; leave those modules out of "
        "--lora_layers or drop kohya"
    )


def write_kohya_file(model: torch.nn.Module, family: str, path: Path, dtype: torch.dtype | None = None) -> Path:
    """Writes the model's LoRA with kohya keys to `path` (safetensors), in `dtype` (None: as trained)."""
    from safetensors.torch import save_file

    config = model.peft_config["default"]
    tensors = to_kohya(adapter_state_dict(model), config.lora_alpha / config.r, family, linear_out_features(model))
    if dtype is not None:
        tensors = {key: value.to(dtype) for key, value in tensors.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt"})
    return path
