"""Token-chunked blocks compute the same function as whole ones: per block, whole models, and under offloading.

Exactness on CPU in fp32: the forward pass is bitwise equal where the CPU kernels give each row the same result
whatever the number of rows (checked below); in general they do not, because CPU matrix-multiply and flash
attention kernels block rows by count, so an uneven chunk can round its last bit differently. Gradients of
weights and of keys/values are sums over tokens that chunking splits into partial sums, so they differ by
floating-point reassociation: every comparison allows 1e-6 of the reference's norm (seen: below 6e-7).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from diffusers.models.transformers.transformer_sd3 import SD3SingleTransformerBlock
from peft import LoraConfig, inject_adapter_in_model
from test_models import (
    flux_inputs,
    sd3_inputs,
    tiny_flux,
    tiny_sd3,
    train_step,
    with_lora,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from accelerate_offload import chunk_rows, offload_model
from accelerate_offload.chunking import auto_chunks, chunked_forward
from accelerate_offload.recompute import recomputation
from live_memory import LiveTensorBytes

TOLERANCE = 1e-6
DIM, HEADS, HEAD_DIM = 16, 2, 8
TEXT_TOKENS, IMAGE_TOKENS = 7, 23  # 23 image tokens make every chunk count in {2, 3, 4} uneven
BLOCK_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "proj_mlp", "proj_out"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tensors here are tiny: thread hand-offs would cost more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    assert actual.shape == expected.shape, name
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"


def with_block_lora(block: torch.nn.Module) -> torch.nn.Module:
    """LoRA on every projection the block has, the text stream's included, with non-zero B so it matters."""
    block.requires_grad_(False)
    targets = [t for t in BLOCK_LORA_TARGETS if any(n == t or n.endswith(f".{t}") for n, _ in block.named_modules())]
    block = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), block)
    generator = torch.Generator().manual_seed(3)
    for name, param in block.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return block


def flux_rope(image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([torch.zeros(TEXT_TOKENS, 3), torch.arange(image_tokens).float()[:, None].expand(-1, 3)])
    return FluxPosEmbed(theta=10000, axes_dim=[2, 2, 4])(ids)


def block_inputs(kind: str, batch: int = 2, image_tokens: int = IMAGE_TOKENS) -> dict:
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(batch, image_tokens, DIM, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, DIM, generator=generator),
        "temb": torch.randn(batch, DIM, generator=generator),
    }
    if kind.startswith("flux"):
        inputs["image_rotary_emb"] = flux_rope(image_tokens)
    return inputs


BLOCKS: dict[str, Callable[[], torch.nn.Module]] = {
    "flux-double": lambda: FluxTransformerBlock(DIM, HEADS, HEAD_DIM),
    "flux-single": lambda: FluxSingleTransformerBlock(DIM, HEADS, HEAD_DIM),
    "sd3-joint": lambda: JointTransformerBlock(DIM, HEADS, HEAD_DIM),
    "sd3-context-pre-only": lambda: JointTransformerBlock(DIM, HEADS, HEAD_DIM, context_pre_only=True),
    "sd35-dual-attention": lambda: JointTransformerBlock(DIM, HEADS, HEAD_DIM, qk_norm="rms_norm",
                                                         use_dual_attention=True),
}


def build_block(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return with_block_lora(BLOCKS[kind]())


def block_step(forward: Callable, inputs: dict, block: torch.nn.Module) -> tuple[list[torch.Tensor], dict]:
    """Outputs, and gradients of a loss over them for the LoRA weights and the block's inputs."""
    block.zero_grad(set_to_none=True)
    inputs = {k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    outputs = [out for out in forward(**inputs) if out is not None]
    loss = sum((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() for out in outputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
    grads.update({name: t.grad for name, t in inputs.items() if isinstance(t, torch.Tensor)})
    return [out.detach() for out in outputs] + [loss.detach()], grads


@pytest.mark.parametrize("chunks", [2, 3, 4])
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_matches_whole(kind: str, chunks: int) -> None:
    block = build_block(kind)
    inputs = block_inputs(kind)
    expected, expected_grads = block_step(block.forward, inputs, block)
    actual, grads = block_step(chunked_forward(block, chunks), inputs, block)
    for index, (out, reference) in enumerate(zip(actual, expected, strict=True)):
        assert_close(out, reference, f"output {index}")
    assert len(grads) > 3
    for name, grad in expected_grads.items():
        if name in grads:
            assert_close(grads[name], grad, name)
        else:  # SD3's last block discards its text queries' output: unchunked, their LoRA gets zeros
            assert kind == "sd3-context-pre-only" and "add_q_proj" in name and not grad.any(), name


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_forward_is_bitwise_equal_for_even_chunks(kind: str) -> None:
    """Same ops in the same order and dtypes: 8-row chunks and the math attention kernel give equal bits here."""
    block = build_block(kind)
    inputs = block_inputs(kind, image_tokens=16)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        expected = block(**inputs)
        actual = chunked_forward(block, 2)(**inputs)
    for out, reference in zip(actual, expected, strict=True):
        assert (out is None and reference is None) or torch.equal(out, reference)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_no_grad_runs_chunks_without_checkpoints(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    block = build_block(kind)
    inputs = block_inputs(kind, batch=1)
    with torch.no_grad():
        expected = block(**inputs)
        monkeypatch.setattr(chunk_rows, "checkpoint", _refuse)
        actual = chunked_forward(block, 3)(**inputs)
    for out, reference in zip(actual, expected, strict=True):
        assert (out is None and reference is None) or (not out.requires_grad and torch.allclose(out, reference))


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("checkpoint called under no_grad")


def tiny_sd35() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        qk_norm="rms_norm", dual_attention_layers=(0, 1),
    )


MODELS = {"flux": (tiny_flux, flux_inputs), "sd3": (tiny_sd3, sd3_inputs), "sd35": (tiny_sd35, sd3_inputs)}


def chunk_every_block(model: torch.nn.Module, chunks: int) -> int:
    blocks = [m for m in model.modules() if type(m) in (FluxTransformerBlock, FluxSingleTransformerBlock,
                                                        JointTransformerBlock)]
    for block in blocks:
        block.forward = chunked_forward(block, chunks)
    return len(blocks)


@pytest.mark.parametrize("chunks", [2, 3, 4])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_model_matches_whole(model_name: str, chunks: int) -> None:
    build, inputs = MODELS[model_name]
    reference = with_lora(build())
    chunked = copy.deepcopy(reference)
    assert chunk_every_block(chunked, chunks) >= 3
    expected_loss, expected = train_step(reference, inputs())
    loss, actual = train_step(chunked, inputs())
    assert_close(loss, expected_loss, "loss")
    assert len(actual) == len(expected) > 0
    for name, grad in expected.items():
        assert_close(actual[name], grad, name)


@pytest.mark.parametrize("model_name", ["flux", "sd3"])
def test_composes_with_offload_runtime(model_name: str) -> None:
    """Chunked blocks inside the runtime's per-block checkpoint, streamed weights and shuttled activations."""
    build, inputs = MODELS[model_name]
    reference = with_lora(build())
    offloaded = copy.deepcopy(reference)
    conductor = offload_model(offloaded, "cpu", layer_offload_fraction=1.0, activation_offloading=True,
                              activation_min_bytes=0)
    conductor.poison_evicted = True
    for hook, block in zip(offloaded._offload_hooks, conductor.blocks, strict=True):
        hook.block_forward = chunked_forward(block, 2)
    expected_loss, expected = train_step(reference, inputs())
    loss, actual = train_step(offloaded, inputs())
    assert_close(loss, expected_loss, "loss")
    for name, grad in expected.items():
        assert_close(actual[name], grad, name)
    assert conductor.streamed_on_device == []


@pytest.mark.parametrize("model_name", ["flux", "sd3"])
def test_recomputation_for_backward_skips_the_row_chunks(model_name: str) -> None:
    """Each feed-forward chunk runs once forward and once in backward: the block's recomputation inside the
    runtime's checkpoint stops after keys and values instead of computing rows whose output it would discard."""
    build, inputs = MODELS[model_name]
    model = with_lora(build())
    conductor = offload_model(model, "cpu", layer_offload_fraction=1.0, sequence_chunks=2)
    calls: list[str] = []
    for index, block in enumerate(conductor.blocks):
        if hasattr(block, "ff"):
            block.ff.register_forward_hook(lambda *_, index=index: calls.append(index))
    train_step(model, inputs())
    fed_forward = [block for block in range(len(conductor.blocks)) if block in calls]
    assert fed_forward and all(calls.count(block) == 2 * 2 for block in fed_forward), calls


def checkpointed_peak_bytes(block: torch.nn.Module, forward: Callable, inputs: dict) -> int:
    """Peak live bytes of one forward + backward inside a non-reentrant checkpoint, run as the runtime runs it
    (the second run is the recomputation for backward)."""
    inputs = {k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) and v.dim() == 3 else v
              for k, v in inputs.items()}
    tensors = {k: v for k, v in inputs.items() if k != "image_rotary_emb"}
    runs = 0

    def run(**kwargs: torch.Tensor) -> tuple:
        nonlocal runs
        runs += 1
        with recomputation(runs > 1):
            return forward(**kwargs)

    with LiveTensorBytes() as memory:
        outputs = checkpoint(run, **tensors, image_rotary_emb=inputs["image_rotary_emb"], use_reentrant=False)
        torch.autograd.backward(outputs, [torch.ones_like(out) for out in outputs])
    return memory.peak


def test_chunked_block_backward_holds_little_more_than_one_chunk() -> None:
    """Each chunk's full-sequence key/value gradient is added to the running sum and freed at once, not kept
    through the rest of the chunk's backward: four chunks of a Flux double block (head size 128, 1024 image
    tokens) peak at 0.51 of the whole block (per-chunk checkpoints: 0.49); holding each chunk's key/value
    gradients through its backward, as a first version did, took them to 0.62."""
    torch.manual_seed(0)
    block = FluxTransformerBlock(128, 1, 128).requires_grad_(False)
    block = inject_adapter_in_model(LoraConfig(r=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), block)
    side, text = 32, 16
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    generator = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, side * side, 128, generator=generator),
              "encoder_hidden_states": torch.randn(1, text, 128, generator=generator),
              "temb": torch.randn(1, 128, generator=generator),
              "image_rotary_emb": FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(
                  torch.cat([torch.zeros(text, 3), ids.reshape(-1, 3)]))}
    whole = checkpointed_peak_bytes(block, block.forward, inputs)
    chunked = checkpointed_peak_bytes(block, chunked_forward(block, 4), inputs)
    assert chunked < 0.53 * whole, chunked / whole


def test_unknown_blocks_return_none() -> None:
    assert chunked_forward(torch.nn.Linear(4, 4), 2) is None
    assert chunked_forward(SD3SingleTransformerBlock(DIM, HEADS, HEAD_DIM), 2) is None
    fused = FluxTransformerBlock(DIM, HEADS, HEAD_DIM)
    fused.attn.fuse_projections()
    assert chunked_forward(fused, 2) is None
    feed_forward_chunked = JointTransformerBlock(DIM, HEADS, HEAD_DIM)
    feed_forward_chunked.set_chunk_feed_forward(4)
    assert chunked_forward(feed_forward_chunked, 2) is None


def test_block_changed_after_wrapping_runs_whole() -> None:
    block = build_block("flux-double")
    forward = chunked_forward(block, 3)
    block.attn.fuse_projections()
    inputs = block_inputs("flux-double")
    with torch.no_grad():
        for out, reference in zip(forward(**inputs), block(**inputs), strict=True):
            assert torch.equal(out, reference)


def test_attention_kwargs_run_whole() -> None:
    block = build_block("flux-double")
    inputs = block_inputs("flux-double")
    mask = torch.rand(2, TEXT_TOKENS + IMAGE_TOKENS, generator=torch.Generator().manual_seed(2)) > 0.3
    kwargs = {"attention_mask": mask}
    with torch.no_grad():
        expected = block(**inputs, joint_attention_kwargs=kwargs)
        actual = chunked_forward(block, 3)(**inputs, joint_attention_kwargs=kwargs)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


def test_one_chunk_is_the_block_class_forward() -> None:
    block = build_block("flux-single")
    block.forward = lambda *args, **kwargs: pytest.fail("the instance's forward must be bypassed")
    inputs = block_inputs("flux-single")
    with torch.no_grad():
        expected = type(block).forward(block, **inputs)
        actual = chunked_forward(block, 1)(**inputs)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))
    with pytest.raises(ValueError):
        chunked_forward(block, 0)


def test_more_chunks_than_tokens() -> None:
    block = build_block("sd3-joint")
    inputs = block_inputs("sd3-joint", image_tokens=3)
    expected, _ = block_step(block.forward, inputs, block)
    actual, _ = block_step(chunked_forward(block, 8), inputs, block)
    for out, reference in zip(actual, expected, strict=True):
        assert_close(out, reference)


def test_auto_chunks_keeps_chunks_under_4096_tokens() -> None:
    assert [auto_chunks(tokens) for tokens in (1, 4096, 4097, 16384, 65536)] == [1, 1, 2, 4, 16]
    assert auto_chunks(16384, max_chunk_tokens=2048) == 8
