"""The model registry: what accelerate-offload knows of each model family, keyed by class name.

For a model, the dotted paths of its block lists (the unit that is streamed, checkpointed and counted); for a
block, the feed-forwards that run after its attention (streamed as a late piece) and the module that mirrors it
in token chunks. A model not listed here streams through its class's own declaration of its repeated blocks.
Nothing here imports diffusers: a family's chunk mirror (`accelerate_offload.models.<family>`) is imported when
one of its blocks is chunked.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .chunk_rows import ChunkMirror

# Model class name -> dotted paths of its block lists in execution order; alternatives for library versions that
# moved them.
_CLIP_LAYERS = [("text_model.encoder.layers",), ("encoder.layers",)]
MODEL_BLOCK_LISTS: dict[str, list[tuple[str, ...]]] = {
    "FluxTransformer2DModel": [("transformer_blocks", "single_transformer_blocks")],
    "SD3Transformer2DModel": [("transformer_blocks",)],
    "T5EncoderModel": [("encoder.block",)],
    "UMT5EncoderModel": [("encoder.block",)],
    "CLIPTextModel": _CLIP_LAYERS,
    "CLIPTextModelWithProjection": _CLIP_LAYERS,
}

# Class attributes that name a model's repeated block classes, most specific first: diffusers' regional
# compilation list, then accelerate's device-map atoms.
_DECLARED_BLOCKS = ("_repeated_blocks", "_no_split_modules")


@dataclass(frozen=True)
class BlockFamily:
    """What the runtime knows of one block class.

    Args:
        attention (`str`, *optional*):
            The attention submodule whose outputs feed `feed_forwards`.
        feed_forwards (`tuple[str, ...]`, defaults to `()`):
            Submodules that run after attention, fed by its outputs in this order (Flux and SD3 attention return
            (image, text), which feed `ff` and `ff_context`; SD3's last block has no `ff_context` and discards its
            text output). In backward their gradients are done before attention's starts, so their weights can
            leave the device first.
        chunk_mirror (`str`, *optional*):
            The module under `accelerate_offload.models` whose `MIRRORS` runs this block in token chunks.
    """

    attention: str | None = None
    feed_forwards: tuple[str, ...] = ()
    chunk_mirror: str | None = None


BLOCK_FAMILIES: dict[str, BlockFamily] = {
    "FluxTransformerBlock": BlockFamily("attn", ("ff", "ff_context"), chunk_mirror="flux"),
    "FluxSingleTransformerBlock": BlockFamily(chunk_mirror="flux"),
    "JointTransformerBlock": BlockFamily("attn", ("ff", "ff_context"), chunk_mirror="sd3"),
}


class BlocksNotFoundError(ValueError):
    """The model's blocks cannot be found: names what was seen so the user can pass `block_names`."""


def base_model(model: nn.Module) -> nn.Module:
    """The model under PEFT's wrapper, if any: block paths are relative to it."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


def find_blocks(model: nn.Module, block_names: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's blocks in execution order, each with its dotted name relative to the model.

    Args:
        model (`torch.nn.Module`):
            The model, or a PEFT wrapper of it.
        block_names (`list[str]`, *optional*):
            Dotted paths of the `nn.ModuleList`s that hold the blocks. Defaults to the registry's lists for the
            model's class, else the lists of the block classes the class declares (`_repeated_blocks`, then
            `_no_split_modules`), in the order the model registers them.
    """
    model = base_model(model)
    names = block_names or _known_lists(model) or _declared_lists(model)
    if not names:
        raise BlocksNotFoundError(
            f"accelerate-offload does not know the blocks of {type(model).__name__} and its class declares none "
            f"({' or '.join(_DECLARED_BLOCKS)}); pass block_names (e.g. ACCELERATE_OFFLOAD_BLOCK_NAMES) from the "
            f"block lists it has: {_describe_lists(model)}"
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
    """The block's attention module and the feed-forward modules its outputs feed, in output order; (None, ()) for
    a block without them."""
    family = BLOCK_FAMILIES.get(type(block).__name__)
    if family is None or family.attention is None:
        return None, ()
    found = (getattr(block, name, None) for name in family.feed_forwards)
    modules = tuple(module for module in found if isinstance(module, nn.Module))
    attention = getattr(block, family.attention, None)
    return (attention, modules) if isinstance(attention, nn.Module) and modules else (None, ())


def chunk_mirror(block: nn.Module) -> ChunkMirror | None:
    """The token-chunked forward of the block's class, importing its family's mirror; None if there is none."""
    family = BLOCK_FAMILIES.get(type(block).__name__)
    if family is None or family.chunk_mirror is None:
        return None
    mirrors = importlib.import_module(f"{__package__}.models.{family.chunk_mirror}").MIRRORS
    mirror = mirrors.get(type(block).__name__)
    return mirror if mirror is not None and type(block) is mirror.block_class else None


def _known_lists(model: nn.Module) -> tuple[str, ...] | None:
    alternatives = MODEL_BLOCK_LISTS.get(type(model).__name__, [])
    present = [names for names in alternatives if all(_has_submodule(model, name) for name in names)]
    return present[0] if present else (alternatives[0] if alternatives else None)


def _declared_lists(model: nn.Module) -> tuple[str, ...] | None:
    """The `nn.ModuleList`s whose entries are all of the block classes the model's class declares, outermost only,
    in registration order (diffusers' models register their block lists in the order they run them)."""
    for attribute in _DECLARED_BLOCKS:
        classes = set(getattr(type(model), attribute, None) or ())
        lists: list[str] = []
        for name, module in model.named_modules():
            inside = any(name.startswith(f"{found}.") for found in lists)
            if isinstance(module, nn.ModuleList) and len(module) and not inside and all(
                type(block).__name__ in classes for block in module
            ):
                lists.append(name)
        if lists:
            return tuple(lists)
    return None


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
