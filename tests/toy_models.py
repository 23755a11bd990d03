"""Small models for runtime tests: blocks that take keyword tensors, nested tuples, and return tuples."""

from __future__ import annotations

import torch
from torch import nn


class ToyBlock(nn.Module):
    """A block shaped like Flux's double block: two streams in, two out, conditioning passed by keyword."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_out = nn.Linear(width, width)
        self.context_proj = nn.Linear(width, width)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width))

    def forward(self, hidden_states, encoder_hidden_states=None, temb=None, rotary=None):
        cos, sin = rotary
        x = self.norm(hidden_states) * (1 + temb[:, None, :]) * self.scale
        x = self.to_q(x) * cos + x * sin
        context = self.context_proj(encoder_hidden_states)
        attention = torch.softmax(x @ context.transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1) @ context
        return hidden_states + self.to_out(torch.nn.functional.gelu(attention)), encoder_hidden_states + context


class ToyTransformer(nn.Module):
    def __init__(self, width: int = 16, depth: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x, context, temb):
        hidden = self.embed(x)
        positions = torch.arange(x.shape[1], dtype=x.dtype, device=x.device)[:, None] / x.shape[1]
        rotary = (torch.cos(positions), torch.sin(positions))
        for block in self.blocks:
            hidden, context = block(hidden, encoder_hidden_states=context, temb=temb, rotary=rotary)
        return self.head(hidden)


def add_lora(model: nn.Module, targets: list[str], rank: int = 4) -> nn.Module:
    """Freezes the model and adds a PEFT LoRA on `targets` (B initialised non-zero so gradients reach A)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"), model)
    generator = torch.Generator().manual_seed(7)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model
