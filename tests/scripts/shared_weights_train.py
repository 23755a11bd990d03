"""Several processes of one machine (CPU, gloo) train a streamed model over one shared host copy of its weights.

Each rank trains a plain model (the DDP reference), then the same model streamed with `share_host_weights` from
the launch config (one copy per machine), then again with private copies (one per process), and measures its
anonymous and shared resident memory around each placement. `kill=<setup|train>:<rank>` makes that rank die by
SIGKILL while mapping the shared memory, or after the first step of the shared model.

    shared_weights_train.py RESULT.json [kill=setup:1] [pids=FOLDER]
"""

import os
import signal
import sys

import torch
from accelerate import Accelerator

_here = __import__("pathlib").Path(__file__).resolve()
sys.path[:0] = [str(_here.parents[1]), str(_here.parents[2])]
import accelerate_offload.shared_weights as shared_weights  # noqa: E402
from accelerate_offload import LayerOffloadPlugin, get_conductor, offload_model  # noqa: E402
from accelerate_offload.memory import host_memory, release_host_memory  # noqa: E402
from toy_models import ToyTransformer, add_lora  # noqa: E402

WIDTH, DEPTH, STEPS = 1536, 4, 3  # 4 blocks of 28 MB of frozen fp32 weights: enough to see in RssAnon
options = dict(arg.split("=", 1) for arg in sys.argv[2:])
kill_phase, _, kill_rank = options.get("kill", ":").partition(":")

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
if "pids" in options:
    (__import__("pathlib").Path(options["pids"]) / str(os.getpid())).touch()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if kill_phase == "setup" and int(kill_rank) == rank:
    mapping = shared_weights._map
    shared_weights._map = lambda *args: (mapping(*args), die())[0]


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return add_lora(ToyTransformer(WIDTH, DEPTH), ["to_q", "to_out"])


def train(model: torch.nn.Module, die_after_first_step: bool = False) -> dict:
    """A few steps on this rank's own batches: the losses, and the LoRA's last gradients and final values."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(100 + rank)
    losses, grads = [], {}
    for step in range(STEPS):
        inputs = (torch.randn(2, 6, WIDTH, generator=generator), torch.randn(2, 3, WIDTH, generator=generator),
                  torch.randn(2, WIDTH, generator=generator))
        loss = model(*inputs).square().mean()
        accelerator.backward(loss)
        losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad()
        if die_after_first_step:
            die()
    return {"losses": losses, "grads": grads,
            "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}


def equal(a: dict, b: dict) -> bool:
    return a["losses"] == b["losses"] and all(
        torch.equal(a[kind][name], b[kind][name]) for kind in ("grads", "params") for name in b[kind])


def placed(setting: bool | str) -> tuple[torch.nn.Module, int]:
    """A streamed model, and this process's RssAnon for its streamed weights: the growth from before the model was
    built to after its placement, less the model's tensors that do not stream."""
    release_host_memory()
    before = host_memory()["RssAnon"]
    model = build()
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    offload_model(model, accelerator.device, block_names=["blocks"], layer_offload_fraction=1.0,
                  share_host_weights=setting)
    release_host_memory()
    streamed = sum(weights.nbytes for weights in get_conductor(model).weights.values())
    return model, host_memory()["RssAnon"] - before - (model_bytes - streamed)


def shared_segments() -> list[int]:
    """Inodes of the shared-memory segments this process maps."""
    maps = open("/proc/self/maps").read().splitlines()
    return sorted({int(line.split()[4]) for line in maps if shared_weights.SEGMENT_PREFIX in line})


plain = build()
expected = train(plain)
del plain
setting = LayerOffloadPlugin().share_host_weights
shared, shared_anon = placed(setting)
streamed_bytes = sum(weights.nbytes for weights in get_conductor(shared).weights.values())
shared_trains = equal(train(shared, die_after_first_step=kill_phase == "train" and int(kill_rank) == rank), expected)
private, private_anon = placed(False)
private_trains = equal(train(private), expected)
release_host_memory()
report = {
    "rank": rank,
    "shared_host": get_conductor(shared).shared_host,
    "private_host": get_conductor(private).shared_host,
    "shared_weights_anon": shared_anon,
    "private_weights_anon": private_anon,
    "rss_shmem": host_memory()["RssShmem"],
    "segments": shared_segments(),
    "shared_trains_like_ddp": shared_trains,
    "private_trains_like_ddp": private_trains,
}
reports = [None] * accelerator.num_processes
torch.distributed.all_gather_object(reports, report)
if accelerator.is_main_process:
    result = {"processes": accelerator.num_processes, "setting": setting, "streamed_bytes": streamed_bytes,
              "ranks": reports}
    with open(sys.argv[1], "w") as handle:
        handle.write(__import__("json").dumps(result))
