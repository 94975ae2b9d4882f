"""The dashboard's sparklines for measured link RTT and throughput and per-role/per-shard busy
fractions (issue 17, item 2): fed three snapshots, the rendered text carries sparklines that
follow the change, at 80 and 120 columns, every line within the width."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from rich.console import Console

from p2pllm.cli.dashboard import SPARK, History, render, sparkline
from tests.cli.test_status_layout import NAMES, check_readable, snapshot

RTT = (0.2, 0.5, 1.0)  # rising
MBPS = (1000.0, 600.0, 200.0)  # falling
BUSY = (0.1, 0.5, 0.9)  # the local shard role's worker, rising
SHARDS = ((0.2, 0.9), (0.5, 0.5), (0.9, 0.1))  # the split job's shard-0 rising, shard-1 falling


def snaps() -> list[dict[str, Any]]:
    out = []
    for i in range(3):
        s = copy.deepcopy(snapshot())
        s["peers"][0]["rtt_ms"], s["peers"][0]["throughput_mbps"] = RTT[i], MBPS[i]
        s["node"]["roles"][0]["metrics"] = {"worker": {"busy": BUSY[i]}}
        split = next(j for j in s["jobs"] if j["pillar"] == "split")
        split["metrics"]["shard_busy"] = {"shard-0": SHARDS[i][0], "shard-1": SHARDS[i][1]}
        out.append(s)
    return out


def draw(width: int, history: History | None) -> str:
    console = Console(record=True, width=width, height=60, color_system=None)
    console.print(render(snaps()[-1], history, width))
    return console.export_text()


def levels(spark: str) -> list[int]:
    return [SPARK.index(c) for c in spark]


def spark_after(line: str, marker: str) -> str:
    """The first run of sparkline blocks after ``marker`` on ``line``."""
    rest = line[line.index(marker) + len(marker):].lstrip()
    return rest[:len(rest) - len(rest.lstrip(SPARK))]


@pytest.mark.parametrize("width", [80, 120])
def test_link_and_busy_sparklines_follow_three_snapshots(width: int) -> None:
    history = History()
    for s in snaps():
        history.update(s)
    out = draw(width, history)
    check_readable(out, width, models=width > 100)
    lines = out.splitlines()

    link = next(x for x in lines if x.startswith(NAMES[1]) and "1.00" in x)  # the links row
    rtt = spark_after(link, "1.00")
    assert len(rtt) == 3 and levels(rtt) == sorted(set(levels(rtt))), link  # strictly rising
    assert rtt == sparkline(list(RTT), 8)
    mbps = spark_after(link, " 200 ")
    assert len(mbps) == 3 and levels(mbps) == sorted(set(levels(mbps)), reverse=True), link  # falling

    role = next(x for x in lines if "busy 90%" in x)  # the node's shard role, on its roles line
    busy = spark_after(role, "busy 90%")
    assert busy == sparkline(list(BUSY), 8, top=1.0) and levels(busy) == sorted(set(levels(busy))), role

    if width >= 120:  # the jobs' trends (tok/s and now each shard's busy) show where there is room
        joined = " ".join(out.split())
        up, down = sparkline([a for a, _ in SHARDS], top=1.0), sparkline([b for _, b in SHARDS], top=1.0)
        assert f"busy trend shard-0 {up} shard-1 {down}" in joined, out
        assert levels(up) == sorted(set(levels(up))) and levels(down) == sorted(set(levels(down)), reverse=True)


def test_a_single_snapshot_gives_single_blocks_and_no_history_none() -> None:
    one = History()
    one.update(snaps()[0])
    assert one.trend("rtt", snapshot()["peers"][0]["node_id"]) == [0.2]
    assert one.trend("rtt", snapshot()["peers"][1]["node_id"]) == []  # a down link: no rtt, no point
    plain = draw(80, None)  # `dash --once`: no history, no sparkline columns
    assert not set(SPARK) & set(plain)
    assert "rtt ms" in plain and "busy 90%" in plain


def test_busy_fractions_scale_to_one_not_to_their_max() -> None:
    assert sparkline([0.1, 0.1], top=1.0) == "▂▂"  # a flat low busy reads low ...
    assert sparkline([0.1, 0.1]) == "██"  # ... where scaling to the max would read full
    assert sparkline([0.0, 0.5, 1.0, 1.5], top=1.0) == "▁▅██"  # clamped at the top
