"""The OpenAI-compatible API of a real p2pllmd (``--api 127.0.0.1:0``), driven by the official
``openai`` client: models, chat (streaming and not), completions, stop, seed, concurrent
streams equal to their lone outputs, the errors in OpenAI's shape, the Bearer key, a client
that goes away mid-stream, the pending cap, and the config refusals. The bundled shakespeare
model for speed; SmolLM2 (the shared Q4_1 GGUF, served as int4) for a real chat model."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import BUNDLED, REPO, SHARED_MODELS, SHARED_SKIP, DaemonProc

KEY = "sk-test-0123456789"
SMOLLM2_DIR = SHARED_MODELS / "smollm2-135m-instruct"


def api_address(d: DaemonProc) -> str:
    """The API line --print-port writes after the PORT line."""
    assert d.proc.stdout is not None
    line = d.proc.stdout.readline()
    assert line.startswith("API 127.0.0.1:"), line
    return line.split()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: Any) -> Any:
    root = tmp_path_factory.mktemp("api")
    models = root / "models"
    models.mkdir()
    if SMOLLM2_DIR.is_dir():
        (models / "smollm2-135m-instruct").symlink_to(SMOLLM2_DIR)
    key = root / "key"
    key.write_text(KEY + "\n")
    d = DaemonProc("api", ["--no-mdns", "--api", "127.0.0.1:0", "--api-key-file", str(key),
                           "--api-max-pending", "16", "--models-dir", str(models)], root,
                   threads=1)
    d.wait_ready()
    addr = api_address(d)
    yield d, addr
    d.stop()


@pytest.fixture
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{server[1]}/v1", api_key=KEY, max_retries=0,
                         timeout=120)


def metrics(addr: str) -> dict[str, float]:
    req = urllib.request.Request(f"http://{addr}/metrics",
                                 headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def local_completion(prompt: str, max_tokens: int) -> str:
    """What the local engine makes of the prompt, greedy (the API must give the same)."""
    import torch

    from p2pllm.engine.generate import continuation_text, generate_ids
    from p2pllm.engine.loader import load_slice, load_tokenizer

    tok = load_tokenizer(BUNDLED)
    model = load_slice(BUNDLED, dtype=torch.float32)
    ids = list(tok(prompt)["input_ids"])
    eos = list(model.config.eos_token_ids)
    if isinstance(tok.eos_token_id, int) and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    res = generate_ids(model, ids, max_tokens=max_tokens, stop_ids=eos)
    return continuation_text(tok, ids, res.token_ids)


def test_models_lists_bundled_and_models_dir(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {"shakespeare", "shakespeare-draft"} <= ids
    if SMOLLM2_DIR.is_dir():
        assert "smollm2-135m-instruct" in ids


def test_completion_equals_local_greedy(client: openai.OpenAI) -> None:
    prompt = "ROMEO: But soft, what light"
    r = client.completions.create(model="shakespeare", prompt=prompt, max_tokens=12,
                                  temperature=0)
    assert r.choices[0].text == local_completion(prompt, 12)
    assert r.usage is not None and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.choices[0].finish_reason == "length"


def test_chat_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Speak of the king."}]
    whole = client.chat.completions.create(model="shakespeare", messages=msgs,  # type: ignore[arg-type]
                                           max_tokens=16, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].message.role == "assistant"
    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(model="shakespeare", messages=msgs,  # type: ignore[arg-type]
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            finish = ch.finish_reason or finish
    assert "".join(pieces) == text
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_stop_string_ends_the_text(client: openai.OpenAI) -> None:
    prompt = "ROMEO: But soft, what light"
    full = local_completion(prompt, 24)
    # a stop string from the middle of the greedy text: the reply is the text before it
    cut = full[len(full) // 2:len(full) // 2 + 3]
    assert cut.strip(), full
    r = client.completions.create(model="shakespeare", prompt=prompt, max_tokens=24,
                                  temperature=0, stop=[cut])
    assert r.choices[0].text == full[:full.index(cut)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def draw(seed: int) -> str:
        r = client.completions.create(model="shakespeare", prompt="KING:", max_tokens=16,
                                      temperature=1.0, seed=seed)
        return r.choices[0].text

    a, b = draw(1234), draw(1234)
    assert a == b
    others = {draw(s) for s in (1, 2, 3)}
    assert len(others | {a}) > 1  # sampling does depend on the seed


def test_concurrent_streams_each_equal_their_lone_output(server: Any) -> None:
    prompts = ["KING:", "ROMEO: O", "JULIET: Ay me", "First Citizen: Before we proceed"]
    client = openai.OpenAI(base_url=f"http://{server[1]}/v1", api_key=KEY, max_retries=0)
    alone = [client.completions.create(model="shakespeare", prompt=p, max_tokens=10,
                                       temperature=0).choices[0].text for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=f"http://{server[1]}/v1", api_key=KEY,
                                 max_retries=0)

    async def one(p: str) -> str:
        stream = await aclient.completions.create(model="shakespeare", prompt=p, max_tokens=10,
                                                  temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main() -> list[str]:
        try:
            return list(await asyncio.gather(*(one(p) for p in prompts * 4)))
        finally:
            await aclient.close()

    assert asyncio.run(main()) == alone * 4  # 16 streams at once


def test_errors_have_openai_shape(server: Any, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="shakespeare", prompt="x", max_tokens=2,
                                  logprobs=2)
    assert e.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="shakespeare", prompt="x", max_tokens=10**6)
    assert e.value.code == "context_length_exceeded"
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=f"http://{server[1]}/v1", api_key=key or "-",
                            max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401
    # malformed JSON: a raw request
    req = urllib.request.Request(f"http://{server[1]}/v1/chat/completions", data=b"{nope",
                                 headers={"Authorization": f"Bearer {KEY}",
                                          "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(req, timeout=10)
    assert he.value.code == 400
    body = json.loads(he.value.read())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_json"


def test_a_client_that_goes_away_stops_its_generation(server: Any) -> None:
    addr = server[1]
    before = metrics(addr).get("p2pllm_api_cancelled_total", 0)
    host, port = addr.split(":")
    body = json.dumps({"model": "shakespeare", "prompt": "KING:", "max_tokens": 400,
                       "stream": True, "temperature": 0}).encode()
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
              + body)
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        assert chunk and not got.startswith(b"HTTP/1.1 4"), got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got
    s.close()  # gone after the first chunk, long before 400 tokens
    deadline = time.monotonic() + 30
    while (m := metrics(addr)).get("p2pllm_api_cancelled_total", 0) < before + 1 \
            or m["p2pllm_api_pending"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m["p2pllm_api_running"] == 0 and m["p2pllm_api_pending"] == 0
    assert m['p2pllm_api_kv_blocks_used{model="shakespeare"}'] == 0  # its blocks are free
    assert m['p2pllm_api_kv_blocks_total{model="shakespeare"}'] > 0
    assert m['p2pllm_api_requests_total{endpoint="completions",model="shakespeare",status="499"}'] >= 1


def test_pending_cap_answers_429(server: Any) -> None:
    aclient = openai.AsyncOpenAI(base_url=f"http://{server[1]}/v1", api_key=KEY, max_retries=0)

    async def one() -> int:
        try:
            await aclient.completions.create(model="shakespeare", prompt="KING:", max_tokens=100,
                                             temperature=0)
            return 200
        except openai.RateLimitError as e:
            assert e.response.headers.get("retry-after")
            return 429

    async def main() -> list[int]:
        try:
            return list(await asyncio.gather(*(one() for _ in range(24))))
        finally:
            await aclient.close()

    codes = asyncio.run(main())
    assert codes.count(429) >= 1 and codes.count(200) >= 16, codes  # cap 16


def test_smollm2_chat_equals_local_int4_greedy(client: openai.OpenAI) -> None:
    if not SMOLLM2_DIR.is_dir():
        pytest.skip(f"{SHARED_SKIP}: {SMOLLM2_DIR} is not present")
    import torch

    from p2pllm.engine.chat import end_ids, render
    from p2pllm.engine.generate import continuation_text, generate_ids
    from p2pllm.engine.loader import load_slice, load_tokenizer

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    tok = load_tokenizer(SMOLLM2_DIR)
    model = load_slice(SMOLLM2_DIR, dtype=torch.float32, quant="int4")
    ids = render(tok, msgs)
    res = generate_ids(model, ids, max_tokens=20,
                       stop_ids=end_ids(tok, tuple(model.config.eos_token_ids)))
    want = continuation_text(tok, ids, res.token_ids)
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs,  # type: ignore[arg-type]
                                       max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want
    assert "Paris" in want


def test_lan_api_without_key_is_refused(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "p2pllm.cli.p2pllmd", "--no-mdns", "--port", "0",
                        "--api", "0.0.0.0:0", "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "--api-key-file" in r.stderr


def test_sigterm_lets_a_running_request_finish(tmp_path: Path) -> None:
    d = DaemonProc("drain", ["--no-mdns", "--api", "127.0.0.1:0"], tmp_path)
    d.wait_ready()
    addr = api_address(d)
    c = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="-", max_retries=0)
    c.completions.create(model="shakespeare", prompt="KING:", max_tokens=2)  # loaded
    stream = c.completions.create(model="shakespeare", prompt="KING:", max_tokens=60,
                                  temperature=0, stream=True)
    it = iter(stream)
    first = next(it)
    t0 = time.monotonic()
    d.proc.terminate()
    rest = [ch for ch in it]
    finish = [ch.choices[0].finish_reason for ch in rest if ch.choices][-1]
    assert first.choices and finish == "length"  # the stream ran to its end
    assert d.proc.wait(30) == 0
    assert time.monotonic() - t0 < 30
    d.stop()
