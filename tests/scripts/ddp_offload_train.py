"""Two-process training under accelerate (DDP: gloo on CPU, or NCCL with one GPU a process when the second
argument is `cuda`): the offloaded model and a plain one end equal."""

import copy
import json
import sys
from collections.abc import Callable

import torch
from accelerate import Accelerator

_here = __import__("pathlib").Path(__file__).resolve()
sys.path[:0] = [str(_here.parents[1]), str(_here.parents[2])]
from accelerate_offload import get_conductor, offload_model  # noqa: E402
from test_models import flux_inputs, tiny_flux, with_lora  # noqa: E402
from toy_models import ToyTransformer, add_lora  # noqa: E402


def toy_batch(generator: torch.Generator) -> tuple[tuple, dict]:
    return (torch.randn(2, 10, 16, generator=generator), torch.randn(2, 4, 16, generator=generator),
            torch.randn(2, 16, generator=generator)), {}


def flux_batch(generator: torch.Generator) -> tuple[tuple, dict]:
    inputs = flux_inputs()
    inputs["hidden_states"] = torch.randn(inputs["hidden_states"].shape, generator=generator)
    return (), {**inputs, "return_dict": False}


def train(model: torch.nn.Module, accelerator: Accelerator, batch: Callable) -> dict[str, torch.Tensor]:
    """Three steps on this rank's own batches; returns the LoRA parameters after them."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)  # each rank its own data
    for _ in range(3):
        args, kwargs = batch(generator)
        args = tuple(a.to(accelerator.device) for a in args)
        kwargs = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        output = model(*args, **kwargs)
        loss = (output[0] if isinstance(output, tuple) else output).square().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}


def largest_relative_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max(((actual[n] - expected[n]).norm() / expected[n].norm()).item() for n in expected)


on_gpus = sys.argv[2:] == ["cuda"]
accelerator = Accelerator(cpu=not on_gpus)
torch.manual_seed(0)
plain = add_lora(ToyTransformer(16, 4), ["to_q", "to_out"])
offloaded = copy.deepcopy(plain)
initial = {n: p.detach().clone() for n, p in plain.named_parameters() if p.requires_grad}
offload_model(offloaded, accelerator.device, block_names=["blocks"], layer_offload_fraction=0.5,
              activation_offloading=True, activation_min_bytes=0, share_host_weights="auto")
expected, actual = train(plain, accelerator, toy_batch), train(offloaded, accelerator, toy_batch)
gathered = accelerator.gather(torch.cat([p.flatten() for p in actual.values()])[None])
# token-chunked Flux blocks hand their LoRA gradients to autograd once per step, as DDP's hooks require
flux = with_lora(tiny_flux())
chunked = copy.deepcopy(flux)
offload_model(chunked, accelerator.device, layer_offload_fraction=1.0, activation_offloading=True,
              activation_min_bytes=0, sequence_chunks=2, share_host_weights="auto")
flux_error = largest_relative_error(train(chunked, accelerator, flux_batch), train(flux, accelerator, flux_batch))
result = {
    "processes": accelerator.num_processes,
    "device": accelerator.device.type,
    "offloaded_error": largest_relative_error(actual, expected),  # 0.0: bit for bit
    "ranks_agree": bool(torch.equal(gathered[0], gathered[-1])),
    "trained": any(not torch.equal(actual[name].cpu(), initial[name]) for name in initial),
    "chunked_flux_error": flux_error,
    "shared_host": get_conductor(offloaded).shared_host and get_conductor(chunked).shared_host
}
if accelerator.is_main_process:
    with open(sys.argv[1], "w") as handle:
        json.dump(result, handle)
