"""The peak-breakdown benchmark tool's replay of allocator events (CPU: the events are made up here)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from peak_breakdown import _origin, _replay  # noqa: E402


def test_replay_finds_the_peak_and_what_was_live_there() -> None:
    trace = [
        {"action": "alloc", "addr": 1, "size": 700},  # a weight piece
        {"action": "alloc", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 9, "size": 30},  # allocated before the step
        {"action": "free_requested", "addr": 2, "size": 50},  # not free until its stream use completes
        {"action": "alloc", "addr": 3, "size": 100},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 1, "size": 700},
        {"action": "alloc", "addr": 4, "size": 10},
    ]
    peak, peak_event, _, _ = _replay(trace, before=1000)
    assert (peak, peak_event) == (1000 - 30 + 700 + 50 + 100, 4)
    _, _, live, pre_step = _replay(trace, before=1000, stop=peak_event + 1)
    assert live == {1: 700, 2: 50, 3: 100} and pre_step == 970


def test_weight_pieces_are_told_from_activations_by_size() -> None:
    pieces = {70_000, 30_000}
    assert _origin(70_000, pieces).startswith("streamed block weights")
    assert _origin(30_000 + 511, pieces).startswith("streamed block weights")  # allocator rounding
    assert _origin(30_000 + 512, pieces).startswith("activations")
    assert _origin(29_999, pieces).startswith("activations")
