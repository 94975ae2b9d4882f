"""Every pillar with a secret (issue 12 "done when"): three real p2pllmd processes on 127.0.0.1
share a secret made by `p2pllm secret new`; the CLI, given the same file, runs the README
walkthrough on the bundled shakespeare models: speculative decoding, split inference over
three shards, one federated LoRA round, two split-training steps, then `ctl jobs`.

The CLI reaches the coordinator "a", and "b" and "c" reach "a", through recording TCP proxies:
the bytes they carry show the handshake's plain HELLO (the recorder works) but none of what a
job sends afterwards (prompt, training text, message keys): the frames are sealed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pllm.wire.messages import MsgType
from tests.conftest import BUNDLED, REPO, wait_for

PROMPT = "ROMEO: sealed prompt of the walkthrough"
TRAIN_TEXT = ("JULIET: the orchard walls are high and hard to climb, sealed-training-line.\n"
              "ROMEO: with love's light wings did I o'erperch these walls.\n") * 40
FL_TEXT = {
    "b": "PROSPERO: our revels now are ended, these our actors were all spirits.\n" * 60,
    "c": "MIRANDA: how beauteous mankind is, o brave new world that has such people.\n" * 60,
}
# What crosses the wire only after the handshake, in clear if it were not sealed (the CLI sends
# the prompt, the request keys and the training text; answers carry token_ids), and the FL
# clients' text, which never crosses it at all.
MARKERS = (PROMPT.encode(), b"sealed-training-line", b"max_tokens", b"token_ids", b"PROSPERO")


class Recorder:
    """Forwards 127.0.0.1:<its port> to 127.0.0.1:`upstream`, keeping every byte both ways."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.seen = bytearray()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Recorder:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    self.seen.extend(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        tasks = [asyncio.create_task(pump(reader, up_writer)), asyncio.create_task(pump(up_reader, writer))]
        self.tasks.update(tasks)
        await asyncio.gather(*tasks)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def cli(daemon: str, secret: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    """`p2pllm ARGS --daemon D --json` with the secret in $P2PLLM_SECRET_FILE, as the README's
    `export` line sets it; the last stdout line parsed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "P2PLLM_SECRET_FILE": str(secret)}
    out = subprocess.run([sys.executable, "-m", "p2pllm.cli.main", *args, "--daemon", daemon, "--json"],
                         capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert out.returncode == 0, f"{args} failed:\n{out.stderr[-3000:]}"
    try:
        return json.loads(out.stdout)  # ctl prints indented JSON
    except json.JSONDecodeError:
        return json.loads(out.stdout.strip().splitlines()[-1])


def local_ids(max_tokens: int) -> list[int]:
    """The bundled model's greedy ids for PROMPT, in this process."""
    from p2pllm.engine.generate import generate
    from p2pllm.engine.loader import load_slice, load_tokenizer

    return generate(load_slice(BUNDLED), load_tokenizer(BUNDLED), PROMPT, None, max_tokens).token_ids


async def test_every_pillar_runs_sealed_with_a_secret(daemons, ctl, tmp_path: Path) -> None:
    # The secret, made the way the README says.
    secret = tmp_path / "cluster.secret"
    made = subprocess.run([sys.executable, "-m", "p2pllm.cli.main", "secret", "new", str(secret)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert made.returncode == 0, made.stderr
    s = ("--secret-file", str(secret), "--no-mdns", "--keepalive-timeout", "5")
    data = {}
    for name, text in FL_TEXT.items():
        data[name] = tmp_path / f"data-{name}"
        data[name].mkdir()
        (data[name] / "lines.txt").write_text(text)
    reference = asyncio.ensure_future(asyncio.to_thread(local_ids, 16))  # while the daemons start
    a = daemons("sealed-a", *s, "--state-dir", str(tmp_path / "sa"))
    to_a = [await Recorder(a.port).start() for _ in range(3)]  # for b, for c, for the CLI
    b = daemons("sealed-b", *s, "--state-dir", str(tmp_path / "sb"), "--data-dir", str(data["b"]),
                "--peer", to_a[0].address)
    c = daemons("sealed-c", *s, "--state-dir", str(tmp_path / "sc"), "--data-dir", str(data["c"]),
                "--peer", to_a[1].address, "--peer", b.address)
    ds = [a, b, c]
    try:
        async def all_up() -> bool:
            for d in ds:
                conn = await ctl(d.port, str(secret))
                snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
                if sum(p["state"] == "up" for p in snap["peers"]) != 2:
                    return False
            return True

        await wait_for(all_up, timeout=30, what="three daemons with the secret connected")
        via = to_a[2].address
        run = asyncio.to_thread

        # 1. Speculative decoding: greedy output = the local engine's, token for token.
        spec = await run(cli, via, secret, "generate", "--mode", "spec", "--max-tokens", "16", PROMPT)
        assert spec["token_ids"] == await reference and spec["mode"] == "spec"
        assert 0 < spec["acceptance_rate"] <= 1
        # 2. Split inference over all three daemons.
        split = await run(cli, via, secret, "generate", "--mode", "split", "--shards", "3",
                          "--max-tokens", "16", PROMPT)
        assert split["token_ids"] == await reference
        # 3. Federated LoRA: b and c train on their own text; the adapter comes back here.
        out = tmp_path / "adapter"
        fl = await run(cli, via, secret, "fl", "run", "--model", "shakespeare", "--rounds", "1",
                       "--local-steps", "2", "--min-clients", "2", "--block-size", "32",
                       "--batch-size", "2", "--round-timeout", "120", "--out", str(out))
        assert fl["rounds"][0]["clients_answered"] == 2
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        # 4. Split training over two stages on a file of this host.
        text = tmp_path / "some-text.txt"
        text.write_text(TRAIN_TEXT)
        saved = tmp_path / "trained"
        train = await run(cli, via, secret, "train", "split", "--model", "shakespeare", "--data", str(text),
                          "--stages", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                          "--save", str(saved))
        assert len(train["losses"]) == 2 and all(loss > 0 for loss in train["losses"])
        assert (saved / "config.json").is_file()

        # ctl jobs with the secret lists every pillar's job.
        listed = await run(cli, via, secret, "ctl", "jobs")
        jobs = listed["jobs"]
        assert {j["pillar"] for j in jobs} >= {"spec", "split", "fl", "splittrain"}, jobs
    finally:
        for d in ds:  # all at once (the fixture then waits for each)
            if d.proc.poll() is None:
                d.proc.terminate()
        for r in to_a:
            await r.close()

    # Sealed: the plain handshake is visible (the recorders saw the connections), nothing after.
    for name, r in zip(("b -> a", "c -> a", "cli -> a"), to_a, strict=True):
        seen = bytes(r.seen)
        assert len(seen) > 10_000, (name, len(seen))
        assert b"nonce" in seen, name  # HELLO is msgpack in the clear
        for marker in MARKERS:
            assert marker not in seen, (name, marker)
    assert b"sealed-b" in to_a[0].seen and b"sealed-c" in to_a[1].seen  # their HELLO names


@pytest.fixture(autouse=True)
def _bundled_present() -> None:
    assert (BUNDLED / "config.json").is_file(), BUNDLED
