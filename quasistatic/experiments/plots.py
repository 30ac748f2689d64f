"""PNG figures of recorded runs (matplotlib, headless).

The figures are drawn on a :class:`~matplotlib.figure.Figure` with its own Agg canvas, without
pyplot: importing this module selects no backend and plotting leaves pyplot's figures and the
host's backend (a notebook's, a GUI's) alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["new_figure", "plot_columns", "plot_hysteresis", "save_figure"]


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas (not registered with pyplot, so nothing to close)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_columns(
    rows: Sequence[Mapping[str, str | float]],
    x: str,
    panels: Sequence[Sequence[str]],
    path: Path,
    title: str = "",
    log_scale: Sequence[str] = ("grad_norm",),
) -> Path:
    """One panel per group of columns in ``panels``, each plotted against column ``x``; a panel
    holding a column of ``log_scale`` gets a logarithmic y axis."""
    fig = new_figure((4 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    xs = [float(row[x]) for row in rows]
    for ax, columns in zip(axes[0], panels):
        for column in columns:
            ax.plot(xs, [float(row[column]) for row in rows], marker=".", label=column)
        if set(columns) & set(log_scale):
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def plot_hysteresis(
    sweeps: Sequence[tuple[str, Sequence[Mapping[str, str | float]]]], path: Path, title: str = ""
) -> Path:
    """The sweeps of a loop (label, rows) on one figure: the R–D plane, the (λ, γ) path and λ–λ_min,
    rows with event ``jump`` or ``fold`` marked with a cross."""
    panels = (("D", "R"), ("lam", "gamma"), ("lam", "lambda_min"))
    fig = new_figure((4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)

    def value(row: Mapping[str, str | float], column: str) -> float:
        return float(row[column]) if row.get(column, "") != "" else float("nan")

    for label, rows in sweeps:
        for ax, (x, y) in zip(axes[0], panels):
            (line,) = ax.plot([value(r, x) for r in rows], [value(r, y) for r in rows], marker=".", label=label)
            marked = [r for r in rows if r.get("event") in ("jump", "fold")]
            ax.plot(
                [value(r, x) for r in marked],
                [value(r, y) for r in marked],
                "x",
                color=line.get_color(),
                markersize=10,
                label=f"{label}: jumps and folds" if marked else None,
            )
            ax.set_xlabel(x)
            ax.set_ylabel(y)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][2].axhline(0.0, color="black", linewidth=0.8)
    return save_figure(fig, path, title)


def save_figure(fig: Figure, path: Path, title: str = "") -> Path:
    """Write ``fig`` (with ``title`` as its suptitle) to ``path`` at 100 dpi."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
