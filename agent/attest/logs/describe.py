"""What firmware event-log events are and say: the PFP vocabulary, and readable event data.

The TCG PC Client Platform Firmware Profile ("PFP", section 10) defines the event types, the
informational EV_NO_ACTION headers (the crypto-agile log's Spec ID event, StartupLocality,
H-CRTM component events) and the layouts of well-known event data (UEFI variables, image loads,
firmware blobs). ``eventlog.py`` parses and judges a log with these definitions; nothing here
judges anything. :func:`describe_event_data` never raises: anything unexpected stays hex.

The Spec ID event is parsed here, with the log's own reader and bounds, because it is both the
header the parser needs and an event that ``attest eventlog`` describes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from agent.attest.reader import ByteReader
from agent.attest.tpm.algorithms import BANKS_BY_ALGORITHM_ID, MAX_DIGEST_BYTES, bank_name
from agent.errors import EventLogError

# Bound for hostile input: TPM2 hash algorithms a PC Client TPM can implement: SHA-1,
# SHA-256/384/512, SM3-256, SHA3.
MAX_ALGORITHMS: Final = 8

SPEC_ID_EVENT03_SIGNATURE: Final = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE: Final = b"StartupLocality\x00"
# PFP 10.4.5.5: TCG_HCRTMComponentEvent, informational EV_NO_ACTION event in PCR 0.
HCRTM_COMPONENT_SIGNATURE: Final = b"H-CRTM CompMeas\x00"

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


_SHORTFALL: Final = (
    "{what} needs {needed} bytes but only {remaining} remain (truncated log or corrupt length "
    "field)"
)


def log_reader(data: bytes, offset: int = 0, *, base: int = 0) -> ByteReader:
    """A reader over event-log bytes (little-endian, PFP); errors are EventLogErrors naming the
    offset, counted from ``base``: where ``data`` starts in the whole log."""

    def error(at: int, message: str) -> EventLogError:
        return EventLogError(f"offset {base + at}: {message}")

    return ByteReader(data, byteorder="little", error=error, shortfall=_SHORTFALL, offset=offset)


def parse_spec_id(data: bytes, base_offset: int) -> SpecIdEvent:
    """TCG_EfiSpecIDEvent; ``base_offset`` is where the event data starts in the log."""
    cursor = log_reader(data, base=base_offset)

    def fail(message: str) -> Exception:
        return cursor.fail(f"Spec ID event: {message}")

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


# --- Decoding event data for display. ---


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


def spec_id_to_dict(spec_id: SpecIdEvent) -> dict[str, object]:
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
        return spec_id_to_dict(parse_spec_id(data, 0))
    if data.startswith(STARTUP_LOCALITY_SIGNATURE) and len(data) == 17:
        return {"signature": "StartupLocality", "startup_locality": data[16]}
    if data.startswith(HCRTM_COMPONENT_SIGNATURE):
        cursor = log_reader(data, 16)
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
    result: dict[str, object] = {"value": f"0x{int.from_bytes(data, 'little'):08X}"}
    if all(0x21 <= byte < 0x7F for byte in data):
        result["text"] = data.decode("ascii")  # Windows' "WBCL" in PCRs 12-14
    return result


def _decode_variable(data: bytes) -> dict[str, object] | None:
    """UEFI_VARIABLE_DATA: GUID, UINT64 name length (chars), UINT64 data length, name, data."""
    cursor = log_reader(data)
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
    cursor = log_reader(data)
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
    cursor = log_reader(data)
    return {
        "blob_base": f"0x{cursor.uint(8, 'BlobBase'):x}",
        "blob_length": cursor.uint(8, "BlobLength"),
    }


def _decode_firmware_blob2(data: bytes) -> dict[str, object] | None:
    cursor = log_reader(data)
    description = cursor.take(cursor.uint(1, "BlobDescriptionSize"), "BlobDescription")
    return {
        "blob_description": description.decode("ascii", errors="replace"),
        "blob_base": f"0x{cursor.uint(8, 'BlobBase'):x}",
        "blob_length": cursor.uint(8, "BlobLength"),
    }


def _decode_event_tag(data: bytes) -> dict[str, object] | None:
    """TCG_PCClientTaggedEvent: UINT32 taggedEventID, UINT32 size, data."""
    cursor = log_reader(data)
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
    cursor = log_reader(data)
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
