"""Two model builds at once in one process (an engine slice and a transformers + peft model,
as a shard and an fl-client starting together on one daemon) take turns on the process-wide
model-build lock (engine.loader.model_build), and both come out right."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from p2pllm.engine.loader import BUNDLED_MODELS_DIR, load_slice, model_build
from p2pllm.engine.model import ModelSlice
from p2pllm.pillars.federated import lora
from p2pllm.pillars.training import LoraSpec

MODEL = BUNDLED_MODELS_DIR / "shakespeare"
IDS = torch.tensor([[0, 1253, 38, 48, 27, 200, 42, 478]])
RENDEZVOUS_S = 1.5  # how long a build waits, inside its constructor, for the other one


class Overlap:
    """Counts the model constructors running at once. A constructor waits (up to
    RENDEZVOUS_S) for a second one to be running too, so two builds that are not serialised
    overlap every time, not by luck of timing."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.inside = 0
        self.peak = 0

    def wrap(self, init: Any) -> Any:
        def wrapped(obj: Any, *args: Any, **kwargs: Any) -> None:
            with self.cond:
                self.inside += 1
                self.peak = max(self.peak, self.inside)
                self.cond.notify_all()
                self.cond.wait_for(lambda: self.inside >= 2, timeout=RENDEZVOUS_S)
            try:
                init(obj, *args, **kwargs)
            finally:
                with self.cond:
                    self.inside -= 1

        return wrapped


def test_engine_slice_and_peft_model_built_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaForCausalLM

    pos = torch.arange(IDS.shape[1])[None]
    with torch.inference_mode():
        reference = load_slice(MODEL, dtype=torch.float32)(IDS, pos)  # built alone
    before = (torch.get_default_dtype(), torch.linspace, torch.nn.init.kaiming_uniform_,
              torch.nn.init.normal_)

    overlap = Overlap()
    monkeypatch.setattr(ModelSlice, "__init__", overlap.wrap(ModelSlice.__init__))
    monkeypatch.setattr(LlamaForCausalLM, "__init__", overlap.wrap(LlamaForCausalLM.__init__))
    out: dict[str, Any] = {}
    start = threading.Barrier(2)

    def engine() -> None:
        start.wait()
        out["slice"] = load_slice(MODEL, dtype=torch.float32)

    def peft() -> None:
        start.wait()
        base = lora.load_base_model(MODEL)
        out["peft"] = lora.wrap(base, LoraSpec(rank=4, alpha=8), seed=3, base_model_path=str(MODEL))

    errors: list[BaseException] = []

    def run(fn: Any) -> None:
        try:
            fn()
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f,)) for f in (engine, peft)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert overlap.peak == 1, "two model builds ran at once"

    # both models are right: the slice equals one built alone; the peft model (B = 0, so
    # equal to its base) agrees with it, its LoRA weights float32 and trainable
    with torch.inference_mode():
        assert torch.equal(out["slice"](IDS, pos), reference)
        theirs = out["peft"](input_ids=IDS).logits
    assert (theirs - reference).abs().max() < 1e-4
    trainable = [p for n, p in out["peft"].named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in out["peft"].named_parameters()
                             if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in trainable)
    # and the process-wide state transformers patches while it builds is back as it was
    after = (torch.get_default_dtype(), torch.linspace, torch.nn.init.kaiming_uniform_,
             torch.nn.init.normal_)
    assert after == before


def test_model_build_lock_is_reentrant_and_process_wide() -> None:
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with model_build(), model_build():  # nested in one thread: re-entrant
            held.set()
            release.wait(timeout=30)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(timeout=30)
    from p2pllm.engine import loader

    try:
        assert not loader._BUILD_LOCK.acquire(blocking=False)  # another thread waits
    finally:
        release.set()
        t.join(timeout=30)
    assert loader._BUILD_LOCK.acquire(blocking=False)
    loader._BUILD_LOCK.release()
