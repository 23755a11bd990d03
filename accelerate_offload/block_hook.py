"""`OffloadBlockHook`: the per-block hook that runs one block under the conductor, inside non-reentrant checkpointing.

The block keeps its place and name in the model (LoRA keys and state dicts stay those of diffusers); only its
`forward` is replaced, as diffusers' hooks do.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from .activations import ActivationShuttle
from .conductor import LayerOffloadConductor
from .recompute import outputs_discarded, recomputation


class OffloadBlockHook:
    """Loads the block before it runs, drops it after, and checkpoints it when gradients are on; tells the
    conductor when the feed-forward of a block that has one after its attention (`attention`) is done in backward.

    Keyword tensors (Flux passes `encoder_hidden_states`, `temb` and `image_rotary_emb` by keyword) are handed
    to `checkpoint` as positional arguments: only those are saved tensors, which activation shuttling moves,
    and all of them are moved to the compute device like positional ones.
    """

    def __init__(
        self,
        block: nn.Module,
        index: int,
        conductor: LayerOffloadConductor,
        gradient_checkpointing: bool,
        activations: ActivationShuttle | None,
        attention: nn.Module | None = None,
        feed_forwards: int = 0,
    ) -> None:
        self.index = index
        self.conductor = conductor
        self.gradient_checkpointing = gradient_checkpointing
        self.activations = activations
        self.original_forward = block.forward
        self.block_forward = block.forward  # what runs: the block's own forward, or a token-chunked one
        self._had_own_forward = "forward" in block.__dict__
        block.forward = self.forward
        self.feed_forwards = feed_forwards  # attention outputs that feed a feed-forward after it
        self._attention_hook = None if attention is None else attention.register_forward_hook(self._watch_attention)

    def remove(self, block: nn.Module) -> None:
        if self._attention_hook is not None:
            self._attention_hook.remove()
        if self._had_own_forward:
            block.forward = self.original_forward
        else:
            del block.forward

    def _watch_attention(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Tells the conductor when the gradients of the attention outputs that feed the feed-forwards are all
        in: those are then done with their weights.

        Those are attention's first `feed_forwards` outputs (the registry's `BlockFamily` says which feed-forward
        each feeds). A countdown over those outputs, holding no graph node: a hook that refers to the graph it sits
        in keeps it, and the step's saved activations, in a reference cycle that only the garbage collector would
        free (`register_multi_grad_hook` does). Not set in a recomputation, whose graph never runs backward.
        """
        if not torch.is_grad_enabled() or outputs_discarded():
            return
        outputs = output if isinstance(output, tuple) else (output,)
        tensors = outputs[: self.feed_forwards]
        if len(tensors) < self.feed_forwards or not all(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
            return  # no signal: the conductor prefetches this block's neighbour whole
        waiting = [len(tensors)]

        def arrived(grad: torch.Tensor) -> None:
            waiting[0] -= 1
            if waiting[0] == 0:
                self.conductor.late_piece_done(self.index)

        for tensor in tensors:
            tensor.register_hook(arrived)
        self.conductor.signal_armed(self.index)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._checkpointed(args, kwargs)
        if torch.is_grad_enabled() and self.conductor.is_streamed(self.index):
            raise RuntimeError(
                "a streamed block ran with gradients on and checkpointing off; its weights would be dropped "
                "before backward: enable gradient_checkpointing or run under torch.no_grad()"
            )
        self.conductor.before_block(self.index, backward=False)
        output = self.block_forward(*_on_device(args, self.conductor.device), **_on_device(kwargs, self.conductor.device))
        self.conductor.after_block(self.index)
        return output

    def _checkpointed(self, args: tuple, kwargs: dict) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        tensors = [leaves[i] for i in positions]
        template = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]  # no tensor refs kept
        device = self.conductor.device
        runs = 0

        def run(*inputs: torch.Tensor) -> Any:
            nonlocal runs
            recomputing = runs > 0
            runs += 1
            filled = list(template)
            for position, tensor in zip(positions, inputs):
                filled[position] = tensor if tensor.device == device else tensor.to(device, non_blocking=True)
            call_args, call_kwargs = tree_unflatten(filled, spec)
            self.conductor.before_block(self.index, backward=recomputing)
            with recomputation(recomputing):
                output = self.block_forward(*call_args, **call_kwargs)
            if not recomputing:
                self.conductor.after_block(self.index)
            return output

        saving = self.activations.saving(self.index) if self.activations is not None else nullcontext()
        with saving:
            return checkpoint(run, *tensors, use_reentrant=False)


def _on_device(tree: Any, device: torch.device) -> Any:
    leaves, spec = tree_flatten(tree)
    moved = [
        leaf.to(device, non_blocking=True) if isinstance(leaf, torch.Tensor) and leaf.device != device else leaf
        for leaf in leaves
    ]
    return tree_unflatten(moved, spec)
