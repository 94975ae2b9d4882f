"""A PNG of the aggregated eval loss per round (matplotlib, from the optional [plot] extra)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MISSING = "matplotlib is not installed, so no plot was written (pip install 'p2pllm[plot]')"


def plot_eval_loss(
    path: str | Path, rounds: Sequence[dict[str, Any]], initial_eval_loss: float | None, title: str = ""
) -> str | None:
    """Write the plot; returns None on success, else why it was not written."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning(MISSING)
        return MISSING
    xs: list[int] = []
    ys: list[float] = []
    if initial_eval_loss is not None:
        xs.append(0)
        ys.append(initial_eval_loss)
    for r in rounds:
        if r.get("eval_loss") is not None:
            xs.append(int(r["round"]))
            ys.append(float(r["eval_loss"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel("round (0 = before training)")
        ax.set_ylabel("aggregated eval loss")
        ax.set_title(title or "federated LoRA: eval loss per round")
        ax.grid(True, alpha=0.3)
        if xs:
            ax.set_xticks(xs)
        fig.tight_layout()
        fig.savefig(str(path), format="png")
    finally:
        plt.close(fig)
    return None
