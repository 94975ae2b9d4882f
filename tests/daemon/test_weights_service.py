"""The daemon's weights service (protocol.md 13, issue 16) through real p2pllmd processes on
loopback: a peer reads a model's manifest and pieces (the bytes are the file's), names outside
the roots and paths are refused, a read over the cap is OVER_LIMIT, a ctl client cannot read
pieces and a peer cannot pull; ``p2pllm models fetch`` (a subprocess) fetches one slice from a
peer into the models cache, writing only that slice's pieces (st_blocks), and a second fetch of
the same slice fetches nothing. The model is a copy of the bundled shakespeare under another
name (every daemon has the bundled models)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pllm.daemon.messages import WEIGHTS_MANIFEST_REPLY
from p2pllm.weights.manifest import Manifest, build_manifest
from p2pllm.weights.slices import Need, pieces_for
from p2pllm.weights.store import JOURNAL
from p2pllm.wire.connection import RemoteError
from p2pllm.wire.frame import encode_frame
from p2pllm.wire.messages import ErrorCode, MsgType
from tests.conftest import BUNDLED, BUNDLED_DRAFT, REPO, wait_for

MODEL = "bard"
T = 30.0


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(BUNDLED, root / MODEL)
    outside = tmp_path / "outside"
    shutil.copytree(BUNDLED_DRAFT, outside / "private")
    (root / "escape").symlink_to(outside / "private")  # a link out of the roots
    big = root / "big"  # a 20 MiB non-tensor file: five 4 MiB pieces
    big.mkdir()
    shutil.copy(BUNDLED / "config.json", big / "config.json")
    with open(big / "blob.bin", "wb") as fh:
        fh.truncate(20 << 20)
    return root


def source(daemons: Any, tmp_path: Path, models: Path) -> Any:
    return daemons("src", "--no-mdns", "--models-dir", str(models), "--state-dir",
                   str(tmp_path / "src-state"))


async def manifest_of(conn: Any, model: str) -> tuple[Manifest, dict[str, Any]]:
    frame = await conn.request(MsgType.WEIGHTS_MANIFEST, {"model": model}, timeout=T)
    m = WEIGHTS_MANIFEST_REPLY.parse(frame.meta)
    return Manifest.from_wire(m["manifest"]), m


async def read(conn: Any, man: Manifest, ids: list[int]) -> Any:
    return await conn.request(MsgType.WEIGHTS_READ, {"model": man.model, "digest": man.digest,
                                                     "pieces": ids}, timeout=T)


async def refused(coro: Any) -> RemoteError:
    with pytest.raises(RemoteError) as err:
        await coro
    return err.value


async def test_a_peer_reads_the_manifest_and_pieces_equal_to_the_files(
        daemons: Any, tmp_path: Path, models: Path, peer: Any, ctl: Any) -> None:
    d = source(daemons, tmp_path, models)
    conn = await peer(d.port)
    man, m = await manifest_of(conn, MODEL)
    assert m["digest"] == man.digest == build_manifest(models / MODEL, MODEL).digest
    assert {f.name for f in man.files} >= {"config.json", "model.safetensors", "tokenizer.json"}
    ids = [p.id for p in man.pieces]
    got = await read(conn, man, ids)
    assert list(got.meta["pieces"]) == ids
    assert list(got.meta["lengths"]) == [p.length for p in man.pieces]
    at = 0
    payload = bytes(got.payload)
    assert len(payload) == man.total_bytes
    for p in man.pieces:
        with open(models / MODEL / man.files[p.file].name, "rb") as fh:
            fh.seek(p.offset)
            want = fh.read(p.length)
        assert payload[at:at + p.length] == want, p
        assert hashlib.sha256(want).hexdigest() == p.sha256
        at += p.length
    part = await read(conn, man, [ids[-1], ids[0]])  # any order, answered in the order asked
    assert bytes(part.payload) == payload[-man.pieces[-1].length:] + payload[:man.pieces[0].length]
    status = (await (await ctl(d.port)).request(MsgType.STATUS, {}, timeout=T)).meta
    assert status["served_bytes"] == man.total_bytes + man.pieces[-1].length + man.pieces[0].length


async def test_refusals_are_typed_and_the_daemon_goes_on(
        daemons: Any, tmp_path: Path, models: Path, peer: Any, ctl: Any) -> None:
    d = source(daemons, tmp_path, models)
    conn = await peer(d.port)
    for name in ("escape", "../outside/private", str(tmp_path / "outside" / "private"),
                 str(models / MODEL), "/etc", f"{MODEL}/../escape"):
        err = await refused(conn.request(MsgType.WEIGHTS_MANIFEST, {"model": name}, timeout=T))
        assert err.code == ErrorCode.FORBIDDEN, (name, err)
    err = await refused(conn.request(MsgType.WEIGHTS_MANIFEST, {"model": "nosuch"}, timeout=T))
    assert err.code == ErrorCode.NOT_FOUND and "looked under" in err.message
    man, _ = await manifest_of(conn, MODEL)
    stale = await refused(conn.request(MsgType.WEIGHTS_READ, {
        "model": MODEL, "digest": "0" * 64, "pieces": [0]}, timeout=T))
    assert stale.code == ErrorCode.BAD_REQUEST and "changed at the source" in stale.message
    for ids in ([len(man.pieces)], [0, 0]):
        err = await refused(read(conn, man, ids))
        assert err.code == ErrorCode.BAD_REQUEST, (ids, err)
    big, _ = await manifest_of(conn, "big")
    blob = [p.id for p in big.pieces if big.files[p.file].name == "blob.bin"]
    assert len(blob) == 5 and big.nbytes(blob) == 20 << 20
    over = await refused(read(conn, big, blob))
    assert over.code == ErrorCode.OVER_LIMIT and "16777216" in over.message
    ok = await read(conn, big, blob[:1])
    assert bytes(ok.payload) == bytes(4 << 20)  # the sparse file reads as zeros
    # a ctl client reads no pieces; a peer cannot make this host fetch
    c = await ctl(d.port)
    err = await refused(c.request(MsgType.WEIGHTS_READ, {"model": MODEL, "digest": man.digest,
                                                         "pieces": [0]}, timeout=T))
    assert err.code == ErrorCode.FORBIDDEN and "only client requests" in err.message
    err = await refused(c.request(MsgType.WEIGHTS_MANIFEST, {"model": MODEL}, timeout=T))
    assert err.code == ErrorCode.FORBIDDEN
    err = await refused(conn.request(MsgType.WEIGHTS_PULL, {"model": MODEL}, timeout=T))
    assert err.code == ErrorCode.FORBIDDEN and "only a ctl client" in err.message
    status = (await c.request(MsgType.STATUS, {}, timeout=T)).meta
    assert status["served_bytes"] == 4 << 20
    assert not (tmp_path / "src-state" / "models-cache").exists()


async def test_a_manifest_over_max_meta_is_refused_not_sent(
        daemons: Any, tmp_path: Path, models: Path, peer: Any) -> None:
    """A manifest whose meta would not fit max_meta is OVER_LIMIT, and the link stays up (a
    reader with the same max_meta would have closed the connection on the frame)."""
    cfg = tmp_path / "small-meta.yaml"
    cfg.write_text("max_meta: 4096\n")
    d = daemons("tight", "--no-mdns", "--models-dir", str(models), "--state-dir",
                str(tmp_path / "tight-state"), "--config", str(cfg))
    conn = await peer(d.port)
    err = await refused(conn.request(MsgType.WEIGHTS_MANIFEST, {"model": MODEL}, timeout=T))
    assert err.code == ErrorCode.OVER_LIMIT and "config key max_meta" in err.message
    man, _ = await manifest_of(conn, "big")  # 6 pieces: fits
    assert len(man.pieces) == 6 and not conn.closed


async def test_a_reader_that_takes_no_answers_does_not_grow_the_server(
        daemons: Any, tmp_path: Path, models: Path, peer: Any) -> None:
    """A peer that asks for 48 x 4 MiB of pieces and reads none of the answers: the server
    stops reading pieces from disk while the connection cannot write, so its memory stays far
    below the 192 MiB asked for, and it serves another peer meanwhile."""
    import socket

    from p2pllm.net.auth import hello_meta
    from tests.security.conftest import raw_frame, read_frame, rss_bytes

    d = source(daemons, tmp_path, models)
    conn = await peer(d.port)
    big, _ = await manifest_of(conn, "big")
    blob = [p.id for p in big.pieces if big.files[p.file].name == "blob.bin"]
    await read(conn, big, blob[:1])  # warm: the manifest is built, a 4 MiB answer was made
    before = rss_bytes(d.proc.pid)
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=T)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.sendall(raw_frame(MsgType.HELLO, hello_meta("greedy", "greedy", "peer", 0,
                                                         os.urandom(16))))
        assert read_frame(sock) is not None  # the HELLO answer: no secret, handshake done
        for i in range(48):
            sock.sendall(raw_frame(MsgType.WEIGHTS_READ, {"model": "big", "digest": big.digest,
                                                          "pieces": [blob[i % 5]]},
                                   request_id=10 + i))
        await asyncio.sleep(3.0)
        grown = rss_bytes(d.proc.pid) - before
        assert grown < 96 << 20, grown
        ok = await read(conn, big, blob[1:2])  # another reader is served meanwhile
        assert ok.payload.nbytes == 4 << 20
    finally:
        sock.close()


def _fetch_cli(address: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "p2pllm.cli.main", "models", "fetch", MODEL,
                           "--daemon", address, "--json", *args],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


async def test_models_fetch_writes_only_the_slice_and_reuses_it(
        daemons: Any, tmp_path: Path, models: Path, ctl: Any) -> None:
    src = source(daemons, tmp_path, models)
    state = tmp_path / "dst-state"
    dst = daemons("dst", "--no-mdns", "--peer", src.address, "--state-dir", str(state))
    c = await ctl(dst.port)

    async def sees_the_model() -> bool:
        snap = (await c.request(MsgType.STATUS, {}, timeout=T)).meta
        return any(p["state"] == "up" and any(m["name"] == MODEL for m in p.get("models", []))
                   for p in snap["peers"])

    await wait_for(sees_the_model, what="dst sees src listing the model")
    out = _fetch_cli(dst.address, "--layers", "1-3", "--from", "src")
    man = build_manifest(models / MODEL, MODEL)
    ids = pieces_for(man, Need.for_layers(1, 3, 4))
    assert ids == pieces_for(man, Need((1, 3), embed=False, head=False))
    entry = state / "models-cache" / MODEL
    assert out["where"] == "cache" and Path(out["path"]) == entry
    assert out["pieces"] == len(ids) and out["bytes"] == man.nbytes(ids)
    assert out["sources"] == ["src"] and out["dropped"] == []
    tensors = {man.pieces[i].tensor for i in ids if man.pieces[i].tensor}
    assert tensors and all(t.startswith(("model.layers.1.", "model.layers.2.")) for t in tensors)
    journal = json.loads((entry / JOURNAL).read_text())
    assert sorted(journal["have"]) == ids and journal["digest"] == man.digest
    # on disk: the file at its full size, holding only the slice's pieces (holes elsewhere)
    weights = entry / "model.safetensors"
    src_file = models / MODEL / "model.safetensors"
    assert weights.stat().st_size == src_file.stat().st_size
    fi = next(i for i, f in enumerate(man.files) if f.name == "model.safetensors")
    fetched = [man.pieces[i] for i in ids if man.pieces[i].file == fi]
    disk = weights.stat().st_blocks * 512
    slice_bytes = sum(p.length for p in fetched)
    assert slice_bytes <= disk <= slice_bytes + 4096 * (len(fetched) + 1), (disk, slice_bytes)
    assert disk < src_file.stat().st_size / 2
    data, want = weights.read_bytes(), src_file.read_bytes()
    for p in man.pieces:
        if p.file != fi:
            continue
        chunk = data[p.offset:p.offset + p.length]
        assert chunk == (want[p.offset:p.offset + p.length] if p.id in ids else bytes(p.length)), p
    src_served = (await (await ctl(src.port)).request(MsgType.STATUS, {}, timeout=T)).meta
    assert src_served["served_bytes"] == man.nbytes(ids)
    snap = (await c.request(MsgType.STATUS, {}, timeout=T)).meta
    (f,) = [f for f in snap["fetches"] if f["model"] == MODEL]
    assert f["state"] == "done" and f["done_bytes"] == f["total_bytes"] == man.nbytes(ids)
    # the same slice again: nothing fetched, nothing served
    again = _fetch_cli(dst.address, "--layers", "1-3")
    assert again["pieces"] == 0 and again["bytes"] == 0 and Path(again["path"]) == entry
    after = (await (await ctl(src.port)).request(MsgType.STATUS, {}, timeout=T)).meta
    assert after["served_bytes"] == src_served["served_bytes"]
    snap = (await c.request(MsgType.STATUS, {}, timeout=T)).meta
    assert [f["state"] for f in snap["fetches"] if f["model"] == MODEL] == ["reused"]
    # WEIGHTS_PULL's refusals, and a model the daemon's roots hold (nothing fetched)
    for meta, code in (({"model": "nosuch"}, ErrorCode.NOT_FOUND),
                       ({"model": MODEL, "from": "nobody"}, ErrorCode.NOT_FOUND),
                       ({"model": MODEL, "layers": "3-9"}, ErrorCode.BAD_REQUEST),
                       ({"model": MODEL, "layers": "two"}, ErrorCode.BAD_REQUEST)):
        err = await refused(c.request(MsgType.WEIGHTS_PULL, meta, timeout=T))
        assert err.code == code, (meta, err)
    local = (await c.request(MsgType.WEIGHTS_PULL, {"model": "shakespeare"}, timeout=T)).meta
    assert local["where"] == "local" and local["pieces"] == 0
    assert Path(local["path"]).resolve() == BUNDLED.resolve()
    # layers 0-1 (and the embedding) without --json: the pieces it lacks, said in words
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "p2pllm.cli.main", "models", "fetch", MODEL,
                           "--daemon", dst.address, "--layers", "0-1"], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    more = [i for i in pieces_for(man, Need.for_layers(0, 1, 4)) if i not in ids]
    assert proc.returncode == 0 and f"{MODEL}: fetched {len(more)} pieces" in proc.stdout, proc
    journal = json.loads((entry / JOURNAL).read_text())
    assert sorted(journal["have"]) == sorted(ids + more)
    # the rest of the model, streamed: progress partials, then the result
    frames = [f async for f in c.stream(MsgType.WEIGHTS_PULL, {"model": MODEL}, idle_timeout=T)]
    partials, final = frames[:-1], frames[-1].meta
    assert partials and all(f.meta["total_bytes"] == man.total_bytes for f in partials)
    assert final["pieces"] == len(man.pieces) - len(ids) - len(more)
    assert sorted(json.loads((entry / JOURNAL).read_text())["have"]) == list(range(len(man.pieces)))
    assert (entry / "model.safetensors").read_bytes() == src_file.read_bytes()


def test_protocol_md_example_is_the_encoders() -> None:
    """protocol.md 13.5's WEIGHTS_READ request frame, byte for byte."""
    text = (REPO / "protocol.md").read_text(encoding="utf-8")
    block = text.split("A `WEIGHTS_READ` request, id 9,")[1].split("```")[1]
    doc = bytearray()
    for line in block.strip().splitlines():  # hex bytes, then a comment
        for token in line.split():
            if len(token) != 2 or any(ch not in "0123456789abcdef" for ch in token):
                break
            doc.append(int(token, 16))
    digest = hashlib.sha256(b"example").hexdigest()
    frame = b"".join(bytes(b) for b in encode_frame(
        MsgType.WEIGHTS_READ, {"model": "tiny", "digest": digest, "pieces": [0, 5, 300]},
        request_id=9))
    assert bytes(doc) == frame and len(frame) == 130


def test_fetches_show_in_ctl_status_jobs_and_the_dashboard() -> None:
    """A node's running fetches (its caps' ``fetches``) under the node, under their job, and
    pulls of no job on their own; a peer's malformed entries are left out."""
    from rich.console import Console

    from p2pllm.cli.ctl import jobs_lines, status_lines
    from p2pllm.cli.dashboard import render

    fetch = {"model": "bard", "job": "split-1", "done_bytes": 3 << 20, "total_bytes": 6 << 20,
             "source": "src"}
    pull = {**fetch, "model": "other", "job": "pull-1"}
    snap = {"node": {"name": "dst", "node_id": "d" * 32, "state": "up", "roles": [],
                     "fetches": [fetch, pull]},
            "peers": [{"name": "src", "node_id": "s" * 32, "state": "up", "roles": [],
                       "fetches": ["junk", {"model": 3}]}],
            "jobs": [{"job": "split-1", "pillar": "split", "state": "running", "members": [],
                      "coordinator": "d" * 32, "started": 1.0, "metrics": {}}]}
    text = "\n".join(t.plain for t in status_lines(snap, 80))
    assert "fetching (2): bard 3.0M/6.0M 50% from src, other 3.0M/6.0M 50% from src" in text
    jobs = "\n".join(t.plain for t in jobs_lines(snap, 80))
    assert "fetching: dst: bard 3.0M/6.0M 50% from src" in jobs
    assert "fetching: dst: other" in jobs
    console = Console(width=80, record=True)
    console.print(render(snap, None, 80))
    dash = console.export_text()
    assert "dst: bard 3.0M/6.0M 50% from src" in dash and "junk" not in dash


def test_state_keeps_fetches_and_served_bytes() -> None:
    """The reducer: a fetch's progress replaces its entry (started kept), ended fetches beyond
    the last 8 are dropped, served bytes add up, and a peer's caps update (sent while fetches
    run) does not reset how long it has been up."""
    from p2pllm.daemon import state as ev

    s = ev.State(node=ev.NodeInfo("n", "n", "", {}))
    s = ev.apply(s, ev.FetchUpdated("m", "j", "fetching", 0, 10, 1.0))
    s = ev.apply(s, ev.FetchUpdated("m", "j", "fetching", 5, 10, 2.0, source="src"))
    (f,) = ev.snapshot(s, 3.0)["fetches"]
    assert (f["done_bytes"], f["started"], f["ended"], f["source"]) == (5, 1.0, None, "src")
    s = ev.apply(s, ev.FetchUpdated("m", "j", "done", 10, 10, 4.0))
    assert ev.snapshot(s, 5.0)["fetches"][0]["ended"] == 4.0
    for i in range(10):
        s = ev.apply(s, ev.FetchUpdated(f"x{i}", "j", "done", 1, 1, 10.0 + i))
    assert len(s.fetches) == 8 and "m" not in s.fetches
    s = ev.apply(ev.apply(s, ev.WeightsServed(3)), ev.WeightsServed(4))
    assert ev.snapshot(s, 30.0)["served_bytes"] == 7
    s = ev.apply(s, ev.PeerUp("p", "p", "a", {}, 100.0))
    s = ev.apply(s, ev.PeerUp("p", "p", "a", {"fetches": []}, 150.0))
    (peer,) = ev.snapshot(s, 160.0)["peers"]
    assert peer["since_s"] == 60.0 and peer["fetches"] == []
    s = ev.apply(ev.apply(s, ev.PeerDown("p", "gone", 170.0)), ev.PeerUp("p", "p", "a", {}, 180.0))
    assert ev.snapshot(s, 181.0)["peers"][0]["since_s"] == 1.0


async def test_a_pull_answers_before_its_fsync_and_the_journal_ends_synced(
        daemons: Any, tmp_path: Path, models: Path, ctl: Any) -> None:
    """The final fsync runs after the answer, in the background (the daemon passes
    sync=False): it still runs, and the journal ends with no piece listed as unsynced."""
    src = source(daemons, tmp_path, models)
    state = tmp_path / "dst-state"
    dst = daemons("dst", "--no-mdns", "--peer", src.address, "--state-dir", str(state))
    c = await ctl(dst.port)

    async def sees_the_model() -> bool:
        snap = (await c.request(MsgType.STATUS, {}, timeout=T)).meta
        return any(p["state"] == "up" and any(m["name"] == MODEL for m in p.get("models", []))
                   for p in snap["peers"])

    await wait_for(sees_the_model, what="dst sees src listing the model")
    out = _fetch_cli(dst.address, "--from", "src")
    journal = state / "models-cache" / MODEL / JOURNAL
    man = build_manifest(models / MODEL, MODEL)
    assert out["pieces"] == len(man.pieces)
    assert sorted(json.loads(journal.read_text())["have"]) == list(range(len(man.pieces)))

    async def synced() -> bool:
        return json.loads(journal.read_text())["unsynced"] == []

    await wait_for(synced, what="the background sync of the fetched entry")
