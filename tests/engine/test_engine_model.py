"""ModelSlice against transformers: prefill, decode, slices, batches, training path."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

from p2pllm.engine.errors import ModelError, SequenceTooLongError
from p2pllm.engine.loader import load_slice
from p2pllm.engine.model import ModelSlice

TOL = 1e-4
ARCHS = ("llama", "llama-tied", "mistral", "qwen2", "qwen3")  # the `tiny` fixture's models
Tiny = Any


def _ids(n: int, seed: int = 0, vocab: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


def _pos(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n).unsqueeze(0)


@torch.no_grad()
def _hf_logits(t: Tiny, ids: torch.Tensor) -> torch.Tensor:
    return t.hf(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_transformers(tiny: dict[str, Tiny], arch: str) -> None:
    t = tiny[arch]
    model = load_slice(t.path)
    ids = _ids(20)  # longer than mistral's 6-token window
    ref = _hf_logits(t, ids)
    with torch.inference_mode():
        no_cache = model(ids, _pos(0, 20))
        cache = model.new_cache(1, 32)
        cached = model(ids, _pos(0, 20), cache)
    assert (no_cache - ref).abs().max() < TOL
    assert (cached - ref).abs().max() < TOL
    assert cache.lengths == [20]


@pytest.mark.parametrize("arch", ARCHS)
def test_step_by_step_decode_matches_transformers(tiny: dict[str, Tiny], arch: str) -> None:
    t = tiny[arch]
    model = load_slice(t.path)
    ids = _ids(20, seed=1)
    ref = _hf_logits(t, ids)
    outs = []
    with torch.inference_mode():
        cache = model.new_cache(1, 24)
        outs.append(model(ids[:, :5], _pos(0, 5), cache))
        for i in range(5, 20):
            outs.append(model(ids[:, i:i + 1], _pos(i, 1), cache))
    assert (torch.cat(outs, dim=1) - ref).abs().max() < TOL


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_several_new_tokens_after_a_prefix(tiny: dict[str, Tiny], arch: str) -> None:
    """Speculative verification: a window of tokens in one pass on top of a cached prefix."""
    t = tiny[arch]
    model = load_slice(t.path)
    ids = _ids(19, seed=2)
    ref = _hf_logits(t, ids)
    with torch.inference_mode():
        cache = model.new_cache(1, 19)
        a = model(ids[:, :4], _pos(0, 4), cache)
        b = model(ids[:, 4:12], _pos(4, 8), cache)  # window longer than mistral's 6
        c = model(ids[:, 12:], _pos(12, 7), cache)
    assert (torch.cat([a, b, c], dim=1) - ref).abs().max() < TOL


def test_last_only_returns_the_last_position(tiny: dict[str, Tiny]) -> None:
    model = load_slice(tiny["llama"].path)
    ids = _ids(9)
    with torch.inference_mode():
        full = model(ids, _pos(0, 9))
        last = model(ids, _pos(0, 9), last_only=True)
    assert last.shape == (1, 1, 96)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


@pytest.mark.parametrize(("arch", "cuts"), [("llama", (0, 2, 3)), ("qwen2", (0, 1, 2, 3)),
                                            ("mistral", (0, 1, 3)), ("qwen3", (0, 1, 2, 3))])
def test_slices_chained_by_hand_equal_the_whole(tiny: dict[str, Tiny], arch: str,
                                                cuts: tuple[int, ...]) -> None:
    t = tiny[arch]
    whole = load_slice(t.path)
    parts = [load_slice(t.path, layers=(a, b)) for a, b in itertools.pairwise(cuts)]
    assert parts[0].has_embed and not parts[0].has_head
    assert parts[-1].has_head and not parts[-1].has_embed
    ids = _ids(14, seed=3)
    with torch.inference_mode():
        ref = whole(ids, _pos(0, 14))
        caches = [p.new_cache(1, 14) for p in parts]

        def chain(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            for p, c in zip(parts, caches, strict=True):
                x = p(x, pos, c)
            return x

        outs = [chain(ids[:, :6], _pos(0, 6))]
        outs += [chain(ids[:, i:i + 1], _pos(i, 1)) for i in range(6, 14)]
        no_cache = ids
        for p in parts:
            no_cache = p(no_cache, _pos(0, 14))
    assert (torch.cat(outs, dim=1) - ref).abs().max() < 1e-5
    assert (no_cache - ref).abs().max() < 1e-5


def test_batched_rows_of_different_lengths_equal_separate_runs(tiny: dict[str, Tiny]) -> None:
    model = load_slice(tiny["mistral"].path)  # sliding window: masks per row matter
    prompts = [_ids(n, seed=10 + n)[0] for n in (3, 9, 5)]
    steps = 4
    nexts = [_ids(steps, seed=20 + i)[0] for i in range(3)]
    with torch.inference_mode():
        # separately, each in its own cache
        expected = []
        for p, nx in zip(prompts, nexts, strict=True):
            c = model.new_cache(1, 16)
            model(p[None], _pos(0, len(p)), c)
            expected.append(torch.cat([model(nx[None, j:j + 1], _pos(len(p) + j, 1), c)
                                       for j in range(steps)], dim=1))
        # together: rows 2, 0, 1 of one cache (prefilled one by one), decoded as a batch
        cache = model.new_cache(3, 16)
        slots = torch.tensor([2, 0, 1])
        for p, s in zip(prompts, slots.tolist(), strict=True):
            model(p[None], _pos(0, len(p)), cache, slots=torch.tensor([s]))
        got = []
        for j in range(steps):
            x = torch.stack([nx[j:j + 1] for nx in nexts])  # (3, 1)
            pos = torch.tensor([[len(p) + j] for p in prompts])
            got.append(model(x, pos, cache, slots=slots))
    got_t = torch.cat(got, dim=1)
    for i in range(3):
        assert (got_t[i] - expected[i][0]).abs().max() < 1e-5
    assert cache.lengths == [9 + steps, 5 + steps, 3 + steps]


def test_batched_prefill_of_equal_lengths(tiny: dict[str, Tiny]) -> None:
    t = tiny["qwen2"]
    model = load_slice(t.path)
    ids = torch.cat([_ids(7, seed=s) for s in (1, 2)])  # (2, 7)
    ref = _hf_logits(t, ids)
    with torch.inference_mode():
        cache = model.new_cache(2, 8)
        got = model(ids, torch.arange(7).expand(2, 7), cache)
        step = model(ids[:, :1], torch.tensor([[7], [7]]), cache)
    assert (got - ref).abs().max() < TOL
    full = _hf_logits(t, torch.cat([ids, ids[:, :1]], dim=1))[:, -1:]
    assert (step - full).abs().max() < TOL


def test_no_cache_path_is_differentiable_like_transformers(tiny: dict[str, Tiny]) -> None:
    t = tiny["qwen3"]
    model = load_slice(t.path)
    model.train()
    ids = _ids(12, seed=4)
    labels = _ids(12, seed=5)[0]
    loss = nn.functional.cross_entropy(model(ids, _pos(0, 12))[0], labels)
    loss.backward()
    t.hf.zero_grad()
    ref = nn.functional.cross_entropy(t.hf(ids).logits[0], labels)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for ours, theirs in [(model.layers["1"].self_attn.k_proj.weight,
                          t.hf.model.layers[1].self_attn.k_proj.weight),
                         (model.layers["0"].mlp.up_proj.weight, t.hf.model.layers[0].mlp.up_proj.weight),
                         (model.layers["2"].self_attn.q_norm.weight,
                          t.hf.model.layers[2].self_attn.q_norm.weight)]:
        assert ours.grad is not None and theirs.grad is not None
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4)
    t.hf.zero_grad()


def test_peft_lora_on_a_slice_is_used_by_inference(tiny: dict[str, Tiny]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    model = load_slice(tiny["llama"].path, layers=(0, 2))
    ids = _ids(8)
    with torch.inference_mode():
        base = model(ids, _pos(0, 8))
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"],
                                       init_lora_weights=False), model)
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert "layers.1.self_attn.q_proj.lora_A.default.weight" in names
    with torch.inference_mode():
        fast = model(ids, _pos(0, 8))
    slow = model(ids, _pos(0, 8))  # autograd path: plain module calls
    assert (fast - base).abs().max() > 1e-3  # the adapter changes the output...
    assert (fast - slow).abs().max() < 1e-5  # ...and the no-grad path applies it too


def test_reassigned_weights_are_used(tiny: dict[str, Tiny]) -> None:
    model = load_slice(tiny["llama"].path)
    ids = _ids(6)
    attn = model.layers["1"].self_attn
    attn.k_proj.weight = nn.Parameter(attn.k_proj.weight.detach() * 2)
    model.layers["0"].mlp.up_proj.weight.data = model.layers["0"].mlp.up_proj.weight.data * 0.5
    with torch.inference_mode():
        fast = model(ids, _pos(0, 6))
    slow = model(ids, _pos(0, 6))
    assert (fast - slow).abs().max() < 1e-5


def test_bfloat16_packed_matches_unpacked_and_float32(tiny: dict[str, Tiny]) -> None:
    t = tiny["qwen2"]
    ref = load_slice(t.path)
    packed = load_slice(t.path, dtype=torch.bfloat16, pack=True)
    plain = load_slice(t.path, dtype=torch.bfloat16, pack=False)
    assert packed.layers["0"].self_attn.q_proj.weight.is_mkldnn
    assert not plain.layers["0"].self_attn.q_proj.weight.is_mkldnn
    ids = _ids(10)
    with torch.inference_mode():
        r = ref(ids, _pos(0, 10))
        a = packed(ids, _pos(0, 10)).float()
        b = plain(ids, _pos(0, 10)).float()
        cache = packed.new_cache(1, 10)
        assert cache.dtype == torch.bfloat16
        c = torch.cat([packed(ids[:, :4], _pos(0, 4), cache)] +
                      [packed(ids[:, i:i + 1], _pos(i, 1), cache) for i in range(4, 10)], 1)
    scale = r.abs().max()
    assert (a - b).abs().max() < 0.02 * scale
    assert (a - r).abs().max() < 0.05 * scale
    assert (c.float() - a).abs().max() < 0.02 * scale
    # the packed slice still reports its weights, unpacked, under their HF names
    assert packed.num_parameters() == ref.num_parameters()
    sd, sd_ref = packed.hf_state_dict(), plain.hf_state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k


def test_float16_runs(tiny: dict[str, Tiny]) -> None:
    t = tiny["llama"]
    ref = load_slice(t.path)
    half = load_slice(t.path, dtype=torch.float16)
    ids = _ids(8)
    with torch.inference_mode():
        r, h = ref(ids, _pos(0, 8)), half(ids, _pos(0, 8)).float()
    assert (h - r).abs().max() < 0.02 * r.abs().max()


def test_hf_parameter_names_map_one_to_one(tiny: dict[str, Tiny]) -> None:
    t = tiny["llama"]
    model = load_slice(t.path, layers=(1, 3))
    names = {n for n, _ in model.named_parameters()}
    assert "layers.1.self_attn.q_proj.weight" in names and "layers.0.mlp.up_proj.weight" not in names
    hf = t.hf.state_dict()
    sd = model.hf_state_dict()
    assert set(sd) == {k for k in hf if k.startswith(("model.layers.1.", "model.layers.2."))} | {
        "model.norm.weight", "lm_head.weight"}
    for k, v in sd.items():
        assert torch.equal(v, hf[k]), k


def test_bad_inputs_raise_model_errors(tiny: dict[str, Tiny]) -> None:
    model = load_slice(tiny["llama"].path)
    middle = load_slice(tiny["llama"].path, layers=(1, 2))
    ids = _ids(5)
    with torch.inference_mode():
        with pytest.raises(ModelError, match="positions must be integers of shape"):
            model(ids, _pos(0, 4))
        with pytest.raises(ModelError, match="positions must be integers"):
            model(ids, _pos(0, 5).float())
        with pytest.raises(ModelError, match="token id out of range"):
            model(torch.tensor([[1, 96]]), _pos(0, 2))
        with pytest.raises(ModelError, match="integer token ids"):
            model(torch.zeros(1, 2, 64), _pos(0, 2))
        with pytest.raises(ModelError, match="hidden states"):
            middle(ids, _pos(0, 5))
        with pytest.raises(ModelError, match="hidden states"):
            middle(torch.zeros(1, 5, 32), _pos(0, 5))
        cache = model.new_cache(1, 8)
        model(ids, _pos(0, 5), cache)
        with pytest.raises(ModelError, match="cache rows hold"):
            model(ids[:, :1], _pos(7, 1), cache)
        with pytest.raises(ModelError, match="slots"):
            model(ids[:, :1], _pos(5, 1), cache, slots=torch.tensor([3]))


def test_too_long_raises(tiny: dict[str, Tiny]) -> None:
    model = load_slice(tiny["llama"].path)  # max_position_embeddings 64
    with torch.inference_mode():
        with pytest.raises(SequenceTooLongError, match="maximum length"):
            model(_ids(65), _pos(0, 65))
        with pytest.raises(SequenceTooLongError):
            model.new_cache(1, 65)
        cache = model.new_cache(1, 8)
        model(_ids(6), _pos(0, 6), cache)
        with pytest.raises(SequenceTooLongError, match="KV cache"):
            model(_ids(3), _pos(6, 3), cache)
        assert cache.lengths == [6]  # a refused step leaves the cache as it was


def test_constructed_slice_has_slice_parameters_only() -> None:
    from p2pllm.engine.config import ModelConfig

    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 50, "hidden_size": 16,
                                 "intermediate_size": 24, "num_hidden_layers": 4,
                                 "num_attention_heads": 2})
    s = ModelSlice(cfg, 1, 3)
    assert not s.has_embed and not s.has_head
    assert s.num_parameters() == 2 * cfg.layer_param_count()
    with pytest.raises(ModelError):
        ModelSlice(cfg, 3, 5)
