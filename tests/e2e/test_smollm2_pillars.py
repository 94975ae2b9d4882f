"""Every pillar on the real model: SmolLM2-135M-Instruct (GGUF, float32 base) over real
p2pllmd processes (issue 19 item 5). Kept short: few tokens, one FL round of two local steps,
two split-training steps on 16-token sequences, every daemon on one thread.

- spec: the float32 target with an int4 copy of itself as draft, greedy = local greedy = the
  README's reference ids;
- split over 2 and 3 shards: greedy = local greedy = the README's reference ids;
- FL: one round with LoRA on two clients; the adapter comes back in peft format and loads;
- split training with LoRA over 2 stages: losses and LoRA parameters equal the single-process
  trainer's, the saved adapter loads.

Three daemons serve all of it (one start-up for the module). Skips without the shared checkout.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pllm.cli.main import main
from tests.conftest import DaemonProc
from tests.e2e.test_fl import stories
from tests.e2e.test_split import all_connected, free_ports
from tests.engine.test_gguf import (
    FRANCE_IDS,
    FRANCE_OUT,
    SHARED_MODELS,
    SHARED_SKIP,
    SMOL,
    SMOL_FILE,
)
from tests.pillars.test_splittrain_trainer import ATOL, RTOL, STORY

PROMPT = "The capital of France is"
TOKENS = 8  # generated tokens per inference run (the README's ids hold 30)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def smol() -> Path:
    path = SHARED_MODELS / SMOL
    if not (path / SMOL_FILE).is_file():
        pytest.skip(f"{SHARED_SKIP}: {path / SMOL_FILE} is not present")
    return path


@pytest.fixture(scope="module")
def cluster(smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DaemonProc]]:
    """Daemons a, b, c serving ../shared/models; b and c hold FL data (a few short stories)."""
    root = tmp_path_factory.mktemp("smol")
    ports = free_ports(3)
    procs = []
    try:
        for name, port, theme in zip("abc", ports, (None, "sea", "farm"), strict=True):
            peers = [x for p in ports if p != port for x in ("--peer", f"127.0.0.1:{p}")]
            extra: list[str] = []
            if theme is not None:
                data = root / f"data-{name}"
                data.mkdir()
                (data / "stories.txt").write_text("\n\n".join(stories(theme, 12)))
                extra = ["--data-dir", str(data)]
            procs.append(DaemonProc(name, ["--no-mdns", "--port", str(port), "--models-dir",
                                           str(SHARED_MODELS), "--state-dir",
                                           str(root / f"state-{name}"), *peers, *extra], root))
        for d in procs:
            d.wait_ready()
        asyncio.run(all_connected(procs))
        yield procs
    finally:
        for d in procs:
            d.stop()


@pytest.fixture(scope="module")
def local_greedy(smol: Path) -> list[int]:
    """The engine's local float32 greedy ids in this process (= the README's, test_gguf)."""
    from p2pllm.engine.generate import generate_ids
    from p2pllm.engine.loader import load_slice, load_tokenizer

    ids = load_tokenizer(smol)(PROMPT)["input_ids"]
    got = list(generate_ids(load_slice(smol), ids, max_tokens=TOKENS).token_ids)
    assert got == FRANCE_OUT[:TOKENS]
    return got


@pytest.fixture(scope="module")
def hf_base(smol: Path) -> Any:
    """The FL clients' base model builder on the GGUF (float32, dequantized)."""
    from p2pllm.pillars.federated.lora import load_base_model

    return lambda: load_base_model(smol)


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc = main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return dict(json.loads(out.out))


def generate(capsys: pytest.CaptureFixture[str], d: DaemonProc, *args: str) -> dict[str, Any]:
    return cli_json(capsys, "generate", "--daemon", d.address, "--models-dir", str(SHARED_MODELS),
                    "--model", SMOL, "--max-tokens", str(TOKENS), "--json", *args, PROMPT)


def assert_peft_adapter_loads(base: Any, out: Path) -> dict[str, torch.Tensor]:
    """The directory is a peft adapter: PeftModel.from_pretrained loads exactly its tensors."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, out))
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    return saved


def test_spec_with_an_int4_copy_of_itself_as_draft(
    cluster: list[DaemonProc], local_greedy: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    got = generate(capsys, cluster[0], "--mode", "spec", "--draft-model", SMOL,
                   "--draft-quant", "int4", "--draft-tokens", "4")
    assert got["token_ids"] == local_greedy == FRANCE_OUT[:TOKENS], got
    assert got["text"].startswith(" Paris.")
    assert got["mode"] == "spec" and got["drafted"] > 0 and got["rounds"] >= 2


@pytest.mark.parametrize("shards", [2, 3])
def test_split_over_shards(cluster: list[DaemonProc], local_greedy: list[int], shards: int,
                           capsys: pytest.CaptureFixture[str]) -> None:
    got = generate(capsys, cluster[0], "--mode", "split", "--shards", str(shards))
    assert got["token_ids"] == local_greedy == FRANCE_OUT[:TOKENS], got


def test_fl_base_model_of_the_gguf_is_the_engines_float_model(smol: Path, hf_base: Any) -> None:
    """The FL clients' transformers model of the GGUF (dequantized to float32, frozen) computes
    the engine's logits."""
    from p2pllm.engine.loader import load_slice

    ids = torch.tensor([FRANCE_IDS])
    base = hf_base()
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in base.parameters())
    with torch.no_grad():
        got = base(ids).logits
        want = load_slice(smol).forward(ids, torch.arange(ids.shape[1]).unsqueeze(0))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert int(got[0, -1].argmax()) == FRANCE_OUT[0]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations inside peft
def test_fl_round_with_lora(cluster: list[DaemonProc], hf_base: Any, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "adapter"
    result = cli_json(capsys, "fl", "run", "--daemon", cluster[0].address, "--model", SMOL,
                      "--rounds", "1", "--min-clients", "2", "--local-steps", "2",
                      "--batch-size", "2", "--block-size", "32", "--lr", "1e-3",
                      "--eval-fraction", "0.2", "--round-timeout", "240", "--out", str(out),
                      "--json")
    (rnd,) = result["rounds"]
    assert rnd["clients_answered"] == 2 and not rnd.get("rejected"), rnd
    assert math.isfinite(rnd["train_loss"]) and math.isfinite(rnd["eval_loss"])
    assert {c["name"] for c in rnd["clients"] if c["status"] == "ok"} == {"b", "c"}
    saved = assert_peft_adapter_loads(hf_base(), out)
    # the default targets on all 30 layers: q_proj and v_proj, A and B each
    assert len(saved) == 30 * 2 * 2
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in saved.items())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_split_training_with_lora_equals_the_single_process_trainer(
    cluster: list[DaemonProc], smol: Path, hf_base: Any, tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from p2pllm.pillars.splittrain.compute import OptimConfig, lora_spec, lora_state_dict
    from p2pllm.pillars.splittrain.data import load_blocks
    from p2pllm.pillars.splittrain.trainer import train_local

    data = tmp_path / "story.txt"
    data.write_text(STORY)
    out = tmp_path / "adapter"
    steps, batch, micro, seq, lr, seed = 2, 2, 2, 16, 1e-3, 4
    result = cli_json(capsys, "train", "split", "--daemon", cluster[0].address, "--model", SMOL,
                      "--data", str(data), "--steps", str(steps), "--batch-size", str(batch),
                      "--micro-batches", str(micro), "--seq-len", str(seq), "--lr", str(lr),
                      "--seed", str(seed), "--stages", "2", "--schedule", "1f1b", "--lora",
                      "--save", str(out), "--json")
    losses = result["losses"]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert len({s["name"] for s in result["stages"]}) == 2
    # the same steps in this process: same init, data order and optimizer
    ref = train_local(smol, load_blocks(data, seq, smol), steps=steps, batch_size=batch,
                      micro_batches=micro, optim=OptimConfig(lr=lr), lora=lora_spec(),
                      seed=seed)
    assert losses == pytest.approx(ref.losses, rel=RTOL, abs=ATOL)
    got = load_file(str(out / "adapter_model.safetensors"))
    want = lora_state_dict(ref.model)
    assert set(got) == set(want) and len(got) == 30 * 2 * 2
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in got.items())
    assert_peft_adapter_loads(hf_base(), out)
