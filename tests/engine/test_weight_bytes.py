"""The one memory estimate of a model (engine.loader.weight_bytes): the bytes the engine holds
once it loads the model as a dtype / quant, for GGUF models too (whatever their blocks take on
disk); what the daemon advertises (param_bytes, float32) and the speculative roles check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pllm.engine.gguf import GGUFFile
from p2pllm.engine.loader import BUNDLED_MODELS_DIR, list_models, load_slice, weight_bytes
from tests.engine.test_gguf import (
    SHARED_MODELS,
    SHARED_SKIP,
    SMOL,
    SMOL_FILE,
    T,
    tiny_state,
    write_gguf,
)

LOADS = [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "int8"),
         (torch.float32, "int4"), (torch.bfloat16, "int4")]


def held(model: Any) -> int:
    """Bytes a loaded slice's weights take: unique parameters, quantized codes and scales."""
    seen: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    total = 0
    for p in seen.values():
        total += p.to_dense().numel() * p.element_size() if p.is_mkldnn else (
            p.numel() * p.element_size())
    qweights = {id(q): q for m in model.modules() if (q := getattr(m, "qweight", None))}
    return total + sum(q.nbytes() for q in qweights.values())


def file_tensor_bytes(path: Path) -> int:
    with GGUFFile(path) as f:
        return sum(i.nbytes for i in f.tensors.values())


def param_count(path: Path) -> int:
    with GGUFFile(path) as f:
        return sum(math.prod(i.shape) for i in f.tensors.values())


@pytest.mark.parametrize("tied", [False, True])
def test_a_q4_1_gguf_is_estimated_as_the_engine_holds_it(tmp_path: Path, tied: bool,
                                                          layout: str) -> None:
    """Either QuantWeight layout (the native one keeps float32 int4 scales and mins, and a
    float32 copy of the int8 scales): the estimate follows the one a load takes."""
    state, cfg = tiny_state(seed=7, tied=tied)
    path = write_gguf(tmp_path / "models" / "tiny-q4" / "Tiny.Q4_1.gguf", state, cfg, T.Q4_1)
    folder = path.parent
    # float32: 4 bytes a parameter, the count from the file's tensor shapes
    assert weight_bytes(folder) == weight_bytes(path) == 4 * param_count(path)
    assert param_count(path) == sum(t.numel() for t in state.values())
    assert weight_bytes(folder) > 5 * file_tensor_bytes(path)  # what was advertised before
    for dtype, quant in LOADS:
        assert weight_bytes(folder, dtype, quant) == held(load_slice(folder, dtype=dtype,
                                                                     quant=quant)), (dtype, quant)
    # a slice: its own layers (and the head on the last)
    part = load_slice(folder, layers=(1, 3), quant="int4")
    assert weight_bytes(folder, quant="int4", layers=(1, 3)) == held(part)
    # the daemon advertises the float32 figure; the speculative roles estimate with it
    (info,) = list_models(tmp_path / "models", include_bundled=False, include_pulled=False)
    assert info.param_bytes == weight_bytes(folder)
    from p2pllm.daemon.capabilities import scan_models
    from p2pllm.pillars.speculative.models import _param_bytes, model_bytes

    caps = {m["name"]: m for m in scan_models(str(tmp_path / "models"))}
    assert caps["tiny-q4"]["param_bytes"] == info.param_bytes
    assert model_bytes(folder, "bfloat16", "int4") == weight_bytes(folder, torch.bfloat16, "int4")
    loaded = load_slice(folder, dtype=torch.float32, quant="int8")
    assert _param_bytes(loaded) == held(loaded) == model_bytes(folder, "float32", "int8")


def test_the_bundled_checkpoint_is_estimated_as_loaded(layout: str) -> None:
    path = BUNDLED_MODELS_DIR / "shakespeare"  # bfloat16 safetensors, tied head
    for dtype, quant in LOADS:
        assert weight_bytes(path, dtype, quant) == held(load_slice(path, dtype=dtype,
                                                                   quant=quant)), (dtype, quant)


def test_smollm2_q4_1_estimate() -> None:
    path = SHARED_MODELS / SMOL / SMOL_FILE
    if not path.is_file():
        pytest.skip(f"{SHARED_SKIP}: {path} is not present")
    folder = path.parent
    assert weight_bytes(folder) == 4 * param_count(path)
    assert weight_bytes(folder) > 5 * file_tensor_bytes(path)
    for dtype, quant in ((torch.float32, None), (torch.bfloat16, "int4")):
        assert weight_bytes(folder, dtype, quant) == held(load_slice(folder, dtype=dtype,
                                                                     quant=quant))
