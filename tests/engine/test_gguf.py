"""GGUF models in the engine: dequantization against ggml's reference, tiny files written with
gguf.GGUFWriter against transformers' GGUF load, slices, errors, and SmolLM2-135M-Instruct
(../shared) against transformers and its README's reference ids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from p2pllm.engine.errors import ModelError, UnsupportedModelError
from p2pllm.engine.generate import generate_ids
from p2pllm.engine.gguf import (
    GGUFFile,
    RawTensor,
    dequantize,
    find_gguf,
    gguf_name,
    load_tokenizer,
)
from p2pllm.engine.loader import list_models, load_slice, resolve_model
from tests import conftest

SHARED_MODELS = conftest.SHARED_MODELS
SHARED_SKIP = getattr(conftest, "SHARED_SKIP", "needs the shared checkout")

T = gguf.GGMLQuantizationType
TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1)
SMOL = "smollm2-135m-instruct"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# README reference greedy ids (transformers 5.24, float32 GGUF load)
FRANCE_IDS = [504, 3575, 282, 4649, 314]
FRANCE_OUT = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33, 29, 34,
              34, 216, 33, 34, 42, 33, 34, 42, 37, 35, 30, 2]
CHAT_OUT = [504, 3575, 282, 4649, 314, 7042, 30, 2]
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)


# -- writing GGUF files like llama.cpp's convert_hf_to_gguf.py ---------------------------------


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def tiny_state(seed: int = 0, tied: bool = False, arch: str = "llama",
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Random weights of a tiny model (llama, qwen2: q/k/v biases, qwen3: q/k norms), by
    HF name, large enough that a wrong mapping shows."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(seed)
    # head_dim 128 != 64 / 4: GGUF key_length (transformers takes Qwen3Config's default, 128)
    extra = {"head_dim": 128} if arch == "qwen3" else {}
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch](
        **TINY, **extra, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        noise = torch.randn(p.shape, generator=g)
        state[name] = 1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise
    if tied:
        state.pop("lm_head.weight", None)
    return state, dict(TINY, **extra, tie_word_embeddings=tied)


def write_gguf(path: Path, state: dict[str, torch.Tensor], cfg: dict[str, Any],
               qtype: T = T.F32, arch: str = "llama",
               types: dict[str, T] | None = None) -> Path:
    """A GGUF file of ``state`` (HF names): 2-D weights stored as ``qtype`` (or ``types`` by
    GGUF name), norms as F32, q/k permuted as llama.cpp does; a byte-level vocabulary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // heads)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    w.add_token_merges([])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    for hf, t in state.items():
        name = gguf_name(hf)
        a = t.float().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            a = _permute(a, heads)
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            a = _permute(a, kv)
        q = (types or {}).get(name, qtype if a.ndim == 2 else T.F32)
        if q == T.F32:
            w.add_tensor(name, np.ascontiguousarray(a))
        elif q == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_gguf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


# -- dequantization ----------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantize_equals_ggml_reference(qtype: T) -> None:
    a = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32) * 3
    stored = a.astype(np.float16) if qtype == T.F16 else a if qtype == T.F32 else \
        gguf.quants.quantize(a, qtype)
    raw = RawTensor(qtype, a.shape, np.ascontiguousarray(stored).view(np.uint8).reshape(6, -1))
    ours = dequantize(raw)
    ref = gguf.quants.dequantize(stored, qtype).astype(np.float32) if qtype not in (
        T.F32, T.F16) else stored.astype(np.float32)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == a.shape
    torch.testing.assert_close(ours, torch.from_numpy(ref), rtol=0, atol=1e-6)
    if qtype != T.F32:  # really lossy/rounded, so the test can tell the types apart
        assert not np.array_equal(ours.numpy(), a)


def test_header_parser_agrees_with_gguf_reader(tmp_path: Path) -> None:
    """GGUFFile (struct over a map, ~0.1 s on SmolLM2) reads what gguf.GGUFReader (~7 s) reads."""
    state, cfg = tiny_state(seed=1)
    path = write_gguf(tmp_path / "h" / "h.gguf", state, cfg, T.Q4_0,
                      types={"blk.0.ffn_down.weight": T.BF16, "blk.1.attn_v.weight": T.F16})
    ref = gguf.GGUFReader(str(path))
    with GGUFFile(path) as f:
        keys = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
        assert set(f.metadata) == set(keys)
        for k, field in keys.items():
            want = field.contents()
            got = f.metadata[k]
            assert got == pytest.approx(want) if isinstance(want, float) else got == want, k
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            mine = f.tensors[t.name]
            assert mine.type_id == int(t.tensor_type) and mine.nbytes == t.n_bytes, t.name
            assert mine.shape == tuple(int(x) for x in reversed(t.shape)), t.name
            assert mine.offset == t.data_offset, t.name


# -- tiny files against transformers' GGUF load -------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_tiny_gguf_equals_transformers(tmp_path: Path, qtype: T) -> None:
    state, cfg = tiny_state(seed=int(qtype))
    path = write_gguf(tmp_path / "m" / "tiny.gguf", state, cfg, qtype)
    ours = load_slice(path, pack=False)
    assert ours.config.num_layers == 3 and not ours.config.tie_word_embeddings
    hf = _hf_gguf_model(path)
    ref = hf.state_dict()
    mine = ours.hf_state_dict()
    assert set(mine) == set(ref)
    for name, t in mine.items():
        torch.testing.assert_close(t, ref[name], rtol=0, atol=1e-6, msg=name)
    if qtype != T.F32:  # the stored weights really are not the float ones
        assert not torch.equal(mine["model.layers.0.mlp.up_proj.weight"],
                               state["model.layers.0.mlp.up_proj.weight"])
    else:  # q/k un-permuted back to the HF layout exactly
        assert torch.equal(mine["model.layers.1.self_attn.k_proj.weight"],
                           state["model.layers.1.self_attn.k_proj.weight"])
    ids = torch.tensor([[1, 5, 9, 33, 70, 4, 12]])
    with torch.inference_mode():
        logits = ours(ids, torch.arange(ids.shape[1]).unsqueeze(0))
        ref_logits = hf(ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    got = generate_ids(ours, ids[0].tolist(), max_tokens=8, stop_ids=()).token_ids
    want = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert got == want


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tiny_qwen_gguf_equals_transformers(tmp_path: Path, arch: str) -> None:
    state, cfg = tiny_state(seed=9, tied=arch == "qwen2", arch=arch)
    path = write_gguf(tmp_path / arch / f"{arch}.gguf", state, cfg, T.Q8_0, arch=arch)
    ours = load_slice(path, pack=False)
    assert ours.config.model_type == arch
    hf = _hf_gguf_model(path)
    assert hf.config.model_type == arch
    ref = hf.state_dict()
    mine = ours.hf_state_dict()
    assert set(mine) == {k for k in ref if not (arch == "qwen2" and k == "lm_head.weight")}
    for name, t in mine.items():
        torch.testing.assert_close(t, ref[name], rtol=0, atol=1e-6, msg=name)
    ids = torch.tensor([[1, 5, 9, 33, 70, 4, 12]])
    with torch.inference_mode():
        logits = ours(ids, torch.arange(ids.shape[1]).unsqueeze(0))
        ref_logits = hf(ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shards", [((0, 2), (2, 3)), ((0, 1), (1, 2), (2, 3))],
                         ids=["2-shards", "3-shards"])
def test_tiny_slices_equal_the_whole(tmp_path: Path, shards: tuple[tuple[int, int], ...]) -> None:
    state, cfg = tiny_state(seed=3, tied=True)
    path = write_gguf(tmp_path / "tied" / "tied.gguf", state, cfg, T.Q8_0)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.inference_mode():
        whole = load_slice(path)(ids, pos)
        x = ids
        for a, b in shards:
            x = load_slice(path, layers=(a, b))(x, pos)
    assert torch.equal(x, whole)


def test_a_slice_reads_only_its_own_tensors(tmp_path: Path) -> None:
    state, cfg = tiny_state(seed=4)
    path = write_gguf(tmp_path / "m" / "m.gguf", state, cfg, T.Q4_1)
    before = load_slice(path, layers=(0, 1), pack=False).hf_state_dict()
    # overwrite every tensor the slice does not need with 0xFF bytes (NaN scales)
    with GGUFFile(path) as f:
        spans = [(i.offset, i.nbytes) for n, i in f.tensors.items()
                 if not n.startswith(("blk.0.", "token_embd."))]
    blob = bytearray(path.read_bytes())
    for lo, n in spans:
        blob[lo:lo + n] = b"\xff" * n
    path.write_bytes(bytes(blob))
    after = load_slice(path, layers=(0, 1), pack=False).hf_state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    whole = load_slice(path, pack=False).hf_state_dict()  # the damage is real
    assert torch.isnan(whole["model.layers.2.mlp.up_proj.weight"]).all()


def test_models_dir_lists_and_resolves_a_gguf_folder(tmp_path: Path) -> None:
    state, cfg = tiny_state(seed=5)
    write_gguf(tmp_path / "models" / "tiny-q8" / "Tiny.Q8_0.gguf", state, cfg, T.Q8_0)
    (tmp_path / "models" / "empty").mkdir()
    infos = {m.name: m for m in list_models(tmp_path / "models", include_bundled=False)}
    assert list(infos) == ["tiny-q8"]
    info = infos["tiny-q8"]
    assert info.format == "gguf" and info.num_layers == 3 and info.model_type == "llama"
    assert info.param_bytes == 4 * sum(  # float32 bytes the engine holds (weight_bytes)
        math.prod(i.shape) for i in GGUFFile(info.path / "Tiny.Q8_0.gguf").tensors.values())
    assert resolve_model("tiny-q8", tmp_path / "models") == info.path
    assert find_gguf(info.path) == (info.path / "Tiny.Q8_0.gguf").resolve()
    assert load_slice(resolve_model("tiny-q8", tmp_path / "models")).config.vocab_size == 96
    # the daemon's resolver (what shards and verifiers use) finds it by name and by path
    from p2pllm.daemon.cluster import resolve_model_ref

    assert resolve_model_ref("tiny-q8", tmp_path / "models") == info.path
    assert resolve_model_ref(str(info.path), None) == info.path
    assert resolve_model_ref(str(info.path / "Tiny.Q8_0.gguf"), None) == find_gguf(info.path)
    assert resolve_model_ref(str(tmp_path / "models" / "empty"), None) is None
    # and the daemon advertises it in its capabilities, so planners see it
    from p2pllm.daemon.capabilities import scan_models

    caps = {m["name"]: m for m in scan_models(str(tmp_path / "models"))}
    assert caps["tiny-q8"]["format"] == "gguf" and caps["tiny-q8"]["num_layers"] == 3
    assert caps["tiny-q8"]["param_bytes"] == info.param_bytes
    assert caps["shakespeare"]["format"] == "hf"


# -- errors ------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> Path:
    state, cfg = tiny_state(seed=6)
    return write_gguf(tmp_path / "good" / "good.gguf", state, cfg, T.Q8_0)


def test_not_a_gguf_file(tmp_path: Path, good: Path) -> None:
    bad = tmp_path / "bad" / "bad.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04" + good.read_bytes()[4:])
    with pytest.raises(ModelError, match=r"bad\.gguf is not a GGUF file"):
        load_slice(bad)
    empty = tmp_path / "bad" / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty\.gguf"):
        load_slice(empty)


def test_truncated_file_names_the_tensor(tmp_path: Path, good: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = good.read_bytes()
    cut.write_bytes(data[:len(data) - 100])
    with pytest.raises(ModelError, match=r"cut\.gguf is truncated or corrupt: tensor '[^']+' "
                                         r"lies at bytes"):
        load_slice(cut)
    header = tmp_path / "header.gguf"
    header.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(ModelError, match=r"header\.gguf is truncated or corrupt"):
        load_slice(header)


def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path: Path) -> None:
    state, cfg = tiny_state(seed=7)
    path = write_gguf(tmp_path / "q5" / "q5.gguf", state, cfg, T.Q8_0,
                      types={"blk.1.ffn_up.weight": T.Q5_0})
    with pytest.raises(ModelError, match=r"q5\.gguf: tensor 'blk\.1\.ffn_up\.weight' is stored "
                                         r"as Q5_0, which is not supported"):
        load_slice(path)
    load_slice(path, layers=(0, 1))  # a slice without that tensor loads


def test_unsupported_architecture(tmp_path: Path) -> None:
    state, cfg = tiny_state(seed=8)
    path = write_gguf(tmp_path / "g" / "phi.gguf", state, cfg, T.F32, arch="phi2")
    with pytest.raises(UnsupportedModelError, match=r"phi\.gguf: GGUF architecture 'phi2' is "
                                                    r"not supported"):
        load_slice(path)


def test_a_folder_with_two_gguf_files_is_ambiguous(tmp_path: Path, good: Path) -> None:
    (good.parent / "other.gguf").write_bytes(good.read_bytes())
    with pytest.raises(ModelError, match=r"holds 2 \.gguf files"):
        load_slice(good.parent)


# -- SmolLM2-135M-Instruct ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_file() -> Path:
    path = SHARED_MODELS / SMOL / SMOL_FILE
    if not path.is_file():
        pytest.skip(f"{SHARED_SKIP}: {path} is not present (../shared/models next to the "
                    f"repository, or $P2PLLM_SHARED/models)")
    return path


@pytest.fixture(scope="module")
def smol(smol_file: Path) -> Any:
    return load_slice(smol_file.parent, dtype=torch.float32)


@pytest.fixture(scope="module")
def smol_tok(smol_file: Path) -> Any:
    return load_tokenizer(smol_file)


def test_smollm2_config_from_metadata(smol: Any) -> None:
    c = smol.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.eos_token_ids == (2,)
    assert smol.num_parameters() == 134_515_008


def test_smollm2_readme_reference_ids(smol: Any, smol_tok: Any) -> None:
    assert smol_tok("The capital of France is")["input_ids"] == FRANCE_IDS
    assert generate_ids(smol, FRANCE_IDS, max_tokens=32).token_ids == FRANCE_OUT
    chat = smol_tok.apply_chat_template([{"role": "user", "content":
                                          "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert len(chat) == 37
    assert generate_ids(smol, chat, max_tokens=32).token_ids == CHAT_OUT


@pytest.mark.timeout(900)  # transformers' own GGUF load dominates (~60 s on a busy 2-core host)
def test_smollm2_equals_transformers_greedy(smol: Any, smol_tok: Any, smol_file: Path) -> None:
    hf = _hf_gguf_model(smol_file)
    for prompt in ("Once upon a time, there was", "def fibonacci(n):",
                   "The three primary colours are"):
        ids = smol_tok(prompt)["input_ids"]
        want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                           pad_token_id=2)[0, len(ids):].tolist()
        assert generate_ids(smol, ids, max_tokens=12).token_ids == want, prompt


def test_smollm2_tokenizer_equals_transformers(smol_tok: Any, smol_file: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smol_file.parent), gguf_file=smol_file.name)
    texts = ["Hello, world!", "  two leading spaces\nand a newline", "Ünïcödé — 東京 🚀",
             "<|im_start|>user\nhi<|im_end|>", "x = [1, 2, 3]  # code"]
    for text in texts:
        assert smol_tok(text)["input_ids"] == ref(text)["input_ids"], text
        ids = ref(text)["input_ids"]
        assert smol_tok.decode(ids) == ref.decode(ids)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]
    assert smol_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (smol_tok.bos_token, smol_tok.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.parametrize("shards", [((0, 14), (14, 30)), ((0, 9), (9, 20), (20, 30))],
                         ids=["2-shards", "3-shards"])
def test_smollm2_slices_equal_the_whole(smol: Any, smol_file: Path,
                                        shards: tuple[tuple[int, int], ...]) -> None:
    ids = torch.tensor([FRANCE_IDS])
    pos = torch.arange(len(FRANCE_IDS)).unsqueeze(0)
    with torch.inference_mode():
        whole = smol(ids, pos)
        x = ids
        for a, b in shards:
            part = load_slice(smol_file, layers=(a, b))
            assert part.num_parameters() < smol.num_parameters()
            x = part(x, pos)
            del part
    torch.testing.assert_close(x, whole, rtol=0, atol=1e-5)
    assert int(x[0, -1].argmax()) == FRANCE_OUT[0]
