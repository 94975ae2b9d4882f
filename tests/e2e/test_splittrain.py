"""Split training over real p2pllmd processes on 127.0.0.1.

- 2 and 3 stages, GPipe and 1F1B, full and LoRA: per-step losses and final parameters equal
  the single-process trainer with the same init, data order and optimizer (fp32, rtol 1e-5,
  atol 4e-5);
- `p2pllm train split --json` on real text (tinystories-656k, or the bundled shakespeare-draft) lowers the loss, and the saved
  checkpoint generates text with `p2pllm generate`;
- bad input: a dataset missing on the first stage, mismatched tensors from a neighbour ->
  typed errors, and the daemon keeps serving;
- datasets are names in the daemons' --data-dir (or content the CLI sends), checkpoints names
  under the coordinator's --state-dir (tests/security/test_paths_data.py tries the rest);
- a stage that dies: the job stops with an error naming it; the last checkpoint is intact.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2pllm.pillars.splittrain.compute import OptimConfig, lora_spec
from p2pllm.pillars.splittrain.data import load_blocks
from p2pllm.pillars.splittrain.trainer import train_local
from p2pllm.wire.connection import RemoteError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import tensor_meta
from tests.conftest import REPO, open_peer, real_model, wait_for
from tests.pillars.test_splittrain_trainer import ATOL, RTOL, STORY, make_tiny_llama

FAST = ("--no-mdns", "--keepalive-timeout", "2")
SEQ, BATCH, HIDDEN = 8, 4, 32


def start_cluster(daemons: Any, n: int, tmp_path: Path, *models_dirs: Path) -> list[Any]:
    """n daemons, each with --data-dir tmp_path/data, its own --state-dir, and tmp_path (where
    the tests make their tiny models) and `models_dirs` as --models-dir."""
    (tmp_path / "data").mkdir(exist_ok=True)

    def dirs(name: str) -> tuple[str, ...]:
        return ("--data-dir", str(tmp_path / "data"), "--state-dir", str(tmp_path / f"{name}-state"),
                *[x for m in (tmp_path, *models_dirs) for x in ("--models-dir", str(m))])

    ds = [daemons("a", *FAST, *dirs("a"))]
    for name in "bcd"[: n - 1]:
        ds.append(daemons(name, *FAST, *dirs(name), *[x for d in ds for x in ("--peer", d.address)]))
    return ds


def checkpoint(tmp_path: Path, name: str, daemon: str = "a") -> Path:
    """Where the coordinator keeps checkpoint `name` (its state dir)."""
    return tmp_path / f"{daemon}-state" / "checkpoints" / name


async def all_up(ctl: Any, ds: list[Any]) -> None:
    async def up() -> bool:
        for d in ds:
            snap = (await (await ctl(d.port)).request(MsgType.STATUS, {}, timeout=10)).meta
            states = {p["node_id"]: p["state"] for p in snap["peers"]}
            if any(states.get(o.node_id) != "up" for o in ds if o is not d):
                return False
        return True

    await wait_for(up, timeout=30, what="daemons to see each other")


async def train(conn: Any, meta: dict[str, Any],
                payload: bytes = b"") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """TRAIN_RUN (``payload``: the dataset's content, with meta's data_format)."""
    partials: list[dict[str, Any]] = []
    async for frame in conn.stream(MsgType.TRAIN_RUN, meta, [payload] if payload else []):
        if frame.is_partial:
            partials.append(frame.meta)
        else:
            return partials, frame.meta
    raise AssertionError("no final answer")


def tiny_data(tmp_path: Path, vocab: int = 96, tokens: int = 400) -> Path:
    """Pre-tokenized ids in the daemons' data dir: the dataset named "ids.safetensors"."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "data").mkdir(exist_ok=True)
    f = tmp_path / "data" / "ids.safetensors"
    save_file({"input_ids": torch.randint(3, vocab, (tokens,), generator=g)}, str(f))
    return f


async def test_split_training_equals_single_process_training(daemons, ctl, tmp_path: Path) -> None:
    # Prepare: a tied and an untied tiny Llama in the daemons' models dir; three daemons;
    # pre-tokenized data.
    tied = make_tiny_llama(tmp_path / "tied", layers=3, tie=True)
    untied = make_tiny_llama(tmp_path / "untied", layers=3, tie=False, seed=1)
    ds = start_cluster(daemons, 3, tmp_path)
    await all_up(ctl, ds)
    data = tiny_data(tmp_path)
    blocks = load_blocks(data, SEQ)
    conn = await ctl(ds[0].port)
    lora = {"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_targets": ["q_proj", "v_proj"]}
    cases = [  # (model, stages, schedule, micro-batches, extra): every combination once
        (tied, 2, "gpipe", 2, {}),
        (untied, 2, "1f1b", 4, {"layers": "0-2,2-3"}),
        (tied, 3, "gpipe", 2, {}),
        (tied, 3, "1f1b", 2, {"grad_clip": 0.3, "weight_decay": 0.1, "warmup_steps": 1,
                              "decay": "cosine", "min_lr": 1e-4}),
        (tied, 2, "gpipe", 2, lora),
        (tied, 2, "1f1b", 2, lora),
        (tied, 3, "gpipe", 4, lora),
        (tied, 3, "1f1b", 2, lora),
        (tied, 2, "1f1b", 2, {"init": "random"}),  # from scratch: the same init everywhere
    ]
    for i, (model, stages, schedule, micro, extra) in enumerate(cases):
        what = f"case {i}: {stages} stages {schedule} M={micro} {extra}"
        save = checkpoint(tmp_path, f"out{i}")
        meta = {"model": str(model), "data": data.name, "steps": 3, "batch_size": BATCH,
                "micro_batches": micro, "seq_len": SEQ, "schedule": schedule, "lr": 5e-3,
                "seed": 4, "save": save.name, **extra}
        if "layers" not in extra:
            meta["stages"] = stages
        # Execute: across the daemons, and in this process.
        partials, result = await train(conn, meta)
        spec = lora_spec(r=4, alpha=8) if extra.get("lora") else None
        optim = OptimConfig(lr=5e-3, weight_decay=extra.get("weight_decay", 0.0),
                            grad_clip=extra.get("grad_clip"),
                            warmup_steps=extra.get("warmup_steps", 0),
                            decay=extra.get("decay", "constant"), min_lr=extra.get("min_lr", 0.0))
        ref = train_local(model, blocks, steps=3, batch_size=BATCH, micro_batches=micro,
                          optim=optim, lora=spec, seed=4, init=extra.get("init", "checkpoint"))
        # Assert: the plan, the losses, the bytes, the final parameters.
        placed = [s["name"] for s in result["stages"]]
        assert placed[0] == "a" and len(set(placed)) == stages, what  # the coordinator first
        assert partials[0]["event"] == "plan" and len(partials[0]["stages"]) == stages
        assert [p["step"] for p in partials if p["event"] == "step"] == [0, 1, 2]
        assert result["losses"] == pytest.approx(ref.losses, rel=RTOL, abs=ATOL), what
        rows = BATCH * SEQ
        for st in result["steps"]:
            assert st["bytes_forward"] == (stages - 1) * rows * (4 * HIDDEN + 8), what
            assert st["bytes_backward"] == (stages - 1) * rows * 4 * HIDDEN, what
            assert st["seconds"] > 0
        # the bubble is measured (each stage's worker busy time against each step's pipeline
        # time); the formula comes beside it as theory
        assert result["bubble_theory"] == pytest.approx((stages - 1) / (micro + stages - 1))
        assert 0.0 < result["bubble"] < 1.0, what
        for st in result["stages"]:
            assert 0.0 <= st["bubble"] < 1.0
            assert st["busy_s"] >= st["forward_s"] + st["backward_s"] - 1e-6, what
        if spec is None:
            got = load_file(str(save / "model.safetensors"))
            want = ref.model.hf_state_dict()
            assert set(got) == set(want), what
            assert (save / "config.json").is_file()
        else:
            from p2pllm.pillars.splittrain.compute import lora_state_dict

            got = load_file(str(save / "adapter_model.safetensors"))
            want = lora_state_dict(ref.model)
            assert set(got) == set(want) and len(got) == 3 * 2 * 2, what
            assert json.loads((save / "adapter_config.json").read_text())["r"] == 4
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, k=k, what=what: f"{what} {k}: {m}")
    # The coordinator's state shows the last job, done, with its metrics.
    jobs = (await conn.request(MsgType.JOBS, {}, timeout=10)).meta["jobs"]
    job = next(j for j in jobs if j["job"] == result["job"])
    assert job["state"] == "done" and job["metrics"]["step"] == 3
    assert job["metrics"]["loss"] == pytest.approx(result["losses"][-1])


async def test_cli_trains_real_text_and_the_checkpoint_generates(daemons, ctl, tmp_path: Path) -> None:
    model = real_model("tinystories-656k")
    a, b = start_cluster(daemons, 2, tmp_path, model.parent)
    await all_up(ctl, [a, b])
    (tmp_path / "story.txt").write_text(STORY)
    out = tmp_path / "trained"
    cmd = [sys.executable, "-m", "p2pllm.cli.main", "train", "split", "--daemon", a.address,
           "--model", str(model), "--data", str(tmp_path / "story.txt"), "--steps", "6",
           "--batch-size", "4", "--micro-batches", "2", "--seq-len", "32", "--lr", "3e-3",
           "--schedule", "1f1b", "--save", str(out), "--json"]
    proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                   timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    losses = result["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    assert [s["step"] for s in result["steps"]] == list(range(6))
    assert set(result["steps"][0]) >= {"step", "loss", "seconds", "bytes_forward", "bytes_backward"}
    assert [s["layers"] for s in result["stages"]] == [[0, 1], [1, 2]]
    assert all(0 <= s["idle_fraction"] <= 1 for s in result["stages"])
    # The saved directory is a Hugging Face checkpoint the engine generates text with.
    from p2pllm.engine.generate import generate
    from p2pllm.engine.loader import load_slice, load_tokenizer

    gen = generate(load_slice(out), load_tokenizer(out), "Once upon a time", max_tokens=12)
    assert gen.generated_tokens > 0 and gen.text.strip()


async def test_bad_input_then_a_stage_that_dies(daemons, ctl, tmp_path: Path) -> None:
    make_tiny_llama(tmp_path / "m", layers=2)  # in the models dir before the daemons start
    a, b = start_cluster(daemons, 2, tmp_path)
    await all_up(ctl, [a, b])
    await check_bad_input(ctl, a, b, tmp_path)
    await check_a_stage_that_dies(ctl, a, b, tmp_path)


async def check_bad_input(ctl: Any, a: Any, b: Any, tmp_path: Path) -> None:
    """Typed errors for a missing dataset and for bad tensors from a neighbour; the daemons
    keep serving."""
    model = tmp_path / "m"
    conn = await ctl(a.port)
    # 1. A dataset that does not exist on the first stage's host (in its data dir).
    missing = "nowhere/data.txt"
    with pytest.raises(RemoteError) as ei:
        await train(conn, {"model": str(model), "data": missing, "steps": 1,
                           "batch_size": 2, "micro_batches": 1, "seq_len": 8, "stages": 2})
    assert ei.value.code == ErrorCode.NOT_FOUND
    assert "stage 0" in ei.value.message and str(missing) in ei.value.message
    # A bad request is refused before any role is assigned.
    with pytest.raises(RemoteError) as ei:
        await train(conn, {"model": str(model), "data": missing, "batch_size": 3,
                           "micro_batches": 2})
    assert ei.value.code == ErrorCode.BAD_REQUEST and "multiple" in ei.value.message
    # 2. A neighbour sending tensors of the wrong shape / dtype / content to a last stage (the
    # test acts as the job's coordinator: a peer connection, protocol.md 4.4).
    cb = await open_peer(b.address)
    params = {"model": str(model), "layers": [1, 2], "index": 1, "num_stages": 2,
              "prev": {"node": a.node_id, "rid": "stage0"}, "next": None,
              "tied_peer": {"node": a.node_id, "rid": "stage0"}, "seq_len": SEQ,
              "batch_size": BATCH, "micro_batches": 2, "schedule": "1f1b", "steps": 1,
              "optim": {"lr": 1e-3}}
    await cb.request(MsgType.ASSIGN, {"job": "jbad", "rid": "stage1", "role": "train-stage",
                                      "params": params, "pillar": "splittrain"}, timeout=60)

    async def forward(tensors: dict[str, torch.Tensor], **meta: Any) -> Any:
        body, payload = tensor_meta(tensors, {"job": "jbad", "rid": "stage1", "step": 0,
                                              "mb": 0, "denom": 16, **meta})
        return await cb.request(MsgType.TRAIN_FORWARD, body, payload, timeout=10)

    good = {"hidden": torch.zeros(2, SEQ, HIDDEN), "labels": torch.ones(2, SEQ, dtype=torch.int64)}
    bad_cases = [
        ({"hidden": torch.zeros(2, SEQ, HIDDEN + 1), "labels": good["labels"]}, {},
         ErrorCode.BAD_TENSOR, "expected hidden float32 (2, 8, 32)"),
        ({"hidden": torch.zeros(2, SEQ, HIDDEN, dtype=torch.float64), "labels": good["labels"]},
         {}, ErrorCode.BAD_TENSOR, "float64"),
        ({"hidden": good["hidden"]}, {}, ErrorCode.BAD_TENSOR, "labels"),
        ({"hidden": good["hidden"], "labels": torch.full((2, SEQ), 500)}, {},
         ErrorCode.BAD_TENSOR, "labels outside"),
        ({"hidden": torch.full((2, SEQ, HIDDEN), float("nan")), "labels": good["labels"]}, {},
         ErrorCode.BAD_TENSOR, "non-finite"),
        (good, {"mb": 7}, ErrorCode.BAD_REQUEST, "mb must be"),
        (good, {"step": 3}, ErrorCode.BAD_REQUEST, "at step 0"),
        (good, {"denom": 0}, ErrorCode.BAD_REQUEST, "denom"),
    ]
    for tensors, meta, code, text in bad_cases:
        with pytest.raises(RemoteError) as ei:
            await forward(tensors, **meta)
        assert ei.value.code == code and text in ei.value.message, (text, ei.value.message)
    # A payload that does not match its descriptors.
    body, payload = tensor_meta(good, {"job": "jbad", "rid": "stage1", "step": 0, "mb": 0,
                                       "denom": 16})
    with pytest.raises(RemoteError) as ei:
        await cb.request(MsgType.TRAIN_FORWARD, body, [bytes(memoryview(payload[0]))[:-4]],
                         timeout=10)
    assert ei.value.code == ErrorCode.BAD_TENSOR
    # A well-formed one is taken, once.
    await forward(good)
    with pytest.raises(RemoteError) as ei:
        await forward(good)
    assert ei.value.code == ErrorCode.DUPLICATE
    # A last stage takes no gradients; TRAIN_STEP before the batch ran is refused.
    body, payload = tensor_meta({"grad": good["hidden"]}, {"job": "jbad", "rid": "stage1",
                                                          "step": 0, "mb": 0})
    with pytest.raises(RemoteError) as ei:
        await cb.request(MsgType.TRAIN_BACKWARD, body, payload, timeout=10)
    assert ei.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(RemoteError) as ei:
        await cb.request(MsgType.TRAIN_STEP, {"job": "jbad", "rid": "stage1", "step": 0,
                                              "lr": 0.1}, timeout=10)
    assert ei.value.code == ErrorCode.BAD_REQUEST
    # Bad ASSIGN params are a typed refusal too.
    with pytest.raises(RemoteError) as ei:
        await cb.request(MsgType.ASSIGN, {"job": "jbad2", "rid": "stage1", "role": "train-stage",
                                          "params": {**params, "layers": [2, 1]},
                                          "pillar": "splittrain"}, timeout=60)
    assert ei.value.code == ErrorCode.BAD_REQUEST
    await cb.request(MsgType.RELEASE, {"job": "jbad"}, timeout=10)
    # Both daemons still serve, and a real job runs afterwards: both stages on b (one daemon
    # holding two stages of a job; the coordinator holding none).
    data = tiny_data(tmp_path, vocab=96)
    _, result = await train(conn, {"model": str(model), "data": data.name, "steps": 2,
                                   "batch_size": 2, "micro_batches": 2, "seq_len": 8,
                                   "nodes": ["b", b.node_id[:8]]})
    assert len(result["losses"]) == 2
    assert [(s["name"], s["layers"]) for s in result["stages"]] == [("b", [0, 1]), ("b", [1, 2])]
    assert (await cb.request(MsgType.STATUS, {}, timeout=10)).meta["node"]["name"] == "b"
    cb.close()


async def check_a_stage_that_dies(ctl: Any, a: Any, b: Any, tmp_path: Path) -> None:
    """The job stops with an error naming the dead stage; the last checkpoint is intact."""
    model = tmp_path / "m"
    data = tmp_path / "data" / "ids.safetensors"
    save = checkpoint(tmp_path, "ckpt")
    conn = await ctl(a.port)
    meta = {"model": str(model), "data": data.name, "steps": 100000, "batch_size": 2,
            "micro_batches": 2, "seq_len": 8, "stages": 2, "save": save.name, "save_every": 2}
    saved = asyncio.Event()
    events: list[dict[str, Any]] = []

    async def run() -> None:
        async for frame in conn.stream(MsgType.TRAIN_RUN, meta):
            events.append(frame.meta)
            if frame.meta.get("event") == "saved" and frame.meta["step"] >= 4:
                saved.set()

    task = asyncio.create_task(run())
    await asyncio.wait_for(saved.wait(), 120)
    b.kill()
    with pytest.raises(RemoteError) as ei:
        await asyncio.wait_for(task, 60)
    assert ei.value.code == ErrorCode.PEER_DOWN
    assert "stage 1" in ei.value.message and "on b" in ei.value.message, ei.value.message
    # The last checkpoint is complete and loads.
    from p2pllm.engine.loader import load_slice

    m = load_slice(save)
    assert m.config.num_layers == 2 and not any(p.isnan().any() for p in m.parameters())
    leftovers = await asyncio.to_thread(lambda: [p for p in save.parent.iterdir()
                                                 if p.name.startswith(".ckpt")])
    assert not leftovers
    # The coordinator marks the job failed and keeps serving.
    jobs = (await conn.request(MsgType.JOBS, {}, timeout=10)).meta["jobs"]
    assert any(j["state"] == "failed" and "stage 1" in (j["error"] or "") for j in jobs)
