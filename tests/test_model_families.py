"""Transformers the registry does not list stream through their class's own declared blocks, with no `block_names`:
tiny Flux.2, Qwen-Image, Wan, Chroma and Z-Image, LoRA gradients equal to the plain run bit for bit in fp32; those
that declare none ask for `block_names`."""

from __future__ import annotations

import copy
from collections.abc import Callable

import diffusers
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    ChromaTransformer2DModel,
    Flux2Transformer2DModel,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from torch import nn

from accelerate_offload import BlocksNotFoundError, find_blocks, offload_model
from accelerate_offload.registry import MODEL_BLOCK_LISTS
from test_models import with_lora
from toy_models import ToyBlock

BATCH, TEXT_TOKENS = 2, 7


def _random(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def flux2() -> tuple[nn.Module, dict]:
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
    )
    generator = torch.Generator().manual_seed(1)
    image_ids = torch.zeros(16, 4)
    image_ids[:, 1], image_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    text_ids = torch.zeros(TEXT_TOKENS, 4)
    text_ids[:, 3] = torch.arange(TEXT_TOKENS)
    return model, {
        "hidden_states": _random(BATCH, 16, 16, generator=generator),
        "encoder_hidden_states": _random(BATCH, TEXT_TOKENS, 24, generator=generator),
        "timestep": torch.full((BATCH,), 0.6), "guidance": torch.full((BATCH,), 3.5),
        "img_ids": image_ids, "txt_ids": text_ids,
    }


def qwen_image() -> tuple[nn.Module, dict]:
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(2, 2, 4),
    )
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(BATCH, TEXT_TOKENS)
    mask[1, -2:] = 0  # a shorter prompt in the batch
    return model, {
        "hidden_states": _random(BATCH, 16, 16, generator=generator),
        "encoder_hidden_states": _random(BATCH, TEXT_TOKENS, 24, generator=generator),
        "encoder_hidden_states_mask": mask, "timestep": torch.full((BATCH,), 0.6), "img_shapes": [(1, 4, 4)] * BATCH,
    }


def wan() -> tuple[nn.Module, dict]:
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=24,
        freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    )
    generator = torch.Generator().manual_seed(1)
    return model, {
        "hidden_states": _random(BATCH, 4, 2, 4, 4, generator=generator), "timestep": torch.full((BATCH,), 600),
        "encoder_hidden_states": _random(BATCH, TEXT_TOKENS, 24, generator=generator),
    }


def chroma() -> tuple[nn.Module, dict]:
    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    )
    generator = torch.Generator().manual_seed(1)
    image_ids = torch.zeros(16, 3)
    image_ids[:, 1], image_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return model, {
        "hidden_states": _random(BATCH, 16, 16, generator=generator),
        "encoder_hidden_states": _random(BATCH, TEXT_TOKENS, 24, generator=generator),
        "timestep": torch.full((BATCH,), 0.6), "img_ids": image_ids, "txt_ids": torch.zeros(TEXT_TOKENS, 3),
    }


def z_image() -> tuple[nn.Module, dict]:
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=24, axes_dims=[2, 2, 4], axes_lens=[64, 32, 32],
    )
    generator = torch.Generator().manual_seed(1)
    return model, {
        "x": [_random(4, 1, 8, 8, generator=generator) for _ in range(BATCH)], "t": torch.full((BATCH,), 0.6),
        "cap_feats": [_random(TEXT_TOKENS, 24, generator=generator), _random(TEXT_TOKENS - 2, 24, generator=generator)],
    }


# family -> (builder, the block lists the declaration resolves to, in the order the model runs them)
FAMILIES: dict[str, tuple[Callable[[], tuple[nn.Module, dict]], tuple[str, ...]]] = {
    "flux2": (flux2, ("transformer_blocks", "single_transformer_blocks")),
    "qwen-image": (qwen_image, ("transformer_blocks",)),
    "wan": (wan, ("blocks",)),
    "chroma": (chroma, ("transformer_blocks", "single_transformer_blocks")),
    "z-image": (z_image, ("noise_refiner", "context_refiner", "layers")),
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"]


def build(family: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model, inputs = FAMILIES[family][0]()
    return with_lora(model, LORA_TARGETS), inputs


def train_step(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(**inputs, return_dict=False)[0]
    outputs = output if isinstance(output, list) else [output]  # Z-Image returns one tensor per sample
    loss = sum(out.square().mean() for out in outputs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_declared_blocks_are_found_in_execution_order(family: str) -> None:
    model, _ = build(family)
    assert type(model).__name__ not in MODEL_BLOCK_LISTS  # found through the class's `_repeated_blocks`
    blocks = find_blocks(model)
    lists = list(dict.fromkeys(name.rsplit(".", 1)[0] for name, _ in blocks))
    assert tuple(lists) == FAMILIES[family][1]
    assert len(blocks) == sum(len(model.get_submodule(name)) for name in lists)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_gradients_equal_the_plain_run(family: str, fraction: float) -> None:
    reference, inputs = build(family)
    offloaded = copy.deepcopy(reference)
    conductor = offload_model(offloaded, "cpu", layer_offload_fraction=fraction, activation_offloading=True,
                              activation_min_bytes=0)
    conductor.poison_evicted = True  # a dropped block read later turns the result into NaN
    assert len(conductor.weights) == conductor.block_count - conductor.resident_count > 0
    expected_loss, expected = train_step(reference, inputs)
    loss, actual = train_step(offloaded, inputs)
    assert conductor.activations.packed_bytes > 0
    assert torch.equal(loss, expected_loss)
    assert len(actual) == len(expected) > 0
    for name, grad in expected.items():
        assert torch.equal(actual[name], grad), name
    assert conductor.streamed_on_device == []


class _DeclaringModel(nn.Module):
    """Declares its blocks as accelerate's device maps read them, with a nested list inside one of them."""

    _no_split_modules = ["ToyBlock"]

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.stages = nn.ModuleList([ToyBlock(4), ToyBlock(4)])
        self.stages[0].inner = nn.ModuleList([ToyBlock(4)])  # a list inside a block is part of that block


def test_no_split_modules_is_the_fallback_and_nested_lists_stay_in_their_block() -> None:
    assert [name for name, _ in find_blocks(_DeclaringModel())] == ["stages.0", "stages.1"]


# diffusers 0.42 transformers that build with their default arguments but declare no repeated blocks (README)
UNDECLARED = ["AceStepTransformer1DModel", "AllegroTransformer3DModel", "BriaTransformer2DModel",
              "ConsisIDTransformer3DModel", "DiTTransformer2DModel", "PRXTransformer2DModel"]


@pytest.mark.parametrize("class_name", UNDECLARED)
def test_a_transformer_that_declares_no_blocks_asks_for_block_names(class_name: str) -> None:
    with init_empty_weights():
        model = getattr(diffusers, class_name)()
    with pytest.raises(BlocksNotFoundError, match=f"blocks of {class_name} and its class declares none.*block_names"):
        find_blocks(model)
