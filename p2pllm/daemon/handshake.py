"""The server side of the handshake: accepted connections, HELLO, AUTH (protocol.md 6).

Limits before trust: an accepted connection reads frames under PREAUTH_LIMITS (64 KiB of
metadata + payload) until it is authenticated, must complete HELLO (and AUTH, when the
cluster has a shared secret) within config.handshake_timeout or is closed, and at most
config.max_unauthed accepted connections are unauthenticated at once (one over the cap is
closed at once; that is logged at most every LOG_EVERY seconds). Until then every other
message is refused with UNAUTHENTICATED. With a secret, the HELLO answer arms the sealing
(protocol.md 6.3): both directions switch right after the client's AUTH frame arrives, so the
answer to AUTH is the server's first sealed frame. A peer that completes it is admitted to
the peer table.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from p2pllm.net.auth import proof
from p2pllm.wire.connection import Connection, Reply, Request
from p2pllm.wire.frame import PREAUTH_LIMITS, PROTOCOL_VERSION, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.seal import derive_keys

if TYPE_CHECKING:
    from p2pllm.daemon.daemon import Daemon

log = logging.getLogger(__name__)

LOG_EVERY = 10.0  # seconds between two log lines about connections refused over max_unauthed


class Handshake:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.accepted = 0  # TCP connections accepted since start
        self.unauthed: set[Connection] = set()  # accepted, open, not yet authenticated
        self.refused_over_cap = 0  # connections closed at once: max_unauthed were open
        self._refused_unlogged = 0
        self._refused_logged_at = float("-inf")

    def on_accept(self, conn: Connection) -> None:
        self.accepted += 1
        conn.info["authed"] = False
        cfg = self.d.config
        if len(self.unauthed) >= cfg.max_unauthed:
            self._refuse_over_cap(conn)
            return
        conn.limits = PREAUTH_LIMITS
        self.unauthed.add(conn)
        conn.on_close(self.unauthed.discard)
        timeout = cfg.handshake_timeout
        loop = asyncio.get_running_loop()

        def expire() -> None:
            if not conn.info.get("authed") and not conn.closed:
                log.info("closing %s: no handshake within %ss", conn.peername, timeout)
                conn.close("handshake timeout")

        timer = loop.call_later(timeout, expire)
        conn.on_close(lambda _c: timer.cancel())  # else the timer holds a closed connection

        def refused(c: Connection) -> None:
            hello = c.info.get("hello")
            if not c.info.get("authed") and hello is not None and self.d.secret is not None:
                log.warning(
                    "refused %s %s from %s: it did not prove the shared secret",
                    hello.get("kind"), hello.get("name"), c.peername,
                )

        conn.on_close(refused)

    def _refuse_over_cap(self, conn: Connection) -> None:
        self.refused_over_cap += 1
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= LOG_EVERY:
            log.warning(
                "closing new connections (this one from %s): %d unauthenticated connections are "
                "open, the cap max_unauthed; %d refused since the last such line",
                conn.peername, len(self.unauthed), self._refused_unlogged,
            )
            self._refused_logged_at = now
            self._refused_unlogged = 0
        conn.close(f"over the cap of {self.d.config.max_unauthed} unauthenticated connections")

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
        if not 1 <= len(node_id.encode()) <= 255:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "HELLO node_id must be 1..255 bytes of UTF-8", fatal=True)
        if d.secret is not None and "nonce_s" in conn.info:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "a second HELLO on this connection", fatal=True)
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
            c2s, s2c = derive_keys(d.secret, nonce, nonce_s, node_id, d.node_id, PROTOCOL_VERSION)
            conn.enable_sealing(s2c, c2s, after_received=MsgType.AUTH)  # armed before the reply
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
        if not conn.sealed:  # cannot happen: the AUTH frame itself switched it (defence in depth)
            raise ProtocolError(ErrorCode.BAD_REQUEST, "AUTH on a connection that is not sealed", fatal=True)
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
        conn.limits = d.limits
        self.unauthed.discard(conn)
        if hello["kind"] != "peer" or hello["node_id"] == d.node_id:
            return
        host = conn.peername[0] if conn.peername else "?"
        port = hello.get("port")
        d.peers.admit(conn, hello, f"{host}:{port}", initiator=str(hello["node_id"]))
        d.dialer.remember_inbound(host, port, str(hello["node_id"]))
