"""The benchmark matrix's pure parts: the grid, each cell's status, its JSONL record, and the
arrays its heatmaps draw. No sockets, no processes, no torch: the runner
(:mod:`p2pllm.cli.bench_matrix`) measures, these functions only shape what it measured.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MODES = ("local", "spec", "split", "tp")
METRICS = ("tokens_per_s", "ttft_s", "peak_rss_mb")
OK, UNAVAILABLE, FAILED = "ok", "unavailable", "failed"
TP_UNAVAILABLE = "tensor parallel is not implemented"
MIN_NODES = {"local": 1, "spec": 1, "split": 2}  # spec: drafter and verifier may share a node


@dataclass(frozen=True)
class Cell:
    mode: str
    context: int  # prompt tokens
    batch: int  # concurrent requests


def parse_list(text: str, kind: type = int) -> list[Any]:
    """'64,256,1024' -> [64, 256, 1024]; order kept, duplicates dropped; ints must be >= 1."""
    out: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        value = kind(part)
        if kind is int and value < 1:
            raise ValueError(f"expected integers >= 1, got {value}")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError(f"empty list {text!r}")
    return out


def parse_modes(text: str) -> list[str]:
    modes = parse_list(text, str)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    return modes


def expand_grid(modes: Sequence[str], contexts: Sequence[int], batches: Sequence[int]) -> list[Cell]:
    """Every (mode, context, batch), mode-major: one mode's cells run together (its daemons
    and loaded model are reused), contexts then batches in the order given."""
    return [Cell(m, c, b) for m in modes for c in contexts for b in batches]


def cell_status(cell: Cell, *, max_positions: int | None, new_tokens: int,
                nodes: int) -> str | None:
    """Why `cell` cannot run ("unavailable: ..." reason), or None when it can."""
    if cell.mode == "tp":
        return TP_UNAVAILABLE
    if max_positions is not None and cell.context + new_tokens > max_positions:
        return (f"context {cell.context} + {new_tokens} new tokens exceeds the model's "
                f"{max_positions} positions")
    need = MIN_NODES.get(cell.mode, 1)
    if nodes < need:
        return f"not enough nodes for {cell.mode}: {nodes} up, {need} needed"
    return None


def summarize(cell: Cell, sessions: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Figures of one measured cell from its sessions' results ({"generated_tokens",
    "ttft_s" (client-side: submit to first streamed token), "daemon_ttft_s"}) and the wall
    time from submitting the first request to the last final response."""
    tokens = sum(int(s["generated_tokens"]) for s in sessions)
    ttfts = [float(s["ttft_s"]) for s in sessions if s.get("ttft_s") is not None]
    daemon_ttfts = [float(s["daemon_ttft_s"]) for s in sessions
                    if s.get("daemon_ttft_s") is not None]
    return {
        "generated_tokens": tokens,
        "wall_s": round(wall_s, 6),
        "tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else None,
        "ttft_s": round(statistics.median(ttfts), 6) if ttfts else None,
        "ttft_s_max": round(max(ttfts), 6) if ttfts else None,
        "daemon_ttft_s": round(statistics.median(daemon_ttfts), 6) if daemon_ttfts else None,
    }


def combine_reps(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One cell's figures from its rounds (each a :func:`summarize`): tokens/s and TTFT are
    the rounds' medians, each round's tokens/s kept in tokens_per_s_reps; one round is
    returned as it is."""
    if not rounds:
        raise ValueError("no rounds")
    if len(rounds) == 1:
        return dict(rounds[0])

    def med(key: str) -> float | None:
        vals = [r[key] for r in rounds if r.get(key) is not None]
        return round(statistics.median(vals), 6) if vals else None

    return {"generated_tokens": sum(r["generated_tokens"] for r in rounds),
            "wall_s": round(sum(r["wall_s"] for r in rounds), 6),
            "tokens_per_s": med("tokens_per_s"), "ttft_s": med("ttft_s"),
            "ttft_s_max": max((r["ttft_s_max"] for r in rounds if r.get("ttft_s_max") is not None),
                              default=None),
            "daemon_ttft_s": med("daemon_ttft_s"),
            "tokens_per_s_reps": [r["tokens_per_s"] for r in rounds], "reps": len(rounds)}


def record(cell: Cell, status: str, *, reason: str | None = None,
           figures: dict[str, Any] | None = None, peak_rss_bytes: int | None = None,
           rss_per_daemon: dict[str, int] | None = None, context: dict[str, Any] | None = None,
           ) -> dict[str, Any]:
    """One JSONL line: the cell, its status (ok / unavailable / failed) with the reason, its
    figures (None where not measured), and the run's machine / versions / config."""
    if status not in (OK, UNAVAILABLE, FAILED):
        raise ValueError(f"bad status {status!r}")
    if status != OK and not reason:
        raise ValueError(f"a {status} cell needs its reason")
    figs = figures or {}
    out: dict[str, Any] = {
        "mode": cell.mode, "context": cell.context, "batch": cell.batch, "status": status,
        "reason": reason,
        "tokens_per_s": figs.get("tokens_per_s"), "ttft_s": figs.get("ttft_s"),
        "peak_rss_bytes": peak_rss_bytes,
        "peak_rss_mb": round(peak_rss_bytes / 2**20, 1) if peak_rss_bytes else None,
    }
    out |= {k: v for k, v in figs.items() if k not in out}
    if rss_per_daemon is not None:
        out["rss_per_daemon"] = rss_per_daemon
    out |= context or {}
    return out


def to_jsonl(rec: dict[str, Any]) -> str:
    return json.dumps(rec, sort_keys=False, allow_nan=False) + "\n"


def heatmap_grid(records: Iterable[dict[str, Any]], mode: str, metric: str,
                 contexts: Sequence[int], batches: Sequence[int]) -> list[list[float | None]]:
    """rows = contexts, columns = batches: `metric` of each ok cell of `mode`, None otherwise."""
    by = {(r["context"], r["batch"]): r for r in records
          if r["mode"] == mode and r["status"] == OK}
    out: list[list[float | None]] = []
    for c in contexts:
        row: list[float | None] = []
        for b in batches:
            v = by.get((c, b), {}).get(metric)
            row.append(float(v) if isinstance(v, int | float) else None)
        out.append(row)
    return out


def ratio_grid(mode_grid: Sequence[Sequence[float | None]],
               local_grid: Sequence[Sequence[float | None]]) -> list[list[float | None]]:
    """Cell-wise mode / local (None where either is missing or local is 0)."""
    return [[(a / b) if a is not None and b else None for a, b in zip(ra, rb, strict=True)]
            for ra, rb in zip(mode_grid, local_grid, strict=True)]


def cell_label(status: str, reason: str | None) -> str:
    """How a cell's status reads in the progress bar and the heatmap ("n/a", "failed")."""
    return {OK: "ok", UNAVAILABLE: "n/a", FAILED: "failed"}[status] + (
        "" if status == OK or not reason else f": {reason}")
