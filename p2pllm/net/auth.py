"""Handshake and shared-secret authentication (HMAC-SHA256 challenge-response).

No secret crosses the wire: each side proves it knows the secret by an HMAC over both sides'
fresh nonces and node ids. The server proves itself in its HELLO answer, the client in AUTH.
With a secret, both sides then seal every frame (protocol.md 6.3, p2pllm.wire.seal): keys per
direction from the secret and both nonces; the client switches right after it sent AUTH, the
server right after it received it. Until the server has proved itself, the client reads its
frames under PREAUTH_LIMITS (64 KiB), as the server does the client's until AUTH succeeded.

`connect()` + `client_handshake()` is the one way to open an authenticated (with a secret:
sealed) client connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from p2pllm.wire.connection import Connection, RemoteError
from p2pllm.wire.frame import PREAUTH_LIMITS, PROTOCOL_VERSION
from p2pllm.wire.messages import MsgType
from p2pllm.wire.seal import derive_keys

HANDSHAKE_TIMEOUT = 10.0  # default; the daemon's is config.handshake_timeout


class HandshakeError(Exception):
    """The peer could not be admitted (version, secret, identity)."""


def proof(secret: bytes, side: bytes, nonce_a: bytes, nonce_b: bytes, node_a: str, node_b: str) -> bytes:
    msg = b"p2pllm-auth-v1|" + side + b"|" + nonce_a + nonce_b + node_a.encode() + b"|" + node_b.encode()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def hello_meta(node_id: str, name: str, kind: str, port: int, nonce: bytes) -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "node_id": node_id,
        "name": name,
        "kind": kind,
        "port": port,
        "nonce": nonce,
    }


async def client_handshake(
    conn: Connection,
    *,
    node_id: str,
    name: str,
    kind: str,
    port: int,
    secret: bytes | None,
    caps: dict[str, Any] | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> dict[str, Any]:
    """Run HELLO (and AUTH when a secret is in use) as the dialing side; with a secret the
    connection is sealed from AUTH on (protocol.md 6.3).

    Returns the peer's HELLO metadata with its "caps". Raises HandshakeError.
    """
    nonce_c = os.urandom(16)
    meta = hello_meta(node_id, name, kind, port, nonce_c)
    if caps is not None and secret is None:
        meta["caps"] = caps  # with a secret they travel sealed, after the ACK (protocol.md 6)
    limits = conn.limits
    conn.limits = PREAUTH_LIMITS  # the HELLO answer of a server not yet proven
    if secret is not None:
        conn.hold_reading_after(MsgType.HELLO)  # what follows the answer is read sealed (6.3)
    else:  # frames right behind the answer (a server uses the link at once) get the full limits
        conn.limits_after(MsgType.HELLO, limits)
    try:
        frame = await conn.request(MsgType.HELLO, meta, timeout=timeout)
    except RemoteError as exc:
        raise HandshakeError(f"peer refused HELLO: {exc}") from exc
    m = frame.meta
    if m.get("version") != PROTOCOL_VERSION:
        raise HandshakeError(
            f"peer speaks protocol version {m.get('version')}, this node speaks {PROTOCOL_VERSION}"
        )
    peer_id = m.get("node_id")
    if not isinstance(peer_id, str):
        raise HandshakeError("peer's HELLO has no node id")
    if m.get("auth"):
        if secret is None:
            raise HandshakeError("the peer requires a shared secret; pass --secret-file")
        nonce_s = m.get("nonce")
        proven = m.get("proof")
        if not isinstance(nonce_s, bytes) or not isinstance(proven, bytes) or not hmac.compare_digest(
            proof(secret, b"server", nonce_c, nonce_s, node_id, peer_id), proven
        ):
            raise HandshakeError("the peer could not prove it knows the shared secret")
        try:
            c2s, s2c = derive_keys(secret, nonce_c, nonce_s, node_id, peer_id, PROTOCOL_VERSION)
        except ValueError as exc:
            raise HandshakeError(f"cannot derive the session keys: {exc}") from exc
        conn.limits = limits  # the server proved the secret
        conn.enable_sealing(c2s, s2c, after_sent=MsgType.AUTH)
        try:
            ack = await conn.request(
                MsgType.AUTH,
                {"proof": proof(secret, b"client", nonce_s, nonce_c, peer_id, node_id)},
                timeout=timeout,
            )
        except RemoteError as exc:
            raise HandshakeError(f"authentication failed: {exc.message}") from exc
        if caps is not None:  # the first sealed frame: what a listener must not read
            await conn.notify(MsgType.CAPS_UPDATE, {"caps": caps})
        m = {**m, "caps": ack.meta.get("caps", {})}
    elif secret is not None:
        raise HandshakeError("the peer does not use the shared secret; refusing it")
    else:
        conn.limits = limits
    return m


