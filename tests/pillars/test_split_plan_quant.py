"""The split planner charges a shard what the engine will hold: quantized linears (--quant
int8|int4) at their codes and scales, not float32 (issue 19)."""

from __future__ import annotations

import pytest
import torch

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.loader import weight_bytes
from p2pllm.pillars.split.pipeline import KV_RESERVE_TOKENS, SplitRequest, plan_pipeline, shard_cost
from p2pllm.plan.layers import kv_bytes_per_token_layer, model_stage_cost
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode
from tests.conftest import BUNDLED
from tests.pillars.test_split_plan import cfg, local, node


def test_float_cost_is_unchanged_and_quantized_cost_is_the_engines_weight_bytes() -> None:
    c = ModelConfig.from_dir(BUNDLED)
    reserve = kv_bytes_per_token_layer(c, 4) * KV_RESERVE_TOKENS
    assert shard_cost(c, "float32", "none") == model_stage_cost(
        c, bytes_per_param=4, reserve_bytes_per_layer=reserve)
    for quant in ("int8", "int4"):
        cost = shard_cost(c, "float32", quant)
        for a, b in ((0, 4), (0, 1), (1, 3), (2, 4)):
            assert cost.stage_bytes(a, b) - (b - a) * reserve == weight_bytes(
                BUNDLED, torch.float32, quant, (a, b)), (quant, a, b)
    f32, i8, i4 = (shard_cost(c, "float32", q).stage_bytes(0, 4) - 4 * reserve
                   for q in ("none", "int8", "int4"))
    assert i4 < i8 < f32 / 2  # int8 ~1 byte a weight, int4 ~0.5 (+ scales); embedding stays


def test_a_budget_that_fits_int4_shards_but_not_float_ones() -> None:
    c = cfg()
    float_need = shard_cost(c, "float32", "none").stage_bytes(0, c.num_layers)
    int4_need = shard_cost(c, "float32", "int4").stage_bytes(0, c.num_layers)
    each = (float_need + int4_need) // 4  # two nodes: half of the point between the two
    assert int4_need < 2 * each < float_need
    nodes = [node("me", each, me=True), node("b", each)]
    stages = plan_pipeline(nodes, local(), SplitRequest(model="m", prompt="x", shards=2,
                                                        quant="int4"))
    assert stages[0].start == 0 and stages[-1].end == c.num_layers
    assert all(s.planned_bytes <= each for s in stages)
    assert sum(s.planned_bytes for s in stages) == int4_need
    with pytest.raises(ProtocolError) as e:
        plan_pipeline(nodes, local(), SplitRequest(model="m", prompt="x", shards=2))
    assert e.value.code == ErrorCode.REFUSED
