"""TCG PC Client firmware event log: parsing and PCR replay.

The log is what the kernel exposes as ``/sys/kernel/security/tpm0/binary_bios_measurements``.
Two formats exist (TCG PC Client Platform Firmware Profile, "PFP", section 10):

* SHA1 format: every event is a ``TCG_PCR_EVENT`` (PCR, type, SHA-1 digest, data).
* Crypto-agile format: the first event is a ``TCG_PCR_EVENT`` whose data is the
  ``TCG_EfiSpecIDEvent`` ("Spec ID Event03") declaring the digest algorithms and their sizes;
  every later event is a ``TCG_PCR_EVENT2`` carrying a ``TPML_DIGEST_VALUES``.

The log arrives from the network on the verifier side, so the parser treats it as hostile: every
size and count is bounded before anything is read, nothing is allocated beyond slices of the
input, and the only exception that leaves this module is :class:`agent.errors.EventLogError`,
whose message names the byte offset and the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography.hazmat.primitives import hashes

from agent.errors import EventLogError

# Bounds for hostile input. Real logs are tens of KiB (the ACPI TPM2 table reserves 64 KiB by
# default in EDK2); these leave two orders of magnitude of headroom.
MAX_LOG_BYTES: Final = 16 * 1024 * 1024
MAX_EVENTS: Final = 100_000
MAX_EVENT_DATA_BYTES: Final = 1024 * 1024
# TPM2 hash algorithms a PC Client TPM can implement: SHA-1, SHA-256/384/512, SM3-256, SHA3.
MAX_ALGORITHMS: Final = 8
# TPMU_HA is at most 64 bytes (SHA-512).
MAX_DIGEST_BYTES: Final = 64
# PC Client TPMs have 24 PCRs (PC Client Platform TPM Profile, PCR attributes table).
PCR_COUNT: Final = 24

SPEC_ID_EVENT03_SIGNATURE: Final = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE: Final = b"StartupLocality\x00"
# PFP 10.4.5.5: TCG_HCRTMComponentEvent, informational EV_NO_ACTION event in PCR 0.
HCRTM_COMPONENT_SIGNATURE: Final = b"H-CRTM CompMeas\x00"

LogFormat = Literal["sha1", "crypto-agile"]
Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class HashBank:
    """A PCR bank: the TPM algorithm ID, its digest size and how to compute it."""

    name: str
    algorithm_id: int
    digest_size: int
    _hashlib_name: str

    def digest(self, data: bytes) -> bytes:
        try:
            return hashlib.new(self._hashlib_name, data).digest()
        except ValueError:
            # OpenSSL 3 builds without the legacy/SM providers lack SM3 in hashlib;
            # cryptography bundles its own OpenSSL that has it.
            if self.name != "sm3_256":
                raise
            context = hashes.Hash(hashes.SM3())
            context.update(data)
            return context.finalize()

    def extend(self, current: bytes, digest: bytes) -> bytes:
        """TPM2_PCR_Extend: new = H(current || digest)."""
        return self.digest(current + digest)


# TCG Algorithm Registry, TPM_ALG_ID values.
BANKS: Final[Mapping[str, HashBank]] = {
    bank.name: bank
    for bank in (
        HashBank("sha1", 0x0004, 20, "sha1"),
        HashBank("sha256", 0x000B, 32, "sha256"),
        HashBank("sha384", 0x000C, 48, "sha384"),
        HashBank("sha512", 0x000D, 64, "sha512"),
        HashBank("sm3_256", 0x0012, 32, "sm3"),
        HashBank("sha3_256", 0x0027, 32, "sha3_256"),
        HashBank("sha3_384", 0x0028, 48, "sha3_384"),
        HashBank("sha3_512", 0x0029, 64, "sha3_512"),
    )
}
BANKS_BY_ALGORITHM_ID: Final[Mapping[int, HashBank]] = {b.algorithm_id: b for b in BANKS.values()}


def bank_name(algorithm_id: int) -> str:
    """Name of a TPM hash algorithm, or ``alg_0x....`` for one this module cannot compute."""
    bank = BANKS_BY_ALGORITHM_ID.get(algorithm_id)
    return bank.name if bank else f"alg_0x{algorithm_id:04x}"


EV_NO_ACTION: Final = 0x00000003
EV_SEPARATOR: Final = 0x00000004
EV_EFI_HCRTM_EVENT: Final = 0x80000010

# PFP section 10.4.1, "Event Types".
EVENT_TYPE_NAMES: Final[Mapping[int, str]] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x00000013: "EV_POST_CODE2",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x8000000D: "EV_EFI_GPT_EVENT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
    0x800000E3: "EV_EFI_SPDM_DEVICE_POLICY",
    0x800000E4: "EV_EFI_SPDM_DEVICE_AUTHORITY",
}
EVENT_TYPES_BY_NAME: Final[Mapping[str, int]] = {n: v for v, n in EVENT_TYPE_NAMES.items()}


def event_type_name(event_type: int) -> str:
    """The PFP name of an event type, or ``0x%08X`` for one the spec does not define."""
    return EVENT_TYPE_NAMES.get(event_type, f"0x{event_type:08X}")


def event_type_from_name(name: str) -> int | None:
    """Inverse of :func:`event_type_name`; None when ``name`` is neither a PFP name nor hex."""
    if name in EVENT_TYPES_BY_NAME:
        return EVENT_TYPES_BY_NAME[name]
    if len(name) == 10 and name.startswith("0x"):
        try:
            return int(name, 16)
        except ValueError:
            return None
    return None


def initial_pcr_value(bank: HashBank, pcr: int) -> bytes:
    """A PCR's value after TPM2_Startup when no StartupLocality event says otherwise.

    PC Client TPMs start PCRs 17-22 (the DRTM PCRs) at all ones until a dynamic launch resets
    them; every other PCR starts at zero (PC Client Platform TPM Profile, PCR attributes).
    """
    fill = b"\xff" if 17 <= pcr <= 22 else b"\x00"
    return fill * bank.digest_size


@dataclass(frozen=True)
class AlgorithmSize:
    algorithm_id: int
    digest_size: int

    @property
    def name(self) -> str:
        return bank_name(self.algorithm_id)


@dataclass(frozen=True)
class SpecIdEvent:
    """TCG_EfiSpecIDEvent (PFP 10.4.5.1), the header of a crypto-agile log."""

    platform_class: int
    spec_version_minor: int
    spec_version_major: int
    spec_errata: int
    uintn_size: int
    algorithms: tuple[AlgorithmSize, ...]
    vendor_info: bytes


@dataclass(frozen=True)
class Event:
    """One measurement: ``digests`` maps a bank name to the digest the firmware extended."""

    index: int
    offset: int
    pcr: int
    event_type: int
    digests: Mapping[str, bytes]
    data: bytes

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    @property
    def extends(self) -> bool:
        """Whether this event was extended into its PCR (EV_NO_ACTION never is: PFP 10.4.1)."""
        return self.event_type != EV_NO_ACTION

    def to_dict(self) -> dict[str, object]:
        result: dict[str, object] = {
            "index": self.index,
            "offset": self.offset,
            "pcr": self.pcr,
            "type": self.type_name,
            "type_value": self.event_type,
            "digests": {bank: digest.hex() for bank, digest in self.digests.items()},
            "data_size": len(self.data),
            "data": self.data.hex(),
        }
        decoded = describe_event_data(self.event_type, self.data)
        if decoded is not None:
            result["decoded"] = decoded
        return result


@dataclass(frozen=True)
class EventLogFinding:
    """Something a verifier must know about a log that parsed: an anomaly or a firmware error.

    ``error`` findings mean the boot cannot be trusted as measured (a separator reporting a
    firmware error, a digest that does not match its data); a policy treats them as failures.
    """

    severity: Severity
    kind: str
    message: str
    event_index: int | None = None
    pcr: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "kind": self.kind,
            "message": self.message,
            "event_index": self.event_index,
            "pcr": self.pcr,
        }


@dataclass(frozen=True)
class EventLog:
    """A parsed firmware event log. ``events[0]`` is the Spec ID event in a crypto-agile log."""

    format: LogFormat
    spec_id: SpecIdEvent | None
    # Bank name -> digest size, as declared (SHA1 format: sha1 only).
    algorithms: Mapping[str, int]
    events: tuple[Event, ...]
    findings: tuple[EventLogFinding, ...]
    # Banks every extending event carries a digest for and that this module can compute.
    replayable_banks: tuple[str, ...]
    startup_locality: int | None
    padding_bytes: int = 0

    def replay(self) -> dict[str, dict[int, bytes]]:
        """Expected PCR values, bank -> PCR -> value, for every PCR the log touches.

        PCRs the log never extends are absent: their value is :func:`initial_pcr_value`.
        A declared bank that some extending event lacks is absent too (see ``findings``),
        so a verifier comparing a quote over that bank fails closed.
        """
        result: dict[str, dict[int, bytes]] = {}
        for name in self.replayable_banks:
            bank = BANKS[name]
            values: dict[int, bytes] = {}
            if self.startup_locality is not None:
                # PFP 10.4.5.3: a StartupLocality of 3 or 4 (H-CRTM) makes PCR 0 start at
                # 0x00..0<locality> instead of zero.
                values[0] = bytes(bank.digest_size - 1) + bytes([self.startup_locality])
            for event in self.events:
                if not event.extends:
                    continue
                current = values.get(event.pcr)
                if current is None:
                    current = initial_pcr_value(bank, event.pcr)
                values[event.pcr] = bank.extend(current, event.digests[name])
            result[name] = values
        return result

    def events_in_pcr(self, pcr: int) -> list[Event]:
        return [event for event in self.events if event.pcr == pcr]

    def to_dict(self) -> dict[str, object]:
        spec_id: dict[str, object] | None = None
        if self.spec_id is not None:
            spec_id = _spec_id_to_dict(self.spec_id)
        return {
            "format": self.format,
            "spec_id": spec_id,
            "algorithms": dict(self.algorithms),
            "replayable_banks": list(self.replayable_banks),
            "startup_locality": self.startup_locality,
            "padding_bytes": self.padding_bytes,
            "events": [event.to_dict() for event in self.events],
            "findings": [finding.to_dict() for finding in self.findings],
            "pcrs": {
                bank: {str(pcr): value.hex() for pcr, value in sorted(values.items())}
                for bank, values in self.replay().items()
            },
        }


class _Cursor:
    """Bounds-checked little-endian reader; every failure names the offset."""

    __slots__ = ("base", "data", "offset")

    def __init__(self, data: bytes, offset: int = 0, *, base: int = 0) -> None:
        self.data = data
        self.offset = offset
        # Where ``data`` starts in the log, so messages give offsets into the whole log.
        self.base = base

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            raise EventLogError(
                f"offset {self.base + self.offset}: {what} needs {size} bytes but only "
                f"{self.remaining} remain (truncated log or corrupt length field)"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little")


def parse_event_log(data: bytes) -> EventLog:
    """Parse a SHA1-format or crypto-agile firmware event log.

    Raises EventLogError (with the byte offset) on anything malformed or over the bounds.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EventLogError(f"offset 0: event log must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_LOG_BYTES:
        raise EventLogError(
            f"offset {MAX_LOG_BYTES}: log is {len(data)} bytes, over the {MAX_LOG_BYTES}-byte limit"
        )
    if not data:
        raise EventLogError("offset 0: event log is empty")
    # Firmware hands over the whole reserved log area on some platforms; the unused tail is
    # zero (or 0xFF, erased flash). Linux stops at an all-zero event the same way.
    end_of_events = min(len(data.rstrip(b"\x00")), len(data.rstrip(b"\xff")))
    if end_of_events == 0:
        raise EventLogError("offset 0: event log holds only zero/0xFF padding, no events")
    cursor = _Cursor(data)
    header = _read_pcr_event(cursor, index=0)
    findings: list[EventLogFinding] = []
    if header.event_type == EV_NO_ACTION and header.data.startswith(SPEC_ID_EVENT03_SIGNATURE):
        spec_id = _parse_spec_id(header.data, header.offset + 32)
        if header.pcr != 0 or any(header.digests["sha1"]):
            findings.append(
                EventLogFinding(
                    "warning",
                    "spec-id-header",
                    "Spec ID event should be in PCR 0 with an all-zero digest (PFP 10.4.5.1)",
                    0,
                    header.pcr,
                )
            )
        sizes = {bank_name(a.algorithm_id): a.digest_size for a in spec_id.algorithms}
        by_id = {a.algorithm_id: a.digest_size for a in spec_id.algorithms}
        events = [header]
        while cursor.offset < end_of_events:
            _check_event_count(len(events), cursor.offset)
            events.append(_read_pcr_event2(cursor, len(events), by_id))
        log_format: LogFormat = "crypto-agile"
    else:
        spec_id = None
        sizes = {"sha1": 20}
        events = [header]
        while cursor.offset < end_of_events:
            _check_event_count(len(events), cursor.offset)
            events.append(_read_pcr_event(cursor, len(events)))
        log_format = "sha1"
    padding = len(data) - cursor.offset
    if padding:
        findings.append(
            EventLogFinding(
                "info",
                "padding",
                f"offset {cursor.offset}: {padding} bytes of zero/0xFF padding after the last"
                " event",
            )
        )
    replayable = _replayable_banks(sizes, events, findings)
    locality = _startup_locality(events, findings)
    _check_separators(events, findings)
    _check_hcrtm(events, locality, findings)
    return EventLog(
        format=log_format,
        spec_id=spec_id,
        algorithms=sizes,
        events=tuple(events),
        findings=tuple(findings),
        replayable_banks=replayable,
        startup_locality=locality,
        padding_bytes=padding,
    )


def read_event_log(path: str | Path) -> EventLog:
    """Read and parse a log file (e.g. ``/sys/kernel/security/tpm0/binary_bios_measurements``)."""
    try:
        # sysfs reports size 0 for this file; read to EOF, one byte past the bound.
        with Path(path).open("rb") as stream:
            data = stream.read(MAX_LOG_BYTES + 1)
    except OSError as error:
        raise EventLogError(
            f"cannot read event log {path}: {error.strerror or error}"
            " (is securityfs mounted and the TPM driver loaded? reading it needs root)"
        ) from error
    return parse_event_log(data)


def _check_event_count(count: int, offset: int) -> None:
    if count >= MAX_EVENTS:
        raise EventLogError(f"offset {offset}: more than {MAX_EVENTS} events")


def _check_pcr(pcr: int, event_type: int, offset: int) -> None:
    # EV_NO_ACTION events are never extended, so the PCR field is informational there.
    if event_type != EV_NO_ACTION and pcr >= PCR_COUNT:
        raise EventLogError(
            f"offset {offset}: event extends PCR {pcr}, a PC Client TPM has PCRs 0-{PCR_COUNT - 1}"
        )


def _read_event_data(cursor: _Cursor) -> bytes:
    size_offset = cursor.offset
    size = cursor.uint(4, "event data size")
    if size > MAX_EVENT_DATA_BYTES:
        raise EventLogError(
            f"offset {size_offset}: event data size {size} is over the "
            f"{MAX_EVENT_DATA_BYTES}-byte limit"
        )
    return cursor.take(size, "event data")


def _read_pcr_event(cursor: _Cursor, index: int) -> Event:
    """TCG_PCR_EVENT: UINT32 pcrIndex, UINT32 eventType, BYTE digest[20], UINT32 size, data."""
    offset = cursor.offset
    pcr = cursor.uint(4, f"event {index} PCR index")
    event_type = cursor.uint(4, f"event {index} type")
    _check_pcr(pcr, event_type, offset)
    digest = cursor.take(20, f"event {index} SHA-1 digest")
    data = _read_event_data(cursor)
    return Event(index, offset, pcr, event_type, {"sha1": digest}, data)


def _read_pcr_event2(cursor: _Cursor, index: int, sizes: Mapping[int, int]) -> Event:
    """TCG_PCR_EVENT2: pcrIndex, eventType, TPML_DIGEST_VALUES, UINT32 size, data."""
    offset = cursor.offset
    pcr = cursor.uint(4, f"event {index} PCR index")
    event_type = cursor.uint(4, f"event {index} type")
    _check_pcr(pcr, event_type, offset)
    count_offset = cursor.offset
    count = cursor.uint(4, f"event {index} digest count")
    if count > len(sizes):
        raise EventLogError(
            f"offset {count_offset}: event {index} has {count} digests but the log declares "
            f"{len(sizes)} algorithms"
        )
    digests: dict[str, bytes] = {}
    for _ in range(count):
        algorithm_offset = cursor.offset
        algorithm_id = cursor.uint(2, f"event {index} digest algorithm")
        size = sizes.get(algorithm_id)
        if size is None:
            raise EventLogError(
                f"offset {algorithm_offset}: event {index} has a digest for algorithm "
                f"0x{algorithm_id:04x}, which the Spec ID event does not declare"
            )
        name = bank_name(algorithm_id)
        if name in digests:
            raise EventLogError(f"offset {algorithm_offset}: event {index} has two {name} digests")
        digests[name] = cursor.take(size, f"event {index} {name} digest")
    data = _read_event_data(cursor)
    return Event(index, offset, pcr, event_type, digests, data)


def _parse_spec_id(data: bytes, base_offset: int) -> SpecIdEvent:
    """TCG_EfiSpecIDEvent; ``base_offset`` is where the event data starts in the log."""
    cursor = _Cursor(data, base=base_offset)

    def fail(message: str) -> EventLogError:
        return EventLogError(f"offset {base_offset + cursor.offset}: Spec ID event: {message}")

    cursor.take(16, "Spec ID signature")
    platform_class = cursor.uint(4, "Spec ID platformClass")
    minor = cursor.uint(1, "Spec ID specVersionMinor")
    major = cursor.uint(1, "Spec ID specVersionMajor")
    errata = cursor.uint(1, "Spec ID specErrata")
    uintn_size = cursor.uint(1, "Spec ID uintnSize")
    count = cursor.uint(4, "Spec ID numberOfAlgorithms")
    if not 1 <= count <= MAX_ALGORITHMS:
        raise fail(f"numberOfAlgorithms is {count}, expected 1 to {MAX_ALGORITHMS}")
    algorithms: list[AlgorithmSize] = []
    for _ in range(count):
        algorithm_id = cursor.uint(2, "Spec ID algorithmId")
        digest_size = cursor.uint(2, "Spec ID digestSize")
        known = BANKS_BY_ALGORITHM_ID.get(algorithm_id)
        if known is not None and known.digest_size != digest_size:
            raise fail(
                f"{known.name} declared with digest size {digest_size}, "
                f"the algorithm's size is {known.digest_size}"
            )
        if not 1 <= digest_size <= MAX_DIGEST_BYTES:
            raise fail(
                f"algorithm 0x{algorithm_id:04x} declared with digest size {digest_size}, "
                f"expected 1 to {MAX_DIGEST_BYTES}"
            )
        if any(a.algorithm_id == algorithm_id for a in algorithms):
            raise fail(f"algorithm {bank_name(algorithm_id)} declared twice")
        algorithms.append(AlgorithmSize(algorithm_id, digest_size))
    vendor_size = cursor.uint(1, "Spec ID vendorInfoSize")
    vendor_info = cursor.take(vendor_size, "Spec ID vendorInfo")
    if cursor.remaining:
        raise fail(f"{cursor.remaining} bytes after vendorInfo")
    return SpecIdEvent(
        platform_class, minor, major, errata, uintn_size, tuple(algorithms), vendor_info
    )


def _replayable_banks(
    sizes: Mapping[str, int], events: list[Event], findings: list[EventLogFinding]
) -> tuple[str, ...]:
    extending = [event for event in events if event.extends]
    replayable: list[str] = []
    for name in sizes:
        if name not in BANKS:
            findings.append(
                EventLogFinding("info", "bank-unsupported", f"cannot compute {name}: not replayed")
            )
            continue
        missing = [event for event in extending if name not in event.digests]
        if not missing:
            replayable.append(name)
        elif len(missing) == len(extending):
            # Declared for the TPM's banks but not used by the firmware (seen on real logs:
            # a Spec ID event listing sha384/sha512 with only sha1/sha256 digests).
            findings.append(
                EventLogFinding(
                    "info", "bank-unused", f"{name} is declared but no event carries it"
                )
            )
        else:
            first = missing[0]
            findings.append(
                EventLogFinding(
                    "error",
                    "bank-incomplete",
                    f"event {first.index} (offset {first.offset}) and {len(missing) - 1} other(s) "
                    f"lack a {name} digest: the {name} bank cannot be replayed",
                    first.index,
                    first.pcr,
                )
            )
    return tuple(replayable)


def _startup_locality(events: list[Event], findings: list[EventLogFinding]) -> int | None:
    """Find the PFP 10.4.5.3 StartupLocality event (EV_NO_ACTION, PCR 0, 17 bytes).

    It only counts before the first extend of PCR 0 (the TPM set PCR 0's start value at
    TPM2_Startup, before any measurement); one found later is reported and ignored.
    """
    locality: int | None = None
    pcr0_extended = False
    for event in events:
        if event.pcr == 0 and event.extends:
            pcr0_extended = True
            continue
        if event.extends or not event.data.startswith(STARTUP_LOCALITY_SIGNATURE):
            continue
        where = f"event {event.index} (offset {event.offset})"
        if len(event.data) != 17 or event.pcr != 0:
            findings.append(
                EventLogFinding(
                    "error",
                    "startup-locality-malformed",
                    f"{where}: StartupLocality must be 17 bytes in PCR 0; ignored",
                    event.index,
                    event.pcr,
                )
            )
            continue
        if pcr0_extended or locality is not None:
            findings.append(
                EventLogFinding(
                    "error",
                    "startup-locality-late",
                    f"{where}: StartupLocality after PCR 0 was extended or set; ignored",
                    event.index,
                    0,
                )
            )
            continue
        locality = event.data[16]
        if locality not in (0, 3, 4):
            findings.append(
                EventLogFinding(
                    "warning",
                    "startup-locality-unusual",
                    f"{where}: StartupLocality {locality}; TPM2_Startup is issued from locality "
                    "0 or 3, and 4 means an H-CRTM sequence",
                    event.index,
                    0,
                )
            )
    return locality


def _check_separators(events: list[Event], findings: list[EventLogFinding]) -> None:
    """PFP 10.4.4: EV_SEPARATOR data is 0x00000000, or 0xFFFFFFFF when firmware hit an error;
    the digest is the hash of that 4-byte data."""
    for event in events:
        if event.event_type != EV_SEPARATOR:
            continue
        where = f"event {event.index} (PCR {event.pcr}, offset {event.offset})"
        if event.data == b"\xff\xff\xff\xff":
            findings.append(
                EventLogFinding(
                    "error",
                    "separator-error",
                    f"{where}: separator value 0xFFFFFFFF, firmware reported a measurement error",
                    event.index,
                    event.pcr,
                )
            )
        elif event.data != b"\x00\x00\x00\x00":
            findings.append(
                EventLogFinding(
                    "error",
                    "separator-value",
                    f"{where}: separator data {event.data[:16].hex()} is not 0x00000000",
                    event.index,
                    event.pcr,
                )
            )
        for name, digest in event.digests.items():
            bank = BANKS.get(name)
            if bank is not None and bank.digest(event.data) != digest:
                findings.append(
                    EventLogFinding(
                        "error",
                        "separator-digest",
                        f"{where}: {name} digest {digest.hex()} is not the hash of its data",
                        event.index,
                        event.pcr,
                    )
                )


def _check_hcrtm(
    events: list[Event], locality: int | None, findings: list[EventLogFinding]
) -> None:
    """An H-CRTM sequence (_TPM_Hash_Start/Data/End before TPM2_Startup) leaves PCR 0 at
    0x00..04 extended by its digest; PFP logs that digest as EV_EFI_HCRTM_EVENT and announces
    it with StartupLocality 4. It replays like any extend; only consistency is checked here."""
    hcrtm = [e for e in events if e.event_type == EV_EFI_HCRTM_EVENT]
    first_pcr0 = next((e for e in events if e.pcr == 0 and e.extends), None)
    if locality == 4 and (first_pcr0 is None or first_pcr0.event_type != EV_EFI_HCRTM_EVENT):
        findings.append(
            EventLogFinding(
                "warning",
                "hcrtm-missing",
                "StartupLocality 4 (H-CRTM) but the first PCR 0 measurement is not "
                "EV_EFI_HCRTM_EVENT",
                None,
                0,
            )
        )
    for event in hcrtm:
        if locality != 4 or event.pcr != 0:
            findings.append(
                EventLogFinding(
                    "warning",
                    "hcrtm-unexpected",
                    f"event {event.index}: EV_EFI_HCRTM_EVENT in PCR {event.pcr} without "
                    "StartupLocality 4",
                    event.index,
                    event.pcr,
                )
            )


# --- Decoding event data for display. Never raises: anything unexpected stays hex. ---


def describe_event_data(event_type: int, data: bytes) -> dict[str, object] | None:
    """A readable view of well-known event data, or None when there is none to give."""
    decoder = _DECODERS.get(event_type)
    if decoder is None:
        return None
    try:
        return decoder(data)
    except (EventLogError, ValueError):
        return None


def _printable(data: bytes) -> str | None:
    text = data.rstrip(b"\x00")
    if text and all(0x20 <= byte < 0x7F or byte in (0x09, 0x0A, 0x0D) for byte in text):
        return text.decode("ascii")
    return None


def _ucs2(data: bytes) -> str | None:
    if len(data) % 2 or not data:
        return None
    text = data.decode("utf-16-le", errors="strict").rstrip("\x00")
    if text and text.isprintable():
        return text
    return None


def _guid(raw: bytes) -> str:
    # EFI_GUID: the first three fields are little-endian integers, the rest a byte array.
    return (
        f"{int.from_bytes(raw[0:4], 'little'):08x}-{int.from_bytes(raw[4:6], 'little'):04x}-"
        f"{int.from_bytes(raw[6:8], 'little'):04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"
    )


def _spec_id_to_dict(spec_id: SpecIdEvent) -> dict[str, object]:
    return {
        "signature": "Spec ID Event03",
        "platform_class": spec_id.platform_class,
        "spec_version": f"{spec_id.spec_version_major}.{spec_id.spec_version_minor}",
        "spec_errata": spec_id.spec_errata,
        "uintn_size": spec_id.uintn_size,
        "algorithms": [
            {"algorithm": a.name, "digest_size": a.digest_size} for a in spec_id.algorithms
        ],
        "vendor_info": spec_id.vendor_info.hex(),
    }


def _decode_no_action(data: bytes) -> dict[str, object] | None:
    if data.startswith(SPEC_ID_EVENT03_SIGNATURE):
        return _spec_id_to_dict(_parse_spec_id(data, 0))
    if data.startswith(STARTUP_LOCALITY_SIGNATURE) and len(data) == 17:
        return {"signature": "StartupLocality", "startup_locality": data[16]}
    if data.startswith(HCRTM_COMPONENT_SIGNATURE):
        cursor = _Cursor(data, 16)
        description = cursor.take(cursor.uint(1, "description size"), "description")
        return {
            "signature": "H-CRTM CompMeas",
            "component_description": description.decode("ascii", errors="replace"),
        }
    signature = _printable(data[:16])
    return {"signature": signature} if signature else None


def _decode_text(data: bytes) -> dict[str, object] | None:
    text = _printable(data)
    return {"text": text} if text is not None else None


def _decode_text_or_ucs2(data: bytes) -> dict[str, object] | None:
    # ASCII first: UCS-2 decoding of ASCII text yields "printable" CJK characters.
    text = _printable(data)
    if text is None:
        text = _ucs2(data)
    return {"text": text} if text is not None else None


def _decode_separator(data: bytes) -> dict[str, object] | None:
    if len(data) != 4:
        return None
    return {"value": f"0x{int.from_bytes(data, 'little'):08X}"}


def _decode_variable(data: bytes) -> dict[str, object] | None:
    """UEFI_VARIABLE_DATA: GUID, UINT64 name length (chars), UINT64 data length, name, data."""
    cursor = _Cursor(data)
    guid = cursor.take(16, "VariableName")
    name_chars = cursor.uint(8, "UnicodeNameLength")
    data_size = cursor.uint(8, "VariableDataLength")
    if name_chars > cursor.remaining // 2:
        return None
    name = cursor.take(name_chars * 2, "UnicodeName").decode("utf-16-le", errors="replace")
    result: dict[str, object] = {
        "variable_guid": _guid(guid),
        "variable_name": name,
        "variable_data_size": data_size,
    }
    if name == "SecureBoot" and data_size == 1 and cursor.remaining >= 1:
        result["secure_boot_enabled"] = cursor.take(1, "VariableData")[0] == 1
    return result


def _decode_image_load(data: bytes) -> dict[str, object] | None:
    """UEFI_IMAGE_LOAD_EVENT: location, length, link-time address, device path length + path."""
    cursor = _Cursor(data)
    location = cursor.uint(8, "ImageLocationInMemory")
    length = cursor.uint(8, "ImageLengthInMemory")
    link_address = cursor.uint(8, "ImageLinkTimeAddress")
    path_length = cursor.uint(8, "LengthOfDevicePath")
    if path_length > cursor.remaining:
        return None
    return {
        "image_location": f"0x{location:x}",
        "image_length": length,
        "image_link_time_address": f"0x{link_address:x}",
        "device_path": cursor.take(path_length, "DevicePath").hex(),
    }


def _decode_firmware_blob(data: bytes) -> dict[str, object] | None:
    if len(data) != 16:
        return _decode_text(data)
    cursor = _Cursor(data)
    return {
        "blob_base": f"0x{cursor.uint(8, 'BlobBase'):x}",
        "blob_length": cursor.uint(8, "BlobLength"),
    }


def _decode_firmware_blob2(data: bytes) -> dict[str, object] | None:
    cursor = _Cursor(data)
    description = cursor.take(cursor.uint(1, "BlobDescriptionSize"), "BlobDescription")
    return {
        "blob_description": description.decode("ascii", errors="replace"),
        "blob_base": f"0x{cursor.uint(8, 'BlobBase'):x}",
        "blob_length": cursor.uint(8, "BlobLength"),
    }


def _decode_event_tag(data: bytes) -> dict[str, object] | None:
    """TCG_PCClientTaggedEvent: UINT32 taggedEventID, UINT32 size, data."""
    cursor = _Cursor(data)
    tag = cursor.uint(4, "taggedEventID")
    size = cursor.uint(4, "taggedEventDataSize")
    tagged = cursor.take(size, "taggedEventData")
    result: dict[str, object] = {
        "tagged_event_id": f"0x{tag:08x}",
        "tagged_event_data": tagged.hex(),
    }
    text = _printable(tagged)
    if text is not None:
        result["text"] = text
    return result


def _decode_handoff_tables(data: bytes) -> dict[str, object] | None:
    cursor = _Cursor(data)
    count = cursor.uint(8, "NumberOfTables")
    if count > cursor.remaining // 24:
        return None
    tables = [_guid(cursor.take(24, "table")[:16]) for _ in range(count)]
    return {"table_guids": tables}


_DECODERS: Final[Mapping[int, Callable[[bytes], dict[str, object] | None]]] = {
    EV_NO_ACTION: _decode_no_action,
    EV_SEPARATOR: _decode_separator,
    0x00000001: _decode_firmware_blob,  # EV_POST_CODE: a string or UEFI_PLATFORM_FIRMWARE_BLOB
    0x00000005: _decode_text,  # EV_ACTION
    0x00000006: _decode_event_tag,
    0x00000008: _decode_text_or_ucs2,  # EV_S_CRTM_VERSION: usually a UCS-2 string
    0x0000000D: _decode_text_or_ucs2,  # EV_IPL: grub commands (ASCII), systemd-boot (UCS-2)
    0x00000011: _decode_text,  # EV_NONHOST_INFO
    0x80000001: _decode_variable,
    0x80000002: _decode_variable,
    0x80000003: _decode_image_load,
    0x80000004: _decode_image_load,
    0x80000005: _decode_image_load,
    0x80000007: _decode_text,  # EV_EFI_ACTION
    0x80000008: _decode_firmware_blob,
    0x80000009: _decode_handoff_tables,
    0x8000000A: _decode_firmware_blob2,
    0x8000000C: _decode_variable,
    0x80000010: _decode_text,  # EV_EFI_HCRTM_EVENT: "HCRTM"
    0x800000E0: _decode_variable,
}
