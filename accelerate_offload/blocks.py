"""Finding a model's sequential blocks: the unit that is streamed, checkpointed and counted."""

from __future__ import annotations

from torch import nn

# Class name -> dotted paths of its block lists in execution order; alternatives for library versions that moved them.
_CLIP_LAYERS = [("text_model.encoder.layers",), ("encoder.layers",)]
KNOWN_BLOCK_LISTS: dict[str, list[tuple[str, ...]]] = {
    "FluxTransformer2DModel": [("transformer_blocks", "single_transformer_blocks")],
    "SD3Transformer2DModel": [("transformer_blocks",)],
    "T5EncoderModel": [("encoder.block",)],
    "UMT5EncoderModel": [("encoder.block",)],
    "CLIPTextModel": _CLIP_LAYERS,
    "CLIPTextModelWithProjection": _CLIP_LAYERS,
}


# Block class name -> (the attention module, the feed-forward modules that run after it, fed by attention's
# outputs in this order). In backward the feed-forwards' gradients are done before attention's starts, so
# their weights can leave the device first.
LATE_FEED_FORWARD: dict[str, tuple[str, tuple[str, ...]]] = {
    "FluxTransformerBlock": ("attn", ("ff", "ff_context")),
    "JointTransformerBlock": ("attn", ("ff", "ff_context")),
}


class BlocksNotFoundError(ValueError):
    """The model's blocks cannot be found: names what was seen so the user can pass `block_names`."""


def base_model(model: nn.Module) -> nn.Module:
    """The model under PEFT's wrapper, if any: block paths are relative to it."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


def find_blocks(model: nn.Module, block_names: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's blocks in execution order, each with its dotted name relative to the model."""
    model = base_model(model)
    names = block_names or _known_lists(model)
    if not names:
        raise BlocksNotFoundError(
            f"accelerate-offload does not know the blocks of {type(model).__name__}; pass block_names "
            f"(e.g. ACCELERATE_OFFLOAD_BLOCK_NAMES) from the block lists it has: {_describe_lists(model)}"
        )
    blocks = []
    for list_name in names:
        try:
            module_list = model.get_submodule(list_name)
        except AttributeError:
            raise BlocksNotFoundError(
                f"{type(model).__name__} has no block list {list_name!r}; block lists it has: "
                f"{_describe_lists(model)}"
            ) from None
        if not isinstance(module_list, (nn.ModuleList, nn.Sequential)):
            raise BlocksNotFoundError(f"{list_name!r} is a {type(module_list).__name__}, not an nn.ModuleList")
        blocks.extend((f"{list_name}.{index}", block) for index, block in enumerate(module_list))
    if not blocks:
        raise BlocksNotFoundError(f"the block lists {', '.join(names)} of {type(model).__name__} are empty")
    return blocks


def late_feed_forward(block: nn.Module) -> tuple[nn.Module | None, tuple[nn.Module, ...]]:
    """The block's attention module and the feed-forward modules that run after it; (None, ()) if not known."""
    attention, feed_forwards = LATE_FEED_FORWARD.get(type(block).__name__, (None, ()))
    modules = tuple(m for m in (getattr(block, name, None) for name in feed_forwards) if isinstance(m, nn.Module))
    found = getattr(block, attention, None) if attention else None
    return (found, modules) if isinstance(found, nn.Module) and modules else (None, ())


def _known_lists(model: nn.Module) -> tuple[str, ...] | None:
    alternatives = KNOWN_BLOCK_LISTS.get(type(model).__name__, [])
    present = [names for names in alternatives if all(_has_submodule(model, name) for name in names)]
    return present[0] if present else (alternatives[0] if alternatives else None)


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _describe_lists(model: nn.Module) -> str:
    lists = [
        f"{name} ({len(module)} x {type(module[0]).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1
    ]
    return ", ".join(lists) or "none"
