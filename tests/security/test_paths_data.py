"""Datasets and outputs stay home (issue 12 item 4, P): no request makes a daemon read data
outside its --data-dir or create, overwrite or delete anything outside its --state-dir.

One real p2pllmd with a data dir, a state dir and a models dir under tmp_path; a hostile but
authenticated client (tests/security/conftest.py `hostile`: wire.connection.connect +
net.auth.client_handshake) sends TRAIN_RUN (as a ctl client), ASSIGN train-stage (as a peer)
and FL_RUN with dataset names and output names that point outside: absolute paths, `..`,
symlinks in the data dir and the state dir, an existing directory outside holding a
config.json. Each gets a typed error; the trees outside (and the data dir) are unchanged,
contents and mtimes; and the daemon then serves a legitimate client: STATUS/PING, a split
training run on a named dataset saving by name (twice: it replaces its own checkpoint), and a
run on content the client sends, whose checkpoint files come back in "file" partials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from p2pllm.pillars.federated.messages import ASSIGN_FL_CLIENT, FL_TRAIN
from p2pllm.pillars.paths import MARKER
from p2pllm.wire.connection import Connection, RemoteError
from p2pllm.wire.messages import ErrorCode, MsgType
from tests.pillars.test_splittrain_trainer import make_tiny_llama
from tests.security.conftest import assert_still_serves, hostile, tree_digest

SEQ = 8
RUN = {"steps": 1, "batch_size": 2, "micro_batches": 1, "seq_len": SEQ, "stages": 1}


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """The daemon's roots and, beside them, the things a request must not reach."""
    root = tmp_path
    outside, data, state, models = (root / n for n in ("outside", "data", "state", "models"))
    for d in (outside, data, state, models):
        d.mkdir()
    (outside / "secret.txt").write_text("the operator's private text, never to be read\n" * 40)
    victim = outside / "victim"  # an existing directory with a config.json (a checkpoint?)
    victim.mkdir()
    (victim / "config.json").write_text('{"model_type": "llama"}')
    (victim / "model.safetensors").write_bytes(b"not yours")
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(3, 96, (400,), generator=g)}, str(data / "ids.safetensors"))
    (data / "leak.txt").symlink_to(outside / "secret.txt")  # a link in the data dir, pointing out
    (data / "docs").mkdir()
    (data / "docs" / "a.txt").write_text("a fine document")
    (data / "docs" / "b.txt").symlink_to(outside / "secret.txt")
    # in the state dir: a directory the daemon did not make, and links pointing outside
    (state / "checkpoints" / "handmade").mkdir(parents=True)
    (state / "checkpoints" / "handmade" / "config.json").write_text("{}")
    (state / "checkpoints" / "linked").symlink_to(victim)
    (state / "fl" / "byhand" / "adapter").mkdir(parents=True)
    (state / "fl" / "byhand" / "adapter" / "adapter_config.json").write_text("{}")
    (state / "fl" / "linked").symlink_to(outside)
    make_tiny_llama(models / "m", layers=2)
    (root / "cfg.yaml").write_text("max_dataset_bytes: 100000\n")
    return {"root": root, "outside": outside, "data": data, "state": state, "models": models,
            "victim": victim}


def snapshot(site: dict[str, Path]) -> dict[str, Any]:
    tmp_x = Path("/tmp/x")
    return {"outside": tree_digest(site["outside"]), "data": tree_digest(site["data"]),
            "handmade": tree_digest(site["state"] / "checkpoints" / "handmade"),
            "byhand": tree_digest(site["state"] / "fl" / "byhand"),
            "/tmp/x": tree_digest(tmp_x) if tmp_x.exists() else None,
            "/tmp/b": Path("/tmp/b").exists(), "root": sorted(p.name for p in site["root"].iterdir())}


async def refused(conn: Connection, msg_type: MsgType, meta: dict[str, Any], codes: set[ErrorCode],
                  payload: bytes = b"") -> RemoteError:
    with pytest.raises(RemoteError) as ei:
        async for frame in conn.stream(msg_type, meta, [payload] if payload else [],
                                       idle_timeout=60):
            assert frame.is_partial, f"{meta} was accepted: {frame.meta}"
            assert frame.meta.get("event") != "file", "files came back"
    assert ei.value.code in codes, (meta, ei.value.code, ei.value.message)
    return ei.value


async def run(conn: Connection, meta: dict[str, Any], payload: bytes = b"") -> tuple[list[Any], dict[str, Any]]:
    partials = []
    async for frame in conn.stream(MsgType.TRAIN_RUN, meta, [payload] if payload else [], idle_timeout=120):
        if frame.is_partial:
            partials.append((frame.meta, bytes(frame.payload)))
        else:
            return partials, frame.meta
    raise AssertionError("no final answer")


async def test_no_request_reads_data_outside_or_writes_outside_the_state_dir(daemons, site) -> None:
    # Prepare: one daemon with its roots; the filesystem as it is.
    d = daemons("a", "--no-mdns", "--config", str(site["root"] / "cfg.yaml"), "--data-dir", str(site["data"]),
                "--state-dir", str(site["state"]), "--models-dir", str(site["models"]))
    before = snapshot(site)
    ctl = await hostile(d.port, None, "ctl", name="hostile-ctl")
    peer = await hostile(d.port, None, "peer", name="hostile-peer")
    base = {"model": "m", **RUN}
    try:
        # Execute / Assert 1: dataset names that leave the data dir, or are not there.
        for data, codes in (("/etc/hostname", {ErrorCode.FORBIDDEN}),
                            ("../../etc/passwd", {ErrorCode.FORBIDDEN}),
                            (f"../{site['outside'].name}/secret.txt", {ErrorCode.FORBIDDEN}),
                            ("leak.txt", {ErrorCode.FORBIDDEN}),  # a symlink to outside
                            ("docs", {ErrorCode.FORBIDDEN}),  # a directory holding such a link
                            ("nope.txt", {ErrorCode.NOT_FOUND})):
            err = await refused(ctl, MsgType.TRAIN_RUN, {**base, "data": data}, codes)
            assert "never to be read" not in err.message
        # ... the same names in an ASSIGN train-stage straight to the daemon (a peer)
        stage = {"model": "m", "layers": [0, 2], "index": 0, "num_stages": 1, "seq_len": SEQ,
                 "batch_size": 2, "micro_batches": 1, "steps": 1, "optim": {"lr": 1e-3}}
        for i, data in enumerate(("/etc/hostname", "../../etc/passwd", "leak.txt", "docs")):
            await refused(peer, MsgType.ASSIGN, {"job": f"evil{i}", "rid": "stage0", "role": "train-stage",
                                                 "params": {**stage, "data": data}, "pillar": "splittrain"},
                          {ErrorCode.FORBIDDEN})
        # ... content over the dataset cap (the config file's 100000 bytes), at TRAIN_RUN and at ASSIGN
        await refused(ctl, MsgType.TRAIN_RUN, {**base, "data_format": "text"}, {ErrorCode.OVER_LIMIT},
                      payload=b"x" * 100_001)
        await refused(peer, MsgType.ASSIGN, {"job": "big", "rid": "stage0", "role": "train-stage", "params": {
            **stage, "data_format": "text", "data_bytes": 100_001}, "pillar": "splittrain"}, {ErrorCode.OVER_LIMIT})
        # Execute / Assert 2: output names that leave the state dir or replace what it did not make.
        for save in ("/tmp/x", "..", "a/../../b", str(site["victim"]), "../../outside/victim",
                     "handmade", "linked", ".hidden"):
            await refused(ctl, MsgType.TRAIN_RUN, {**base, "data": "ids.safetensors", "save": save},
                          {ErrorCode.FORBIDDEN})
        for meta in ({"run_name": "/tmp/x"}, {"run_name": ".."}, {"run_name": "a/../../b"},
                     {"out": "/tmp/x"}, {"out": str(site["victim"])}):
            await refused(ctl, MsgType.FL_RUN, {"model": "m", "rounds": 1, **meta}, {ErrorCode.BAD_REQUEST})
        for name in ("byhand", "linked"):
            await refused(ctl, MsgType.FL_RUN, {"model": "m", "rounds": 1, "run_name": name,
                                                 "wait_clients": 0}, {ErrorCode.FORBIDDEN})
        # The filesystem is unchanged: contents and mtimes outside, the data dir, what the
        # state dir held that the daemon did not make.
        assert snapshot(site) == before
        # FL clients read only their own --data-dir: nothing a peer sends names a file.
        for body in (ASSIGN_FL_CLIENT, FL_TRAIN):
            assert not {"data", "data_dir", "path", "file", "out"} & set(body.by_name), body.name
    finally:
        ctl.close()
        peer.close()
    # The daemon still serves a legitimate client: STATUS and PING, then real runs.
    await assert_still_serves(d.port)
    legit = await hostile(d.port, None, "ctl", name="legit")
    try:
        _, first = await run(legit, {**base, "data": "ids.safetensors", "save": "good"})
        ckpt = site["state"] / "checkpoints" / "good"
        assert first["saved"] == str(ckpt) and (ckpt / "model.safetensors").is_file()
        assert (ckpt / MARKER).is_file()
        # The same name again replaces the daemon's own checkpoint, atomically.
        mtime = (ckpt / "model.safetensors").stat().st_mtime_ns
        await run(legit, {**base, "data": "ids.safetensors", "save": "good", "seed": 1})
        assert (ckpt / "model.safetensors").stat().st_mtime_ns != mtime
        assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".good")]
        # Content the client sends, and the checkpoint's files back.
        content = (site["data"] / "ids.safetensors").read_bytes()
        partials, result = await run(legit, {**base, "data_format": "safetensors", "save": "sent",
                                             "send_files": True}, content)
        files: dict[str, bytearray] = {}
        for meta, payload in partials:
            if meta.get("event") == "file":
                assert meta["offset"] == len(files.setdefault(meta["name"], bytearray()))
                files[meta["name"]] += payload
        sent = site["state"] / "checkpoints" / "sent"
        on_disk = {p.name: p.read_bytes() for p in sent.iterdir() if not p.name.startswith(".")}
        assert {k: bytes(v) for k, v in files.items()} == on_disk and "model.safetensors" in on_disk
        assert len(result["losses"]) == 1
    finally:
        legit.close()
    assert snapshot(site) == before
    assert "never to be read" not in d.log()
    assert (site["victim"] / "model.safetensors").read_bytes() == b"not yours"
