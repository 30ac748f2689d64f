"""PNG figures of recorded runs (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_columns", "plot_hysteresis"]


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
    return _save(fig, path, title)


def plot_hysteresis(sweeps: Sequence[tuple[str, Sequence[dict[str, str | float]]]], path: Path,
                    title: str = "") -> Path:
    """The sweeps of a loop (label, rows) on one figure: the R–D plane, the (λ, γ) path and λ–λ_min,
    rows with event ``jump`` or ``fold`` marked with a cross."""
    panels = (("D", "R"), ("lam", "gamma"), ("lam", "lambda_min"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)

    def value(row: dict[str, str | float], column: str) -> float:
        return float(row[column]) if row.get(column, "") != "" else float("nan")

    for label, rows in sweeps:
        for ax, (x, y) in zip(axes[0], panels):
            line, = ax.plot([value(r, x) for r in rows], [value(r, y) for r in rows], marker=".", label=label)
            marked = [r for r in rows if r.get("event") in ("jump", "fold")]
            ax.plot([value(r, x) for r in marked], [value(r, y) for r in marked], "x", color=line.get_color(),
                    markersize=10, label=f"{label}: jumps and folds" if marked else None)
            ax.set_xlabel(x)
            ax.set_ylabel(y)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][2].axhline(0.0, color="black", linewidth=0.8)
    return _save(fig, path, title)


def _save(fig: plt.Figure, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
