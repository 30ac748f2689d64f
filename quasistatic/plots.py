"""PNG figures of recorded runs (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_columns"]


def plot_columns(rows: Sequence[dict[str, str | float]], x: str, panels: Sequence[Sequence[str]],
                 path: Path, title: str = "", log_scale: Sequence[str] = ("grad_norm",)) -> Path:
    """One panel per group of columns in ``panels``, each plotted against column ``x``; a panel
    holding a column of ``log_scale`` gets a logarithmic y axis."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    xs = [float(row[x]) for row in rows]
    for ax, columns in zip(axes[0], panels):
        for column in columns:
            ax.plot(xs, [float(row[column]) for row in rows], marker=".", label=column)
        if set(columns) & set(log_scale):
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
