"""``controller.toml``: the controller's typed configuration (same rules as agent.toml: unknown
keys and bad values are errors naming the key)."""

from __future__ import annotations

import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import (
    LoggingConfig,
    _absolute,
    _build,
    _check,
    _positive,
    _socket_mode,
    config_as_dict,
    to_toml,
)
from agent.errors import ConfigError
from agent.identity.spiffe import TRUST_DOMAIN

DEFAULT_CONTROLLER_CONFIG = Path("/etc/accelguard/controller.toml")


def _listen(value: Any) -> str | None:
    # Port 0 lets the kernel choose (tests); the bound ports are written to listening.json.
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})", str(value))
    if match is None or int(match.group(2)) > 65535:
        return "must be HOST:PORT, e.g. '0.0.0.0:7444'"
    return None


def _optional_listen(value: Any) -> str | None:
    return None if value == "" else _listen(value)


def _command_ttl(value: Any) -> str | None:
    return None if 0 < value <= 600 else "must be more than 0 and at most 600 (seconds)"


def _trust_domain(value: Any) -> str | None:
    if not isinstance(value, str) or TRUST_DOMAIN.fullmatch(value) is None:
        return "must be a lower-case DNS-like name such as 'fleet.example'"
    return None


@dataclass(frozen=True)
class ControllerSection:
    state_dir: Path = _check(_absolute, Path("/var/lib/accelguard-controller"))  # noqa: RUF009
    trust_domain: str = _check(_trust_domain, "accelguard.local")
    # Enrollment: server-authenticated TLS only (a node has no certificate yet).
    enroll_listen: str = _check(_listen, "0.0.0.0:7443")
    # The node link: mutual TLS, a node certificate of this CA required.
    link_listen: str = _check(_listen, "0.0.0.0:7444")
    admin_socket: Path = _check(_absolute, Path("/run/accelguard/controller.sock"))  # noqa: RUF009
    admin_socket_mode: str = _check(_socket_mode, "0660")
    # Calls that change the fleet (tokens, commands, policies, groups, the command key) are
    # taken from root and members of admin_group only; admin_read_group, when set, is the
    # socket's group instead, so its members may read (nodes, certificates, audit checkpoints).
    admin_group: str = ""
    admin_read_group: str = ""
    node_cert_lifetime_s: float = _check(_positive, 24 * 3600.0)
    token_ttl_s: float = _check(_positive, 3600.0)
    # Nodes without a TPM may enroll (recorded `unattested`) only where this is true.
    allow_unattested: bool = False
    keepalive_time_s: float = _check(_positive, 20.0)
    keepalive_timeout_s: float = _check(_positive, 10.0)
    # Reports committed per SQLite transaction at most (group commit across nodes).
    commit_batch: int = _check(_positive, 1024)
    # Remote commands (docs/commands.md): how long a command stays valid (at most 600 s) and
    # how long `ctl` waits for its result by default.
    command_ttl_s: float = _check(_command_ttl, 600.0)
    command_timeout_s: float = _check(_positive, 60.0)
    # Attestation in the loop: a fresh quote on each connect and this often; the PCRs asked for.
    attest_interval_s: float = _check(_positive, 600.0)
    attest_pcrs: str = "sha256:0,1,2,3,4,5,6,7,8,9,10,14"
    # The MQTT bridge for edge nodes (docs/edge.md): the broker, HOST:PORT (its certificate must
    # name HOST); empty: no bridge. The bridge's client certificate is <pki>/bridge.pem.
    mqtt_broker: str = _check(_optional_listen, "")
    mqtt_session_expiry_s: int = _check(_positive, 24 * 3600)
    mqtt_keepalive_s: int = _check(_positive, 20)

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def database(self) -> Path:
        return self.state_dir / "controller.db"


@dataclass(frozen=True)
class ControllerConfig:
    controller: ControllerSection = field(default_factory=ControllerSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def parse_controller_config(document: dict[str, Any]) -> ControllerConfig:
    return typing.cast(ControllerConfig, _build(ControllerConfig, document, ""))


def load_controller_config(path: Path | None) -> ControllerConfig:
    if path is None:
        if not DEFAULT_CONTROLLER_CONFIG.exists():
            return ControllerConfig()
        path = DEFAULT_CONTROLLER_CONFIG
    try:
        document = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    try:
        return parse_controller_config(document)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def controller_config_toml(config: ControllerConfig) -> str:
    """The effective controller config, as `config check` prints it."""
    return to_toml(config)  # type: ignore[arg-type]


__all__ = [
    "ControllerConfig",
    "ControllerSection",
    "config_as_dict",
    "controller_config_toml",
    "load_controller_config",
    "parse_controller_config",
]
