"""The optimizer flags of diffusers' training scripts, read, checked and built one way for both of ours.

Commands copied from diffusers' examples keep working: `--optimizer` takes any case (`prodigy`, `AdamW`),
`--use_8bit_adam` turns AdamW into bitsandbytes' 8-bit AdamW, and the Prodigy switches keep diffusers' defaults.
Unlike there, `--prodigy_decouple false` means false, and a flag that would be ignored is refused instead.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
OPTIMIZER_STATE = "optimizer.bin"  # accelerate's name for the first optimizer's state in a checkpoint
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def switch(text: str) -> bool:
    """`true`/`false` (also 1/0, yes/no, on/off) for a flag that takes a value, as diffusers' Prodigy flags do."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def optimizer_name(text: str) -> str:
    return text.strip().lower()


def add_optimizer_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--optimizer`, `--use_8bit_adam`, Adam's and Prodigy's settings, with diffusers' names and defaults."""
    parser.add_argument(
        "--optimizer",
        type=optimizer_name,
        default="adamw",
        choices=OPTIMIZERS,
        help="AdamW, AdamW8bit (bitsandbytes, CUDA) or Prodigy (prodigyopt); any case.",
    )
    parser.add_argument(
        "--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes (CUDA); same as AdamW8bit."
    )
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="Beta1 of Adam and Prodigy.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="Beta2 of Adam and Prodigy.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-4, help="Weight decay of the LoRA parameters.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="Epsilon of Adam and Prodigy.")
    parser.add_argument(
        "--prodigy_beta3",
        type=float,
        default=None,
        help="Prodigy's step-size averaging coefficient (default: the square root of beta2).",
    )
    parser.add_argument(
        "--prodigy_decouple", type=switch, default=True, help="Prodigy: decoupled (AdamW-style) weight decay."
    )
    parser.add_argument(
        "--prodigy_use_bias_correction", type=switch, default=True, help="Prodigy: Adam's bias correction."
    )
    parser.add_argument(
        "--prodigy_safeguard_warmup",
        type=switch,
        default=True,
        help="Prodigy: leave the learning rate out of the step-size estimate during warm-up.",
    )


def chosen_optimizer(args: argparse.Namespace) -> str:
    """The optimizer the flags ask for: `--use_8bit_adam` makes AdamW 8-bit."""
    return "adamw8bit" if args.use_8bit_adam and args.optimizer == "adamw" else args.optimizer


def optimizer_problem(args: argparse.Namespace, cuda: bool) -> str | None:
    """What stops the flags' optimizer from being built, as one line naming the fix; None if nothing."""
    if args.use_8bit_adam and args.optimizer != "adamw":
        return f"--use_8bit_adam makes AdamW 8-bit; drop it for --optimizer {args.optimizer}"
    for name in ("adam_beta1", "adam_beta2", "prodigy_beta3"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value < 1.0:
            return f"--{name} must be in [0, 1), got {value}"
    if not 0.0 < args.adam_epsilon < math.inf:
        return f"--adam_epsilon must be a positive number, got {args.adam_epsilon}"
    if not 0.0 <= args.adam_weight_decay < math.inf:
        return f"--adam_weight_decay cannot be negative, got {args.adam_weight_decay}"
    name = chosen_optimizer(args)
    flag = "--use_8bit_adam" if args.use_8bit_adam else "--optimizer AdamW8bit"
    if name == "adamw8bit" and not cuda:
        return f"{flag} needs a CUDA GPU; use --optimizer AdamW on this machine"
    if name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return f"{flag} needs bitsandbytes: pip install bitsandbytes (or use --optimizer AdamW)"
    if name == "prodigy":
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            return "--optimizer Prodigy needs prodigyopt: pip install prodigyopt (or use --optimizer AdamW)"
    return None


def build_optimizer(args: argparse.Namespace, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of the trainable parameters at `--learning_rate`, as the flags ask (checked first)."""
    common = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "weight_decay": args.adam_weight_decay,
        "eps": args.adam_epsilon,
    }
    name = chosen_optimizer(args)
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, **common)
    if name == "prodigy":
        import prodigyopt

        if args.learning_rate < 0.1:
            logger.warning("Prodigy adapts the step size itself; a --learning_rate near 1.0 is usual")
        return prodigyopt.Prodigy(
            parameters,
            beta3=args.prodigy_beta3,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
            **common,
        )
    return torch.optim.AdamW(parameters, **common)


def saved_optimizer(state: dict) -> str:
    """Which of OPTIMIZERS wrote an optimizer `state_dict`: Prodigy keeps its step-size estimate `d` in each group,
    bitsandbytes' AdamW names its moments `state1` and `state2`, torch's AdamW `exp_avg` and `exp_avg_sq`."""
    if any("d" in group for group in state.get("param_groups", [])):
        return "prodigy"
    if any("state1" in moments for moments in state.get("state", {}).values()):
        return "adamw8bit"
    return "adamw"


def optimizer_checkpoint_problem(checkpoint: Path, optimizer: str) -> str | None:
    """What stops `optimizer` from resuming `checkpoint`: another optimizer's state (it would load into the wrong
    slots). An unreadable state is left to the checkpoint's own damage check."""
    path = checkpoint / OPTIMIZER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    found = saved_optimizer(state)
    if found == optimizer:
        return None
    return f"its optimizer state is {found}'s, --optimizer is {optimizer} (pass --optimizer {found} to continue it)"
