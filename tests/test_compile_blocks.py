"""`compile_blocks`: the tiny Flux and SD3 transformers trained with compiled blocks give the eager run's loss and
LoRA gradients; blocks of a class share their compiled graphs, streamed or resident; nothing compiles after the
first step although streamed weights are re-pointed at fresh copies on every visit.

Most cases compile with the "aot_eager" backend: dynamo's guards and AOTAutograd's forward and backward graphs,
exactly as inductor would receive them, without generating kernels (minutes of C++ on a CPU). The cases that run
inductor itself carry the `slow` marker: `python -m pytest -m slow` runs them.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from accelerate_offload import LayerOffloadPlugin, OffloadConfigError, get_conductor, offload_model
from accelerate_offload.block_compiler import _role_codes
from test_models import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3, train_step, with_lora

# model, batch, and the graphs each block class may need, resident and streamed blocks together: one, another for
# the first block (its input needs no gradient), and for SD3 one more for the last block (context_pre_only,
# computed otherwise); never one per block
FAMILIES = {
    "flux": (tiny_flux, flux_inputs, {FluxTransformerBlock: 2, FluxSingleTransformerBlock: 1}),
    "sd3": (tiny_sd3, sd3_inputs, {JointTransformerBlock: 3}),
}
CASES = {
    "fraction0.5": {"layer_offload_fraction": 0.5, "activation_offloading": True},
    "fraction1.0": {"layer_offload_fraction": 1.0, "activation_offloading": True},
    "fraction1.0-chunks2": {"layer_offload_fraction": 1.0, "activation_offloading": True, "sequence_chunks": 2},
}


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Graphs compiled by other tests in this process would hide what these compile (and count against dynamo's
    limit of graphs per function)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def frames_compiled() -> int:
    return counters["frames"]["ok"]


def graphs_per_code() -> dict[str, int]:
    """How many graphs dynamo holds for each block forward and each chunk function's role."""
    codes = {f"{cls.__name__}.forward": cls.forward.__code__ for family in FAMILIES.values() for cls in family[2]}
    codes.update({
        f"{code.co_filename}:{code.co_firstlineno} {code.co_name} ({role})": own for (code, role), own in _role_codes.items()
    })
    return {name: len(_debug_get_cache_entry_list(code)) for name, code in codes.items()}


def pointers_seen(conductor) -> set[int]:
    """Records the storage a streamed block's first weight points at whenever that block starts to run. Each
    copy is kept alive, so the allocator cannot hand the next copy the same address: every load is at a new one
    (and an evicted copy, poisoned, stays where a graph that kept its address would read it)."""
    index = max(conductor.weights)
    block = conductor.blocks[index]
    weight = next(p for p in block.parameters() if not p.requires_grad)
    seen: set[int] = set()
    kept: list[torch.Tensor] = []
    original = conductor.before_block

    def recording(block_index: int, backward: bool) -> None:
        original(block_index, backward)
        if block_index == index:
            seen.add(weight.data_ptr())
            kept.append(weight.data)

    conductor.before_block = recording
    return seen


def compiled_and_eager(family: str, settings: dict, backend: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    build = FAMILIES[family][0]
    eager = with_lora(build())
    compiled = copy.deepcopy(eager)
    offload_model(eager, "cpu", **settings)
    offload_model(compiled, "cpu", compile_blocks=True, compile_backend=backend, **settings)
    get_conductor(compiled).poison_evicted = True  # a graph that kept an evicted copy's address would read NaN
    return eager, compiled


def assert_same_training(eager, compiled, inputs, steps: int = 3, tolerance: float = 0.0) -> list[int]:
    """Trains both on the same batch; returns the frames compiled in each step of the compiled model."""
    per_step = []
    for _ in range(steps):
        before = frames_compiled()
        expected_loss, expected = train_step(eager, inputs)
        loss, grads = train_step(compiled, inputs)
        per_step.append(frames_compiled() - before)
        torch.testing.assert_close(loss, expected_loss, rtol=tolerance, atol=tolerance)
        assert grads.keys() == expected.keys() and len(grads) > 0
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, rtol=tolerance, atol=tolerance, msg=name)
    return per_step


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_blocks_train_like_eager_and_compile_once(family: str, case: str, caplog) -> None:
    eager, compiled = compiled_and_eager(family, CASES[case], "aot_eager")
    conductor = get_conductor(compiled)
    pointers = pointers_seen(conductor)
    with caplog.at_level(logging.INFO, logger="accelerate_offload"):
        per_step = assert_same_training(eager, compiled, FAMILIES[family][1]())

    assert per_step[1:] == [0, 0], per_step  # after the first step: nothing compiled, though weights moved
    assert len(pointers) > 1, "the streamed block never got a fresh copy: the test would prove nothing"
    graphs = graphs_per_code()
    for cls, most in FAMILIES[family][2].items():
        assert 0 < graphs[f"{cls.__name__}.forward"] <= most or "chunks" in case, graphs
    # a chunk function per stream: forward (no grad), backward, and the first block's backward
    assert max(graphs.values()) <= 4, graphs
    reports = [r.getMessage() for r in caplog.records if "compiled blocks:" in r.getMessage()]
    if per_step[0]:
        assert len(reports) == 1 and "in the first step" in reports[0], reports


def test_compiled_blocks_in_inference_reuse_their_graphs() -> None:
    """No gradients, no checkpointing: the hook calls the compiled forward itself."""
    build, inputs = FAMILIES["flux"][0], flux_inputs()
    eager = build().requires_grad_(False)
    compiled = copy.deepcopy(eager)
    offload_model(compiled, "cpu", layer_offload_fraction=1.0, gradient_checkpointing=False, compile_blocks=True,
                  compile_backend="aot_eager")
    with torch.no_grad():
        expected = eager(**inputs, return_dict=False)[0]
        first = compiled(**inputs, return_dict=False)[0]
        before = frames_compiled()
        second = compiled(**inputs, return_dict=False)[0]
    assert frames_compiled() == before
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_kernels_with_streamed_weights_match_eager() -> None:
    """Inductor's own kernels (fused, reordered), resident and streamed blocks, activations offloaded."""
    eager, compiled = compiled_and_eager("flux", CASES["fraction0.5"], "inductor")
    per_step = assert_same_training(eager, compiled, flux_inputs(), steps=2, tolerance=1e-5)
    assert per_step[1] == 0


@pytest.mark.slow
def test_inductor_chunk_rows_match_eager() -> None:
    eager, compiled = compiled_and_eager("sd3", CASES["fraction1.0-chunks2"], "inductor")
    per_step = assert_same_training(eager, compiled, sd3_inputs(), steps=2, tolerance=1e-5)
    assert per_step[1] == 0


@pytest.mark.slow
def test_inference_placement_compiles_the_transformer(tiny_flux_path) -> None:
    """Through place_pipeline, with the plugin's compile_blocks and inductor."""
    from diffusers import FluxPipeline

    from accelerate_offload.inference import place_pipeline

    plugin = LayerOffloadPlugin(layer_offload_fraction=1.0, compile_blocks=True)
    pipeline = FluxPipeline.from_pretrained(tiny_flux_path)
    eager = copy.deepcopy(pipeline.transformer).requires_grad_(False)
    place_pipeline(pipeline, "cpu", plugin, stream=True)
    conductor = get_conductor(pipeline.transformer)
    assert conductor.compiler is not None and conductor.compiler.mode == "default"
    assert get_conductor(pipeline.text_encoder_2).compiler is None  # T5 streams as it did, uncompiled
    config = pipeline.transformer.config
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        expected = eager(**inputs)[0]
        first = pipeline.transformer(**inputs)[0]
        before = frames_compiled()
        second = pipeline.transformer(**inputs)[0]
    assert frames_compiled() == before and conductor.compiler.compiles > 0
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_compile_blocks_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LayerOffloadPlugin().compile_blocks is False
    assert not LayerOffloadPlugin().enabled
    monkeypatch.setenv("ACCELERATE_OFFLOAD_COMPILE_BLOCKS", "true")
    plugin = LayerOffloadPlugin()
    assert plugin.compile_blocks == "default" and plugin.enabled
    assert plugin.offload_settings("cpu").compile_blocks == "default"  # compiling needs no CUDA
    assert plugin.to_env()["ACCELERATE_OFFLOAD_COMPILE_BLOCKS"] == "default"
    monkeypatch.delenv("ACCELERATE_OFFLOAD_COMPILE_BLOCKS")
    assert LayerOffloadPlugin(compile_blocks="max-autotune-no-cudagraphs").compile_blocks == "max-autotune-no-cudagraphs"
    assert LayerOffloadPlugin(compile_blocks="off").compile_blocks is False
    with pytest.raises(OffloadConfigError, match="reduce-overhead records CUDA graphs.*use true"):
        LayerOffloadPlugin(compile_blocks="reduce-overhead")
    with pytest.raises(OffloadConfigError, match="compile_blocks must be true, false or one of default"):
        LayerOffloadPlugin(compile_blocks="fastest")


def test_compile_blocks_in_the_config_file(tmp_path) -> None:
    from accelerate_offload.cli import main, read_config

    path = tmp_path / "compiled.yaml"
    assert main(["config", "--config_file", str(path), "--layer_offload_fraction", "1.0", "--compile_blocks"]) == 0
    assert read_config(path)["offload_config"]["compile_blocks"] == "default"
    path.write_text(path.read_text().replace("compile_blocks: default", "compile_blocks: reduce-overhead"))
    assert main(["launch", "--config_file", str(path), "train.py"]) == 2  # refused before anything starts


CUDA = torch.device("cuda", 0)


@pytest.mark.cuda
@pytest.mark.parametrize("chunks", [1, 2])
def test_compiled_streamed_flux_matches_eager_in_bf16(chunks: int) -> None:
    from test_cuda import bf16_step, bigger_flux, flux_batch, relative_error

    reference = with_lora(bigger_flux())
    for p in reference.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    compiled = copy.deepcopy(reference)
    settings = {"layer_offload_fraction": 1.0, "activation_offloading": True, "sequence_chunks": chunks}
    offload_model(reference, CUDA, **settings)
    conductor = offload_model(compiled, CUDA, compile_blocks=True, **settings)
    conductor.poison_evicted = True
    batch = flux_batch()
    per_step = []
    for _ in range(3):
        expected_loss, expected = bf16_step(reference, batch)
        before = frames_compiled()
        loss, actual = bf16_step(compiled, batch)
        per_step.append(frames_compiled() - before)
    assert per_step[0] > 0 and per_step[1:] == [0, 0], per_step
    assert relative_error(loss, expected_loss) < 1e-3
    for name, grad in expected.items():
        assert torch.isfinite(actual[name]).all(), name
        assert relative_error(actual[name], grad) < 2e-2, name
    assert conductor.streamed_on_device == []
