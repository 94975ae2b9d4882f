"""Local LoRA training on the real tinystories-656k: adapters, rounds, files, the engine's view."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

from p2pllm.pillars.federated import lora as lora_mod
from p2pllm.pillars.federated.lora import LoraSpec
from p2pllm.pillars.federated.messages import ClientParams, RoundConfig
from p2pllm.pillars.federated.plot import MISSING, plot_eval_loss
from p2pllm.pillars.federated.training import Cancelled, LocalTrainer
from tests.conftest import real_model, shared_model

torch.set_num_threads(1)

TEXT = " ".join(
    f"Bob the {animal} went to the {place} and found a {thing}. Bob was happy."
    for animal in ("frog", "duck", "goat", "mouse")
    for place in ("pond", "park", "hill", "shop")
    for thing in ("ball", "hat", "box")
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return real_model("tinystories-656k")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "stories.txt").write_text(TEXT)
    return d


def params(model_dir: Path, **kw) -> ClientParams:
    return ClientParams("tinystories-656k", str(model_dir), kw.pop("lora", LoraSpec()), kw.pop("block_size", 32),
                        0.2, kw.pop("seed", 0))


def test_initial_adapter_is_seeded_lora_with_zero_b(model_dir: Path) -> None:
    a = lora_mod.initial_adapter(model_dir, LoraSpec(rank=4), seed=1)
    assert len(a) == 8  # q_proj and v_proj, A and B, in 2 layers
    assert a["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 128)
    assert a["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (64, 4)
    assert all(not t.any() for k, t in a.items() if "lora_B" in k)  # the adapted model starts as the base
    again = lora_mod.initial_adapter(model_dir, LoraSpec(rank=4), seed=1)
    other = lora_mod.initial_adapter(model_dir, LoraSpec(rank=4), seed=2)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_a_round_trains_evaluates_and_is_deterministic(model_dir: Path, data_dir: Path) -> None:
    # Prepare: two independent clients on the same data
    t1 = LocalTrainer.load(model_dir, params(model_dir), data_dir, "cpu")
    t2 = LocalTrainer.load(model_dir, params(model_dir), data_dir, "cpu")
    glob = lora_mod.initial_adapter(model_dir, LoraSpec(), seed=0)
    before = t1.evaluate(glob)
    cfg = RoundConfig(round=1, local_steps=12, lr=3e-3, batch_size=4, seed=0)
    # Execute
    r1 = t1.train_round(glob, cfg)
    r2 = t2.train_round(glob, cfg)
    # Assert: the loss went down, counts are the training blocks, the round is reproducible
    assert r1.num_examples == t1.data.train.shape[0] > 10 and r1.steps == 12
    assert r1.eval_loss < before - 0.2 and r1.train_loss == r1.train_loss  # finite, not NaN
    assert r1.eval_loss == pytest.approx(t1.evaluate(r1.tensors))
    assert r1.tensors.keys() == glob.keys()
    assert all(torch.equal(r1.tensors[k], r2.tensors[k]) for k in glob)
    r3 = t1.train_round(glob, RoundConfig(round=2, local_steps=12, lr=3e-3, batch_size=4, seed=0))
    assert not all(torch.equal(r1.tensors[k], r3.tensors[k]) for k in glob)  # another round's batches
    # The global adapter given is not modified.
    assert all(not t.any() for k, t in glob.items() if "lora_B" in k)


def test_cancel_stops_a_round_and_bad_layouts_are_refused(model_dir: Path, data_dir: Path) -> None:
    t = LocalTrainer.load(model_dir, params(model_dir), data_dir, "cpu")
    glob = lora_mod.initial_adapter(model_dir, LoraSpec(), seed=0)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        t.train_round(glob, RoundConfig(1, 5, 1e-3, 4, 0), cancel)
    assert t.model.training is False
    wrong = lora_mod.initial_adapter(model_dir, LoraSpec(rank=4), seed=0)
    with pytest.raises(ValueError, match="expected"):
        t.evaluate(wrong)
    with pytest.raises(ValueError, match="missing"):
        t.evaluate({k: v for k, v in glob.items() if "layers.1" not in k})


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations inside peft
def test_saved_adapter_loads_in_peft_and_in_the_engine(data_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from p2pllm.engine.loader import load_slice

    # Shared-only: a float32 checkpoint. On the bundled bf16 pair the engine rounds the merged
    # weight to bf16 before computing in float32 (adapter.merge returns the stored dtype), and
    # the logits differ from peft's by ~6e-3.
    model_dir = shared_model("tinystories-656k")
    t = LocalTrainer.load(model_dir, params(model_dir), data_dir, "cpu")
    glob = lora_mod.initial_adapter(model_dir, LoraSpec(), seed=0)
    trained = t.train_round(glob, RoundConfig(1, 8, 3e-3, 4, 0)).tensors
    out = lora_mod.save_peft_adapter(tmp_path / "adapter", trained, LoraSpec(), str(model_dir))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    loaded = get_peft_model_state_dict(peft_model)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    # The engine merges the adapter at load (`p2pllm generate --adapter`): same logits as peft.
    ids = torch.tensor([[1, 80, 147, 201, 282, 57, 313, 598]])
    engine = load_slice(model_dir, adapter=out)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = engine.forward(ids, torch.arange(ids.shape[1]).unsqueeze(0))
        base = load_slice(model_dir).forward(ids, torch.arange(ids.shape[1]).unsqueeze(0))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the adapter changed something


def test_qlora_is_refused_without_cuda() -> None:
    reason = lora_mod.quantize_refusal("4bit", "cpu")
    assert reason is not None and "QLoRA" in reason and "CUDA" in reason
    assert lora_mod.quantize_refusal(None, "cpu") is None
    assert "unknown quantization" in (lora_mod.quantize_refusal("2bit", "cuda") or "")
    with pytest.raises(ValueError, match="QLoRA"):
        lora_mod.load_base_model("/nonexistent", device="cpu", quantize="4bit")


def test_plot_of_eval_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rounds = [{"round": 1, "eval_loss": 4.0}, {"round": 2, "eval_loss": None}, {"round": 3, "eval_loss": 3.0}]
    assert plot_eval_loss(tmp_path / "p.png", rounds, 5.0) is None
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert plot_eval_loss(tmp_path / "q.png", rounds, 5.0) == MISSING
    assert not (tmp_path / "q.png").exists()
