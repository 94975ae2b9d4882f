"""`p2pllm generate --mode spec|split|tp`: submit a GENERATE job to the local daemon and stream it.

The daemon coordinates the job (plans, assigns roles, runs it) and streams partial responses
`{"token_ids": [...], "text": "..."}` as tokens are produced; the final response carries the
result fields (see protocol.md section 12).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from p2pllm.cli.client import open_daemon, run_daemon_call
from p2pllm.daemon.jobs import GENERATE_KEYS
from p2pllm.daemon.modelrefs import cli_model_ref
from p2pllm.wire.messages import MsgType


def generate_meta(args: argparse.Namespace) -> dict[str, Any]:
    """The GENERATE request body from parsed CLI arguments (None values left out). A model or
    adapter given as a path here goes as its real absolute path: the daemon uses it only if it
    lies inside its roots (else FORBIDDEN, saying to add the folder with --models-dir)."""
    meta: dict[str, Any] = {"prompt": args.prompt}
    for key in GENERATE_KEYS:
        value = getattr(args, key, None)
        if key in ("model", "draft_model", "adapter") and isinstance(value, str):
            value = cli_model_ref(value)
        if value is not None and value is not False:  # ignore_eos: sent only when set
            meta[key] = value
    return meta


async def stream_generate(
    address: str | None, secret_file: str | None, meta: dict[str, Any], echo: bool
) -> dict[str, Any]:
    conn = await open_daemon(address, secret_file)
    try:
        result: dict[str, Any] = {}
        async for frame in conn.stream(MsgType.GENERATE, meta):
            if frame.is_partial:
                if echo and frame.meta.get("text"):
                    sys.stdout.write(frame.meta["text"])
                    sys.stdout.flush()
            else:
                result = frame.meta
        if echo:
            sys.stdout.write("\n")
        return result
    finally:
        conn.close()


def run_generate(args: argparse.Namespace) -> int:
    meta = generate_meta(args)
    as_json = bool(getattr(args, "json", False))
    result, rc = run_daemon_call(
        stream_generate(getattr(args, "daemon", None), getattr(args, "secret_file", None), meta, not as_json),
        "generate",
    )
    if result is None:
        return rc
    if as_json:
        print(json.dumps(result))
    else:
        stats = {k: result[k] for k in ("tokens_per_s", "acceptance_rate") if k in result}
        if stats:
            print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
    return 0
