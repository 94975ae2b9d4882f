"""`p2pllm`: the command-line client. Every subcommand talks to one daemon over the wire.

Subcommands live in their own modules, each with `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (command, module, help); a module that cannot be imported yet is left out of the CLI.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("ctl", "p2pllm.cli.ctl", "inspect and steer the cluster (status, peers, ping, jobs, stop)"),
    ("generate", "p2pllm.cli.generate", "generate text (local, speculative or split across hosts)"),
    ("fl", "p2pllm.cli.fl", "federated LoRA fine-tuning"),
    ("train", "p2pllm.cli.train", "split training across hosts"),
    ("dash", "p2pllm.cli.dashboard", "live terminal dashboard"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pllm", description="p2pllm: a few LAN hosts as one LLM lab.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            logging.getLogger(__name__).debug("command %s unavailable: %s", name, exc)
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
