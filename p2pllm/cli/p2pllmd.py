"""`p2pllmd`: run the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import stat
import sys
import threading

from p2pllm.config import ROLE_KINDS, ConfigError, load_config
from p2pllm.wire.connection import install_uvloop


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2pllmd", description="The p2pllm daemon: one per host. Finds peers, hosts roles, runs jobs."
    )
    p.add_argument("--config", help="YAML config file (flags override its values)")
    p.add_argument("--name", help="node name shown to peers (default: hostname)")
    p.add_argument(
        "--host",
        help="address to listen on (default 127.0.0.1: this machine only; a LAN address such as "
        "0.0.0.0 needs --secret-file)",
    )
    p.add_argument("--port", type=int, help="TCP port (default 7411; 0 = pick a free one)")
    p.add_argument(
        "--role",
        dest="roles",
        action="append",
        choices=["auto", *ROLE_KINDS],
        help="role this daemon accepts (repeatable; default auto = any it has resources for)",
    )
    p.add_argument("--peer", dest="peers", action="append", metavar="HOST:PORT", help="static peer (repeatable)")
    p.add_argument("--no-mdns", dest="mdns", action="store_const", const=False, help="disable mDNS discovery")
    p.add_argument("--interface", help="address mDNS uses (e.g. 127.0.0.1 for one-machine tests)")
    p.add_argument(
        "--secret-file", help="file holding the cluster's shared secret (make one with `p2pllm secret new`)"
    )
    p.add_argument("--models-dir", action="append", metavar="DIR",
                   help="directory of model folders (repeatable): requests may name only models "
                   "under these, the pulled and bundled models and the hub cache")
    p.add_argument("--allow-hub", action="store_const", const=True,
                   help="download Hugging Face hub ids that are not in the hub cache (in a thread)")
    p.add_argument("--data-dir", help="directory of local training data (federated learning)")
    p.add_argument("--state-dir", help="where jobs keep checkpoints and state")
    p.add_argument("--threads", type=int, help="torch threads for the roles on this host")
    p.add_argument("--keepalive-timeout", type=float, help="seconds of silence before a peer is down")
    p.add_argument("--metrics", metavar="[HOST:]PORT",
                   help="serve Prometheus metrics on GET /metrics (off by default; a bare port "
                   "binds 127.0.0.1; a LAN address needs --secret-file)")
    p.add_argument("--api", metavar="[HOST:]PORT|off",
                   help="serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                   "/v1/models, /health, /metrics) on this address (off by default; a bare port "
                   "binds 127.0.0.1; a LAN address needs --api-key-file)")
    p.add_argument("--api-key-file", help="file whose first line is the API's Bearer key")
    p.add_argument("--api-max-pending", type=int,
                   help="API requests running or queued at once; more get 429 (default 64)")
    p.add_argument("--api-quant", choices=("auto", "none", "int8", "int4"),
                   help="weights of the models the API serves: auto (default) keeps a GGUF's "
                   "Q8_0/Q4 blocks as int8/int4 and loads float files as float32")
    p.add_argument("--api-serve", metavar="FILE",
                   help="a serve config (configs/serve.yaml): served names that run as spec, "
                   "split or tp jobs this daemon coordinates")
    p.add_argument("--dashboard", action="store_const", const=True, help="show the live dashboard")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--print-port", action="store_true", help="print 'PORT <n>' on stdout once listening")
    # tests only: host the echo test role (DaemonConfig.test_roles); hidden from --help
    p.add_argument("--test-roles", action="store_const", const=True, help=argparse.SUPPRESS)
    return p


def warn_if_readable_by_others(path: str) -> None:
    """Log a warning when the secret file's mode lets group or others read it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # Daemon() reports an unreadable secret file
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logging.getLogger("p2pllm.secret").warning(
            "secret file %s has mode %04o: other users of this host can read it; chmod 600 %s",
            path, stat.S_IMODE(mode), path,
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "print_port")}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"p2pllmd: {exc}", file=sys.stderr)
        return 2
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if config.dashboard:  # logs would scribble over the live view: send them to a file
        os.makedirs(config.state_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(config.state_dir, "p2pllmd.log"))
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[handler],
    )
    if config.secret_file:
        warn_if_readable_by_others(config.secret_file)
    install_uvloop()
    from p2pllm.daemon.daemon import Daemon
    from p2pllm.engine import native

    # the native kernels build (~1 min the first time on a host) while the daemon starts,
    # not inside the first job that loads a model
    threading.Thread(target=native.kernels, name="p2pllm-native-build", daemon=True).start()

    try:
        daemon = Daemon(config)
    except ConfigError as exc:
        print(f"p2pllmd: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        task = asyncio.create_task(daemon.run())
        ready = asyncio.create_task(daemon.wait_ready())
        done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            if args.print_port:
                print(f"PORT {daemon.port} NODE {daemon.node_id}", flush=True)
                if daemon.metrics_listener is not None:
                    print(f"METRICS {daemon.metrics_listener.address}", flush=True)
                if daemon.api is not None:
                    print(f"API {daemon.api.address}", flush=True)
            if config.dashboard:
                from p2pllm.cli.dashboard import run_dashboard_inline

                dash = asyncio.create_task(run_dashboard_inline(daemon))
                await asyncio.wait({task, dash}, return_when=asyncio.FIRST_COMPLETED)
                if dash.done() and not task.done():
                    daemon.stop()
        else:
            ready.cancel()
        await task

    try:
        asyncio.run(run())
    except ConfigError as exc:
        print(f"p2pllmd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"p2pllmd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
