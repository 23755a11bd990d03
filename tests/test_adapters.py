"""Adapters beyond LoRA under streaming, the kohya-keyed files read back by diffusers, the adapter's CPU EMA."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxPipeline
from test_models import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3, train_step

from accelerate_offload import offload_model
from accelerate_offload.adapters import adapter_config, adapter_parameters
from accelerate_offload.ema import AdapterEMA
from accelerate_offload.lora_formats import kohya_name, to_kohya

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]
ADAPTERS = {
    "lokr": {"adapter": "lokr"},
    "loha": {"adapter": "loha"},
    "dora": {"adapter": "lora", "use_dora": True},
}


def with_adapter(model: torch.nn.Module, adapter: str, use_dora: bool = False) -> torch.nn.Module:
    """A frozen model with an adapter whose update is not zero (PEFT starts LoKr and LoHa at zero)."""
    model.requires_grad_(False)
    model.add_adapter(adapter_config(adapter, 4, 4, TARGETS, use_dora=use_dora))
    generator = torch.Generator().manual_seed(3)
    for _, param in adapter_parameters(model):
        param.data = param.data + torch.randn(param.shape, generator=generator) * 0.05
    return model


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
@pytest.mark.parametrize(("build", "inputs"), [(tiny_flux, flux_inputs), (tiny_sd3, sd3_inputs)], ids=["flux", "sd3"])
def test_adapter_trains_streamed_as_resident(kind: str, build, inputs) -> None:
    """Base weights stream (device copies poisoned once evicted); the adapter stays resident, gradients bit for bit."""
    reference = with_adapter(build(), **ADAPTERS[kind])
    offloaded = copy.deepcopy(reference)
    conductor = offload_model(offloaded, "cpu", layer_offload_fraction=1.0, activation_offloading=True,
                              activation_min_bytes=0)  # fmt: skip
    conductor.poison_evicted = True
    streamed = {
        id(slot.module._parameters[slot.name])
        for weights in conductor.weights.values()
        for slot in weights._slots
        if slot.is_parameter
    }

    expected_loss, expected = train_step(reference, inputs())
    loss, actual = train_step(offloaded, inputs())

    adapter = adapter_parameters(offloaded)
    assert adapter and all(param.requires_grad and id(param) not in streamed for _, param in adapter)
    assert streamed, "the base weights stream"
    assert torch.equal(loss, expected_loss)
    assert actual.keys() == expected.keys() and len(actual) == len(adapter)
    for name, grad in expected.items():
        assert torch.equal(actual[name], grad), name


def random_lora(modules: dict[str, tuple[int, int]], rank: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    lora = {}
    for module, (out_features, in_features) in modules.items():
        lora[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        lora[f"{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    return lora


def delta(lora: dict[str, torch.Tensor], module: str, scale: float = 1.0) -> torch.Tensor:
    return scale * lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]


def test_kohya_flux_file_at_full_size_is_read_back_by_diffusers() -> None:
    """FLUX.1's sizes (the single blocks' `linear1` only converts at them): fused and plain modules, every part."""
    inner, mlp = 3072, 12288
    modules = {
        **{f"transformer_blocks.0.attn.{name}": (inner, inner) for name in ("to_q", "to_k", "to_v", "to_out.0")},
        **{f"transformer_blocks.0.attn.{name}": (inner, inner) for name in ("add_q_proj", "add_k_proj", "add_v_proj")},
        "transformer_blocks.0.ff.net.2": (inner, mlp),
        **{f"single_transformer_blocks.1.attn.{name}": (inner, inner) for name in ("to_q", "to_k", "to_v")},
        "single_transformer_blocks.1.proj_out": (inner, inner + mlp),
    }
    lora, scale = random_lora(modules), 0.5
    sizes = {**{module: shape[0] for module, shape in modules.items()}, "single_transformer_blocks.1.proj_mlp": mlp}

    kohya = to_kohya(lora, scale, "flux", sizes)
    back = FluxPipeline.lora_state_dict(kohya)

    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_single_blocks_1_linear1.alpha" in kohya
    read = {key.removeprefix("transformer."): value for key, value in back.items()}
    assert {key.rpartition(".lora_")[0] for key in read} == {*modules, "single_transformer_blocks.1.proj_mlp"}
    for module in modules:
        torch.testing.assert_close(delta(read, module), delta(lora, module, scale), rtol=1e-5, atol=1e-4)
    assert delta(read, "single_transformer_blocks.1.proj_mlp").abs().max() == 0, "no LoRA on proj_mlp"


def test_kohya_sd3_file_fuses_the_projections_as_the_original_checkpoint() -> None:
    """diffusers has no reader for kohya SD3 files: the fused update must equal the parts' updates, and the names
    must be the original MMDiT modules (`joint_blocks.N.x_block.attn.qkv`), as ComfyUI and sd-scripts read them."""
    inner = 16
    parts = [f"transformer_blocks.2.attn.{name}" for name in ("to_q", "to_k", "to_v")]
    modules = {parts[0]: (inner, inner), parts[2]: (inner, inner), "transformer_blocks.2.ff_context.net.2": (inner, 64)}
    lora = random_lora(modules)
    sizes = {**{module: shape[0] for module, shape in modules.items()}, parts[1]: inner}

    kohya = to_kohya(lora, 2.0, "sd3", sizes)

    fused = "lora_unet_joint_blocks_2_x_block_attn_qkv"
    assert sorted(kohya) == sorted(
        f"{name}.{suffix}"
        for name in (fused, "lora_unet_joint_blocks_2_context_block_mlp_fc2")
        for suffix in ("alpha", "lora_down.weight", "lora_up.weight")
    )
    rank = kohya[f"{fused}.lora_down.weight"].shape[0]
    update = kohya[f"{fused}.alpha"] / rank * kohya[f"{fused}.lora_up.weight"] @ kohya[f"{fused}.lora_down.weight"]
    expected = torch.cat([delta(lora, parts[0], 2.0), torch.zeros(inner, inner), delta(lora, parts[2], 2.0)])
    torch.testing.assert_close(update, expected)
    assert kohya_name("transformer_blocks.0.attn2.to_out.0", "sd3") == ("lora_unet_joint_blocks_0_x_block_attn2_proj", 0)
    assert kohya_name("transformer_blocks.0.norm1.linear", "sd3") is None


def test_ema_follows_diffusers_ema_model_and_lives_in_cpu_memory() -> None:
    from diffusers.training_utils import EMAModel

    model = with_adapter(tiny_flux(), "lora")
    trainable = [param for param in model.parameters() if param.requires_grad]
    ema, reference = AdapterEMA(model, decay=0.9), EMAModel(copy.deepcopy(trainable), decay=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for param in trainable:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        ema.step(model)
        reference.step(trainable)

    state = ema.state_dict()
    assert state["optimization_step"] == 5 and len(state["shadow"]) == len(trainable)
    assert all(value.device.type == "cpu" and value.dtype == torch.float32 for value in state["shadow"].values())
    for value, expected in zip(state["shadow"].values(), reference.shadow_params):
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)

    trained = [param.detach().clone() for param in trainable]
    with ema.averaged(model):
        assert all(torch.equal(param, value) for param, value in zip(trainable, state["shadow"].values()))
    assert all(torch.equal(param, value) for param, value in zip(trainable, trained)), "trained weights are back"

    again = AdapterEMA(model, decay=0.5)
    again.load_state_dict(copy.deepcopy(state))
    assert again.decay == 0.9 and all(torch.equal(again.shadow[name], state["shadow"][name]) for name in state["shadow"])
