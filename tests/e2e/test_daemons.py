"""Real p2pllmd processes on 127.0.0.1: discovery, status, auth, roles, bad input."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from p2pllm.cli.client import DaemonUnavailable, open_daemon
from p2pllm.wire.connection import RemoteError, connect
from p2pllm.wire.frame import HEADER, MAGIC, PROTOCOL_VERSION
from p2pllm.wire.messages import ErrorCode, MsgType
from tests.conftest import REPO, wait_for

MDNS = ("--interface", "127.0.0.1")
FAST = ("--keepalive-timeout", "2")


async def status(ctl, port: int) -> dict:
    conn = await ctl(port)
    return (await conn.request(MsgType.STATUS, {}, timeout=10)).meta


def peer_states(snap: dict) -> dict[str, str]:
    return {p["node_id"]: p["state"] for p in snap["peers"]}


async def test_three_daemons_find_each_other_by_mdns_and_a_killed_one_goes_down_then_away(daemons, ctl, tmp_path) -> None:
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("keepalive_interval: 0.3\nkeepalive_timeout: 2\npeer_remove_after: 3\n")
    ds = [daemons(f"m{i}", *MDNS, "--config", str(cfg), wait=False) for i in range(3)]
    for d in ds:
        d.wait_ready()
    ids = {d.node_id for d in ds}

    async def all_up():
        for d in ds:
            states = peer_states(await status(ctl, d.port))
            if any(states.get(o) != "up" for o in ids - {d.node_id}):
                return False
        return True

    await wait_for(all_up, timeout=20, what="three daemons to see each other up")
    # The CLI shows them as JSON too.
    out = subprocess.run(
        [sys.executable, "-m", "p2pllm.cli.main", "ctl", "status", "--json", "--daemon", ds[0].address],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["node"]["node_id"] == ds[0].node_id
    seen = {p["node_id"]: p for p in snap["peers"]}
    for d in ds[1:]:
        p = seen[d.node_id]
        assert p["name"] == d.name and p["state"] == "up" and p["address"] == d.address
        assert "roles" in p and "rtt_ms" in p
    # Kill one: shown down, then removed.
    ds[2].kill()
    await wait_for(
        lambda: _state_is(ctl, ds[0].port, ds[2].node_id, "down"), timeout=10, what="killed peer down"
    )
    await wait_for(
        lambda: _state_is(ctl, ds[0].port, ds[2].node_id, None), timeout=15, what="killed peer removed"
    )


async def _state_is(ctl, port, node_id, expected):
    return peer_states(await status(ctl, port)).get(node_id) == expected


async def test_static_peers_without_mdns(daemons, ctl) -> None:
    a = daemons("s0", "--no-mdns", *FAST)
    b = daemons("s1", "--no-mdns", "--peer", a.address, *FAST)
    c = daemons("s2", "--no-mdns", "--peer", a.address, "--peer", b.address, *FAST)

    async def a_sees_both():
        st = peer_states(await status(ctl, a.port))
        return st.get(b.node_id) == "up" and st.get(c.node_id) == "up"

    await wait_for(a_sees_both, what="static peers up")
    snap = await status(ctl, b.port)
    assert peer_states(snap) == {a.node_id: "up", c.node_id: "up"}  # no mDNS: nobody else
    # Only one connection per pair survives: c dialed both, and each sees c exactly once.
    assert [p["node_id"] for p in snap["peers"]].count(c.node_id) == 1


async def test_shared_secret_refuses_outsiders(daemons, ctl, tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("something else\n")
    a = daemons("k0", "--no-mdns", "--secret-file", str(secret))
    good = daemons("k1", "--no-mdns", "--secret-file", str(secret), "--peer", a.address)
    bad = daemons("k2", "--no-mdns", "--secret-file", str(wrong), "--peer", a.address)
    none = daemons("k3", "--no-mdns", "--peer", a.address)

    async def good_up():
        return peer_states(await status_secret(a.port, secret)).get(good.node_id) == "up"

    await wait_for(good_up, what="peer with the secret accepted")
    await asyncio.sleep(1.0)
    st = peer_states(await status_secret(a.port, secret))
    assert bad.node_id not in st and none.node_id not in st
    assert a.log().count("did not prove the shared secret") >= 2  # refused and logged
    # CLI clients need it too.
    with pytest.raises(DaemonUnavailable, match="shared secret"):
        await open_daemon(a.address)
    with pytest.raises(DaemonUnavailable):
        await open_daemon(a.address, str(wrong))


async def status_secret(port, secret) -> dict:
    conn = await open_daemon(f"127.0.0.1:{port}", str(secret))
    try:
        return (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
    finally:
        conn.close()


async def test_assign_release_echo_role_and_refusals(daemons, peer) -> None:
    # the test acts as a coordinator: a peer connection (only peers may ASSIGN, protocol.md 4.4)
    a = daemons("r0", "--no-mdns", "--test-roles")
    b = daemons("r1", "--no-mdns", "--peer", a.address, "--role", "fl-client")
    conn = await peer(a.port)
    meta = {"job": "j1", "rid": "echo", "role": "echo", "params": {"x": 1}}
    ack = await conn.request(MsgType.ASSIGN, meta, timeout=10)
    assert ack.msg_type == MsgType.ACK and ack.meta["rid"] == "echo"
    # A second echo role in another job on the same daemon.
    await conn.request(MsgType.ASSIGN, {**meta, "job": "j2"}, timeout=10)
    reply = await conn.request(MsgType.ROLE_CALL, {"job": "j1", "data": "hi"}, [b"abc"], timeout=10)
    assert reply.meta["params"] == {"x": 1} and reply.meta["echo"] == "hi"
    assert bytes(reply.payload) == b"abc"
    snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
    assert {(r["job"], r["role"]) for r in snap["node"]["roles"]} == {("j1", "echo"), ("j2", "echo")}
    # Refusals are typed and say why.
    with pytest.raises(RemoteError) as ei:
        await conn.request(MsgType.ASSIGN, {**meta, "job": "j3", "params": {"refuse": "testing"}}, timeout=10)
    assert ei.value.code == ErrorCode.REFUSED and "testing" in ei.value.message
    with pytest.raises(RemoteError) as ei:
        await conn.request(MsgType.ASSIGN, {**meta, "job": "j3", "params": {"memory": 10**15}}, timeout=10)
    assert ei.value.code == ErrorCode.REFUSED and "memory" in ei.value.message
    with pytest.raises(RemoteError) as ei:
        await conn.request(MsgType.ASSIGN, {**meta, "job": "j1"}, timeout=10)
    assert ei.value.code == ErrorCode.REFUSED and "already holds" in ei.value.message
    with pytest.raises(RemoteError) as ei:
        await conn.request(MsgType.ASSIGN, {**meta, "role": "warp-drive"}, timeout=10)
    assert ei.value.code == ErrorCode.REFUSED and "unknown role" in ei.value.message
    # A daemon pinned to fl-client refuses a shard (pinned roles).
    conn_b = await peer(b.port)
    with pytest.raises(RemoteError) as ei:
        await conn_b.request(MsgType.ASSIGN, {**meta, "role": "shard", "rid": "shard"}, timeout=10)
    assert ei.value.code == ErrorCode.REFUSED and "accepts only fl-client" in ei.value.message
    # Release one job: its role is gone, the other stays.
    rel = await conn.request(MsgType.RELEASE, {"job": "j1"}, timeout=10)
    assert rel.meta["released"] == ["echo"]
    with pytest.raises(RemoteError) as ei:
        await conn.request(MsgType.ROLE_CALL, {"job": "j1"}, timeout=10)
    assert ei.value.code == ErrorCode.UNKNOWN_JOB
    snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
    assert [r["job"] for r in snap["node"]["roles"]] == ["j2"]


async def test_bad_input_then_daemon_still_answers_ping(daemons, ctl) -> None:
    a = daemons("b0", "--no-mdns")

    async def raw(data: bytes, eof: bool = False) -> tuple[int, int] | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        writer.write(data)
        if eof:
            writer.write_eof()
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readexactly(32), 5)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return None
        _, _, mtype, _, _, _, mlen, plen = HEADER.unpack(head)
        import msgpack

        body = msgpack.unpackb(await reader.readexactly(mlen + plen))
        writer.close()
        return mtype, body["code"]

    def hdr(mtype=MsgType.PING, mlen=0, plen=0, magic=MAGIC, version=PROTOCOL_VERSION):
        return HEADER.pack(magic, version, mtype, 0, 0, 5, mlen, plen)

    assert await raw(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20) == (MsgType.ERROR, ErrorCode.BAD_MAGIC)
    assert await raw(hdr(version=2)) == (MsgType.ERROR, ErrorCode.BAD_VERSION)
    assert await raw(hdr(plen=2**40)) == (MsgType.ERROR, ErrorCode.FRAME_TOO_LARGE)
    assert await raw(hdr(mlen=2) + b"\xc1\xc1") == (MsgType.ERROR, ErrorCode.BAD_META)
    assert await raw(hdr(mtype=0x6666)) == (MsgType.ERROR, ErrorCode.UNKNOWN_TYPE)
    assert await raw(hdr(mtype=MsgType.STATUS)) == (MsgType.ERROR, ErrorCode.UNAUTHENTICATED)
    assert await raw(hdr(mlen=50)[:-3], eof=True) is None  # truncated, then EOF
    assert await raw(hdr(mlen=50) + b"\x80" * 10, eof=True) is None  # body cut short
    # HELLO with the wrong protocol version in its body.
    async def no(conn, req):
        return None

    c = await connect("127.0.0.1", a.port, no)
    with pytest.raises(RemoteError) as ei:
        await c.request(MsgType.HELLO, {"version": 9, "node_id": "x", "name": "x", "kind": "ctl", "nonce": b"12345678"}, timeout=5)
    assert ei.value.code == ErrorCode.BAD_VERSION and "9" in ei.value.message
    c.close()
    conn = await ctl(a.port)
    pong = await conn.request(MsgType.PING, {"t": 3.0}, timeout=5)
    assert pong.msg_type == MsgType.PONG and pong.meta["t"] == 3.0
    assert (await conn.request(MsgType.STATUS, {}, timeout=5)).meta["node"]["node_id"] == a.node_id


def test_cli_without_daemon_says_where_it_looked() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "p2pllm.cli.main", "ctl", "status", "--daemon", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert out.returncode == 2
    assert "127.0.0.1:9" in out.stderr and "p2pllmd" in out.stderr
