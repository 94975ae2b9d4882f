"""Finding checkpoints, partial loading, bad checkpoints, writing checkpoints back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import p2pllm.engine.loader as loader
from p2pllm.engine.errors import CheckpointError, ModelError, ModelNotFoundError
from p2pllm.engine.loader import (
    list_models,
    load_slice,
    load_tokenizer,
    resolve_model,
    save_hf_checkpoint,
    slice_tensor_names,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _hf_params(hf: Any, start: int, end: int, embed: bool, head: bool) -> dict[str, torch.Tensor]:
    """The transformers model's tensors a slice should hold, by HF name (tied counted once)."""
    out = {}
    for k, v in hf.state_dict().items():
        if k.startswith("model.layers."):
            if start <= int(k.split(".")[2]) < end:
                out[k] = v
        elif k == "model.embed_tokens.weight":
            if embed or (head and hf.config.tie_word_embeddings):
                out[k] = v
        elif k == "model.norm.weight" and head:
            out[k] = v
        elif k == "lm_head.weight" and head and not hf.config.tie_word_embeddings:
            out[k] = v
    return out


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen3"])
@pytest.mark.parametrize(("layers", "embed", "head"), [
    ((0, 3), None, None), ((0, 1), None, None), ((1, 2), None, None), ((2, 3), None, None),
    ((1, 3), True, False), ((3, 3), False, True), ((0, 0), True, False)])
def test_partial_load_holds_exactly_its_slice(tiny: dict[str, Any], arch: str,
                                              layers: tuple[int, int], embed: bool | None,
                                              head: bool | None) -> None:
    t = tiny[arch]
    model = load_slice(t.path, layers=layers, embed=embed, head=head)
    want = _hf_params(t.hf, *layers, model.has_embed, model.has_head)
    assert model.has_embed == (layers[0] == 0 if embed is None else embed)
    assert model.has_head == (layers[1] == 3 if head is None else head)
    assert model.num_parameters() == sum(v.numel() for v in want.values())
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()
    sd = model.hf_state_dict()
    assert set(sd) == set(want)
    for k, v in sd.items():
        assert torch.equal(v, want[k]), k


def test_partial_load_reads_only_the_slice_tensors(tiny: dict[str, Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    read: list[str] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *a: Any, **k: Any) -> None:
            self.f = real_open(*a, **k)

        def __enter__(self) -> Spy:
            self.f.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.f.get_tensor(name)

        def get_slice(self, name: str) -> Any:
            read.append(name)
            return self.f.get_slice(name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    load_slice(tiny["llama"].path, layers=(1, 2))
    assert read and all(n.startswith("model.layers.1.") for n in read)
    assert len(set(read)) == len(slice_tensor_names(load_slice(tiny["llama"].path).config,
                                               1, 2, False, False))


def test_sharded_checkpoint_with_index(tiny: dict[str, Any], tmp_path: Path) -> None:
    t = tiny["qwen2"]
    t.hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    ids = torch.randint(3, 96, (1, 9))
    pos = torch.arange(9)[None]
    with torch.inference_mode():
        whole = load_slice(t.path)(ids, pos)
        a = load_slice(tmp_path / "sharded", layers=(0, 2))
        b = load_slice(tmp_path / "sharded", layers=(2, 3))
        chained = b(a(ids, pos), pos)
    assert torch.equal(chained, whole)


def test_tied_head_only_slice_reads_the_embedding(shared_model: Any) -> None:
    """tinystories-656k stores its tied embedding only as lm_head.weight."""
    path = shared_model("tinystories-656k")
    first = load_slice(path, layers=(0, 1))
    last = load_slice(path, layers=(1, 2))
    assert first.embed_tokens is not None and last.lm_head is not None
    assert torch.equal(first.embed_tokens.weight, last.lm_head.weight)
    whole = load_slice(path)
    assert whole.lm_head is not None and whole.embed_tokens is not None
    assert whole.lm_head.weight is whole.embed_tokens.weight
    assert first.num_parameters() + last.num_parameters() - whole.num_parameters() == 2048 * 128


# -- finding models -------------------------------------------------------------------------


def test_resolve_model_by_path_name_and_bundled(tiny: dict[str, Any], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    p = tiny["llama"].path
    assert resolve_model(str(p)) == p.resolve()
    models = tmp_path / "models"
    _copy(p, models / "mine")
    assert resolve_model("mine", models) == (models / "mine").resolve()
    bundled = tmp_path / "bundled"
    _copy(p, bundled / "shakespeare")
    monkeypatch.setattr(loader, "BUNDLED_MODELS_DIR", bundled)
    assert resolve_model("shakespeare") == (bundled / "shakespeare").resolve()
    assert resolve_model("mine", models) == (models / "mine").resolve()  # models-dir first
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_model(str(tmp_path / "nope" / "deeper"))


def test_resolve_hub_id_offline_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="offline") as e:
        resolve_model("someone/some-model-that-is-not-cached")
    assert "--model /path/to/model" in str(e.value)


def test_resolve_hub_id_unreachable_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def fail(repo_id: str, **kw: Any) -> str:
        raise OSError("cannot reach huggingface.co")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ModelNotFoundError, match=r"could not be reached \(offline\?\)"):
        resolve_model("someone/model")


def test_resolve_hub_id_from_a_snapshot(monkeypatch: pytest.MonkeyPatch,
                                        tiny: dict[str, Any]) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def snap(repo_id: str, **kw: Any) -> str:
        calls.append(kw)
        return str(tiny["qwen3"].path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snap)
    assert resolve_model("Qwen/Qwen3-0.6B") == tiny["qwen3"].path.resolve()
    assert calls[0]["local_files_only"] is True


def test_list_models(tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "BUNDLED_MODELS_DIR", tmp_path / "no-bundled-models")
    _copy(tiny["qwen3"].path, tmp_path / "b-qwen")
    _copy(tiny["llama"].path, tmp_path / "a-llama")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "not-a-model").mkdir()
    infos = list_models(tmp_path)
    assert [i.name for i in infos] == ["a-llama", "b-qwen"]
    a = infos[0]
    assert (a.model_type, a.num_layers, a.path) == ("llama", 3, (tmp_path / "a-llama").resolve())
    n_bytes = sum(v.numel() * v.element_size()
                  for v in load_file(str(tmp_path / "a-llama" / "model.safetensors")).values())
    assert a.param_bytes == n_bytes


def test_load_tokenizer_errors_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="tokenizer"):
        load_tokenizer(tmp_path)


# -- bad checkpoints ------------------------------------------------------------------------


def test_missing_files(tiny: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_slice(_empty(tmp_path / "empty"))
    d = _copy(tiny["llama"].path, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_slice(d)
    with pytest.raises(ModelNotFoundError):
        load_slice(tmp_path / "does-not-exist")


def _empty(p: Path) -> Path:
    p.mkdir()
    return p


def test_corrupt_safetensors(tiny: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(tiny["llama"].path, tmp_path / "truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_slice(d)
    d = _copy(tiny["llama"].path, tmp_path / "garbage")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{not a header")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_slice(d)
    (d / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated"):
        load_slice(d)


def test_missing_tensor_and_wrong_shape(tiny: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(tiny["llama"].path, tmp_path / "missing")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    load_slice(d, layers=(0, 2))  # the slice that does not need it loads
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.down_proj\.weight"):
        load_slice(d, layers=(2, 3))
    tensors = load_file(str(tiny["llama"].path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        load_slice(d)


@pytest.mark.parametrize("field", ["model_type", "vocab_size", "hidden_size",
                                   "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads"])
def test_config_without_required_field(tiny: dict[str, Any], tmp_path: Path, field: str) -> None:
    d = _copy(tiny["llama"].path, tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    del cfg[field]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=field):
        load_slice(d)


def test_unsupported_model_type(tiny: dict[str, Any], tmp_path: Path) -> None:
    d = _copy(tiny["llama"].path, tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="'gpt2' is not supported; supported: llama, mistral, "
                                         "qwen2, qwen3"):
        load_slice(d)


def test_bad_layer_range_and_dtype(tiny: dict[str, Any]) -> None:
    with pytest.raises(ModelError, match="layers"):
        load_slice(tiny["llama"].path, layers=(2, 4))
    with pytest.raises(ModelError, match="dtype"):
        load_slice(tiny["llama"].path, dtype=torch.int8)


# -- writing back -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_hf_checkpoint_round_trip(tiny: dict[str, Any], tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    t = tiny[arch]
    parts = [load_slice(t.path, layers=(0, 2)), load_slice(t.path, layers=(2, 3))]
    with torch.no_grad():  # "train" a little: change a weight of each part
        parts[0].layers["1"].self_attn.v_proj.weight.add_(0.5)
        parts[1].layers["2"].mlp.up_proj.weight.mul_(0.5)
    out = save_hf_checkpoint(parts, parts[0].config, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 96, (1, 7))
    pos = torch.arange(7)[None]
    with torch.inference_mode():
        ours = parts[1](parts[0](ids, pos), pos)
        theirs = back(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    with pytest.raises(ModelError, match="do not cover"):
        save_hf_checkpoint(parts[:1], parts[0].config, tmp_path / "partial")
