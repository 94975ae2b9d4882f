"""Daemon configuration: defaults < config file (YAML) < command-line flags."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

ROLE_KINDS = (
    "drafter",
    "verifier",
    "shard",
    "fl-client",
    "fl-coordinator",
    "train-stage",
    "tp-rank",
    "echo",
)
DEFAULT_PORT = 7411


class ConfigError(ValueError):
    """A configuration value or file a user gave is unusable."""


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return os.path.join(base, "p2pllm")


@dataclass(frozen=True)
class DaemonConfig:
    name: str = ""
    # Closed by default: loopback only. Any other listen address needs secret_file (checked in
    # __post_init__; SECURITY.md).
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    roles: tuple[str, ...] = ("auto",)
    peers: tuple[str, ...] = ()
    mdns: bool = True
    interface: str | None = None
    secret_file: str | None = None
    models_dir: str | None = None
    # More model roots (M, issue 12): --models-dir is repeatable; the first goes to models_dir,
    # the rest here. Requests resolve model names only inside these, the pulled and bundled
    # models and the hub cache (p2pllm/daemon/modelrefs.py).
    models_dirs: tuple[str, ...] = ()
    allow_hub: bool = False  # download hub ids that are not in the hub cache (M, issue 12)
    data_dir: str | None = None
    state_dir: str = field(default_factory=default_state_dir)
    threads: int = 0  # 0 = torch's default
    log_level: str = "INFO"
    keepalive_interval: float = 1.0
    keepalive_timeout: float = 5.0
    peer_remove_after: float = 15.0
    # Limits before trust (issue 12, T; protocol.md 2.1 and 6): an accepted connection must
    # finish HELLO/AUTH within handshake_timeout seconds, and at most max_unauthed accepted
    # connections may be unauthenticated at once (a new one over the cap is closed at once).
    handshake_timeout: float = 10.0
    max_unauthed: int = 32
    max_meta: int = 1 << 20
    # Resource caps (issue 12, C; protocol.md 4.5): past one, a request gets
    # ProtocolError(OVER_LIMIT, "... over the cap N (config key KEY)"), the rest is served.
    max_payload: int = 256 << 20  # bytes of one frame's payload after the handshake
    max_sessions_per_role: int = 64  # sessions one verifier, shard or drafter role serves at once
    max_session_tokens: int = 0  # prompt + generated tokens of a session; 0 = the model's context
    max_train_tokens: int = 65536  # batch x sequence of a training step (train-stage, FL_TRAIN)
    max_subscriptions_per_conn: int = 4  # SUBSCRIBE streams open at once on one connection
    max_subscriptions: int = 64  # SUBSCRIBE streams open at once on this daemon
    max_probe_bytes: int = 1 << 20  # LINK_PROBE echo payload (peers send 128 KiB)
    max_probe_rate: float = 10.0  # LINK_PROBE requests per second per connection (burst: as many)
    # bytes of a dataset a CLI sends with TRAIN_RUN (and this host takes as stage 0) (P)
    max_dataset_bytes: int = 64 << 20
    # bytes on disk of the models cache (<state_dir>/models-cache: model pieces fetched from
    # peers, issue 16; protocol.md 4.5 and 13): a fetch that would take it past this is refused
    max_models_cache_bytes: int = 64 << 30
    memory_budget: int = 0  # bytes roles may use; 0 = the free memory measured at start
    compute_bench_seconds: float = 0.2
    dashboard: bool = False
    # Prometheus text on GET /metrics (issue 17 item 2; p2pllm/daemon/httpd.py): None or "off" =
    # no listener; "PORT" = 127.0.0.1:PORT; "HOST:PORT". Closed by default like `host`: a
    # non-loopback address needs secret_file (the endpoint itself has no authentication).
    metrics: str | None = None
    # The OpenAI-compatible API (issue 13; p2pllm/daemon/api.py): same address forms as
    # metrics; off by default (several daemons share a host in labs and tests, and a fixed
    # default port would collide). A non-loopback address needs api_key_file (Bearer key).
    api: str | None = None
    api_key_file: str | None = None
    api_max_pending: int = 64  # requests admitted at once (running or queued); more get 429
    # weights of served models: "auto" = GGUF Q8_0/Q4_x blocks kept as stored (int8/int4),
    # float files as float32; or none/int8/int4 for every model
    api_quant: str = "auto"
    # a serve config (configs/serve.yaml; p2pllm/daemon/serving.py): more served names, each a
    # GENERATE job (spec, split, tp) this daemon coordinates; read by the Daemon, whose
    # construction fails with ConfigError (p2pllmd exits 2) on a bad file
    api_serve: str | None = None
    # Host the test-only echo role (p2pllmd --test-roles; tests turn it on). Off: ASSIGN echo
    # is an unknown role (issue 12, A).
    test_roles: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for r in self.roles:
            if r != "auto" and r not in ROLE_KINDS:
                raise ConfigError(f"unknown role {r!r}; choose auto or one of {', '.join(ROLE_KINDS)}")
        for p in self.peers:
            parse_hostport(p)
        if self.keepalive_timeout <= 0 or self.keepalive_interval <= 0:
            raise ConfigError("keepalive interval and timeout must be positive")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if not self.handshake_timeout > 0:
            raise ConfigError(f"handshake_timeout must be positive, got {self.handshake_timeout!r}")
        if isinstance(self.max_unauthed, bool) or not isinstance(self.max_unauthed, int) or self.max_unauthed < 1:
            raise ConfigError(f"max_unauthed must be a whole number >= 1, got {self.max_unauthed!r}")
        self._check_caps()
        self._check_closed_by_default()

    def _check_closed_by_default(self) -> None:
        """Without a secret only loopback; a loopback daemon's mDNS stays on loopback."""
        loopback = listens_on_loopback_only(self.host)
        if not loopback and not self.secret_file:
            raise ConfigError(
                f"listening on {self.host or 'every interface'} lets other hosts connect, so it needs "
                "a shared secret: run `p2pllm secret new` once, copy the file it writes to every "
                f"host, and start `p2pllmd --secret-file PATH --host {self.host or '0.0.0.0'}` "
                "(without a secret, keep the default --host 127.0.0.1)"
            )
        where = self.metrics_address()
        if where is not None and not listens_on_loopback_only(where[0]) and not self.secret_file:
            raise ConfigError(
                f"--metrics {self.metrics} lets other hosts read this daemon's metrics (jobs, peers, "
                "figures), so it needs a shared secret like a LAN --host: run `p2pllm secret new` "
                "once, copy the file to every host and start with --secret-file PATH "
                "(without a secret, keep metrics on loopback: --metrics PORT or --metrics 127.0.0.1:PORT)"
            )
        api = self.api_address()
        if api is not None and not listens_on_loopback_only(api[0]) and not self.api_key_file:
            raise ConfigError(
                f"--api {self.api} lets other hosts run models on this daemon, so it needs an "
                "API key: write one to a file and start with --api-key-file PATH (clients send "
                "Authorization: Bearer <key>); without a key keep the API on loopback "
                "(--api PORT or --api 127.0.0.1:PORT)"
            )
        if not isinstance(self.api_max_pending, int) or isinstance(self.api_max_pending, bool) \
                or self.api_max_pending < 1:
            raise ConfigError(f"api_max_pending must be a whole number >= 1, got "
                              f"{self.api_max_pending!r}")
        if self.api_quant not in ("auto", "none", "int8", "int4"):
            raise ConfigError(f"api_quant must be auto, none, int8 or int4, got {self.api_quant!r}")
        if loopback and self.mdns and self.interface is not None and not listens_on_loopback_only(self.interface):
            raise ConfigError(
                f"--interface {self.interface} would announce this daemon to the LAN, but it "
                f"listens only on {self.host}: peers there could not reach it; give it a secret "
                "and a LAN --host, or use --no-mdns"
            )

    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics listener binds: None when off; a bare port means 127.0.0.1."""
        return _listen_address(self.metrics, "--metrics")

    def api_address(self) -> tuple[str, int] | None:
        """Where the OpenAI-compatible API binds: None when off; a bare port means 127.0.0.1."""
        return _listen_address(self.api, "--api")

    def api_key(self) -> str | None:
        """The API's Bearer key (the key file's first line), or None without a key file."""
        if not self.api_key_file:
            return None
        try:
            key = Path(self.api_key_file).read_text().strip().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read API key file {self.api_key_file}: {exc}") from exc
        if not key or not key[0].strip():
            raise ConfigError(f"API key file {self.api_key_file} is empty")
        return key[0].strip()

    def mdns_interface(self) -> str | None:
        """The address mDNS uses: --interface, or for a loopback-only daemon its loopback
        address (it announces and browses on loopback only, so same-host daemons still find
        each other and nothing is announced to the LAN); None = every interface."""
        if self.interface is not None:
            return self.interface
        if listens_on_loopback_only(self.host):
            v4 = [a for a in listen_addresses(self.host) if a.version == 4]
            return str(v4[0]) if v4 else "127.0.0.1"
        return None

    def mdns_announce_host(self) -> str | None:
        """The address mDNS announces: the listen address when it is one address (a hostname
        resolved), None (mDNS picks the interface's) for a wildcard."""
        if self.host in ("", "0.0.0.0", "::"):
            return None
        v4 = [a for a in listen_addresses(self.host) if a.version == 4]
        return str(v4[0]) if v4 else None

    def _check_caps(self) -> None:
        """The resource caps (C): whole numbers >= 1 (max_session_tokens: 0 = the model's)."""
        for key in ("max_payload", "max_sessions_per_role", "max_train_tokens",
                    "max_subscriptions_per_conn", "max_subscriptions", "max_probe_bytes",
                    "max_models_cache_bytes"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key} must be a whole number >= 1, got {v!r}")
        if self.max_payload >= 2**64:
            raise ConfigError(f"max_payload must be under 2**64, got {self.max_payload}")
        t = self.max_session_tokens
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ConfigError(f"max_session_tokens must be a whole number >= 0 (0 = the model's "
                              f"context), got {t!r}")
        r = self.max_probe_rate
        if not isinstance(r, int | float) or isinstance(r, bool) or not 0 < r <= 1e6:
            raise ConfigError(f"max_probe_rate must be a number of probes per second in "
                              f"(0, 1e6], got {r!r}")

    def accepts(self, role: str) -> bool:
        """Whether this daemon's --role settings allow `role` (echo is always allowed)."""
        return role == "echo" or "auto" in self.roles or role in self.roles

    def secret(self) -> bytes | None:
        if not self.secret_file:
            return None
        try:
            data = Path(self.secret_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {self.secret_file}: {exc}") from exc
        if not data:
            raise ConfigError(f"secret file {self.secret_file} is empty")
        return data


def _listen_address(value: str | None, flag: str) -> tuple[str, int] | None:
    """An HTTP listener's (host, port): None for unset/"off"; a bare port means 127.0.0.1."""
    text = "" if value is None else str(value).strip()
    if not text or text.lower() == "off":
        return None
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    if text.startswith("[") or text.count(":") == 1:
        host, port_s = (text[1:].partition("]")[::2] if text.startswith("[")
                        else text.split(":"))
        port_s = port_s.lstrip(":")
    else:
        host, port_s = text, ""
    if not port_s.isdigit() or not 0 <= int(port_s) < 65536:
        raise ConfigError(f"{flag} wants PORT or HOST:PORT (port 0..65535), got {value!r}")
    return host, int(port_s)


def listen_addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a server given `host` binds: a literal, or every address a hostname
    resolves to ("" = every interface, like asyncio.start_server)."""
    if host == "":
        return [ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")]
    try:
        return [ipaddress.ip_address(host.split("%", 1)[0])]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot resolve listen address {host!r}: {exc}") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def listens_on_loopback_only(host: str) -> bool:
    """Whether every address `host` binds is a loopback address (0.0.0.0 and :: are not)."""
    return all(a.is_loopback for a in listen_addresses(host))


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'host:port', 'host' or '[v6]:port' -> (host, port)."""
    text = text.strip()
    if not text:
        raise ConfigError("empty address")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_s = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port_s = text.split(":")
    else:
        host, port_s = text, ""
    try:
        port = int(port_s) if port_s else default_port
    except ValueError:
        raise ConfigError(f"bad port in address {text!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"bad port in address {text!r}")
    return host, port


def load_config(path: str | None, overrides: dict[str, Any]) -> DaemonConfig:
    """Defaults, then the YAML file (if any), then the non-None overrides (flags)."""
    values: dict[str, Any] = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        raw = raw.get("daemon", raw)
        values.update({k.replace("-", "_"): v for k, v in raw.items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(DaemonConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    for key in ("roles", "peers", "models_dirs"):
        if key in values:
            v = values[key]
            values[key] = (v,) if isinstance(v, str) else tuple(v)
    if isinstance(values.get("models_dir"), list | tuple):  # a repeated --models-dir (M)
        dirs = [str(d) for d in values["models_dir"]]
        values["models_dir"] = dirs[0] if dirs else None
        values["models_dirs"] = tuple(dirs[1:])
    try:
        return replace(DaemonConfig(), **values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
