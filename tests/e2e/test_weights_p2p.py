"""Models travel peer to peer (issue 16), with three real p2pllmd processes on loopback and the
model only in the first one's models dir:

- a 3-shard split job runs on a, b and c; b and c fetch only their slices from a: their cache
  entries hold exactly the pieces of their layers (the journal), take about those pieces'
  bytes on disk (``st_blocks * 512``: the rest are holes) and well under the model's size, and
  every byte outside their pieces reads as zero; greedy output equals the engine's local
  greedy; the plan (job result, ``ctl jobs`` member summaries) shows the fetch;
- a second job reuses the cached slices without a fetch (a's served bytes unchanged, b's and
  c's fetch state "reused");
- an FL round whose two clients lack the base model (they fetch it whole), a split training
  step whose second stage lacks it (it fetches its layers), and a speculative job whose
  verifier, pinned to a node without the target, fetches it whole.

The split test runs on the bundled shakespeare copied under another name (every daemon has the
bundled models in its roots) and, with the shared checkout, on SmolLM2-135M (GGUF). Few tokens,
one thread per daemon.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2pllm.cli.client import open_daemon
from p2pllm.cli.main import main
from p2pllm.weights.manifest import Manifest, build_manifest
from p2pllm.weights.slices import Need, pieces_for
from p2pllm.weights.store import JOURNAL, entry_dirname
from p2pllm.wire.messages import MsgType
from tests.conftest import (
    BUNDLED,
    BUNDLED_DRAFT,
    SHARED_MODELS,
    SHARED_SKIP,
    DaemonProc,
    wait_for,
)
from tests.e2e.test_fl import stories
from tests.e2e.test_split import all_connected, free_ports

pytestmark = pytest.mark.timeout(600)

FAST = ("--no-mdns", "--keepalive-timeout", "2")
TOKENS = 6
BARD = "bard"  # the bundled shakespeare under a name only daemon a has in its roots
SMOL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Variant:
    name: str  # the model's name (its folder in a's models dir)
    source: Path  # the files copied there
    layers: str  # the three shards' ranges (fixed: the second job must plan the same)
    prompt: str


VARIANTS = {
    "shakespeare": Variant(BARD, BUNDLED, "0-2,2-3,3-4", "ROMEO:"),
    "smollm2": Variant(SMOL, SHARED_MODELS / SMOL, "0-10,10-20,20-30", "The capital of France is"),
}


def copy_model(src: Path, models: Path, name: str) -> Path:
    """A real copy (no links) of the model's files as ``models/name``."""
    folder = models / name
    folder.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copyfile(f, folder / f.name)
    return folder


class Trio:
    """Daemons a, b, c that know each other; only a's models dir holds the model."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[DaemonProc] = []

    async def start(self, models: Path, data: dict[str, Path] | None = None) -> Trio:
        data = data or {}
        empty = self.root / "no-models"
        empty.mkdir(exist_ok=True)
        ports = free_ports(3)
        for i, (name, port) in enumerate(zip("abc", ports, strict=True)):
            # each pair dials once (a -> b, c; b -> c): two links dialled at the same time
            # between one pair replace each other, failing a request on the replaced one
            peers = [x for p in ports[i + 1:] for x in ("--peer", f"127.0.0.1:{p}")]
            extra = ["--data-dir", str(data[name])] if name in data else []
            self.procs.append(DaemonProc(name, [
                *FAST, "--port", str(port), "--models-dir", str(models if name == "a" else empty),
                "--state-dir", str(self.state(name)), *peers, *extra], self.root))
        for d in self.procs:
            await asyncio.to_thread(d.wait_ready)
        await all_connected(self.procs)
        return self

    def state(self, name: str) -> Path:
        return self.root / f"state-{name}"

    def entry(self, name: str, model: str) -> Path:
        return self.state(name) / "models-cache" / entry_dirname(model)

    async def status(self, d: DaemonProc) -> dict[str, Any]:
        conn = await open_daemon(d.address)
        try:
            return (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
        finally:
            conn.close()

    async def stop(self) -> None:
        for d in self.procs:
            await asyncio.to_thread(d.stop)


@pytest.fixture
async def trio(tmp_path: Path) -> AsyncIterator[Trio]:
    t = Trio(tmp_path)
    yield t
    await t.stop()


async def split(d: DaemonProc, model: str, layers: str, prompt_ids: Sequence[int]) -> dict[str, Any]:
    conn = await open_daemon(d.address)
    try:
        body = {"mode": "split", "model": model, "layers": layers, "prompt_ids": list(prompt_ids),
                "max_tokens": TOKENS, "keep_alive": 0, "retries": 0}
        async for frame in conn.stream(MsgType.GENERATE, body, idle_timeout=300):
            if not frame.is_partial:
                return dict(frame.meta)
    finally:
        conn.close()
    raise AssertionError("no final GENERATE answer")


def fetch_of(snap: dict[str, Any], model: str) -> dict[str, Any] | None:
    return next((f for f in snap.get("fetches") or [] if f["model"] == model), None)


def check_slice(entry: Path, source: Path, manifest: Manifest, need: Need) -> int:
    """The cache entry holds exactly the pieces ``need`` names: journal, bytes, holes. Returns
    its bytes on disk."""
    want = set(pieces_for(manifest, need))
    journal = json.loads((entry / JOURNAL).read_text())
    assert set(journal["have"]) == want
    want_bytes = manifest.nbytes(want)
    disk = sum((entry / f.name).stat().st_blocks * 512 for f in manifest.files)
    total = manifest.nbytes(range(len(manifest.pieces)))
    # the pieces' bytes, up to a block or two per piece (a piece's edges share blocks)
    assert want_bytes <= disk <= want_bytes + 2 * 4096 * len(want) + 65536, (disk, want_bytes)
    assert disk < 0.6 * total, (disk, total)
    for i, f in enumerate(manifest.files):
        got, src = (entry / f.name).read_bytes(), (source / f.name).read_bytes()
        assert len(got) == f.size == len(src)
        for p in manifest.pieces:
            if p.file != i:
                continue
            part = got[p.offset:p.offset + p.length]
            if p.id in want:
                assert part == src[p.offset:p.offset + p.length], (f.name, p.tensor)
            else:  # no byte of a piece this node was not given
                assert part.count(0) == len(part), (f.name, p.tensor)
    return disk


@pytest.mark.parametrize("variant", ["shakespeare", "smollm2"])
async def test_three_shards_fetch_only_their_slices_and_reuse_them(
        trio: Trio, tmp_path: Path, variant: str) -> None:
    from p2pllm.engine.generate import generate_ids
    from p2pllm.engine.loader import load_slice, load_tokenizer

    v = VARIANTS[variant]
    if not v.source.is_dir():
        pytest.skip(f"{SHARED_SKIP}: {v.source} is not present")
    folder = copy_model(v.source, tmp_path / "models", v.name)
    await trio.start(tmp_path / "models")
    a, b, c = trio.procs
    prompt_ids = list(load_tokenizer(folder)(v.prompt)["input_ids"])
    local = list(generate_ids(load_slice(folder), prompt_ids, max_tokens=TOKENS).token_ids)

    got = await split(a, v.name, v.layers, prompt_ids)
    assert got["token_ids"] == local, got
    plan = {s["name"]: s for s in got["shards"]}
    assert list(plan) == ["b", "c", "a"]  # the coordinator a holds the last range
    assert "fetch_bytes" not in plan["a"]
    manifest = await asyncio.to_thread(build_manifest, folder, v.name)
    n = int(v.layers.rsplit("-", 1)[1])
    for d in (b, c):
        s = plan[d.name]
        assert s["sources"] == [a.node_id] and s["fetch_bytes"] > 0 and s["fetch_s"] > 0, s
        need = Need.for_layers(*s["layers"], n)
        check_slice(trio.entry(d.name, v.name), folder, manifest, need)
        fetch = fetch_of(await trio.status(d), v.name)
        assert fetch is not None and fetch["state"] == "done" and fetch["job"] == got["job"]
        assert fetch["total_bytes"] == manifest.nbytes(pieces_for(manifest, need))
    # the plan's fetch shows in `ctl jobs`: the members' summaries
    job = next(j for j in (await trio.status(a))["jobs"] if j["job"] == got["job"])
    summaries = {m["node_id"]: m.get("summary", "") for m in job["members"]}
    assert "fetch" in summaries[b.node_id] and "fetch" not in summaries[a.node_id]
    served = (await trio.status(a))["served_bytes"]
    assert served >= sum(manifest.nbytes(pieces_for(manifest, Need.for_layers(*plan[x]["layers"], n)))
                         for x in "bc")

    # the first job released its shards (keep_alive 0): a second one loads the cached slices
    async def released() -> bool:
        snaps = [await trio.status(d) for d in (b, c)]
        return all(not snap["node"]["roles"] for snap in snaps)

    await wait_for(released, timeout=30, what="b and c released the first job's shards")
    again = await split(a, v.name, v.layers, prompt_ids)
    assert again["job"] != got["job"] and again["token_ids"] == local
    assert (await trio.status(a))["served_bytes"] == served  # nothing fetched this time
    for d in (b, c):
        fetch = fetch_of(await trio.status(d), v.name)
        assert fetch is not None and fetch["state"] == "reused" and fetch["job"] == again["job"]


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc = main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.err
    return dict(json.loads(out.out))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations inside peft
async def test_fl_clients_fetch_the_base_model_whole(
        trio: Trio, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_model(BUNDLED, tmp_path / "models", BARD)
    data = {}
    for name, theme in (("b", "sea"), ("c", "farm")):
        data[name] = tmp_path / f"data-{name}"
        data[name].mkdir()
        (data[name] / "stories.txt").write_text("\n\n".join(stories(theme, 12)))
    await trio.start(tmp_path / "models", data)
    a, b, c = trio.procs
    result = await asyncio.to_thread(
        cli_json, capsys, "fl", "run", "--daemon", a.address, "--model", BARD, "--rounds", "1",
        "--min-clients", "2", "--local-steps", "2", "--batch-size", "2", "--block-size", "32",
        "--eval-fraction", "0.2", "--round-timeout", "240", "--json")
    (rnd,) = result["rounds"]
    assert rnd["clients_answered"] == 2 and math.isfinite(rnd["train_loss"]), rnd
    manifest = await asyncio.to_thread(build_manifest, folder, BARD)
    for d in (b, c):
        entry = trio.entry(d.name, BARD)
        journal = json.loads((entry / JOURNAL).read_text())
        assert set(journal["have"]) == set(range(len(manifest.pieces)))  # the whole model
        for f in manifest.files:
            assert (entry / f.name).read_bytes() == (folder / f.name).read_bytes()
        fetch = fetch_of(await trio.status(d), BARD)
        assert fetch is not None and fetch["state"] == "done"


async def test_a_split_training_stage_fetches_its_layers(
        trio: Trio, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.pillars.test_splittrain_trainer import STORY

    folder = copy_model(BUNDLED, tmp_path / "models", BARD)
    await trio.start(tmp_path / "models")
    a, b, _ = trio.procs
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    result = await asyncio.to_thread(
        cli_json, capsys, "train", "split", "--daemon", a.address, "--model", BARD, "--data",
        str(story), "--steps", "1", "--batch-size", "2", "--micro-batches", "1", "--seq-len",
        "16", "--layers", "0-2,2-4", "--json")
    assert len(result["losses"]) == 1 and math.isfinite(result["losses"][0]), result
    names = [s["name"] for s in result["stages"]]
    assert names[0] == "a" and names[1] in ("b", "c")
    d = b if names[1] == "b" else trio.procs[2]
    manifest = await asyncio.to_thread(build_manifest, folder, BARD)
    entry = trio.entry(d.name, BARD)
    journal = json.loads((entry / JOURNAL).read_text())
    assert set(journal["have"]) == set(pieces_for(manifest, Need((2, 4), embed=False, head=True)))
    assert not (trio.entry("a", BARD)).exists()
    # the plan in the job's info (ctl jobs) carries the second stage's fetch
    job = next(j for j in (await trio.status(a))["jobs"] if j["pillar"] == "splittrain")
    planned = job["metrics"]["stages"]
    assert "fetch_bytes" not in planned[0]
    assert planned[1]["sources"] == [a.node_id] and planned[1]["fetch_bytes"] > 0


async def test_a_verifier_without_the_target_fetches_it_whole(trio: Trio, tmp_path: Path) -> None:
    from p2pllm.engine.generate import generate_ids
    from p2pllm.engine.loader import load_slice, load_tokenizer

    folder = copy_model(BUNDLED, tmp_path / "models", BARD)
    copy_model(BUNDLED_DRAFT, tmp_path / "models", "bard-draft")
    await trio.start(tmp_path / "models")
    a, b, _ = trio.procs
    prompt_ids = list(load_tokenizer(folder)("ROMEO:")["input_ids"])
    local = list(generate_ids(load_slice(folder), prompt_ids, max_tokens=TOKENS).token_ids)
    conn = await open_daemon(a.address)
    try:
        body = {"mode": "spec", "model": BARD, "draft_model": "bard-draft", "verifier": "b",
                "prompt_ids": prompt_ids, "max_tokens": TOKENS}
        got = None
        async for frame in conn.stream(MsgType.GENERATE, body, idle_timeout=300):
            if not frame.is_partial:
                got = dict(frame.meta)
    finally:
        conn.close()
    assert got is not None and got["token_ids"] == local and got["verifier"] == "b", got
    assert got["drafter"] == "a"  # a has the draft: no fetch for it
    manifest = await asyncio.to_thread(build_manifest, folder, BARD)
    journal = json.loads((trio.entry("b", BARD) / JOURNAL).read_text())
    assert set(journal["have"]) == set(range(len(manifest.pieces)))
    assert not trio.entry("b", "bard-draft").exists()
