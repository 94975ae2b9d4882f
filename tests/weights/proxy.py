"""A userspace TCP proxy for tests and benchmarks (there is no `tc netem` here).

It forwards both directions of every connection it accepts to one upstream address, and can:
- limit bandwidth (bytes/s per direction, a token bucket shared by all its connections: one
  "link") and add latency (each chunk is delivered `latency` seconds after it arrived, without
  stalling the chunks behind it);
- follow the p2pllm frames of protocol.md section 2 in both directions (also through a sealed
  handshake: after a `HELLO` answer with `"auth": true` the server's frames, after the `AUTH`
  frame the client's, carry a 16-byte tag) and count them by type;
- corrupt: flip one byte in the middle of the payload of `WEIGHTS_READ` response frames (type
  0x0601 with the RESPONSE flag), never in a header or in metadata;
- pause and resume forwarding (also by itself: `pause_when`, checked after each write, e.g.
  right after the first WEIGHTS_READ answer went through), drop every connection.

Counters (read them any time): bytes forwarded per direction ("c2s": client to upstream,
"s2c": upstream to client), frames per direction, frames and payload bytes per (direction,
type, is_response), the corrupted frames. Frames are counted as they are written on, so a count
is what the other side has been handed.

    proxy = await Proxy(upstream_port, rate=1_000_000).start()   # in an event loop
    ...dial 127.0.0.1:proxy.port...
    await proxy.wait(lambda p: p.frames_of(WEIGHTS_READ, "s2c") >= 1, timeout=20)
    await proxy.stop()

    with ProxyThread(upstream_port, rate=...) as proxy:         # its own loop in a thread
        ...

    python tests/weights/proxy.py --upstream 127.0.0.1:PORT [--rate BYTES_PER_S]
        [--latency S] [--corrupt N]      # prints "PORT n"; on SIGTERM/SIGINT one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

if __name__ == "__main__":  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from p2pllm.wire.frame import HEADER, HEADER_SIZE, MAGIC, PROTOCOL_VERSION
from p2pllm.wire.messages import Flags, MsgType

WEIGHTS_READ = 0x0601  # protocol.md section 13
TAG = 16  # AES-GCM tag after a sealed frame's body (protocol.md 6.3)
CHUNK = 256 * 1024  # bytes read from a socket at a time
QUEUE = 16  # chunks read ahead per direction (4 MiB): a throttled sender feels the limit
C2S, S2C = "c2s", "s2c"


@dataclass(frozen=True)
class Flip:
    """One byte the proxy flipped: where (direction, frame type, request id, offset in the
    frame's payload, the payload's length)."""

    direction: str
    msg_type: int
    request_id: int
    offset: int
    payload_len: int


class Bucket:
    """A token bucket: `rate` bytes/s (None: unlimited), at most `burst` bytes at once.
    Concurrent takers queue behind each other's debt."""

    def __init__(self, rate: float | None, burst: int | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = 0.0
        self._last = time.monotonic()

    def _cap(self) -> float:
        assert self.rate is not None
        return float(self.burst) if self.burst is not None else max(16384.0, self.rate / 100)

    def slice_size(self) -> int:
        """The most bytes to write in one go (about 10 ms of the rate)."""
        return CHUNK if self.rate is None else max(1024, min(CHUNK, int(self._cap())))

    async def take(self, n: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        self._tokens = min(self._cap(), self._tokens + (now - self._last) * self.rate) - n
        self._last = now
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


class FrameParser:
    """Follows the frame boundaries of one direction of a p2pllm connection, chunk by chunk,
    and flips the byte the proxy asks for in the payloads it picks. Stops following (`ok`
    False) at bytes that are not a frame header of protocol version 1 (not p2pllm)."""

    def __init__(self, proxy: Proxy, direction: str) -> None:
        self.proxy = proxy
        self.direction = direction
        self.ok = True
        self.sealed = False
        self._head = bytearray()
        self._cur: tuple[int, int, int, int, int] | None = None  # type, flags, rid, meta, payload
        self._meta = bytearray()
        self._keep_meta = False
        self._meta_left = self._payload_left = self._tag_left = 0
        self._payload_pos = 0
        self._flip_at = -1

    def feed(self, data: bytes) -> bytes | bytearray:
        out: bytes | bytearray = data
        i, n = 0, len(data)
        while i < n and self.ok:
            if self._cur is None:
                take = min(HEADER_SIZE - len(self._head), n - i)
                self._head += data[i:i + take]
                i += take
                if len(self._head) == HEADER_SIZE:
                    self._start()
            elif self._meta_left:
                take = min(self._meta_left, n - i)
                if self._keep_meta:
                    self._meta += data[i:i + take]
                self._meta_left -= take
                i += take
            elif self._payload_left:
                take = min(self._payload_left, n - i)
                if self._payload_pos <= self._flip_at < self._payload_pos + take:
                    out = out if isinstance(out, bytearray) else bytearray(out)
                    out[i + self._flip_at - self._payload_pos] ^= 0xFF
                    self._flipped()
                self._payload_pos += take
                self._payload_left -= take
                i += take
            else:
                take = min(self._tag_left, n - i)
                self._tag_left -= take
                i += take
            if self._cur is not None and not (self._meta_left or self._payload_left or self._tag_left):
                self._finish()
        return out

    def _start(self) -> None:
        magic, version, msg_type, flags, _r, rid, meta_len, payload_len = HEADER.unpack(self._head)
        self._head.clear()
        if magic != MAGIC or version != PROTOCOL_VERSION:
            self.ok = False
            self.proxy.unparsed += 1
            return
        self._cur = (msg_type, flags, rid, meta_len, payload_len)
        self._meta_left, self._payload_left = meta_len, payload_len
        self._tag_left = TAG if self.sealed else 0
        self._payload_pos = 0
        self._keep_meta = not self.sealed and msg_type == MsgType.HELLO and bool(flags & Flags.RESPONSE)
        self._meta.clear()
        is_response = bool(flags & Flags.RESPONSE)
        self._flip_at = -1
        if msg_type == WEIGHTS_READ and is_response and payload_len and self.proxy._take_corrupt():
            self._flip_at = payload_len // 2

    def _flipped(self) -> None:
        assert self._cur is not None
        msg_type, _flags, rid, _m, payload_len = self._cur
        self.proxy.flips.append(Flip(self.direction, msg_type, rid, self._flip_at, payload_len))
        self._flip_at = -1

    def _finish(self) -> None:
        assert self._cur is not None
        msg_type, flags, _rid, _m, payload_len = self._cur
        self._cur = None
        key = (self.direction, msg_type, bool(flags & Flags.RESPONSE))
        p = self.proxy
        p.frames[self.direction] += 1
        p.frame_types[key] += 1
        p.payload_bytes[key] += payload_len
        # Sealing starts here (protocol.md 6.3): the server's frames after its HELLO answer
        # with "auth": true, the client's after its AUTH frame.
        if self._keep_meta:
            with contextlib.suppress(Exception):
                if msgpack.unpackb(bytes(self._meta)).get("auth") is True:
                    self.sealed = True
        if self.direction == C2S and msg_type == MsgType.AUTH and not flags & Flags.RESPONSE:
            self.sealed = True
        p._changed()


class Proxy:
    """Accepts on host:port (0: any free port) and forwards each connection to upstream."""

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate: float | None = None,
        latency: float = 0.0,
        corrupt: float = 0,
        parse: bool = True,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host, self.port = host, port
        self.buckets = {C2S: Bucket(rate), S2C: Bucket(rate)}
        self.latency = latency
        self.parse = parse
        self._corrupt_left = corrupt
        self.bytes: Counter[str] = Counter()
        self.frames: Counter[str] = Counter()
        self.frame_types: Counter[tuple[str, int, bool]] = Counter()
        self.payload_bytes: Counter[tuple[str, int, bool]] = Counter()
        self.flips: list[Flip] = []
        self.unparsed = 0  # directions whose bytes stopped looking like p2pllm frames
        self.accepted = 0
        self.failed_upstream = 0  # accepted connections whose upstream could not be dialed
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._event = asyncio.Event()
        # checked after each write: once it returns true the proxy pauses (and forgets it)
        self.pause_when: Callable[[Proxy], bool] | None = None

    # -- control ---------------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        return self.buckets[S2C].rate

    @rate.setter
    def rate(self, value: float | None) -> None:
        for b in self.buckets.values():
            b.rate = value

    def corrupt(self, count: float = math.inf) -> None:
        """Flip one byte in each of the next `count` WEIGHTS_READ responses (inf: all; 0: stop)."""
        self._corrupt_left = count

    def pause(self) -> None:
        """Hold every byte (both directions) until resume(); connections stay open."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    def drop(self) -> None:
        """Abort every open connection (both sockets), as a broken link would."""
        for down, up in list(self._conns):
            down.transport.abort()
            up.transport.abort()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def frames_of(self, msg_type: int, direction: str = S2C, response: bool = True) -> int:
        return self.frame_types[(direction, msg_type, response)]

    def payload_of(self, msg_type: int, direction: str = S2C, response: bool = True) -> int:
        """Payload bytes of the complete frames of that kind forwarded so far."""
        return self.payload_bytes[(direction, msg_type, response)]

    def stats(self) -> dict[str, Any]:
        return {
            "bytes": dict(self.bytes), "frames": dict(self.frames),
            "frame_types": {f"{d}:{t:#06x}:{'resp' if r else 'req'}": n
                            for (d, t, r), n in sorted(self.frame_types.items())},
            "payload_bytes": {f"{d}:{t:#06x}:{'resp' if r else 'req'}": n
                              for (d, t, r), n in sorted(self.payload_bytes.items())},
            "flips": len(self.flips), "accepted": self.accepted, "open": self.open_connections,
            "unparsed": self.unparsed, "failed_upstream": self.failed_upstream,
        }

    async def wait(self, predicate: Callable[[Proxy], Any], timeout: float = 20.0, what: str = "") -> Any:
        """Wait until predicate(self) is truthy (checked on every frame forwarded, and every
        0.05 s for byte counts), or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while not (value := predicate(self)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"proxy: timed out after {timeout}s waiting for {what or predicate}; {self.stats()}")
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), min(left, 0.05))
        return value

    def _changed(self) -> None:
        self._event.set()

    def _take_corrupt(self) -> bool:
        if self._corrupt_left <= 0:
            return False
        self._corrupt_left -= 1
        return True

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Proxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- forwarding ----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                self.failed_upstream += 1
                writer.transport.abort()
                return
            pair = (writer, up_writer)
            self._conns.add(pair)
            self._changed()
            try:
                await asyncio.gather(self._pump(reader, up_writer, C2S, pair), self._pump(up_reader, writer, S2C, pair))
            except asyncio.CancelledError:
                pass  # stop(): the connection goes with the proxy (asyncio's accept callback
                # would log a cancelled task as an error)
            finally:
                self._conns.discard(pair)
                for w in pair:
                    w.transport.abort()
                self._changed()
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        """Read chunks as they come; a second task delivers each at arrival + latency, paced by
        the bucket, parsing (and maybe corrupting) just before it writes. An end of file is
        passed on as one (half-close); a failed write aborts both sockets."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=QUEUE)
        parser = FrameParser(self, direction) if self.parse else None
        bucket = self.buckets[direction]

        async def deliver() -> None:
            broken = False
            while (item := await queue.get()) is not None:
                if broken:  # keep taking what the reader queues until it sees the abort
                    continue
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)  # the configured latency, not a stand-in for an event
                step = bucket.slice_size()
                for i in range(0, len(data), step):
                    part = data[i:i + step]
                    await self._open.wait()
                    await bucket.take(len(part))
                    out = parser.feed(part) if parser is not None and parser.ok else part
                    try:
                        writer.write(out)
                        await writer.drain()
                    except (OSError, ConnectionError):
                        for w in pair:
                            w.transport.abort()
                        broken = True
                        break
                    self.bytes[direction] += len(part)
                    if self.pause_when is not None and self.pause_when(self):
                        self.pause_when = None
                        self.pause()
                    self._changed()
            if not broken and writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                if not data or sender.done():
                    break
                await queue.put((time.monotonic() + self.latency, data))
            if not sender.done():
                await queue.put(None)
            with contextlib.suppress(OSError, ConnectionError):
                await sender
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender


class ProxyThread:
    """A Proxy on its own event loop in a daemon thread, for synchronous code (a test that
    blocks on a subprocess, a benchmark). Its counters are read directly (`.proxy.bytes`...);
    `call(fn, *args)` runs a control method on the proxy's loop."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", **kwargs: Any) -> None:
        self._args = (upstream_port, upstream_host)
        self._kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="proxy", daemon=True)
        self.proxy: Proxy

    def start(self) -> ProxyThread:
        self._thread.start()

        async def make() -> Proxy:
            return await Proxy(*self._args, **self._kwargs).start()

        self.proxy = asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)
        return self

    @property
    def port(self) -> int:
        return self.proxy.port

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def wait(self, predicate: Callable[[Proxy], Any], timeout: float = 20.0, what: str = "") -> Any:
        return asyncio.run_coroutine_threadsafe(self.proxy.wait(predicate, timeout, what), self.loop).result(timeout + 5)

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rate", type=float, default=None, help="bytes/s per direction (default: unlimited)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to each direction")
    ap.add_argument("--corrupt", type=float, default=0, help="WEIGHTS_READ responses to corrupt (inf: all)")
    ap.add_argument("--no-parse", action="store_true", help="forward bytes without following frames")
    args = ap.parse_args()
    host, _, port = args.upstream.rpartition(":")

    async def run() -> None:
        proxy = await Proxy(int(port), host or "127.0.0.1", host=args.host, port=args.port,
                            rate=args.rate, latency=args.latency, corrupt=args.corrupt,
                            parse=not args.no_parse).start()
        print(f"PORT {proxy.port}", flush=True)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        stats = proxy.stats()
        await proxy.stop()
        print(json.dumps(stats), flush=True)

    asyncio.run(run())


if __name__ == "__main__":
    main()
