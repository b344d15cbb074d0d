"""Plots as PNG bytes, drawn by matplotlib on its Agg canvas: no display, and no pyplot, whose global figure
state is not safe to share between threads. matplotlib is imported when a plot is drawn, not with vae_core."""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

LOSS_SERIES = (("loss", "train"), ("val_loss", "validation"))


def loss_curves_png(history: Sequence[Mapping[str, float]], *, title: str = "training: loss per epoch",
                    best_epoch: int | None = None) -> bytes:
    """Train and validation loss (nats per image) against the epoch (1-based, integer ticks), with the best
    epoch marked when given (0-based, as metrics.json records it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [int(h.get("epoch", i)) + 1 for i, h in enumerate(history)]
    for key, label in LOSS_SERIES:
        values = [float(h[key]) if h.get(key) is not None else math.nan for h in history]
        if any(math.isfinite(v) for v in values):
            ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.5, label=label)
    if best_epoch is not None:
        ax.axvline(best_epoch + 1, color="grey", linestyle=":", linewidth=1, label=f"best (epoch {best_epoch + 1})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per image (nats)")
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
