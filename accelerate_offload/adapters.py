"""PEFT adapters beyond LoRA (DoRA, LoKr, LoHa): their configs, the files they are saved in, how they load.

What each type's saved file is, and which loader reads it (diffusers 0.42, PEFT 0.21):

- `lora` and `lora` with DoRA: diffusers' LoRA format; the pipeline's `load_lora_weights` reads it.
- `lokr`: the same file layout with `lokr_w1` / `lokr_w2` keys and the PEFT config in its header; diffusers'
  `transformer.load_lora_adapter` reads it (the pipelines' `load_lora_weights` accept `lora` keys only).
- `loha`: diffusers has no LoHa loader. The file has `hada_*` keys under diffusers' module names, an `alpha` per
  module (the LyCORIS layout ComfyUI reads) and the PEFT config in its header; `load_adapter_file` injects it with
  PEFT.

Only frozen weights stream: every adapter tensor has `requires_grad`, so it stays on the compute device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ADAPTER_TYPES = ("lora", "lokr", "loha")
# diffusers' key for the adapter config in a LoRA file's safetensors header
METADATA_KEY = "lora_adapter_metadata"
# the suffix of every adapter tensor's key after its module's name (one tensor a match)
ADAPTER_SUFFIXES = (
    ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b",
    ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b",
    ".hada_t1", ".hada_t2", ".alpha",
)  # fmt: skip


def adapter_config(
    adapter: str,
    rank: int,
    alpha: float,
    targets: list[str],
    *,
    dropout: float = 0.0,
    use_dora: bool = False,
    lokr_factor: int = -1,
):
    """The PEFT config of a fresh adapter. LoRA starts from gaussian A and zero B, LoKr and LoHa from PEFT's
    defaults (also a zero update), so training starts at the base model for every type."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if adapter == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=lokr_factor)
    if adapter == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
        use_dora=use_dora,
    )


def adapter_type(config) -> str:
    """'lora', 'lokr' or 'loha' for a PEFT config (DoRA is a LoRA)."""
    return {"LORA": "lora", "LOKR": "lokr", "LOHA": "loha"}[str(getattr(config.peft_type, "value", config.peft_type))]


def adapter_type_of_keys(keys) -> str | None:
    """The adapter type a saved file's keys hold (None for a file of no adapter)."""
    keys = list(keys)
    for kind, marker in (("lokr", ".lokr_"), ("loha", ".hada_"), ("lora", ".lora_")):
        if any(marker in key for key in keys):
            return kind
    return None


def adapter_checkpoint_problem(checkpoint: Path, keys, adapter: str, use_ema: bool) -> str | None:
    """What stops a run of `adapter` (with `use_ema`) from resuming `checkpoint`: another adapter type, or no EMA
    state (accelerate saves registered objects as `custom_checkpoint_N.pkl`)."""
    found = adapter_type_of_keys(keys)
    if found is not None and found != adapter:
        return f"its adapter is {found}, --adapter is {adapter} (pass --adapter {found} to continue it)"
    if use_ema and not list(checkpoint.glob("custom_checkpoint_*.pkl")):
        return "it has no EMA of the adapter (trained without --use_ema); drop --use_ema to continue it"
    return None


def module_of(key: str) -> str:
    """The module a saved adapter key belongs to, without the file's `transformer.` prefix."""
    key = key.removeprefix("transformer.")
    for suffix in ADAPTER_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def adapter_metadata(model: nn.Module) -> dict:
    """The model's adapter config as a dict that JSON can hold (PEFT keeps target modules as a set)."""
    config = model.peft_config["default"].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def adapter_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapter's tensors in `dtype` on the CPU under the keys PEFT and diffusers use (no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return {key: value.detach().to("cpu", dtype) for key, value in get_peft_model_state_dict(model).items()}


def adapter_file_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the saved file (without the `transformer.` prefix), in `dtype` (None: as trained): LoHa adds
    each module's `alpha`, which ComfyUI reads (PEFT scales by alpha / rank as LyCORIS does)."""
    state_dict = adapter_state_dict(model, dtype or torch.float32)
    config = model.peft_config["default"]
    if adapter_type(config) == "loha":
        for module in sorted({module_of(key) for key in state_dict}):
            state_dict[f"{module}.alpha"] = torch.tensor(float(config.alpha))
    return state_dict


def write_adapter_file(
    pipeline_class, model: nn.Module, folder: Path, weight_name: str, dtype: torch.dtype | None = None
) -> Path:
    """Writes the adapter in diffusers' file layout with its PEFT config in the header, by diffusers' writer."""
    pipeline_class.save_lora_weights(
        folder,
        transformer_lora_layers=adapter_file_tensors(model, dtype),
        transformer_lora_adapter_metadata=adapter_metadata(model),
        weight_name=weight_name,
    )
    return Path(folder) / weight_name


def read_adapter_file(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A saved adapter's tensors (keys without `transformer.`) and its PEFT config from the header, if any."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as file:
        header = file.metadata() or {}
    metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
    if metadata is not None:  # diffusers keeps each model's config under its prefix
        metadata = {key.removeprefix("transformer."): value for key, value in metadata.items()}
    tensors = {key.removeprefix("transformer."): value for key, value in load_file(path).items()}
    return tensors, metadata


def set_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Loads a saved file's tensors into the model's `default` adapter; returns the keys the model has no place for."""
    from peft import set_peft_model_state_dict

    tensors = {key: value for key, value in tensors.items() if not key.endswith(".alpha")}
    result = set_peft_model_state_dict(model, tensors, adapter_name="default")
    return list(getattr(result, "unexpected_keys", []) or [])


def load_adapter_file(transformer: nn.Module, path: Path) -> None:
    """Adds the adapter saved in `path` to `transformer` as its users would load it: diffusers' `load_lora_adapter`
    for LoRA, DoRA and LoKr, PEFT's injection for LoHa (which diffusers does not read)."""
    tensors, metadata = read_adapter_file(path)
    if adapter_type_of_keys(tensors) != "loha":
        transformer.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="transformer")
        return
    from peft import LoHaConfig, inject_adapter_in_model

    inject_adapter_in_model(LoHaConfig(**metadata), transformer, adapter_name="default")
    set_adapter_state(transformer, tensors)


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters of every PEFT adapter layer in `model` (LoRA, DoRA magnitude, LoKr, LoHa), with their names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: dict[int, tuple[str, nn.Parameter]] = {}  # by identity: a DoRA layer is reached twice
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attribute in module.adapter_layer_names:
            container = getattr(module, attribute, None)
            if isinstance(container, nn.Module):
                for name, param in container.named_parameters():
                    found.setdefault(id(param), (f"{module_name}.{attribute}.{name}", param))
    return list(found.values())


# ----------------------------------------------------------------------------------------------------------------
# What the training scripts check and write about adapters
# ----------------------------------------------------------------------------------------------------------------

SAVE_FORMATS = ("diffusers", "kohya")
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
EMA_SUFFIX = "_ema"


def save_formats(text: str) -> list[str]:
    """`--save_format`'s comma list, in order, without repeats; diffusers is always written (resume reads it)."""
    found = [part.strip() for part in text.split(",") if part.strip()]
    return list(dict.fromkeys(["diffusers", *found]))


def flag_problem(
    adapter: str, use_dora: bool, save_format: str, dropout: float, lokr_factor: int, ema_decay: float
) -> str | None:
    """What is wrong with the adapter, format and EMA flags together, as one line naming the fix; None if nothing."""
    unknown = [name for name in save_formats(save_format) if name not in SAVE_FORMATS]
    if unknown:
        return f"--save_format: unknown format '{unknown[0]}'; give a comma list of {', '.join(SAVE_FORMATS)}"
    if use_dora and adapter != "lora":
        return f"--use_dora is a LoRA variant: use it with --adapter lora, not {adapter}"
    if "kohya" in save_formats(save_format) and (adapter != "lora" or use_dora):
        return "--save_format kohya writes plain LoRAs only: train --adapter lora without --use_dora, or drop kohya"
    if dropout and adapter != "lora":
        return f"--lora_dropout applies to --adapter lora only; drop it for --adapter {adapter}"
    if lokr_factor == 0 or lokr_factor < -1:
        return f"--lokr_factor must be -1 (chosen per layer) or a positive factor, got {lokr_factor}"
    if not 0.0 < ema_decay < 1.0:
        return f"--ema_decay must be in (0, 1), e.g. 0.999, got {ema_decay}"
    return None


def ema_weight_name(weight_name: str) -> str:
    """`pytorch_lora_weights.safetensors` -> `pytorch_lora_weights_ema.safetensors` (the EMA's file beside it)."""
    stem, dot, suffix = weight_name.rpartition(".")
    return f"{stem}{EMA_SUFFIX}{dot}{suffix}"


def usage_snippet(adapter: str, pipeline_class: str, base: str, repo_id: str, weight_name: str) -> str:
    """The model card's Python lines that load the saved file, with the loader its adapter type needs."""
    load = {
        "lora": f'pipeline.load_lora_weights("{repo_id}", weight_name="{weight_name}")',
        "lokr": (
            f'pipeline.transformer.load_lora_adapter("{repo_id}", weight_name="{weight_name}", prefix="transformer")'
        ),
        "loha": (
            "from huggingface_hub import hf_hub_download\n"
            "from accelerate_offload.adapters import load_adapter_file  # PEFT injection: diffusers reads no LoHa\n\n"
            f'load_adapter_file(pipeline.transformer, Path(hf_hub_download("{repo_id}", "{weight_name}")))'
        ),
    }[adapter]
    path_import = "from pathlib import Path\n\n" if adapter == "loha" else ""
    return (
        f"{path_import}import torch\nfrom diffusers import {pipeline_class}\n\n"
        f'pipeline = {pipeline_class}.from_pretrained("{base}", dtype=torch.bfloat16).to("cuda")\n{load}'
    )


def formats_note(adapter: str, formats: list[str], use_ema: bool, weight_name: str) -> str:
    """The model card's lines on the files: which loader reads each, the kohya file, the EMA file."""
    lines = {
        "lora": f"`{weight_name}` is in diffusers' LoRA format: `load_lora_weights` reads it (ComfyUI too).",
        "lokr": (
            f"`{weight_name}` is a LoKr in diffusers' key layout (`lokr_w1`, `lokr_w2`, PEFT config in the header): "
            "diffusers reads it with `transformer.load_lora_adapter` (its pipelines' `load_lora_weights` read LoRA "
            "keys only); ComfyUI reads the same keys."
        ),
        "loha": (
            f"`{weight_name}` is a LoHa (`hada_*` keys under diffusers' module names, an `alpha` per module, the "
            "PEFT config in the header). diffusers has no LoHa loader: load it with PEFT as below (ComfyUI reads "
            "the file as it is)."
        ),
    }
    notes = [lines[adapter]]
    if "kohya" in formats:
        notes.append(
            f"`{KOHYA_WEIGHT_NAME}` holds the same LoRA with kohya keys (`lora_unet_...`, `lora_down` / `lora_up` / "
            "`alpha`), for ComfyUI, Forge and sd-scripts."
        )
    if use_ema:
        notes.append(
            f"Files ending in `{EMA_SUFFIX}` hold the exponential moving average of the adapter (the weights the "
            "validation and final images used); load them the same way."
        )
    return "\n\n".join(notes)
