"""The run's summary plot: the training loss of every step and the validation loss where it was measured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_losses(records: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Draws metrics.jsonl's records (`step`, `loss`, optional `validation_loss`) to a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(8, 4.5))
    steps = [record["step"] for record in records]
    axis.plot(steps, [record["loss"] for record in records], color="tab:blue", alpha=0.8, label="training loss")
    measured = [record for record in records if "validation_loss" in record]
    if measured:
        axis.plot(
            [record["step"] for record in measured],
            [record["validation_loss"] for record in measured],
            color="tab:orange", marker="o", label="validation loss (fixed timesteps and noise)",
        )  # fmt: skip
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
