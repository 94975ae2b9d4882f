"""Model and adapter references stay inside the operator's roots (issue 12 item 4, M).

Real p2pllmd processes on 127.0.0.1 and a hostile authenticated client (wire.connection.connect
+ net.auth.client_handshake, tests/security/conftest.py ``hostile``): every request that names a
model or an adapter (GENERATE spec/split, its draft_model and adapter, ASSIGN verifier, drafter,
shard, fl-client and train-stage, FL_RUN, TRAIN_RUN) is sent ``/etc``, ``/etc/passwd``,
``../../..``, a valid tiny model in a folder outside the roots (by path, through a link inside
the models dir, and as ``name/../..``), and a hub id that is not in the hub cache. Each gets a
typed error (FORBIDDEN for a path outside the roots, naming them and --models-dir; NOT_FOUND /
REFUSED for an unknown name), no role or job is left behind, no log line shows the outside model
loaded, the folders are unchanged, and the daemon still serves a legitimate client: a spec
generation by name, a split generation of a hub id that is in the hub cache (the name crosses
the wire, the shard resolves it in its own cache). The CLI sends a local path inside a root as
a name and gets the FORBIDDEN message for one outside. With --allow-hub, a hub id is fetched in
a thread: the daemon answers PING while the download (from a fake hub on 127.0.0.1 that stalls 2 s,
then answers 404) is under way.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pllm.wire.connection import Connection, RemoteError
from p2pllm.wire.messages import ErrorCode, MsgType
from tests.conftest import BUNDLED_DRAFT, REPO
from tests.security.conftest import TIMEOUT, assert_still_serves, hostile, log_problems, tree_digest

TINY = "tiny"  # the legitimate model's name under the models dir
HUB_ID = "org/tiny"  # a hub id present in the test's hub cache
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                  "base_model_name_or_path": TINY}


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """models/ (the root, with tiny and a link out), outside/ (a valid model and an adapter no
    root holds), a hub cache holding org/tiny, data/, state/ (with one adapter)."""
    models, outside, hub = tmp_path / "models", tmp_path / "outside", tmp_path / "hub"
    shutil.copytree(BUNDLED_DRAFT, models / TINY)
    shutil.copytree(BUNDLED_DRAFT, outside / "tiny-out")
    (outside / "adapter").mkdir()
    (outside / "adapter" / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    (models / "escape").symlink_to(outside / "tiny-out", target_is_directory=True)
    snap = hub / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(BUNDLED_DRAFT, snap)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.txt").write_text("To be or not to be, that is the question. " * 40)
    (tmp_path / "state" / "adapters" / "mine").mkdir(parents=True)
    (tmp_path / "state" / "adapters" / "mine" / "adapter_config.json").write_text(
        json.dumps(ADAPTER_CONFIG))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded by these tests
    monkeypatch.setenv("P2PLLM_MODELS_DIR", str(tmp_path / "pulled"))  # no stray pulled models
    return {"root": tmp_path, "models": models, "outside": outside, "hub": hub,
            "data": tmp_path / "data", "state": tmp_path / "state"}


def start(daemons: Any, layout: dict[str, Path], name: str, *extra: str) -> Any:
    return daemons(name, "--no-mdns", "--models-dir", str(layout["models"]),
                   "--data-dir", str(layout["data"]), "--state-dir", str(layout["state"]),
                   "--keepalive-timeout", "3", *extra)


def hostile_refs(layout: dict[str, Path]) -> list[tuple[str, set[ErrorCode]]]:
    """(model reference, the codes it may get): FORBIDDEN for everything outside the roots."""
    out, models = layout["outside"], layout["models"]
    forbidden = {ErrorCode.FORBIDDEN}
    return [
        ("/etc", forbidden),
        ("/etc/passwd", forbidden),
        ("../../..", forbidden),
        (str(out / "tiny-out"), forbidden),  # a valid model, outside the roots
        ("escape", forbidden),  # a link in the models dir pointing outside
        (str(models / "escape"), forbidden),  # the same, by path
        (f"{TINY}/../../outside/tiny-out", forbidden),  # a name climbing out
        ("someone/not-cached", {ErrorCode.NOT_FOUND, ErrorCode.REFUSED}),  # no --allow-hub
    ]


def assign_params(role: str, ref: str) -> dict[str, Any]:
    if role == "shard":  # valid shard params, so that only the model is wrong
        return {"model": ref, "start": 0, "end": 2, "num_layers": 2, "index": 0, "count": 1,
                "first": {"node": "nobody", "rid": "shard0"}}
    if role == "fl-client":
        return {"model": ref, "lora": {"rank": 4}}
    return {"model": ref}


def requests_for(ref: str) -> list[tuple[str, MsgType, dict[str, Any]]]:
    """Every request that names a model: (label, connection kind, type, body)."""
    spec = {"mode": "spec", "prompt": "To be", "max_tokens": 2}
    return [
        ("ctl", MsgType.GENERATE, {**spec, "model": ref, "draft_model": TINY}),
        ("ctl", MsgType.GENERATE, {**spec, "model": TINY, "draft_model": ref}),
        ("ctl", MsgType.GENERATE, {"mode": "split", "prompt": "To be", "max_tokens": 2,
                                   "model": ref}),
        ("ctl", MsgType.FL_RUN, {"model": ref, "rounds": 1, "run_name": "probe"}),
        ("ctl", MsgType.TRAIN_RUN, {"model": ref, "data": "d.txt", "steps": 1}),
        *[("peer", MsgType.ASSIGN, {"job": f"probe-{role}", "rid": role, "role": role,
                                    "params": assign_params(role, ref)})
          for role in ("verifier", "drafter", "shard", "fl-client", "train-stage")],
    ]


async def send(conns: dict[str, Connection], kind: str, msg_type: MsgType,
               meta: dict[str, Any]) -> Any:
    """The request's final answer (a GENERATE / FL_RUN / TRAIN_RUN streams partials first)."""
    conn = conns[kind]
    if msg_type is MsgType.ASSIGN:
        return await conn.request(msg_type, meta, timeout=TIMEOUT * 3)
    last = None
    async for frame in conn.stream(msg_type, meta, idle_timeout=TIMEOUT * 3):
        last = frame
    return last


async def refused(conns: dict[str, Connection], kind: str, msg_type: MsgType,
                  meta: dict[str, Any]) -> RemoteError:
    with pytest.raises(RemoteError) as err:
        await send(conns, kind, msg_type, meta)
    return err.value


async def test_every_model_and_adapter_request_stays_inside_the_roots(
        daemons: Any, layout: dict[str, Path]) -> None:
    d = start(daemons, layout, "m")
    before = {k: tree_digest(layout[k]) for k in ("models", "outside", "hub", "data")}
    conns = {"ctl": await hostile(d.port, None, "ctl")}
    outside_real = str((layout["outside"] / "tiny-out").resolve())
    try:
        # client requests first: while a hostile peer is connected it is a node of the cluster
        # (an ACK-everything one that planners may pick for a role)
        todo = [(ref, codes, r) for ref, codes in hostile_refs(layout) for r in requests_for(ref)]
        todo.sort(key=lambda t: t[2][0] == "peer")
        for ref, codes, (kind, msg_type, meta) in todo:
            if kind not in conns:
                conns[kind] = await hostile(d.port, None, kind)
            err = await refused(conns, kind, msg_type, meta)
            what = f"{msg_type.name} {meta.get('role') or meta.get('mode') or ''} {ref!r}"
            assert err.code in codes, f"{what}: {err.code} {err.message}"
            if err.code == ErrorCode.FORBIDDEN:  # names the roots and how to add one
                assert "--models-dir" in err.message and str(layout["models"]) in err.message, what
            else:
                assert "--allow-hub" in err.message or "looked under" in err.message, what
        conns.pop("peer").close()  # leaves the cluster
        # adapters: only under <state>/adapters and the models dirs; spec/split never merge one
        for adapter, code in (("/etc", ErrorCode.FORBIDDEN), ("../../..", ErrorCode.FORBIDDEN),
                              (str(layout["outside"] / "adapter"), ErrorCode.FORBIDDEN),
                              ("nope", ErrorCode.NOT_FOUND), ("mine", ErrorCode.BAD_REQUEST)):
            for mode in ("spec", "split"):
                err = await refused(conns, "ctl", MsgType.GENERATE,
                                    {"mode": mode, "prompt": "To be", "max_tokens": 2,
                                     "model": TINY, "draft_model": TINY, "adapter": adapter})
                assert err.code == code, (mode, adapter, err.message)
        err = await refused(conns, "ctl", MsgType.GENERATE,  # no local mode on a daemon
                            {"mode": "local", "prompt": "x", "model": outside_real})
        assert err.code == ErrorCode.BAD_REQUEST

        # nothing was opened outside the roots, nothing left behind
        status = await assert_still_serves(d.port)
        assert not status.get("jobs") or all(j.get("state") != "running" for j in status["jobs"])
        assert {k: tree_digest(layout[k]) for k in before} == before
        log = d.log()
        assert outside_real not in "\n".join(
            line for line in log.splitlines() if "loaded" in line), log
        # the capabilities leave the link out (a request could not use it)
        node = status["node"]
        assert not node["roles"], node["roles"]
        names = {m["name"] for m in node["models"]}
        assert TINY in names and "escape" not in names

        # legitimate requests are served: a spec generation by name ...
        final = await send(conns, "ctl", MsgType.GENERATE,
                           {"mode": "spec", "prompt": "To be", "model": TINY,
                            "draft_model": TINY, "max_tokens": 4, "temperature": 0})
        assert final.msg_type is MsgType.GENERATE and 0 < len(final.meta["token_ids"]) <= 4
        # ... a path inside the root (the coordinator sends the shard the name) ...
        final = await send(conns, "ctl", MsgType.GENERATE,
                           {"mode": "split", "prompt_ids": [1, 2, 3], "max_tokens": 3,
                            "model": str(layout["models"] / TINY), "keep_alive": 0})
        assert len(final.meta["token_ids"]) == 3
        # ... and a hub id found in the hub cache, resolved by the shard in its own cache
        final = await send(conns, "ctl", MsgType.GENERATE,
                           {"mode": "split", "prompt_ids": [1, 2, 3], "max_tokens": 3,
                            "model": HUB_ID, "keep_alive": 0})
        assert len(final.meta["token_ids"]) == 3
    finally:
        for c in conns.values():
            c.close()
    assert not log_problems(d.log()), d.log()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2pllm.cli.main", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


async def test_cli_sends_local_paths_as_names_or_gets_the_forbidden_message(
        daemons: Any, layout: dict[str, Path]) -> None:
    d = start(daemons, layout, "c")
    common = ("generate", "--mode", "split", "--max-tokens", "2", "--json", "--daemon", d.address)
    # a relative path inside the root (the CLI's cwd is not the daemon's): served
    rel = os.path.relpath(layout["models"] / TINY, REPO)
    ok = await asyncio.to_thread(run_cli, *common, "--model", rel, "To be")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["token_ids"]) == 2
    # a folder outside every root: the FORBIDDEN message says how to add it
    bad = await asyncio.to_thread(run_cli, *common, "--model",
                                  str(layout["outside"] / "tiny-out"), "To be")
    assert bad.returncode != 0
    assert "outside the roots" in bad.stderr and "--models-dir" in bad.stderr, bad.stderr
    await assert_still_serves(d.port)


class StallingHub:
    """A fake Hugging Face hub on 127.0.0.1: each request is answered 404 after `delay` s."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hits: list[tuple[float, str]] = []
        self.answered: list[float] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            line = conn.recv(65536).split(b"\r\n", 1)[0].decode(errors="replace")
            self.hits.append((time.monotonic(), line))
            time.sleep(self.delay)
            body = b'{"error":"Repository not found"}'
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                         b"X-Error-Code: RepoNotFound\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            self.answered.append(time.monotonic())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stalling_hub() -> Iterator[StallingHub]:
    hub = StallingHub(delay=2.0)
    yield hub
    hub.close()


async def test_allow_hub_fetches_in_a_thread_while_the_daemon_keeps_answering(
        daemons: Any, layout: dict[str, Path], stalling_hub: StallingHub,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{stalling_hub.port}")
    d = start(daemons, layout, "h", "--allow-hub")
    ctl = await hostile(d.port, None, "ctl")
    ping = await hostile(d.port, None, "ctl", name="pinger")
    try:
        request = asyncio.create_task(send({"ctl": ctl}, "ctl", MsgType.GENERATE, {
            "mode": "split", "prompt_ids": [1, 2], "max_tokens": 2, "model": "someone/fetched"}))
        rtts: list[float] = []
        while not request.done():
            t0 = time.monotonic()
            pong = await ping.request(MsgType.PING, {"t": 1.0}, timeout=TIMEOUT)
            assert pong.msg_type is MsgType.PONG
            rtts.append(time.monotonic() - t0)
            await asyncio.sleep(0.05)
        with pytest.raises(RemoteError) as err:
            await request
        assert err.value.code == ErrorCode.NOT_FOUND and "download" in err.value.message
        # the daemon did ask the hub, for that repo, and answered pings while it waited
        assert any("someone/fetched" in line for _, line in stalling_hub.hits), stalling_hub.hits
        asked = min(t for t, line in stalling_hub.hits if "someone/fetched" in line)
        assert stalling_hub.answered and max(stalling_hub.answered) - asked >= 1.9
        # on the loop, a download would hold every PING for its 2 s stall(s)
        assert len(rtts) >= 10 and max(rtts) < 1.5, rtts
        # a cached hub id needs no download, and a path outside the roots is still FORBIDDEN
        with pytest.raises(RemoteError) as err:
            await send({"ctl": ctl}, "ctl", MsgType.GENERATE, {
                "mode": "split", "prompt_ids": [1], "max_tokens": 1, "model": "/etc"})
        assert err.value.code == ErrorCode.FORBIDDEN
    finally:
        ctl.close()
        ping.close()
    await assert_still_serves(d.port)


def test_models_dirs_from_repeated_flags_and_config_files(tmp_path: Path) -> None:
    """--models-dir is repeatable (the first is models_dir, the rest models_dirs); a config
    file's models_dir keeps working, models_dirs adds more; flags replace the file's dirs."""
    from p2pllm.cli.p2pllmd import build_parser
    from p2pllm.config import load_config
    from p2pllm.daemon.modelrefs import ModelRoots, config_models_dirs

    old = tmp_path / "old.yaml"
    old.write_text("models_dir: /srv/models\n")
    assert config_models_dirs(load_config(str(old), {})) == ("/srv/models",)
    both = tmp_path / "both.yaml"
    both.write_text("models_dir: /srv/models\nmodels_dirs: [/data/a, /data/b]\nallow_hub: true\n")
    cfg = load_config(str(both), {})
    assert config_models_dirs(cfg) == ("/srv/models", "/data/a", "/data/b") and cfg.allow_hub
    args = vars(build_parser().parse_args(["--models-dir", "/x", "--models-dir", "/y",
                                           "--allow-hub"]))
    flags = {k: v for k, v in args.items() if k not in ("config", "print_port")}
    cfg = load_config(str(both), flags)
    assert config_models_dirs(cfg) == ("/x", "/y") and cfg.allow_hub
    roots = ModelRoots.of(cfg)
    assert [str(d) for k, d in roots.model_roots() if k == "models-dir"] == ["/x", "/y"]
    assert roots.may_fetch("org/name") and not roots.may_fetch("/etc")
    assert not load_config(None, {}).allow_hub  # off by default
