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


# -- the one-session step's short paths (take_input, the greedy sampler, the send payload) ------

def _frame(tensors: dict[str, torch.Tensor]) -> tuple[list, memoryview]:
    """What a received SHARD_FORWARD holds: the descriptors and one contiguous payload."""
    from p2pllm.wire.tensors import pack_tensors

    descs, bufs = pack_tensors(tensors)
    return descs, memoryview(bytearray(b"".join(bytes(b) for b in bufs)))


def test_take_input_is_check_input_of_a_well_formed_step_and_declines_anything_else(
        tiny_models) -> None:
    from p2pllm.wire.tensors import unpack_tensors

    first, second = chain(tiny_models["llama"], [(0, 2), (2, 4)])
    (half,) = chain(tiny_models["llama"], [(2, 4)], wire=torch.bfloat16)
    good = [(first, {"ids": torch.tensor([5])}), (first, {"ids": torch.tensor([1, 511, 0])}),
            (second, {"hidden": torch.randn(1, 64)}), (second, {"hidden": torch.randn(3, 64)}),
            (half, {"hidden": torch.randn(2, 64).bfloat16()})]
    for engine, tensors in good:
        descs, payload = _frame(tensors)
        got = engine.take_input(descs, payload, 2, 16)
        want = engine.check_input(unpack_tensors(descs, payload), 2, 16)
        assert got is not None and got.dtype == want.dtype and torch.equal(got, want)
        payload[:] = bytes(payload.nbytes)  # a copy: the receive buffer may be reused
        assert torch.equal(got, want)
    # anything unusual is left to the full path: unpack_tensors + check_input name it
    bad = [(first, {"ids": torch.tensor([1, 512])}, 0),  # out of the vocabulary
           (first, {"ids": torch.tensor([-1])}, 0),
           (first, {"ids": torch.tensor([[1, 2]])}, 0),
           (first, {"ids": torch.tensor([1, 2], dtype=torch.int32)}, 0),  # fine, but int32
           (first, {"hidden": torch.zeros(1, 64)}, 0),
           (first, {"ids": torch.tensor([1]), "x": torch.tensor([1])}, 0),
           (second, {"hidden": torch.zeros(3, 63)}, 0),
           (second, {"hidden": torch.zeros(3, 1, 64)}, 0),
           (second, {"hidden": torch.zeros(0, 64)}, 0),
           (second, {"hidden": torch.zeros(2, 64, dtype=torch.float16)}, 0),
           (second, {"hidden": torch.zeros(3, 64)}, 14),  # past the session's length
           (half, {"hidden": torch.zeros(2, 64)}, 0)]  # float32 on a bfloat16 wire
    for engine, tensors, pos in bad:
        descs, payload = _frame(tensors)
        assert engine.take_input(descs, payload, pos, 16) is None, tensors
    descs, payload = _frame({"hidden": torch.zeros(2, 64)})
    assert second.take_input(descs, payload[:-4], 0, 16) is None  # short payload
    assert second.take_input(descs + descs, payload, 0, 16) is None
    assert second.take_input([{**descs[0], "shape": [2, True]}], payload, 0, 16) is None
    assert second.take_input("junk", payload, 0, 16) is None


def test_the_greedy_sampler_draws_the_first_maximum_as_sample_does() -> None:
    from p2pllm.engine.sampling import sample

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for _ in range(20):
            logits = torch.randint(-3, 4, (512,), generator=gen).to(dtype)  # many ties
            s = Sampler(SamplingParams(), 3, 8, stop_ids=())
            assert s.argmax
            assert s.next(logits)[0] == sample(logits, SamplingParams())[0]
    assert not Sampler(SamplingParams(repetition_penalty=1.2), 1, 4, (), [1]).argmax
    assert not Sampler(SamplingParams(temperature=0.7), 1, 4, ()).argmax


def test_a_step_output_goes_out_as_pack_tensors_would_send_it() -> None:
    from p2pllm.pillars.split.shard import _hidden_payload
    from p2pllm.wire.tensors import pack_tensors

    base = torch.randn(4, 64)
    for t in (torch.randn(1, 576), torch.randn(3, 64).half(), torch.randn(2, 64).bfloat16(),
              base.t()[:4], base[:0]):  # bfloat16, not contiguous, empty: pack_tensors
        descs, bufs = _hidden_payload(t)
        want_descs, want_bufs = pack_tensors({"hidden": t})
        assert descs == want_descs
        assert [bytes(b) for b in bufs] == [bytes(b) for b in want_bufs]
