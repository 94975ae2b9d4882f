"""PNG heatmaps of a benchmark matrix (matplotlib: the optional ``[plot]`` extra).

One PNG per metric (a panel per mode: rows = context, columns = batch) and one of each mode's
tokens/s over local's. Cells without a figure (unavailable, failed) are grey and say why in
short ("n/a", "failed"). Figures have a fixed size in inches at a fixed dpi (no tight bbox),
so a PNG's pixel size is :func:`png_size` of its panel count.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2pllm.lab.matrix import METRICS, OK, heatmap_grid, ratio_grid

PANEL_W, PANEL_H, DPI = 4.0, 3.5, 100
TITLES = {"tokens_per_s": "tokens/s (all sessions)", "ttft_s": "time to first token (s)",
          "peak_rss_mb": "peak RSS of the daemons (MiB)", "ratio": "tokens/s / local"}


def png_size(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a PNG with `panels` panels."""
    return int(PANEL_W * DPI * max(1, panels)), int(PANEL_H * DPI)


def _labels(records: Sequence[dict[str, Any]], mode: str, contexts: Sequence[int],
            batches: Sequence[int]) -> list[list[str]]:
    by = {(r["context"], r["batch"]): r for r in records if r["mode"] == mode}
    return [["" if by.get((c, b), {}).get("status") == OK else
             ("n/a" if by.get((c, b), {}).get("status") == "unavailable" else "failed")
             for b in batches] for c in contexts]


def _draw(path: Path, title: str, panels: list[tuple[str, list[list[float | None]],
                                                       list[list[str]]]],
          contexts: Sequence[int], batches: Sequence[int], fmt: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    w, h = png_size(len(panels))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(w / DPI, h / DPI), dpi=DPI,
                             squeeze=False)
    for ax, (name, grid, labels) in zip(axes[0], panels, strict=False):
        data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_yticks(range(len(contexts)), [str(c) for c in contexts])
        ax.set_xlabel("batch (concurrent requests)", fontsize=8)
        ax.set_ylabel("context (prompt tokens)", fontsize=8)
        lo, hi = (np.nanmin(data), np.nanmax(data)) if not np.all(np.isnan(data)) else (0, 0)
        for i in range(len(contexts)):
            for j in range(len(batches)):
                v = data[i, j]
                text = labels[i][j] or (fmt.format(v) if not np.isnan(v) else "")
                bright = np.isnan(v) or (hi > lo and (v - lo) / (hi - lo) > 0.6)
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="black" if bright else "white")
        if not np.all(np.isnan(data)):
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.16, top=0.82, wspace=0.45)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def write_heatmaps(out_dir: Path, records: Sequence[dict[str, Any]], modes: Sequence[str],
                   contexts: Sequence[int], batches: Sequence[int]) -> list[Path]:
    """The PNGs: ``<metric>.png`` per metric (one panel per mode) and ``ratio_to_local.png``
    (one panel per mode other than local, when local is in the matrix)."""
    written = []
    fmts = {"tokens_per_s": "{:.1f}", "ttft_s": "{:.3f}", "peak_rss_mb": "{:.0f}"}
    for metric in METRICS:
        panels = [(m, heatmap_grid(records, m, metric, contexts, batches),
                   _labels(records, m, contexts, batches)) for m in modes]
        written.append(_draw(out_dir / f"{metric}.png", TITLES[metric], panels, contexts,
                             batches, fmts[metric]))
    others = [m for m in modes if m != "local"]
    if "local" in modes and others:
        local = heatmap_grid(records, "local", "tokens_per_s", contexts, batches)
        panels = [(f"{m} / local", ratio_grid(heatmap_grid(records, m, "tokens_per_s",
                                                           contexts, batches), local),
                   _labels(records, m, contexts, batches)) for m in others]
        written.append(_draw(out_dir / "ratio_to_local.png", TITLES["ratio"], panels, contexts,
                             batches, "{:.2f}x"))
    return written
