"""mDNS discovery: announce this daemon and browse for the others (zeroconf asyncio API).

One `Discovery` per daemon. `start()` registers the service
``<name>-<node_id[:8]>._p2pllm._tcp.local.`` with TXT properties ``node_id``, ``name``,
``version`` and ``port``, then browses the same type. Every other instance is resolved into a
`PeerAddr` and handed to ``on_found`` (again whenever its address, port, name or version
changes); an instance that says goodbye (or whose records expire) is handed to ``on_lost`` by
node id. Both callbacks run on the event loop thread, must not block, and must not raise (an
exception is logged and dropped).

Everything coming off the network is validated: a malformed announcement is logged and ignored,
never raised into the daemon.

Loopback: on Linux, mDNS on ``interface="127.0.0.1"`` works without any route or flag change
even though ``lo`` has no MULTICAST flag; without an explicit interface the kernel sends
224.0.0.251 out of the default-route interface instead.

Size: one module because announcing, browsing and validating what comes back share one
zeroconf instance and one set of resolver tasks, and the validation is most of its length.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2pllm._tcp.local."

# Record TTL (seconds) for every record we announce. RFC 6762 suggests 75 min for PTR/TXT, but
# a shorter TTL makes a peer that died without a goodbye disappear from browsers within about
# this long (browsers re-query at 80..95 % of the TTL, so a live peer is never dropped).
RECORD_TTL_S = 120
# How long one resolution of a browsed instance may take, and how often it is retried.
RESOLVE_TIMEOUT_MS = 3000
RESOLVE_ATTEMPTS = 3

_MDNS_GROUP = ("224.0.0.251", 5353)
_MAX_LABEL_BYTES = 63  # one DNS label: the instance name and the host name
_MAX_NAME_BYTES = 200  # whole `name` TXT entry must fit in 255 bytes
_UNSAFE_HOST_CHARS = re.compile(r"[^A-Za-z0-9-]+")

_KEY_NODE_ID = "node_id"
_KEY_NAME = "name"
_KEY_VERSION = "version"
_KEY_PORT = "port"


@dataclass(frozen=True)
class PeerAddr:
    """Where a discovered peer listens, and who it says it is."""

    node_id: str
    name: str
    host: str
    port: int
    version: int

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("empty node_id")
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.version < 0:
            raise ValueError(f"negative protocol version: {self.version}")
        ipaddress.ip_address(self.host)  # raises ValueError


class Discovery:
    """Announce this node over mDNS and report the other nodes of the same service type."""

    def __init__(
        self,
        *,
        name: str,
        node_id: str,
        port: int,
        version: int,
        interface: str | None,
        on_found: Callable[[PeerAddr], None],
        on_lost: Callable[[str], None],
        announce_host: str | None = None,
    ) -> None:
        if not name or len(name.encode()) > _MAX_NAME_BYTES:
            raise ValueError(f"name must be 1..{_MAX_NAME_BYTES} bytes: {name!r}")
        if not node_id or len(node_id.encode()) > _MAX_NAME_BYTES:
            raise ValueError(f"node_id must be 1..{_MAX_NAME_BYTES} bytes: {node_id!r}")
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        if version < 0:
            raise ValueError(f"negative protocol version: {version}")
        if interface is not None:
            ipaddress.ip_address(interface)  # raises ValueError
        if announce_host is not None:
            ipaddress.ip_address(announce_host)
        self._name = name
        self._node_id = node_id
        self._port = port
        self._version = version
        self._interface = interface
        self._announce_host = announce_host
        self._on_found = on_found
        self._on_lost = on_lost
        label = _instance_label(name, node_id)
        self._instance = f"{label}.{SERVICE_TYPE}"
        self._server = f"{_UNSAFE_HOST_CHARS.sub('-', label).strip('-') or 'p2pllm'}.local."

        self._lock = asyncio.Lock()
        self._started = False
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aiozc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._registered = False
        self._browser: AsyncServiceBrowser | None = None
        self._announcing: asyncio.Future[object] | None = None  # zeroconf's announce broadcasts
        self._tasks: set[asyncio.Task[None]] = set()  # every resolver task, live or cancelled
        self._resolvers: dict[str, asyncio.Task[None]] = {}  # instance name -> live resolver
        self._stale: set[str] = set()  # instances updated while their resolver ran
        self._peers: dict[str, PeerAddr] = {}  # instance name -> last reported address

    # -- public -------------------------------------------------------------------------------

    @property
    def instance_name(self) -> str:
        """Our full service instance name (may gain a ``-2`` suffix on a name conflict)."""
        return self._info.name if self._info is not None else self._instance

    def peers(self) -> list[PeerAddr]:
        """Snapshot of the peers currently known (reported by on_found and not yet lost)."""
        return list(self._peers.values())

    async def start(self) -> None:
        """Register our service and start browsing; returns once our name is claimed."""
        async with self._lock:
            if self._started or self._stopped:
                raise RuntimeError("Discovery.start() may be called once, before stop()")
            self._started = True
            self._loop = asyncio.get_running_loop()
            try:
                await self._open()
            except BaseException:
                await self._close()
                raise

    async def stop(self) -> None:
        """Send goodbye, stop browsing and close zeroconf. Safe to call more than once."""
        async with self._lock:
            if self._stopped:
                return
            self._stopped = True
            await self._close()

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- lifecycle ----------------------------------------------------------------------------

    async def _open(self) -> None:
        # 1. Sockets: one interface (tests, --interface) or all of them, IPv4.
        host = self._announce_host or self._interface or _primary_address()
        if self._interface is not None:
            _check_local_address(self._interface)
            self._aiozc = AsyncZeroconf(interfaces=[self._interface])
        else:
            self._aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        zc = self._aiozc.zeroconf

        # 2. Browse first: peers are reported while our name probe (below) is still running.
        self._browser = AsyncServiceBrowser(
            zc, SERVICE_TYPE, handlers=[self._on_service_state_change]
        )

        # 3. Register: probe for the name (about 1 s), then announce in the background.
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            self._instance,
            port=self._port,
            properties={
                _KEY_NODE_ID: self._node_id,
                _KEY_NAME: self._name,
                _KEY_VERSION: str(self._version),
                _KEY_PORT: str(self._port),
            },
            server=self._server,
            host_ttl=RECORD_TTL_S,
            other_ttl=RECORD_TTL_S,
            parsed_addresses=[host],
        )
        announcing = await self._aiozc.async_register_service(self._info, allow_name_change=True)
        self._registered = True
        self._announcing = asyncio.ensure_future(announcing)
        log.info(
            "mDNS: announcing %s at %s:%d (interface %s)",
            self._info.name,
            host,
            self._port,
            self._interface or "all",
        )

    async def _close(self) -> None:
        aiozc, browser, info = self._aiozc, self._browser, self._info
        self._aiozc = self._browser = None
        # 1. Stop browsing and resolving: no callback fires after this.
        if browser is not None:
            await browser.async_cancel()
        resolvers = list(self._tasks)
        for task in resolvers:
            task.cancel()
        await asyncio.gather(*resolvers, return_exceptions=True)
        self._tasks.clear()
        self._resolvers.clear()
        self._stale.clear()
        # 2. Stop the announcements, then say goodbye.
        if self._announcing is not None:
            await _cancel_and_wait(self._announcing)
            self._announcing = None
        if aiozc is None:
            return
        try:
            if info is not None and self._registered:
                self._registered = False
                goodbye = await aiozc.async_unregister_service(info)
                await goodbye
        except Exception:
            log.warning("mDNS: goodbye for %s failed", self.instance_name, exc_info=True)
        finally:
            # 3. Close sockets (also unregisters anything left).
            await aiozc.async_close()
        log.info("mDNS: stopped %s", self.instance_name)

    # -- browsing -----------------------------------------------------------------------------

    def _on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """zeroconf handler: AsyncServiceBrowser calls it on the zeroconf loop (ours)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            on_our_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_our_loop = False
        if on_our_loop:
            self._handle_change(name, state_change)
        else:
            loop.call_soon_threadsafe(self._handle_change, name, state_change)

    def _handle_change(self, name: str, state_change: ServiceStateChange) -> None:
        if self._browser is None or name.lower() == self.instance_name.lower():
            return
        log.debug("mDNS: %s %s", state_change.name, name)
        if state_change is ServiceStateChange.Removed:
            task = self._resolvers.pop(name, None)
            if task is not None:
                task.cancel()
            self._stale.discard(name)
            self._forget(name)
            return
        # Added or Updated: (re)resolve; a running resolver picks the update up when it ends.
        task = self._resolvers.get(name)
        if task is not None and not task.done():
            self._stale.add(name)
            return
        assert self._loop is not None
        task = self._loop.create_task(self._resolve_loop(name), name=f"mdns-resolve:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._resolvers[name] = task

    async def _resolve_loop(self, name: str) -> None:
        try:
            while True:
                self._stale.discard(name)
                peer = await self._resolve(name)
                if peer is not None:
                    self._found(name, peer)
                if name not in self._stale:
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("mDNS: resolving %s failed", name, exc_info=True)
        finally:
            if self._resolvers.get(name) is asyncio.current_task():
                del self._resolvers[name]

    async def _resolve(self, name: str) -> PeerAddr | None:
        aiozc = self._aiozc
        if aiozc is None:
            return None
        for attempt in range(1, RESOLVE_ATTEMPTS + 1):
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
                try:
                    return _peer_from_info(info)
                except ValueError as exc:
                    log.warning("mDNS: ignoring malformed announcement %s: %s", name, exc)
                    return None
            log.debug("mDNS: %s did not resolve (attempt %d)", name, attempt)
        log.info("mDNS: gave up resolving %s", name)
        return None

    def _found(self, name: str, peer: PeerAddr) -> None:
        if peer.node_id == self._node_id:
            return  # our own announcement (e.g. after a rename)
        if self._peers.get(name) == peer:
            return
        self._peers[name] = peer
        log.info(
            "mDNS: found %s (%s) at %s:%d v%d",
            peer.name,
            peer.node_id,
            peer.host,
            peer.port,
            peer.version,
        )
        _call_safely(self._on_found, peer)

    def _forget(self, name: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is None:
            return
        if any(p.node_id == peer.node_id for p in self._peers.values()):
            return  # the same node is still announced under another instance name
        log.info("mDNS: lost %s (%s)", peer.name, peer.node_id)
        _call_safely(self._on_lost, peer.node_id)


# -- helpers ----------------------------------------------------------------------------------


def _instance_label(name: str, node_id: str) -> str:
    """``<name>-<node_id[:8]>`` cut to one DNS label; dots would split the label, so no dots."""
    suffix = "-" + node_id[:8].replace(".", "-")
    head = name.replace(".", "-").encode()[: _MAX_LABEL_BYTES - len(suffix.encode())]
    return head.decode(errors="ignore") + suffix


def _peer_from_info(info: AsyncServiceInfo) -> PeerAddr:
    props = info.decoded_properties
    node_id = props.get(_KEY_NODE_ID)
    version = props.get(_KEY_VERSION)
    if not node_id or version is None:
        raise ValueError("missing node_id or version in TXT")
    addresses = info.parsed_addresses(IPVersion.V4Only) or info.parsed_addresses(IPVersion.V6Only)
    if not addresses:
        raise ValueError("no address")
    port = info.port if info.port else int(props.get(_KEY_PORT) or 0)
    return PeerAddr(
        node_id=node_id,
        name=props.get(_KEY_NAME) or node_id,
        host=addresses[0],  # most recently announced first
        port=port,
        version=int(version),
    )


def _call_safely(callback: Callable[..., None], *args: object) -> None:
    try:
        callback(*args)
    except Exception:
        log.warning("mDNS: callback %r failed", callback, exc_info=True)


async def _cancel_and_wait(fut: Awaitable[object]) -> None:
    task = asyncio.ensure_future(fut)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _check_local_address(address: str) -> None:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as exc:
            raise OSError(exc.errno, f"mDNS interface {address} is not a local address") from exc


def _primary_address() -> str:
    """The address this host sends mDNS multicast from (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(_MDNS_GROUP)
            return str(sock.getsockname()[0])
        except OSError:
            return "127.0.0.1"
