"""Chat: templates rendered and their end ids (engine/chat.py), `p2pllm chat` piped on
SmolLM2-135M-Instruct (history, /reset, /exit), `generate --chat` and `--ignore-eos`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pllm.cli.main import main
from p2pllm.engine.chat import ChatHistory, end_ids, render
from p2pllm.engine.errors import ModelError
from p2pllm.engine.loader import load_tokenizer
from tests.engine.test_gguf import (
    CHAT_OUT,
    FRANCE_OUT,
    SHARED_MODELS,
    SHARED_SKIP,
    SMOL,
    SMOL_FILE,
)

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
BUNDLED = Path(__file__).resolve().parents[2] / "p2pllm" / "models" / "shakespeare"
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    if not (SHARED_MODELS / SMOL / SMOL_FILE).is_file():
        pytest.skip(f"{SHARED_SKIP}: {SHARED_MODELS / SMOL / SMOL_FILE} is not present")
    return SHARED_MODELS


@pytest.fixture(scope="module")
def smol_tok(smol_dir: Path) -> Any:
    return load_tokenizer(smol_dir / SMOL)


def test_template_round_trip_on_a_bundled_tokenizer() -> None:
    tok = load_tokenizer(BUNDLED)
    with pytest.raises(ModelError, match="no chat template"):
        render(tok, [{"role": "user", "content": "hi"}])
    tok.chat_template = TEMPLATE
    msgs = [{"role": "user", "content": "Good morrow"}, {"role": "assistant", "content": "Hail"},
            {"role": "user", "content": "What news?"}]
    ids = render(tok, msgs)
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<s>assistant: ") and text.count("</s>") == 3
    assert tok.decode(ids) == text
    assert ids.count(tok.eos_token_id) == 3
    # the template ends a reply with </s>: that is the stop id
    assert end_ids(tok) == (tok.eos_token_id,)
    assert end_ids(tok, [7, tok.eos_token_id]) == (tok.eos_token_id, 7)


def test_history_renders_every_turn(smol_tok: Any) -> None:
    h = ChatHistory()
    first = h.prompt(smol_tok, QUESTION)
    assert len(first) == 37  # the README's count for this question
    h.add(QUESTION, ANSWER)
    second = h.prompt(smol_tok, "And of Italy?")
    text = smol_tok.decode(second)
    assert text.startswith(smol_tok.decode(first)) and text.count("<|im_start|>user") == 2
    assert ANSWER + "<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert h.turns == 1
    h.reset()
    assert h.prompt(smol_tok, QUESTION) == first
    h2 = ChatHistory(system="You are terse.")
    assert "You are terse." in smol_tok.decode(h2.prompt(smol_tok, QUESTION))
    assert "SmolLM" not in smol_tok.decode(h2.prompt(smol_tok, QUESTION))
    assert end_ids(smol_tok) == (2,)  # <|im_end|>


def test_chat_piped(smol_dir: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    turns = [QUESTION, QUESTION, "/reset", QUESTION, "/exit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    rc = main(["chat", "--models-dir", str(smol_dir), "--model", SMOL, "--max-tokens", "24"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    replies = out.out.splitlines()
    assert len(replies) == 3
    assert replies[0] == ANSWER and replies[2] == ANSWER
    stats = [tuple(map(int, m)) for m in re.findall(r"\[(\d+) prompt tokens, (\d+) tokens",
                                                     out.err)]
    assert len(stats) == 3
    # turn 2 sees turn 1 (the question, the answer and its end token); /reset forgets it
    assert stats[0] == (37, len(CHAT_OUT))
    assert stats[1][0] > 37 + len(CHAT_OUT)
    assert stats[2] == stats[0]
    assert "(history cleared)" in out.err and out.err.count(", eos]") >= 2


def test_chat_refuses_a_model_without_template(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--model", str(BUNDLED)]) == 1
    assert "no chat template" in capsys.readouterr().err


def test_generate_chat_and_ignore_eos(smol_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--models-dir", str(smol_dir), "--model", SMOL, "--json"]
    assert main([*base, "--chat", QUESTION]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == CHAT_OUT and got["text"] == ANSWER and got["prompt_tokens"] == 37
    # without --ignore-eos the raw prompt stops at <|im_end|> after 30 tokens (README)
    assert main([*base, "--max-tokens", "34", "--ignore-eos", "The capital of France is"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["generated_tokens"] == 34 and got["token_ids"][:30] == FRANCE_OUT
    # spec and split take --ignore-eos too: tests/e2e/test_ignore_eos.py


@pytest.mark.timeout(900)  # two daemons load SmolLM2 halves; three turns
def test_chat_split_over_two_daemons(smol_dir: Path, tmp_path: Path) -> None:
    """`p2pllm chat --mode split`: the template is applied here, each turn is a GENERATE job
    over 2 shards on real daemons, and the replies stop at <|im_end|> (from the GGUF config)."""
    from tests.conftest import REPO, DaemonProc
    from tests.e2e.test_split import all_connected, free_ports

    ports = free_ports(2)
    procs = []
    try:
        for name, port in zip("ab", ports, strict=True):
            peers = [x for p in ports if p != port for x in ("--peer", f"127.0.0.1:{p}")]
            procs.append(DaemonProc(name, ["--no-mdns", "--port", str(port), "--models-dir",
                                           str(smol_dir), *peers], tmp_path))
        for d in procs:
            d.wait_ready()
        asyncio.run(all_connected(procs))
        out = subprocess.run(
            [sys.executable, "-m", "p2pllm.cli.main", "chat", "--mode", "split", "--shards", "2",
             "--models-dir", str(smol_dir), "--model", SMOL, "--max-tokens", "24",
             "--daemon", procs[0].address],
            input=f"{QUESTION}\nAnd of Italy?\n/reset\n{QUESTION}\n", capture_output=True,
            text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        for d in procs:
            d.stop()
    assert out.returncode == 0, out.stderr
    replies = out.stdout.strip().splitlines()
    assert replies[0] == ANSWER and replies[2] == ANSWER
    assert "Rome" in replies[1]  # the second turn saw the first
    stats = [tuple(map(int, m)) for m in re.findall(r"\[(\d+) prompt tokens, (\d+) tokens",
                                                     out.stderr)]
    assert stats[0] == (37, len(CHAT_OUT)) and stats[2] == stats[0] and stats[1][0] > 45
    assert out.stderr.count("eos, split]") == 3
