"""TCG PC Client firmware event log: parsing, consistency checks and PCR replay.

The log is what the kernel exposes as ``/sys/kernel/security/tpm0/binary_bios_measurements``.
Two formats exist (TCG PC Client Platform Firmware Profile, "PFP", section 10):

* SHA1 format: every event is a ``TCG_PCR_EVENT`` (PCR, type, SHA-1 digest, data).
* Crypto-agile format: the first event is a ``TCG_PCR_EVENT`` whose data is the
  ``TCG_EfiSpecIDEvent`` ("Spec ID Event03") declaring the digest algorithms and their sizes;
  every later event is a ``TCG_PCR_EVENT2`` carrying a ``TPML_DIGEST_VALUES``.

The log arrives from the network on the verifier side, so the parser treats it as hostile: every
size and count is bounded before anything is read, nothing is allocated beyond slices of the
input, and the only exception that leaves this module is :class:`agent.errors.EventLogError`,
whose message names the byte offset and the reason. Event types, the Spec ID header and
readable event data are in ``describe.py``; PCR banks in ``tpm/algorithms.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from agent.attest.logs.describe import (
    EV_EFI_HCRTM_EVENT,
    EV_NO_ACTION,
    EV_SEPARATOR,
    SPEC_ID_EVENT03_SIGNATURE,
    STARTUP_LOCALITY_SIGNATURE,
    SpecIdEvent,
    describe_event_data,
    event_type_name,
    log_reader,
    parse_spec_id,
    spec_id_to_dict,
)
from agent.attest.reader import ByteReader, read_bounded
from agent.attest.tpm.algorithms import BANKS, PCR_COUNT, bank_name, initial_pcr_value
from agent.errors import EventLogError

# Bounds for hostile input. Real logs are tens of KiB (the ACPI TPM2 table reserves 64 KiB by
# default in EDK2); these leave two orders of magnitude of headroom.
MAX_LOG_BYTES: Final = 16 * 1024 * 1024
MAX_EVENTS: Final = 100_000
MAX_EVENT_DATA_BYTES: Final = 1024 * 1024

# PFP section 3.3.4: the PCRs firmware measures into; its separator rule (10.4.4) binds them only.
FIRMWARE_PCRS: Final = frozenset(range(8))
SEPARATOR_NORMAL: Final = b"\x00\x00\x00\x00"
# 0x00000001 is the PFP's error value (EDK2's MeasureSeparatorEventWithError). 0xFFFFFFFF is
# reported as an error too: no specification makes it a normal separator, and this module always
# treated it as a firmware error.
SEPARATOR_ERROR_VALUES: Final[Mapping[bytes, str]] = {
    b"\x01\x00\x00\x00": "0x00000001",
    b"\xff\xff\xff\xff": "0xFFFFFFFF",
}
# Windows' boot manager and loader close their measurements in the OS-owned PCRs 12 (data and
# volatile events), 13 (boot modules) and 14 (boot authorities) with an EV_SEPARATOR whose data
# is b"WBCL" (Windows Boot Configuration Log); go-attestation's Windows parser expects the same.
WBCL_SEPARATOR: Final = b"WBCL"
WBCL_PCRS: Final = frozenset({12, 13, 14})

LogFormat = Literal["sha1", "crypto-agile"]
Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Event:
    """One measurement: ``digests`` maps a bank name to the digest the firmware extended."""

    index: int
    offset: int
    pcr: int
    event_type: int
    digests: Mapping[str, bytes]
    data: bytes

    @functools.cached_property
    def type_name(self) -> str:
        # Cached: a policy asks for it of every event on every verification of a kept log.
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
        # The log is immutable, so the replay is computed once (a verifier and its policy
        # both ask); each caller gets its own dicts.
        return {bank: dict(values) for bank, values in self._replayed.items()}

    @functools.cached_property
    def _replayed(self) -> dict[str, dict[int, bytes]]:
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
            spec_id = spec_id_to_dict(self.spec_id)
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
    cursor = log_reader(data)
    header = _read_pcr_event(cursor, index=0)
    findings: list[EventLogFinding] = []
    if header.event_type == EV_NO_ACTION and header.data.startswith(SPEC_ID_EVENT03_SIGNATURE):
        spec_id = parse_spec_id(header.data, header.offset + 32)
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
    data = read_bounded(
        path,
        MAX_LOG_BYTES,
        "event log",
        EventLogError,
        hint=" (is securityfs mounted and the TPM driver loaded? reading it needs root)",
    )
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


def _read_event_data(cursor: ByteReader) -> bytes:
    size_offset = cursor.offset
    size = cursor.uint(4, "event data size")
    if size > MAX_EVENT_DATA_BYTES:
        raise EventLogError(
            f"offset {size_offset}: event data size {size} is over the "
            f"{MAX_EVENT_DATA_BYTES}-byte limit"
        )
    return cursor.take(size, "event data")


def _read_pcr_event(cursor: ByteReader, index: int) -> Event:
    """TCG_PCR_EVENT: UINT32 pcrIndex, UINT32 eventType, BYTE digest[20], UINT32 size, data."""
    offset = cursor.offset
    pcr = cursor.uint(4, f"event {index} PCR index")
    event_type = cursor.uint(4, f"event {index} type")
    _check_pcr(pcr, event_type, offset)
    digest = cursor.take(20, f"event {index} SHA-1 digest")
    data = _read_event_data(cursor)
    return Event(index, offset, pcr, event_type, {"sha1": digest}, data)


def _read_pcr_event2(cursor: ByteReader, index: int, sizes: Mapping[int, int]) -> Event:
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
    """PFP 10.4.4: EV_SEPARATOR data is 0x00000000, or 0x00000001 when firmware hit an error;
    the digest is the hash of that 4-byte data.

    The data rule binds the firmware's PCRs 0-7 only. The OS owns PCRs 8 and up, and Windows
    separates its boot phases there with the ASCII data ``WBCL`` (PCRs 12-14): those are
    accepted and reported as findings for a policy to judge, never taken for firmware ones.
    """
    seen: set[int] = set()
    for event in events:
        if event.event_type != EV_SEPARATOR:
            continue
        where = f"event {event.index} (PCR {event.pcr}, offset {event.offset})"
        shown = _separator_data(event.data)
        error_value = SEPARATOR_ERROR_VALUES.get(event.data)
        if error_value is not None:
            findings.append(
                EventLogFinding(
                    "error",
                    "separator-error",
                    f"{where}: separator value {error_value}, firmware reported a measurement "
                    "error",
                    event.index,
                    event.pcr,
                )
            )
        elif event.data == SEPARATOR_NORMAL:
            pass
        elif event.pcr in FIRMWARE_PCRS:
            hint = ""
            if event.data == WBCL_SEPARATOR:
                hint = " (WBCL is the Windows separator of PCRs 12-14, never of firmware PCRs)"
            findings.append(
                EventLogFinding(
                    "error",
                    "separator-value",
                    f"{where}: separator data {shown} in firmware PCR {event.pcr}: PFP 10.4.4 "
                    f"allows only 0x00000000 (0x00000001 after an error) in PCRs 0-7{hint}",
                    event.index,
                    event.pcr,
                )
            )
        elif event.data == WBCL_SEPARATOR and event.pcr in WBCL_PCRS:
            findings.append(
                EventLogFinding(
                    "info",
                    "separator-wbcl",
                    f"{where}: Windows Boot Configuration Log separator 'WBCL' in PCR {event.pcr}",
                    event.index,
                    event.pcr,
                )
            )
        else:
            findings.append(
                EventLogFinding(
                    "warning",
                    "separator-os-value",
                    f"{where}: separator data {shown} in OS PCR {event.pcr} follows no convention "
                    "this verifier knows (0x00000000; 'WBCL' in PCRs 12-14)",
                    event.index,
                    event.pcr,
                )
            )
        if event.pcr in seen:
            findings.append(
                EventLogFinding(
                    "warning",
                    "separator-repeated",
                    f"{where}: a second separator in PCR {event.pcr}; firmware and Windows each "
                    "separate a PCR once per boot",
                    event.index,
                    event.pcr,
                )
            )
        seen.add(event.pcr)
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


def _separator_data(data: bytes) -> str:
    """Separator data for a message: quoted text when it is short printable ASCII, else hex."""
    if not data:
        return "(empty)"
    if len(data) <= 16 and all(0x21 <= byte < 0x7F for byte in data):
        return repr(data.decode("ascii"))
    return data[:16].hex() + ("..." if len(data) > 16 else "")


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
