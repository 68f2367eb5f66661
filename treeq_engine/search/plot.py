"""The root merge's candidates as the paper draws them: cost against MSE, kept (green dots) and dropped (red
crosses), with the chosen plan, the budget and the baselines marked. Saved as PNG with matplotlib's Agg backend
(no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

AXIS_LABEL = {"w": "average weight bits", "a": "average activation bits", "wa": "budget use: max(W / W budget, A / A budget)",
              "bytes": "model bytes", "latency": "latency of the searched linears (µs)"}


def plot_front(path: str | Path, root_candidates: Mapping[str, list], *, kind: str, budget_axis: float | None = None,
               chosen: tuple[float, float] | None = None, baselines: Mapping[str, tuple[float, float]] | None = None,
               title: str = "") -> Path:
    """Draw ``root_candidates`` (``axis``, ``mse``, ``kept`` lists from the tree search) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(root_candidates["axis"], dtype=np.float64)
    y = np.array([np.nan if v is None else v for v in root_candidates["mse"]], dtype=np.float64)
    kept = np.asarray(root_candidates["kept"], dtype=bool)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter(x[~kept], y[~kept], marker="x", color="tab:red", s=18, linewidths=1, label="Dropped", zorder=2)
    ax.scatter(x[kept], y[kept], marker="o", color="tab:green", s=22, label="Kept", zorder=3)
    if budget_axis is not None:
        ax.axvline(budget_axis, color="0.4", linestyle="--", linewidth=1, label="budget", zorder=1)
    markers = iter(["s", "^", "D", "v", "P"])
    for name, (bx, by) in (baselines or {}).items():
        ax.scatter([bx], [by], marker=next(markers, "o"), s=46, facecolors="none", edgecolors="k", linewidths=1.2,
                   label=name, zorder=4)
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], marker="*", s=160, color="gold", edgecolors="k", linewidths=0.8,
                   label="TSS plan", zorder=5)
    ax.set_xlabel(AXIS_LABEL.get(kind, kind))
    ax.set_ylabel("MSE vs full precision")
    ax.set_title(title or f"Root merge: {kept.sum()} kept of {len(kept)} scored")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
