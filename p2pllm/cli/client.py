"""Connecting a CLI to its daemon: address resolution, handshake, clear errors."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from p2pllm.config import DEFAULT_PORT, ConfigError, parse_hostport
from p2pllm.net.auth import HandshakeError, client_handshake
from p2pllm.wire.connection import (
    Connection,
    ConnectionClosed,
    RemoteError,
    Reply,
    Request,
    connect,
)
from p2pllm.wire.frame import Limits

ENV_DAEMON = "P2PLLM_DAEMON"
ENV_SECRET = "P2PLLM_SECRET_FILE"

T = TypeVar("T")


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
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc}") from exc
    if not data:
        raise ConfigError(f"secret file {path} is empty (make one with `p2pllm secret new`)")
    return data


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


def run_daemon_call(coro: Coroutine[Any, Any, T], what: str) -> tuple[T | None, int]:
    """Run a CLI's conversation with its daemon; failures become a message and an exit code.

    Returns (result, 0), or (None, 2) when no daemon could be used, (None, 1) when the job
    failed on the daemon's side or the daemon went away.
    """
    try:
        return asyncio.run(coro), 0
    except (DaemonUnavailable, ConfigError) as exc:
        print(f"p2pllm: {exc}", file=sys.stderr)
        return None, 2
    except RemoteError as exc:
        print(f"\np2pllm: {what} failed: {exc.message}", file=sys.stderr)
        return None, 1
    except (ConnectionClosed, TimeoutError) as exc:
        print(f"\np2pllm: lost the daemon: {exc}", file=sys.stderr)
        return None, 1
