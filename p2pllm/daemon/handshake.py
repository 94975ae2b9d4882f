"""The server side of the handshake: accepted connections, HELLO, AUTH (protocol.md 6).

An accepted connection must complete HELLO (and AUTH, when the cluster has a shared secret)
within HANDSHAKE_TIMEOUT, or it is closed; until then every other message is refused with
UNAUTHENTICATED. A peer that completes it is admitted to the peer table.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from p2pllm.net.auth import HANDSHAKE_TIMEOUT, proof
from p2pllm.wire.connection import Connection, Reply, Request
from p2pllm.wire.frame import PROTOCOL_VERSION, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

if TYPE_CHECKING:
    from p2pllm.daemon.daemon import Daemon

log = logging.getLogger(__name__)


class Handshake:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.accepted = 0  # TCP connections accepted since start

    def on_accept(self, conn: Connection) -> None:
        self.accepted += 1
        conn.info["authed"] = False
        loop = asyncio.get_running_loop()

        def expire() -> None:
            if not conn.info.get("authed") and not conn.closed:
                log.info("closing %s: no handshake within %ss", conn.peername, HANDSHAKE_TIMEOUT)
                conn.close("handshake timeout")

        loop.call_later(HANDSHAKE_TIMEOUT, expire)

        def refused(c: Connection) -> None:
            hello = c.info.get("hello")
            if not c.info.get("authed") and hello is not None and self.d.secret is not None:
                log.warning(
                    "refused %s %s from %s: it did not prove the shared secret",
                    hello.get("kind"), hello.get("name"), c.peername,
                )

        conn.on_close(refused)

    async def on_hello(self, conn: Connection, req: Request) -> Reply:
        d = self.d
        m = req.meta
        if m.get("version") != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.BAD_VERSION,
                f"peer speaks protocol version {m.get('version')}, this node speaks {PROTOCOL_VERSION}",
                fatal=True,
            )
        node_id, name, kind, nonce = m.get("node_id"), m.get("name"), m.get("kind"), m.get("nonce")
        if (
            not isinstance(node_id, str)
            or not isinstance(name, str)
            or kind not in ("peer", "ctl", "self")
            or not isinstance(nonce, bytes)
            or not 8 <= len(nonce) <= 64
        ):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "HELLO needs node_id, name, kind, nonce", fatal=True)
        conn.info.update(node_id=node_id, name=name, kind=kind, hello=m)
        reply: dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "node_id": d.node_id,
            "name": d.name,
            "port": d.port,
            "auth": d.secret is not None,
        }
        if d.secret is not None:
            nonce_s = os.urandom(16)
            conn.info["nonce_s"] = nonce_s
            reply["nonce"] = nonce_s
            reply["proof"] = proof(d.secret, b"server", nonce, nonce_s, node_id, d.node_id)
        else:
            reply["caps"] = d.caps_now()
            self._authed(conn, m)
        return Reply(MsgType.HELLO, reply)

    async def on_auth(self, conn: Connection, req: Request) -> Reply:
        d = self.d
        hello = conn.info.get("hello")
        nonce_s = conn.info.get("nonce_s")
        if d.secret is None or hello is None or nonce_s is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "AUTH without a HELLO that asked for it", fatal=True)
        expected = proof(d.secret, b"client", nonce_s, hello["nonce"], d.node_id, hello["node_id"])
        given = req.meta.get("proof")
        if not isinstance(given, bytes) or not hmac.compare_digest(expected, given):
            log.warning(
                "refused %s %s from %s: wrong shared secret", hello.get("kind"), hello.get("name"), conn.peername
            )
            conn.info["hello"] = None  # logged once
            raise ProtocolError(ErrorCode.AUTH_FAILED, "wrong shared secret", fatal=True)
        caps = req.meta.get("caps")
        self._authed(conn, {**hello, "caps": caps if isinstance(caps, dict) else {}})
        return Reply(MsgType.ACK, {"caps": d.caps_now()})

    def _authed(self, conn: Connection, hello: Mapping[str, Any]) -> None:
        d = self.d
        conn.info["authed"] = True
        if hello["kind"] != "peer" or hello["node_id"] == d.node_id:
            return
        host = conn.peername[0] if conn.peername else "?"
        port = hello.get("port")
        d.peers.admit(conn, hello, f"{host}:{port}", initiator=str(hello["node_id"]))
        d.dialer.remember_inbound(host, port, str(hello["node_id"]))
