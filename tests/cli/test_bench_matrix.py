"""`p2pllm bench matrix`: the pure grid/status/record/heatmap functions, and small matrices
run through real daemons on the bundled shakespeare models (started by the matrix itself,
and a running daemon given with --daemon)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from p2pllm.cli.main import main
from p2pllm.lab.heatmaps import png_size
from p2pllm.lab.matrix import (
    TP_UNAVAILABLE,
    Cell,
    cell_status,
    combine_reps,
    expand_grid,
    heatmap_grid,
    parse_list,
    parse_modes,
    ratio_grid,
    record,
    summarize,
    to_jsonl,
)
from tests.conftest import BUNDLED

# -- pure parts -----------------------------------------------------------------------------------


def test_parse_lists_and_modes() -> None:
    assert parse_list("64, 256,1024,64") == [64, 256, 1024]
    assert parse_modes("split,local") == ["split", "local"]
    for bad in ("0,4", "", "a"):
        with pytest.raises(ValueError):
            parse_list(bad)
    with pytest.raises(ValueError, match="unknown mode"):
        parse_modes("local,pipeline")


def test_expand_grid_is_mode_major_and_complete() -> None:
    cells = expand_grid(["local", "tp"], [64, 256], [1, 4, 16])
    assert len(cells) == 12 and len(set(cells)) == 12
    assert cells[0] == Cell("local", 64, 1) and cells[1] == Cell("local", 64, 4)
    assert cells[3] == Cell("local", 256, 1) and cells[6] == Cell("tp", 64, 1)


def test_cell_status_reasons() -> None:
    kw: dict[str, Any] = {"max_positions": 512, "new_tokens": 16, "nodes": 2}
    assert cell_status(Cell("local", 496, 4), **kw) is None  # 496 + 16 = 512 fits
    assert "exceeds the model's 512 positions" in str(cell_status(Cell("local", 497, 1), **kw))
    assert cell_status(Cell("tp", 64, 1), **kw) == TP_UNAVAILABLE
    assert cell_status(Cell("split", 64, 1), **kw) is None
    assert "not enough nodes for split: 1 up, 2 needed" == cell_status(
        Cell("split", 64, 1), max_positions=None, new_tokens=16, nodes=1)
    assert cell_status(Cell("spec", 4096, 1), max_positions=None, new_tokens=16, nodes=1) is None


def test_record_and_summary() -> None:
    cell = Cell("split", 64, 2)
    figs = summarize(cell, [{"generated_tokens": 10, "ttft_s": 0.2, "daemon_ttft_s": 0.1},
                            {"generated_tokens": 6, "ttft_s": 0.4, "daemon_ttft_s": 0.3}], 2.0)
    assert figs["tokens_per_s"] == 8.0 and figs["ttft_s"] == pytest.approx(0.3)
    assert figs["ttft_s_max"] == 0.4 and figs["generated_tokens"] == 16
    rec = record(cell, "ok", figures=figs, peak_rss_bytes=3 * 2**20, context={"config": {"x": 1}})
    line = json.loads(to_jsonl(rec))
    assert line["peak_rss_mb"] == 3.0 and line["config"] == {"x": 1} and line["reason"] is None
    with pytest.raises(ValueError, match="reason"):
        record(cell, "unavailable")
    with pytest.raises(ValueError):
        record(cell, "skipped", reason="x")
    with pytest.raises(ValueError):  # NaN is not JSON
        to_jsonl(record(cell, "ok", figures={"tokens_per_s": math.nan}))


def test_combine_reps_takes_medians() -> None:
    cell = Cell("local", 8, 1)
    rounds = [summarize(cell, [{"generated_tokens": 4, "ttft_s": t}], w)
              for t, w in ((0.1, 1.0), (0.5, 0.5), (0.2, 2.0))]
    assert combine_reps(rounds[:1]) == rounds[0]
    got = combine_reps(rounds)
    assert got["tokens_per_s"] == 4.0 and got["tokens_per_s_reps"] == [4.0, 8.0, 2.0]
    assert got["ttft_s"] == 0.2 and got["ttft_s_max"] == 0.5 and got["generated_tokens"] == 12
    assert got["reps"] == 3 and got["wall_s"] == 3.5
    with pytest.raises(ValueError):
        combine_reps([])


def test_heatmap_and_ratio_grids() -> None:
    recs = [record(Cell("local", 8, 1), "ok", figures={"tokens_per_s": 10.0}),
            record(Cell("local", 8, 2), "ok", figures={"tokens_per_s": 20.0}),
            record(Cell("split", 8, 1), "ok", figures={"tokens_per_s": 15.0}),
            record(Cell("split", 8, 2), "failed", reason="boom")]
    local = heatmap_grid(recs, "local", "tokens_per_s", [8, 16], [1, 2])
    split = heatmap_grid(recs, "split", "tokens_per_s", [8, 16], [1, 2])
    assert local == [[10.0, 20.0], [None, None]]
    assert split == [[15.0, None], [None, None]]
    assert ratio_grid(split, local) == [[1.5, None], [None, None]]


# -- through real daemons -------------------------------------------------------------------------


def _lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _check_ok(rec: dict[str, Any], batch: int, new_tokens: int, rss: bool) -> None:
    assert rec["status"] == "ok" and rec["reason"] is None, rec
    assert rec["generated_tokens"] == batch * new_tokens  # ignore_eos: exactly new_tokens each
    assert rec["tokens_per_s"] == pytest.approx(rec["generated_tokens"] / rec["wall_s"], rel=1e-2)
    assert 0 < rec["ttft_s"] <= rec["ttft_s_max"] <= rec["wall_s"]
    if rss:  # a daemon holding the shakespeare model and torch is well over 100 MB
        assert rec["peak_rss_bytes"] > 100 * 2**20
        assert rec["peak_rss_bytes"] == sum(rec["rss_per_daemon"].values())
    else:
        assert rec["peak_rss_bytes"] is None


def test_matrix_with_started_daemons(tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "out"
    rc = main(["bench", "matrix", "--model", "shakespeare", "--modes", "local,split,tp",
               "--context", "8,600", "--batch", "1,2", "--new-tokens", "4", "--out", str(out)])
    assert rc == 0
    lines = _lines(out)
    assert [(r["mode"], r["context"], r["batch"]) for r in lines] == [
        (m, c, b) for m in ("local", "split", "tp") for c in (8, 600) for b in (1, 2)]
    by = {(r["mode"], r["context"], r["batch"]): r for r in lines}
    for mode in ("local", "split"):
        for b in (1, 2):
            _check_ok(by[mode, 8, b], b, 4, rss=True)
            assert by[mode, 600, b]["status"] == "unavailable"
            assert "exceeds the model's 512 positions" in by[mode, 600, b]["reason"]
    assert len(by["local", 8, 1]["rss_per_daemon"]) == 1
    assert len(by["split", 8, 1]["rss_per_daemon"]) == 2
    for c in (8, 600):
        for b in (1, 2):
            assert by["tp", c, b]["status"] == "unavailable"
            assert by["tp", c, b]["reason"] == TP_UNAVAILABLE
    first = lines[0]
    assert first["machine"]["cpus"] >= 1 and first["versions"]["p2pllm"]
    assert first["config"]["model_facts"]["max_positions"] == 512
    assert first["config"]["modes"] == ["local", "split", "tp"]
    for name, panels in (("tokens_per_s", 3), ("ttft_s", 3), ("peak_rss_mb", 3),
                         ("ratio_to_local", 2)):
        with Image.open(out / f"{name}.png") as im:
            im.load()
            assert im.size == png_size(panels), name


def test_matrix_against_a_running_daemon(daemons: Any, tmp_path: Path) -> None:
    """--daemon: a one-node cluster runs local, marks split unavailable (not enough nodes),
    does not measure RSS; a model no node has makes failed cells that say why."""
    import matplotlib.image as mpimg

    d = daemons("solo", "--no-mdns")
    out = tmp_path / "solo"
    rc = main(["bench", "matrix", "--daemon", d.address, "--model", str(BUNDLED),
               "--modes", "local,split", "--context", "8", "--batch", "1,3",
               "--new-tokens", "4", "--reps", "2", "--out", str(out)])
    assert rc == 0
    by = {(r["mode"], r["batch"]): r for r in _lines(out)}
    assert len(by) == 4
    for b in (1, 3):  # two rounds each
        rec = by["local", b]
        assert rec["status"] == "ok" and rec["reps"] == 2 and rec["peak_rss_bytes"] is None
        assert rec["generated_tokens"] == 2 * b * 4
        assert rec["tokens_per_s"] == pytest.approx(sum(rec["tokens_per_s_reps"]) / 2, rel=1e-3)
        assert 0 < rec["ttft_s"] <= rec["ttft_s_max"] <= rec["wall_s"]
    for b in (1, 3):
        assert by["split", b]["status"] == "unavailable"
        assert by["split", b]["reason"] == "not enough nodes for split: 1 up, 2 needed"
    assert mpimg.imread(out / "tokens_per_s.png").shape[:2] == png_size(2)[::-1]

    bad = tmp_path / "bad"
    rc = main(["bench", "matrix", "--daemon", d.address, "--model", "no-such-model",
               "--modes", "local", "--context", "8", "--batch", "1", "--out", str(bad),
               "--no-plots"])
    assert rc == 1
    [rec] = _lines(bad)
    assert rec["status"] == "failed" and "no-such-model" in rec["reason"], rec
    assert not list(bad.glob("*.png"))
