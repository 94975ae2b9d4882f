"""Shard compute without sockets: chained ShardEngines equal the local engine exactly,
slices hold exactly their parameters, bad peer input is a typed error, messages validate."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice
from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.split.compute import Sampler, ShardEngine, Step
from p2pllm.pillars.split.messages import OpenSession, ShardParams
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode
from tests.conftest import SHARED_MODELS

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_model(root: Path, arch: str, layers: int = 4, seed: int = 0) -> Path:
    """A random tiny checkpoint of ``arch`` (vocab 512, with the stories-260k tokenizer)."""
    import transformers

    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
               "qwen3": "Qwen3Config"}
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=arch in ("qwen2", "llama"))
    if arch == "mistral":
        kw["sliding_window"] = 12  # short: generation runs past it
    if arch == "qwen3":
        kw["head_dim"] = 16
    config = getattr(transformers, classes[arch])(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = root / f"tiny-{arch}-{layers}"
    model.save_pretrained(path)
    tok = SHARED_MODELS / "stories-260k"
    if tok.is_dir():
        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            if (tok / f).exists():
                shutil.copy(tok / f, path / f)
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny_model(root, arch) for arch in ARCHS}


def chain(path: Path, ranges: list[tuple[int, int]], rows: int = 4,
          wire: torch.dtype = torch.float32) -> list[ShardEngine]:
    return [ShardEngine(load_slice(path, layers=r), rows=rows, max_len=128, wire_dtype=wire)
            for r in ranges]


def run_chain(engines: list[ShardEngine], prompt: list[int], max_new: int,
              params: SamplingParams | None = None) -> list[int]:
    """The protocol's data flow, in process: ids -> hidden -> ... -> logits -> token -> ids."""
    rows = [e.take_row() for e in engines]
    sampler = Sampler(params or SamplingParams(), len(prompt), max_new, stop_ids=(),
                      prompt_ids=prompt)
    x, pos, out = torch.tensor(prompt), 0, []
    while True:
        for e, row in zip(engines, rows, strict=True):
            name = "ids" if e.model.has_embed else "hidden"
            x = e.check_input({name: x}, pos, 128)
            (x,) = e.run([Step(row, pos, x, True)])
        token, reason = sampler.next(x)
        out.append(token)
        if reason:
            break
        pos, x = sampler.next_pos, torch.tensor([token])
    for e, row in zip(engines, rows, strict=True):
        e.give_row(row)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_two_and_three_shards_equal_the_local_engine_for_every_architecture(tiny_models, arch) -> None:
    path = tiny_models[arch]
    prompt = [1, 17, 300, 42, 5, 77]
    local = generate_ids(load_slice(path), prompt, max_tokens=24, stop_ids=()).token_ids
    assert run_chain(chain(path, [(0, 2), (2, 4)]), prompt, 24) == local
    assert run_chain(chain(path, [(0, 1), (1, 3), (3, 4)]), prompt, 24) == local
    # seeded sampling with a repetition penalty: the same draws as the local loop
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3, seed=7)
    local = generate_ids(load_slice(path), prompt, params, max_tokens=16, stop_ids=()).token_ids
    assert run_chain(chain(path, [(0, 3), (3, 4)]), prompt, 16, params) == local


def test_a_shard_holds_exactly_its_slice_of_the_parameters(tiny_models) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_models["qwen3"]  # untied head
    hf = dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())
    for start, end in [(0, 1), (1, 3), (3, 4)]:
        engine = chain(path, [(start, end)])[0]
        want = sum(p.numel() for n, p in hf.items()
                   if (n.startswith("model.layers.") and start <= int(n.split(".")[2]) < end)
                   or (start == 0 and n == "model.embed_tokens.weight")
                   or (end == 4 and n in ("model.norm.weight", "lm_head.weight")))
        assert engine.model.num_parameters() == want


def test_batched_decode_steps_of_several_sessions_match_single_steps_closely(tiny_models) -> None:
    (engine,) = chain(tiny_models["llama"], [(0, 4)], rows=3)
    prompts = [[1, 5, 9], [1, 7, 8, 9, 10], [1, 2]]
    rows = [engine.take_row() for _ in prompts]
    for row, p in zip(rows, prompts, strict=True):
        engine.run([Step(row, 0, torch.tensor(p), True)])
    # one decode step for all three sessions at different lengths, in one forward
    steps = [Step(r, len(p), torch.tensor([3]), True) for r, p in zip(rows, prompts, strict=True)]
    batched = engine.run(steps)
    (single,) = chain(tiny_models["llama"], [(0, 4)], rows=1)
    for p, got in zip(prompts, batched, strict=True):
        row = single.take_row()
        single.run([Step(row, 0, torch.tensor(p), True)])
        (want,) = single.run([Step(row, len(p), torch.tensor([3]), True)])
        single.give_row(row)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert int(got.argmax()) == int(want.argmax())


def test_bad_input_from_a_peer_is_a_typed_error(tiny_models) -> None:
    first, second = chain(tiny_models["llama"], [(0, 2), (2, 4)])

    def code(engine, tensors, pos=0, limit=16):
        with pytest.raises(ProtocolError) as e:
            engine.check_input(tensors, pos, limit)
        return e.value.code

    assert code(second, {"hidden": torch.zeros(3, 63)}) == ErrorCode.BAD_TENSOR  # shape
    assert code(second, {"hidden": torch.zeros(3, 64, dtype=torch.float16)}) == ErrorCode.BAD_TENSOR
    assert code(second, {"hidden": torch.zeros(3, 1, 64)}) == ErrorCode.BAD_TENSOR
    assert code(second, {"ids": torch.zeros(3, dtype=torch.int64)}) == ErrorCode.BAD_TENSOR
    assert code(second, {"hidden": torch.zeros(0, 64)}) == ErrorCode.BAD_TENSOR
    assert code(second, {"hidden": torch.zeros(3, 64)}, pos=14) == ErrorCode.BAD_REQUEST
    assert code(first, {"ids": torch.tensor([1, 512])}) == ErrorCode.BAD_TENSOR  # out of vocab
    assert code(first, {"ids": torch.tensor([[1, 2]])}) == ErrorCode.BAD_TENSOR
    assert code(first, {"ids": torch.tensor([1.0])}) == ErrorCode.BAD_TENSOR
    x = second.check_input({"hidden": torch.ones(2, 64)}, 0, 16)
    assert x.shape == (2, 64)


def test_wire_dtype_bfloat16_sends_half_the_bytes_and_stays_close(tiny_models) -> None:
    path = tiny_models["llama"]
    first, second = chain(path, [(0, 2), (2, 4)], wire=torch.bfloat16)
    row = first.take_row()
    (h,) = first.run([Step(row, 0, torch.tensor([1, 2, 3]), True)])
    assert h.dtype == torch.bfloat16 and h.shape == (3, 64)
    with pytest.raises(ProtocolError):
        second.check_input({"hidden": h.float()}, 0, 16)
    assert second.check_input({"hidden": h}, 0, 16).dtype == torch.bfloat16


def test_session_cache_takes_memory_only_as_positions_arrive_and_gives_it_back(tiny_models) -> None:
    (engine,) = chain(tiny_models["llama"], [(0, 4)], rows=3)
    cache = engine.cache
    assert cache.nbytes == 0 and cache.blocks_used == 0
    row = engine.take_row()
    other = engine.take_row()
    engine.run([Step(row, 0, torch.arange(1, 21), True)])  # 20 positions: 2 blocks of 16
    assert cache.blocks_used == 2 and cache.nbytes > 0 and cache.lengths[other] == 0
    engine.give_row(row)
    assert cache.blocks_used == 0 and cache.nbytes == 0 and engine.rows_free == 2
    assert cache.position_bytes() == 4 * 2 * 2 * 16 * 4  # layers, K and V, kv heads, hd, fp32


def test_messages_validate_what_a_peer_sends() -> None:
    p = ShardParams.from_meta(ShardParams("m", 0, 2, 4, next=None, first=None,
                                          ).to_meta() | {"next": {"node": "n", "rid": "shard1"}})
    assert p.is_first and not p.is_last and p.next is not None and p.next.rid == "shard1"
    with pytest.raises(ProtocolError, match="needs 'next'"):
        ShardParams.from_meta({"model": "m", "start": 0, "end": 2, "num_layers": 4})
    with pytest.raises(ProtocolError, match="needs 'first'"):
        ShardParams.from_meta({"model": "m", "start": 2, "end": 4, "num_layers": 4})
    with pytest.raises(ProtocolError, match="end"):
        ShardParams.from_meta({"model": "m", "start": 2, "end": 2, "num_layers": 4})
    with pytest.raises(ProtocolError, match="wire_dtype"):
        ShardParams.from_meta({"model": "m", "start": 0, "end": 4, "num_layers": 4,
                               "first": {"node": "a", "rid": "b"}, "wire_dtype": "int8"})
    o = OpenSession.from_meta({"session": "s", "max_len": 10, "prompt_len": 3, "max_new": 8,
                               "stop_ids": [2], "sampling": {"temperature": 0.5, "seed": 3}},
                              last=True)
    assert o.max_new == 8 and o.sampling.seed == 3 and o.stop_ids == (2,)
    assert OpenSession.from_meta(o.to_meta(), last=True) == o
    with pytest.raises(ProtocolError, match="exceeds max_len"):
        OpenSession.from_meta({"session": "s", "max_len": 10, "prompt_len": 3, "max_new": 9},
                              last=True)
    with pytest.raises(ProtocolError, match="prompt_ids"):
        OpenSession.from_meta({"session": "s", "max_len": 10, "prompt_len": 3, "max_new": 2,
                               "sampling": {"repetition_penalty": 1.2}}, last=True)
    with pytest.raises(ProtocolError, match="session"):
        OpenSession.from_meta({"session": "x" * 65, "max_len": 10}, last=False)
