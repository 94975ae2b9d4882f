"""`p2pllm secret new [FILE]` / `p2pllm secret path`: the cluster's shared secret.

A secret is 32 random bytes (os.urandom) written as 64 hex digits and a newline. The file is
created with mode 0600 from the first byte on (os.open with O_CREAT|O_EXCL and 0o600, or with
--force a temporary file made that way and renamed over the old one), so no moment exists at
which another user of the host could read it. Every daemon of a cluster and every CLI that
dials one is given the same file (SECURITY.md).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from p2pllm.config import default_state_dir

SECRET_BYTES = 32
FILE_NAME = "secret"


def default_secret_path(state_dir: str | None = None) -> str:
    return os.path.join(state_dir or default_state_dir(), FILE_NAME)


def new_secret_text() -> str:
    return os.urandom(SECRET_BYTES).hex() + "\n"


def write_secret(path: str, text: str, force: bool = False) -> None:
    """Write `text` to `path`, mode 0600, never readable by others at any moment.

    Raises FileExistsError when `path` exists and not `force`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    if not force:
        _write_new(path, text)
        return
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    _write_new(tmp, text)
    try:
        os.replace(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise


def _write_new(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
        os.write(fd, text.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    n = sub.add_parser("new", help="write a new random secret (mode 0600)",
                       description="Write a new random secret (32 bytes, hex) to FILE, mode 0600.")
    n.add_argument("file", nargs="?", metavar="FILE",
                   help=f"where to write it (default STATE_DIR/{FILE_NAME}, STATE_DIR = {default_state_dir()})")
    n.add_argument("--state-dir", help="the state dir whose secret to write (default as p2pllmd's)")
    n.add_argument("--force", action="store_true", help="replace an existing file")
    s = sub.add_parser("path", help="print where `secret new` writes by default")
    s.add_argument("--state-dir", help="the state dir (default as p2pllmd's)")


def run(args: argparse.Namespace) -> int:
    if args.secret_command == "path":
        print(default_secret_path(args.state_dir))
        return 0
    path = os.path.abspath(args.file or default_secret_path(args.state_dir))
    try:
        write_secret(path, new_secret_text(), force=args.force)
    except FileExistsError:
        print(f"p2pllm: {path} exists; keep it (every host must share one secret) or pass --force "
              "to replace it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"p2pllm: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a new secret to {path} (mode 0600)")
    print("copy it to every host of the cluster, keeping it mode 0600 (e.g. scp -p), then on each host:")
    print(f"  p2pllmd --secret-file {path} --host 0.0.0.0")
    print(f"  export P2PLLM_SECRET_FILE={path}   # every p2pllm command (or --secret-file {path})")
    return 0
