"""Attention backend choice for training on Hopper.

With torch 2.11 on H100, scaled_dot_product_attention's cuDNN backend failed in backward (NaN gradients or a
`mha_graph.execute` error). Flash and memory-efficient attention are correct and as fast for these shapes.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def avoid_cudnn_attention() -> None:
    """Turns the cuDNN SDPA backend off so flash / memory-efficient attention serve training."""
    if torch.cuda.is_available() and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        logger.info("accelerate-offload: cuDNN attention disabled (its backward is unreliable); using flash/efficient SDPA")
