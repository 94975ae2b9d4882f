"""Connecting a CLI to its daemon: address resolution, handshake, clear errors."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from p2pllm.config import DEFAULT_PORT, ConfigError, parse_hostport
from p2pllm.net.auth import HandshakeError, client_handshake
from p2pllm.wire.connection import Connection, Reply, Request, connect
from p2pllm.wire.frame import Limits

ENV_DAEMON = "P2PLLM_DAEMON"
ENV_SECRET = "P2PLLM_SECRET_FILE"


class DaemonUnavailable(Exception):
    """No daemon answered; the message says where we tried and what to do."""


def daemon_address(text: str | None) -> tuple[str, int]:
    return parse_hostport(text or os.environ.get(ENV_DAEMON) or f"127.0.0.1:{DEFAULT_PORT}")


async def _no_requests(conn: Connection, req: Request) -> Reply | None:
    return None


def read_secret(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc}") from exc


async def open_daemon(address: str | None, secret_file: str | None = None, timeout: float = 5.0) -> Connection:
    host, port = daemon_address(address)
    secret = read_secret(secret_file or os.environ.get(ENV_SECRET))
    try:
        conn = await connect(host, port, _no_requests, limits=Limits(max_payload=1 << 32), timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise DaemonUnavailable(
            f"no p2pllm daemon answered at {host}:{port} ({exc}).\n"
            f"Start one with `p2pllmd --port {port}`, or point at a running one with "
            f"--daemon HOST:PORT (or ${ENV_DAEMON})."
        ) from exc
    try:
        await client_handshake(
            conn, node_id="ctl-" + uuid.uuid4().hex[:12], name="ctl", kind="ctl", port=0, secret=secret
        )
    except (HandshakeError, TimeoutError, ConnectionError) as exc:
        conn.close()
        raise DaemonUnavailable(f"the daemon at {host}:{port} refused us: {exc}") from exc
    return conn
