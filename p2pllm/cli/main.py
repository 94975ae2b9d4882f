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
    ("chat", "p2pllm.cli.chat", "chat with a model through its chat template (streaming, history)"),
    ("models", "p2pllm.cli.models", "list the models dirs, pull a model by name"),
    ("fl", "p2pllm.cli.fl", "federated LoRA fine-tuning"),
    ("train", "p2pllm.cli.train", "split training across hosts"),
    ("dash", "p2pllm.cli.dashboard", "live terminal dashboard"),
    ("secret", "p2pllm.cli.secret", "make the cluster's shared secret (mode 0600) for --secret-file"),
    ("bench", "p2pllm.cli.bench_matrix", "benchmarks through the daemons (matrix: modes x context x batch, heatmaps)"),
)


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (after the global options), or None."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--log-level":
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return arg if any(arg == name for name, _, _ in COMMANDS) else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. When `argv` names a command, only that command's module is imported (the
    others are listed by name): `p2pllm ctl` stays fast and never loads torch because some
    other command's module does."""
    chosen = chosen_command(argv) if argv is not None else None
    parser = argparse.ArgumentParser(prog="p2pllm", description="p2pllm: a few LAN hosts as one LLM lab.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        if chosen is not None and name != chosen:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
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
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
