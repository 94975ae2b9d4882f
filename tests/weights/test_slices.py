"""pieces_for against what the engine's loader reads for a slice (its tensor names), on the
bundled safetensors model, a GGUF written from it and SmolLM2 (shared checkout); tied and untied
heads; tensors of no known part. The load of a cache holding only these pieces is in
test_store.py."""

from __future__ import annotations

import json

import pytest

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.gguf import gguf_name
from p2pllm.engine.loader import slice_tensor_names
from p2pllm.weights.manifest import FileEntry, Manifest, Piece, build_manifest
from p2pllm.weights.slices import Need, pieces_for, slice_bytes, tensor_part
from tests.conftest import BUNDLED
from tests.weights.test_manifest import smollm2_gguf


def _tensors(m: Manifest, ids: list[int]) -> set[str]:
    return {t for i in ids if (t := m.pieces[i].tensor) is not None}


def _synthetic(names: list[str]) -> Manifest:
    """A manifest of one GGUF file holding one 10-byte tensor of each name."""
    pieces = [Piece(0, 0, 0, 10, "0" * 64, None)]
    pieces += [Piece(i + 1, 0, 10 * (i + 1), 10, f"{i + 1:064x}", n) for i, n in enumerate(names)]
    return Manifest("m", "gguf", (FileEntry("model.gguf", 10 * len(pieces)),), tuple(pieces))


def test_need() -> None:
    assert Need.whole() == Need(None, True, True)
    assert Need.for_layers(0, 2, 4) == Need((0, 2), True, False)
    assert Need.for_layers(2, 4, 4) == Need((2, 4), False, True)
    assert Need.for_layers(1, 3, 4) == Need((1, 3), False, False)
    for bad in [(2, 1), (-1, 2), (0.0, 1)]:
        with pytest.raises(ValueError, match="range"):
            Need(bad)  # type: ignore[arg-type]
    assert Need((1, 3)).wants_layer(2) and not Need((1, 3)).wants_layer(3)


def test_tensor_part() -> None:
    assert tensor_part("blk.12.attn_q.weight") == ("layer", 12)
    assert tensor_part("model.layers.3.mlp.up_proj.weight") == ("layer", 3)
    assert tensor_part("token_embd.weight") == ("embed", None)
    assert tensor_part("model.embed_tokens.weight") == ("embed", None)
    for head in ("output.weight", "output_norm.weight", "lm_head.weight", "model.norm.weight"):
        assert tensor_part(head) == ("head", None)
    assert tensor_part("rope_freqs.weight") == ("other", None)
    assert tensor_part("blk.x.attn_q.weight") == ("other", None)


@pytest.mark.parametrize("start, end, embed, head", [
    (0, 4, True, True), (0, 2, True, False), (2, 4, False, True), (1, 3, False, False),
    (2, 2, False, True), (0, 1, False, False), (3, 4, True, True),
])
def test_safetensors_slice_reads_what_the_loader_reads(start: int, end: int, embed: bool,
                                                       head: bool) -> None:
    m = build_manifest(BUNDLED, "shakespeare")
    config = ModelConfig.from_dir(BUNDLED)
    assert config.tie_word_embeddings  # the bundled model ties its head to the embedding
    ids = pieces_for(m, Need((start, end), embed, head))
    assert _tensors(m, ids) == set(slice_tensor_names(config, start, end, embed, head))
    # every non-tensor piece (headers, config, tokenizer) is in every slice
    assert {p.id for p in m.pieces if p.tensor is None} <= set(ids)
    assert ids == sorted(ids) and slice_bytes(m, Need((start, end), embed, head)) == \
        sum(m.pieces[i].length for i in ids)


def test_smollm2_gguf_slices_read_what_the_loader_reads() -> None:
    file = smollm2_gguf()
    m = build_manifest(file, "smollm2")
    config = ModelConfig.from_dir(file)
    n = config.num_layers
    for start, end, embed, head in [(0, n, True, True), (0, 10, True, False),
                                    (10, 20, False, False), (20, n, False, True)]:
        ids = pieces_for(m, Need((start, end), embed, head))
        want = {gguf_name(t) for t in slice_tensor_names(config, start, end, embed, head)}
        assert _tensors(m, ids) == want
    assert slice_bytes(m, Need((10, 20), False, False)) < m.total_bytes / 2


def test_untied_head_does_not_read_the_embedding_and_unknown_tensors_always_come() -> None:
    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight",
             "output_norm.weight", "output.weight", "rope_freqs.weight"]
    m = _synthetic(names)
    assert _tensors(m, pieces_for(m, Need((1, 2), False, True))) == \
        {"blk.1.attn_q.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}
    assert _tensors(m, pieces_for(m, Need((0, 1), True, False))) == \
        {"token_embd.weight", "blk.0.attn_q.weight", "rope_freqs.weight"}
    assert pieces_for(m, Need.whole()) == list(range(len(m.pieces)))
    # a tied model saved with both: the output's bytes are the embedding's
    both = _synthetic(["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                       "model.norm.weight", "lm_head.weight"])
    same = Manifest(both.model, both.format, both.files, tuple(
        p._replace(sha256="1" * 64) if p.tensor in ("lm_head.weight",
                                                    "model.embed_tokens.weight") else p
        for p in both.pieces))
    assert "model.embed_tokens.weight" in _tensors(same, pieces_for(same, Need((0, 0), False,
                                                                                True)))
    differ = Manifest(both.model, both.format, both.files, tuple(
        p._replace(sha256="2" * 64) if p.tensor == "lm_head.weight" else p for p in both.pieces))
    assert "model.embed_tokens.weight" not in _tensors(differ, pieces_for(differ, Need(
        (0, 0), False, True)))
    tied = _synthetic([n for n in names if n != "output.weight"])
    assert "token_embd.weight" in _tensors(tied, pieces_for(tied, Need((1, 2), False, True)))
    assert "token_embd.weight" not in _tensors(tied, pieces_for(tied, Need((1, 2), False, False)))


def test_bundled_config_is_what_the_manifest_lists() -> None:
    # the manifest and the loader see the same model: the config file is one of its pieces
    m = build_manifest(BUNDLED, "shakespeare")
    cfg = [f.name for f in m.files].index("config.json")
    assert m.files[cfg].size == len((BUNDLED / "config.json").read_bytes())
    assert json.loads((BUNDLED / "config.json").read_text())["num_hidden_layers"] == \
        1 + max(n for t in m.tensor_names() if (n := tensor_part(t)[1]) is not None)
