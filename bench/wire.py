"""Wire benchmark: p2pllm Connection plain and sealed vs a plain asyncio echo, same payloads,
same loopback.

Prints one JSON object. A server process hosts three echo servers (our Connection with plain
frames, our Connection with sealed frames as after a handshake with a secret (protocol.md
6.3), and a plain asyncio StreamReader/StreamWriter server speaking a 4-byte length prefix);
the client process measures, side by side in one run, interleaved in rounds:
- round-trip time of a small request (16-byte body),
- throughput of a 4 MiB tensor frame echoed back (so bytes cross loopback both ways; sealed:
  each echo is sealed and opened twice).

    python bench/wire.py [--iters 2000] [--mib 4] [--reps 30] [--loop uvloop|asyncio] [--pin]

--pin puts the server process on the last usable core and the client on the first (taskset
style, os.sched_setaffinity), so neither side migrates between cores mid-measurement; both
contenders share the same two processes, so pinning treats them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from p2pllm.wire.connection import Connection, Reply, Request, connect, serve
from p2pllm.wire.frame import Limits
from p2pllm.wire.messages import MsgType
from p2pllm.wire.seal import HAS_INPLACE
from p2pllm.wire.tensors import tensor_meta, unpack_tensors

LIMITS = Limits(max_payload=1 << 30)


def use_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def echo_handler(conn: Connection, req: Request) -> Reply:
    # Echo the tensors back: descriptors and payload (views, no copy).
    return Reply(MsgType.LINK_PROBE, req.meta, [req.frame.payload] if req.frame.payload.nbytes else [])


async def plain_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            n = struct.unpack("!I", await reader.readexactly(4))[0]
            data = await reader.readexactly(n)
            writer.write(struct.pack("!I", n) + data)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def pin(which: str) -> list[int] | None:
    """Pin this process to one core: the first usable for the client, the last for the server."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[0] if which == "client" else cores[-1]
    os.sched_setaffinity(0, {core})
    return [core]


def server_main(loop_kind: str, ports: mp.Queue, pinned: bool, keys: tuple[bytes, bytes]) -> None:  # type: ignore[type-arg]
    if pinned:
        pin("server")
    use_loop(loop_kind)
    k_c2s, k_s2c = keys

    async def run() -> None:
        ours = await serve("127.0.0.1", 0, echo_handler, lambda c: None, limits=LIMITS)
        sealed = await serve("127.0.0.1", 0, echo_handler, lambda c: c.enable_sealing(k_s2c, k_c2s),
                             limits=LIMITS)
        plain = await asyncio.start_server(plain_echo, "127.0.0.1", 0, limit=1 << 24)
        ports.put(tuple(s.sockets[0].getsockname()[1] for s in (ours, sealed, plain)))
        await asyncio.Event().wait()

    asyncio.run(run())


async def no_requests(conn: Connection, req: Request) -> None:
    return None


async def bench(
    ports: tuple[int, int, int], keys: tuple[bytes, bytes], iters: int, mib: int, reps: int
) -> dict[str, object]:
    port_ours, port_sealed, port_plain = ports
    conn = await connect("127.0.0.1", port_ours, no_requests, limits=LIMITS)
    sconn = await connect("127.0.0.1", port_sealed, no_requests, limits=LIMITS)
    sconn.enable_sealing(*keys)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_plain, limit=1 << 24)
    small = b"x" * 16
    tensor = torch.randn(mib * (1 << 20) // 4)  # float32

    async def ours_small() -> None:
        await conn.request(MsgType.LINK_PROBE, {"b": small})

    async def sealed_small() -> None:
        await sconn.request(MsgType.LINK_PROBE, {"b": small})

    async def plain_small() -> None:
        writer.write(struct.pack("!I", len(small)) + small)
        await writer.drain()
        n = struct.unpack("!I", await reader.readexactly(4))[0]
        await reader.readexactly(n)

    async def ours_big() -> None:
        meta, bufs = tensor_meta({"x": tensor})
        frame = await conn.request(MsgType.LINK_PROBE, meta, bufs)
        out = unpack_tensors(frame.meta["tensors"], frame.payload)["x"]
        assert out.numel() == tensor.numel()

    async def sealed_big() -> None:
        meta, bufs = tensor_meta({"x": tensor})
        frame = await sconn.request(MsgType.LINK_PROBE, meta, bufs)
        out = unpack_tensors(frame.meta["tensors"], frame.payload)["x"]
        assert out.numel() == tensor.numel()

    async def plain_big() -> None:
        # The fair plain baseline: the tensor's bytes out, bytes back, rebuilt as a tensor.
        data = tensor.numpy().tobytes()
        writer.write(struct.pack("!I", len(data)) + data)
        await writer.drain()
        n = struct.unpack("!I", await reader.readexactly(4))[0]
        back = await reader.readexactly(n)
        out = torch.frombuffer(bytearray(back), dtype=torch.float32)
        assert out.numel() == tensor.numel()

    async def timeit(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
        for _ in range(max(3, n // 20)):
            await fn()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - t0)
        return out

    # Interleave the two contenders in rounds so drift on a noisy machine hits both alike.
    rtt_ours: list[float] = []
    rtt_sealed: list[float] = []
    rtt_plain: list[float] = []
    big_ours: list[float] = []
    big_sealed: list[float] = []
    big_plain: list[float] = []
    rounds = 5
    for _ in range(rounds):
        rtt_ours += await timeit(ours_small, iters // rounds)
        rtt_sealed += await timeit(sealed_small, iters // rounds)
        rtt_plain += await timeit(plain_small, iters // rounds)
        big_ours += await timeit(ours_big, max(1, reps // rounds))
        big_sealed += await timeit(sealed_big, max(1, reps // rounds))
        big_plain += await timeit(plain_big, max(1, reps // rounds))
    # The same tensor's bytes really crossed sealed (the sealed server opened and resealed).
    assert sconn.sealed and sconn.bytes_in > len(big_sealed) * tensor.numel() * 4
    conn.close()
    sconn.close()
    writer.close()
    nbytes = tensor.numel() * 4

    def mbps(ts: list[float]) -> float:
        # Bytes moved each way per echo, over the median echo time.
        return round(2 * nbytes / statistics.median(ts) / 1e6, 1)

    r_ours = statistics.median(rtt_ours) * 1e6
    r_sealed = statistics.median(rtt_sealed) * 1e6
    r_plain = statistics.median(rtt_plain) * 1e6
    t_ours, t_sealed, t_plain = mbps(big_ours), mbps(big_sealed), mbps(big_plain)
    return {
        "small_rtt_us": {
            "p2pllm_connection": round(r_ours, 1),
            "p2pllm_sealed": round(r_sealed, 1),
            "plain_asyncio_echo": round(r_plain, 1),
            "ratio_ours_over_plain": round(r_ours / r_plain, 3),
            "ratio_sealed_over_ours": round(r_sealed / r_ours, 3),
            "p2pllm_p90": round(statistics.quantiles(rtt_ours, n=10)[-1] * 1e6, 1),
            "sealed_p90": round(statistics.quantiles(rtt_sealed, n=10)[-1] * 1e6, 1),
            "plain_p90": round(statistics.quantiles(rtt_plain, n=10)[-1] * 1e6, 1),
        },
        f"tensor_{mib}MiB_echo_MBps": {
            "p2pllm_connection": t_ours,
            "p2pllm_sealed": t_sealed,
            "plain_asyncio_echo": t_plain,
            "ratio_ours_over_plain": round(t_ours / t_plain, 3),
            "ratio_sealed_over_ours": round(t_sealed / t_ours, 3),
        },
        "sealed": {"cipher": "AES-256-GCM", "in_place": HAS_INPLACE},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--pin", action="store_true", help="server on the last core, client on the first")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    keys = (os.urandom(32), os.urandom(32))  # (client to server, server to client)
    server = ctx.Process(target=server_main, args=(args.loop, ports, args.pin, keys), daemon=True)
    server.start()
    try:
        got = ports.get(timeout=60)
        if args.pin:
            pin("client")
        use_loop(args.loop)
        result = asyncio.run(bench(got, keys, args.iters, args.mib, args.reps))
    finally:
        server.terminate()
    cores = sorted(os.sched_getaffinity(0))
    print(json.dumps({"bench": "wire", "loop": args.loop, "iters": args.iters, "pinned": args.pin,
                      "usable_cores": len(cores), "loadavg": [round(x, 2) for x in os.getloadavg()],
                      **result}, indent=2))


if __name__ == "__main__":
    main()
