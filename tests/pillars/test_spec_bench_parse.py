"""bench/spec.py's pure helpers for the SmolLM2 mode: the cell list and the figures parsed
from llama.cpp's llama-speculative-simple and llama-bench output."""

from __future__ import annotations

import pytest

from tests.conftest import bench_module

bench_spec = bench_module("spec")

# the tail of a real llama-speculative-simple run (f32 target, q8_0 draft, -n 96)
LLAMA_SPEC_TAIL = """
0.03.345.931 I encoded    5 tokens in    0.132 seconds, speed:   37.982 t/s
0.03.345.950 I decoded   30 tokens in    1.785 seconds, speed:   16.803 t/s
0.03.345.961 I
0.03.345.973 I n_draft   = 4
0.03.345.985 I n_predict = 30
0.03.345.997 I n_drafted = 24
0.03.346.008 I n_accept  = 22
0.03.346.020 I accept    = 91.667%
0.03.346.031 I
"""


def test_parse_llama_spec() -> None:
    r = bench_spec.parse_llama_spec(LLAMA_SPEC_TAIL)
    assert r == {"decoded": 30, "seconds": 1.785, "tokens_per_s": 16.803, "n_draft": 4,
                 "n_predict": 30, "n_drafted": 24, "n_accept": 22,
                 "accept": pytest.approx(0.91667)}


def test_parse_llama_spec_missing_lines() -> None:
    assert bench_spec.parse_llama_spec("failed to initialize speculative decoding") == {}


def test_parse_llama_bench_json() -> None:
    text = ('load stuff\n[\n {"n_prompt": 0, "n_gen": 96, "avg_ts": 35.7, "stddev_ts": 0.1}\n]\n')
    assert bench_spec.parse_llama_bench(text) == 35.7
    assert bench_spec.parse_llama_bench("no json here") is None


def test_parse_cells() -> None:
    assert bench_spec.parse_cells("int4@0, int8@0,bf16@5,") == [
        ("int4", 0.0), ("int8", 0.0), ("bf16", 5.0)]
    assert bench_spec.parse_cells(bench_spec.SMOL_DEFAULT_CELLS)[-1] == ("int4", 20.0)
    with pytest.raises(ValueError):
        bench_spec.parse_cells("fp8@0")
    with pytest.raises(ValueError):
        bench_spec.parse_cells("int4")
