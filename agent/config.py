"""Typed agent configuration, read from TOML.

Every key is declared here with its type and default; unknown keys and values of the wrong type or
range are errors that name the key (``admin.socket_mode: ...``), so a typo in a fleet's config
management fails loudly at ``accelguard config check`` instead of silently meaning the default.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w

from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/accelguard/agent.toml")


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _socket_mode(value: Any) -> str | None:
    # Octal digits only: int(value, 8) alone would also take "0o666", " 666" and "6_66".
    if not isinstance(value, str) or re.fullmatch(r"[0-7]{3,4}", value) is None:
        return "must be an octal file mode such as '0660'"
    mode = int(value, 8)
    # Whoever may connect may move tenants' GPUs and end their leases: never "other", and no
    # setuid/setgid/sticky bits, which mean nothing on a socket.
    if mode & 0o007:
        return "must grant nothing to others (use '0660' with admin.group, or '0600')"
    if mode & ~0o770:
        return "must be at most '0770' (owner and group bits only)"
    return None


def _absolute(value: Any) -> str | None:
    return None if Path(value).is_absolute() else "must be an absolute path"


def _check(validator: Callable[[Any], str | None], default: Any = dataclasses.MISSING) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"check": validator})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"check": validator})
    return field(default=default, metadata={"check": validator})


@dataclass(frozen=True)
class NodeConfig:
    id: str = field(default_factory=socket.gethostname)
    profile: Literal["datacenter", "edge"] = "datacenter"
    state_dir: Path = _check(_absolute, Path("/var/lib/accelguard"))

    @property
    def store_path(self) -> Path:
        return self.state_dir / "agent.db"


@dataclass(frozen=True)
class AdminConfig:
    socket: Path = _check(_absolute, Path("/run/accelguard/admin.sock"))
    # 0660 to an admin group: the admin API can move tenants' GPUs, so it is not world-writable.
    socket_mode: str = _check(_socket_mode, "0660")
    # Calls that change anything (grant, release, layout apply, quarantine, clear) are taken
    # from root and members of this group only; the socket's group unless read_group is set.
    group: str = ""
    # Set to let a wider group connect (the socket's group then) for the read-only calls:
    # status, lists, plans, health. Its members who are not in `group` are refused changes.
    read_group: str = ""


@dataclass(frozen=True)
class NvmlConfig:
    # NVIDIA GPUs through NVML; off on a node without them (an NPU-only node).
    enabled: bool = True
    # Empty: the driver's libnvidia-ml.so.1 from the loader path. A path: preload that library
    # (nvml-sim on a simulated node) before pynvml looks the SONAME up.
    library: str = ""
    sim_dir: str = ""


@dataclass(frozen=True)
class DcmiConfig:
    # Huawei Ascend NPUs through DCMI (docs/npu.md); on where the node has them.
    enabled: bool = False
    # Empty: the driver's libdcmi.so from the loader path. A path: that library (dcmi-sim).
    library: str = ""
    # The dcmi-sim state directory of a simulated node (`accelguard sim init` sets it).
    sim_dir: str = ""


@dataclass(frozen=True)
class AccelConfig:
    # Every /dev/accel/accelN device (Intel Gaudi, client NPUs) leased whole (docs/npu.md).
    enabled: bool = False
    # Where /sys/class/accel and /sys/bus/pci/devices are (a simulated node's own tree).
    sys_root: Path = _check(_absolute, Path("/sys"))


@dataclass(frozen=True)
class DevicesConfig:
    dev_root: Path = _check(_absolute, Path("/dev"))
    proc_root: Path = _check(_absolute, Path("/proc"))


@dataclass(frozen=True)
class InventoryConfig:
    refresh_interval_s: float = _check(_positive, 30.0)


def _hex_ids(value: Any) -> str | None:
    for item in value:
        try:
            if not 0 <= int(item, 16) <= 0xFFFF:
                return f"{item!r} is not a 16-bit PCI vendor id"
        except ValueError:
            return f"{item!r} is not a hex PCI vendor id such as '0x10de'"
    return None


@dataclass(frozen=True)
class HotplugConfig:
    enabled: bool = True
    # Which uevents mean "the accelerators may have changed": subsystems, and for PCI events
    # the vendor ids and class-code prefixes (hex; "03" = display controllers) to react to.
    subsystems: list[str] = field(default_factory=lambda: ["pci", "nvidia", "accel"])
    pci_vendor_ids: list[str] = _check(_hex_ids, ["0x10de"])
    pci_class_prefixes: list[str] = field(default_factory=lambda: ["03"])


@dataclass(frozen=True)
class TenantsConfig:
    cgroup_parents: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class SimConfig:
    # Set by `accelguard sim init`: where the simulated node's device memory files live, and how
    # many bytes stand for one MIG memory slice (about 10 GB on an H100).
    memory_dir: str = ""
    slice_bytes: int = _check(_positive, 16 << 20)


def _fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


@dataclass(frozen=True)
class ScrubConfig:
    # "cuda" on a GPU node; "simmem" on a simulated node (sim init sets it).
    backend: Literal["cuda", "simmem"] = "cuda"
    policy: Literal["zero", "multi-pass"] = "zero"
    # A worker still running after this long is killed and its partition quarantined.
    deadline_s: float = _check(_positive, 600.0)
    # Below this fraction of the partition's memory verified, the partition is quarantined.
    min_coverage: float = _check(_fraction, 0.9)
    # Also fill and clear every SM's shared memory (the LeftoverLocals class, CVE-2023-4969).
    shared_memory: bool = True
    # A device whose memory cannot be verified (a /dev/accel device: PCI function reset only)
    # is quarantined after its reset unless this is on; then it is freed with a certificate
    # that says `verified: false`.
    accept_unverified: bool = False


@dataclass(frozen=True)
class LeasesConfig:
    # SIGTERM first; whatever still holds the partition after this long is killed.
    evict_grace_s: float = _check(_positive, 10.0)
    # Who holds a released partition: "auto" asks the kernel (BPF iterators, one pass) and reads
    # /proc where it cannot; "proc" always reads /proc (slower, needs CAP_SYS_PTRACE).
    census: Literal["auto", "proc"] = "auto"
    max_ttl_s: float = _check(_positive, 30 * 24 * 3600.0)
    cdi_dir: Path = _check(_absolute, Path("/var/run/cdi"))


@dataclass(frozen=True)
class AttestConfig:
    # TPM access: the kernel's resource manager on hardware; "swtpm:port=2321" for tests.
    tcti: str = "device:/dev/tpmrm0"
    event_log: Path = _check(_absolute, Path("/sys/kernel/security/tpm0/binary_bios_measurements"))
    ima_log: Path = _check(_absolute, Path("/sys/kernel/security/ima/binary_runtime_measurements"))
    # Persistent handle of the attestation key (TCG provisioning guidance: 0x81010002 range).
    ak_handle: int = _check(_positive, 0x81010002)
    # Default PCR selection of a quote, as "bank:i,j,...".
    pcrs: str = "sha256:0,1,2,3,4,5,6,7,8,9,10,14"
    # This boot's id: the IMA list restarts with each boot, and the controller keeps its IMA
    # position per boot id (docs/commands.md).
    boot_id_file: Path = _check(_absolute, Path("/proc/sys/kernel/random/boot_id"))


def _host_port(value: Any) -> str | None:
    # Empty: no controller link. Otherwise HOST:PORT (IPv6 as [addr]:port), as gRPC dials it.
    if value == "":
        return None
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})", str(value))
    if match is None or not 0 < int(match.group(2)) < 65536:
        return "must be HOST:PORT, e.g. 'controller.example:7444', or empty for no link"
    return None


def split_host_port(value: str, setting: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port); ConfigError naming ``setting``."""
    host, colon, port_text = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f'{setting}: {value!r} is not HOST:PORT (e.g. "127.0.0.1:9464", "[::1]:9464")'
        )
    return host, int(port_text)


def _optional_absolute(value: Any) -> str | None:
    return None if value == "" or Path(value).is_absolute() else "must be empty or absolute"


@dataclass(frozen=True)
class LinkConfig:
    """The controller link (docs/link.md); empty ``controller`` means this node has none."""

    # The controller's link port (mutual TLS), HOST:PORT.
    controller: str = _check(_host_port, "")
    # The node's TLS key, certificate and the pinned controller CA, written by `accelguard enroll`.
    cert_dir: Path = _check(_absolute, Path("/var/lib/accelguard/link"))
    # The controller CA to trust; empty: the one `enroll` pinned (<cert_dir>/ca.pem).
    ca_file: str = _check(_optional_absolute, "")
    # A health sample (the heartbeat) every this many seconds, and inventory change detection.
    heartbeat_s: float = _check(_positive, 10.0)
    # Reconnect delays: full-jitter exponential backoff from backoff_base_s up to backoff_cap_s.
    backoff_base_s: float = _check(_positive, 0.5)
    backoff_cap_s: float = _check(_positive, 30.0)
    # HTTP/2 pings: sent after keepalive_time_s without traffic, the peer is dead when one is not
    # answered within keepalive_timeout_s (together well under 30 s, and under NAT idle timeouts).
    keepalive_time_s: float = _check(_positive, 10.0)
    keepalive_timeout_s: float = _check(_positive, 10.0)
    # The controller's HelloReply must come this soon after the Hello (over MQTT nothing else
    # says it is away); then the link is dropped and dialled again with backoff. Sent reports
    # wait this plus keepalive_time_s and keepalive_timeout_s for an ack (agent/link/flight.py).
    hello_reply_timeout_s: float = _check(_positive, 15.0)
    # Outbox bounds: rows and payload bytes, acked rows of never-dropped kinds included.
    outbox_max_reports: int = _check(_positive, 100_000)
    outbox_max_bytes: int = _check(_positive, 256 << 20)
    # Room kept for the events of leases already granted: a new grant is refused once less
    # than this many reports' room is left.
    outbox_grant_reserve: int = _check(_positive, 1_000)
    # Acked lease events, scrub certificates, attestation and command results stay this long,
    # so that a controller restored from an older backup is refilled.
    retention_s: float = _check(_positive, 7 * 24 * 3600.0)
    # Remote commands: how far the controller's clock may be ahead of this node's (a command
    # issued further in the future is refused) and behind (an expired one is accepted this
    # much longer). Keep the node's clock in sync (NTP): commands live 10 minutes at most.
    command_clock_skew_s: float = _check(_positive, 30.0)
    # The MQTT fallback (docs/edge.md): the broker, HOST:PORT (TLS with the node's enrolled
    # certificate; the broker's certificate must name HOST); empty: none.
    mqtt_broker: str = _check(_host_port, "")
    # "auto": fall back on an edge node (node.profile = "edge") only; "on"/"off": always/never.
    mqtt_fallback: Literal["auto", "on", "off"] = "auto"
    # Switch to MQTT once gRPC has been unreachable this long; back once it has been healthy
    # (probed) this long.
    fallback_after_s: float = _check(_positive, 30.0)
    failback_after_s: float = _check(_positive, 60.0)
    # The broker keeps the node's session (its subscription and the commands queued on it)
    # this long after the node went away.
    mqtt_session_expiry_s: int = _check(_positive, 24 * 3600)
    mqtt_keepalive_s: int = _check(_positive, 20)

    def fallback_enabled(self, profile: str) -> bool:
        if not self.mqtt_broker or self.mqtt_fallback == "off":
            return False
        return self.mqtt_fallback == "on" or profile == "edge"

    def __post_init__(self) -> None:
        if self.outbox_grant_reserve >= self.outbox_max_reports:
            raise ConfigError(
                "link.outbox_grant_reserve: must be below link.outbox_max_reports "
                f"({self.outbox_grant_reserve} >= {self.outbox_max_reports}): no grant could "
                "ever be admitted"
            )
        if self.backoff_base_s > self.backoff_cap_s:
            raise ConfigError("link.backoff_base_s: must not exceed link.backoff_cap_s")
        if self.mqtt_fallback == "on" and not self.mqtt_broker:
            raise ConfigError("link.mqtt_fallback: 'on' needs link.mqtt_broker")


_XID_OVERRIDE = re.compile(
    r"[1-9][0-9]{0,4}=(quarantine_gpu|quarantine_instance|lease_event|ignore)"
)


def _xid_overrides(value: Any) -> str | None:
    bad = [item for item in value if not _XID_OVERRIDE.fullmatch(str(item))]
    if bad:
        return (
            f"{bad[0]!r} is not XID=ACTION (ACTION: quarantine_gpu, quarantine_instance, "
            'lease_event or ignore), e.g. "94=quarantine_gpu"'
        )
    return None


@dataclass(frozen=True)
class HealthConfig:
    """The GPU health monitor (docs/health.md)."""

    enabled: bool = True
    # Counters and state (ECC, row remapping, a lost GPU) are read this often; XIDs arrive as
    # NVML events at once.
    poll_interval_s: float = _check(_positive, 10.0)
    # Per-XID overrides of the Catalog's classification, "XID=ACTION".
    xid_overrides: list[str] = _check(_xid_overrides, [])


def _listen_or_empty(value: Any) -> str | None:
    if value == "":
        return None
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})", str(value))
    if match is None or not 0 < int(match.group(2)) < 65536:
        return "must be HOST:PORT, e.g. '127.0.0.1:9464', or empty for no metrics endpoint"
    return None


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (docs/metrics.md)."""

    # HOST:PORT to serve /metrics on; empty: no endpoint. Keep it on localhost (or a management
    # network): the numbers describe the node's tenants and faults.
    listen: str = _check(_listen_or_empty, "")


@dataclass(frozen=True)
class AuditConfig:
    """The audit log (docs/audit.md): checkpoints, retention and its hard bound."""

    # Off only to measure what auditing costs (bench audit): a node with it off keeps no
    # record of who did what, and the agent says so at every start.
    enabled: bool = True

    # A checkpoint (seq and head hash signed with the node key, sent to the controller) after
    # this many new records, or every checkpoint_interval_s when there are any.
    checkpoint_records: int = _check(_positive, 256)
    checkpoint_interval_s: float = _check(_positive, 60.0)
    # Retention: records beyond the newest keep_records, or older than keep_days, are removed,
    # but only once a checkpoint the controller acked (or `audit export`) covers them.
    keep_records: int = _check(_positive, 100_000)
    keep_days: float = _check(_positive, 400.0)
    # Hard bound: while this many records are not covered by such a checkpoint (controller
    # unreachable, nothing exported), new grants are refused rather than history lost.
    max_records: int = _check(_positive, 1_000_000)


def _hook_argv(value: Any) -> str | None:
    # An argv list run without a shell: a command the agent runs as root must not depend on
    # PATH or on shell quoting. Whether the file exists is checked when it is run (an apply
    # is refused then); the agent must start on a node where a hook is not installed yet.
    if not value:
        return None
    if any(not isinstance(item, str) or "\x00" in item for item in value):
        return "every item must be a string without NUL characters"
    if not Path(value[0]).is_absolute():
        return (
            "must be [] or an argv list whose first item is an absolute path, e.g. "
            '["/usr/local/bin/stop-gpu-clients", "--wait"] (run without a shell)'
        )
    return None


def _hook_timeout(value: Any) -> str | None:
    return None if 0 < value <= 3600 else "must be greater than 0 and at most 3600"


@dataclass(frozen=True)
class LayoutConfig:
    """MIG layouts (docs/layouts.md): the desired layout at start-up and the apply hooks."""

    # At start-up, re-apply the desired layout the last `layout apply` recorded (keeping what
    # fits, never touching a leased instance, never resetting a GPU). Off: only check it and
    # report the difference (`layout desired`).
    reapply_at_start: bool = True
    # Commands run before and after an apply that changes something (not for one that has
    # nothing to do), e.g. to stop and restart GPU clients. An argv list (no shell); [] for
    # none. A before_apply that fails or times out refuses the apply with nothing changed; an
    # after_apply that fails is reported, and the layout stays applied.
    before_apply: list[str] = _check(_hook_argv, [])
    after_apply: list[str] = _check(_hook_argv, [])
    # A hook still running after this long is killed (its whole process group) and has failed.
    hook_timeout_s: float = _check(_hook_timeout, 60.0)


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    nvml: NvmlConfig = field(default_factory=NvmlConfig)
    dcmi: DcmiConfig = field(default_factory=DcmiConfig)
    accel: AccelConfig = field(default_factory=AccelConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    inventory: InventoryConfig = field(default_factory=InventoryConfig)
    hotplug: HotplugConfig = field(default_factory=HotplugConfig)
    tenants: TenantsConfig = field(default_factory=TenantsConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    leases: LeasesConfig = field(default_factory=LeasesConfig)
    attest: AttestConfig = field(default_factory=AttestConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_config(path: Path | None, *, required: bool = False) -> Config:
    """Read and validate a config file; ``None`` reads the default path.

    A missing file named by ``path`` is an error. A missing default file gives the defaults,
    unless ``required``: the CLI asks that for every verb that talks to the agent or reads its
    state directory, where defaults would silently point at the wrong socket or journal.
    """
    if path is None:
        if not required and not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        raw = path.read_bytes()
    except FileNotFoundError as error:
        raise ConfigError(
            f"cannot read config: no file at {path} (pass --config FILE; "
            "`accelguard config check` validates one)"
        ) from error
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from error
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    try:
        return parse_config(document)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def parse_config(document: Mapping[str, Any]) -> Config:
    return typing.cast(Config, _build(Config, document, ""))


def _build(cls: type[Any], values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (valid: {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table")
            kwargs[name] = _build(typing.cast(type[Any], hint), value, f"{key}.")
            continue
        converted = _convert(hint, value, key)
        check = fields[name].metadata.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{key}: {problem} (got {value!r})")
        kwargs[name] = converted
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"{key}: must be one of {', '.join(map(repr, choices))} (got {value!r})"
            )
        return value
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list (got {type(value).__name__})")
        return [_convert(item, element, f"{key}[{i}]") for i, element in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported config type")  # pragma: no cover - schema bug
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty path string (got {value!r})")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false (got {value!r})")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number (got {value!r})")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer (got {value!r})")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string (got {value!r})")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint!r}")  # pragma: no cover


def config_as_dict(config: Config) -> dict[str, Any]:
    """The effective config as plain TOML-able values (paths as strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {
        section.name: {
            k: plain(v) for k, v in dataclasses.asdict(getattr(config, section.name)).items()
        }
        for section in dataclasses.fields(config)
    }


def to_toml(config: Config) -> str:
    """The effective config as TOML that load_config reads back to the same Config.

    tomli_w quotes and escapes every value (a newline, quotes, backslashes, control characters);
    the layout is ours: one key a line, and an array (a short list of scalars here) on one line,
    as operators write them, where tomli_w would give each item a line of its own."""
    lines: list[str] = []
    for section, values in config_as_dict(config).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # tomli_w writes documents, not single values: write the value as a document's only key.
    return tomli_w.dumps({"v": value}).removeprefix("v = ").removesuffix("\n")
