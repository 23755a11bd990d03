"""Whether the code running now is a checkpoint's recomputation, whose outputs are thrown away.

Non-reentrant checkpointing reruns a block only to regenerate the tensors its backward saved; what the block
returns is discarded. A block whose last step saves only its inputs can then skip computing its outputs
(token-chunked blocks do: their row chunks are recomputed one by one in backward anyway).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_outputs_discarded: ContextVar[bool] = ContextVar("outputs_discarded", default=False)


@contextmanager
def recomputation(active: bool = True) -> Iterator[None]:
    """Marks the enclosed block call as a recomputation for backward (a no-op when `active` is False)."""
    token = _outputs_discarded.set(active or _outputs_discarded.get())
    try:
        yield
    finally:
        _outputs_discarded.reset(token)


def outputs_discarded() -> bool:
    return _outputs_discarded.get()
