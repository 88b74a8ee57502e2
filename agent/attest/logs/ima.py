"""Linux IMA runtime measurement list: parsing, template-hash checks and PCR replay.

Both formats the kernel exposes under ``/sys/kernel/security/ima/`` are read:

* ``binary_runtime_measurements``: per entry ``u32 pcr``, the template hash, ``u32`` name length,
  the template name, then (except for the ``ima`` template) ``u32`` template data length and
  the template data, each field as ``u32`` length + data. Integers are little-endian: that is
  the host order on x86/arm64 and what ``ima_canonical_fmt`` forces everywhere else.
* ``ascii_runtime_measurements``: ``"%2d %s %s"`` (PCR, template hash, template name) followed by
  one space and each field. It is lossy (a file name with a newline breaks it); the binary list
  is the authoritative one.

What the kernel hashes (security/integrity/ima/ima_crypto.c, ``ima_calc_field_array_hash_tfm``):
for every template but ``ima``, each field as ``u32 length || data`` (so the binary template
data itself); for ``ima``, the 20-byte file digest followed by the file name NUL-padded to
``IMA_EVENT_NAME_LEN_MAX + 1`` = 256 bytes. String fields carry their terminating NUL.

PCR banks (``ima_calc_field_array_hash``, since Linux 5.8): the kernel extends every allocated
bank with the hash of the same serialised template data computed with that bank's algorithm; the
list itself only shows the SHA-1 template hash. So replaying SHA-1 uses the listed hashes and
replaying any other bank recomputes the hash from the template data. Kernels before 5.8 (and,
on later kernels, banks whose algorithm the kernel crypto API lacks) extend the SHA-1 template
hash zero-padded to the bank's size: ``legacy_padded_sha1=True``.

Violations (a file measured while open for write, or vice versa) are listed with an all-zero
template hash and extend the PCR with all ``0xFF`` of the bank's size (``ima_add_violation``).

Why this module is over 600 lines: both list formats build the same :class:`ImaEntry` from the
same template table with the same checks, and :func:`read_ima_log` picks between them; an ASCII
parser in a module of its own would import all of that back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from agent.attest.reader import ByteReader, read_bounded
from agent.attest.tpm.algorithms import BANKS, PCR_COUNT, HashAlgorithm
from agent.errors import ImaLogError

# Bounds for hostile input. A busy server's list reaches a few hundred thousand entries.
MAX_LOG_BYTES: Final = 256 * 1024 * 1024
MAX_ENTRIES: Final = 2_000_000
# ima-buf carries measured buffers (keys, device-mapper tables, kexec command lines): KiBs.
MAX_TEMPLATE_DATA_BYTES: Final = 1024 * 1024
MAX_TEMPLATE_NAME_BYTES: Final = 255
# IMA_TEMPLATE_NUM_FIELDS_MAX in security/integrity/ima/ima_template.c.
MAX_FIELDS: Final = 15
# IMA_EVENT_NAME_LEN_MAX: the `ima` template's name field is padded to this + 1 when hashed.
IMA_EVENT_NAME_LEN_MAX: Final = 255
MAX_ASCII_LINE_BYTES: Final = 2 * MAX_TEMPLATE_DATA_BYTES + 4096
# CONFIG_IMA_MEASURE_PCR_IDX default.
IMA_DEFAULT_PCR: Final = 10

SourceFormat = Literal["ascii", "binary"]
# Builds the error for the line being parsed, prefixed with its entry index and offset.
_Fail = Callable[[str], ImaLogError]

# Built-in templates (ima_template.c, builtin_templates[]).
TEMPLATE_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "ima": ("d", "n"),
    "ima-ng": ("d-ng", "n-ng"),
    "ima-ngv2": ("d-ngv2", "n-ng"),
    "ima-sig": ("d-ng", "n-ng", "sig"),
    "ima-sigv2": ("d-ngv2", "n-ng", "sig"),
    "ima-buf": ("d-ng", "n-ng", "buf"),
    "ima-modsig": ("d-ng", "n-ng", "sig", "d-modsig", "modsig"),
    "evm-sig": (
        "d-ng",
        "n-ng",
        "evmsig",
        "xattrnames",
        "xattrlengths",
        "xattrvalues",
        "iuid",
        "igid",
        "imode",
    ),
}
# How each field is printed in the ASCII list, hence how to rebuild its data from the text.
# Fields printed in other ways (xattrnames, iuid, igid, imode) cannot be rebuilt.
_RAW_DIGEST_FIELDS: Final = frozenset({"d"})
_ALGO_DIGEST_FIELDS: Final = frozenset({"d-ng", "d-ngv2", "d-modsig"})
_STRING_FIELDS: Final = frozenset({"n", "n-ng"})
_HEX_FIELDS: Final = frozenset({"sig", "buf", "modsig", "evmsig", "xattrlengths", "xattrvalues"})
_KNOWN_FIELDS: Final = frozenset(
    _RAW_DIGEST_FIELDS
    | _ALGO_DIGEST_FIELDS
    | _STRING_FIELDS
    | _HEX_FIELDS
    | {"xattrnames", "iuid", "igid", "imode"}
)
_HEX_TOKEN: Final = re.compile(rb"(?:[0-9a-fA-F]{2})*")
_TEMPLATE_NAME: Final = re.compile(rb"[A-Za-z0-9_|.-]+")


def template_field_ids(template_name: str) -> tuple[str, ...] | None:
    """Field IDs of a template: a built-in's, or a custom ``ima_template_fmt`` such as
    ``d-ng|n-ng|sig`` (the kernel lists a custom template under its format string)."""
    if template_name in TEMPLATE_FIELDS:
        return TEMPLATE_FIELDS[template_name]
    parts = tuple(template_name.split("|"))
    if len(parts) <= MAX_FIELDS and all(part in _KNOWN_FIELDS for part in parts):
        return parts
    return None


def _bank(name: str) -> HashAlgorithm:
    bank = BANKS.get(name)
    if bank is None:
        raise ImaLogError(f"unknown hash bank {name!r}; known: {', '.join(BANKS)}")
    return bank


@dataclass(frozen=True)
class ImaEntry:
    """One measurement. ``fields`` hold the kernel's field data (string fields end in NUL)."""

    index: int
    # Byte offset of the entry (binary) or of its line (ASCII) in the parsed input.
    offset: int
    pcr: int
    template_hash: bytes
    template_name: str
    fields: tuple[bytes, ...]
    field_ids: tuple[str, ...] | None
    # False only for ASCII entries of templates whose fields cannot be rebuilt from the text.
    template_data_known: bool
    template_hash_bank: str = "sha1"

    @property
    def violation(self) -> bool:
        return not any(self.template_hash)

    def template_hash_input(self) -> bytes:
        """The bytes the kernel hashes into the template hash."""
        if not self.template_data_known:
            raise ImaLogError(
                f"entry {self.index}: template {self.template_name!r} cannot be rebuilt from the "
                "ASCII list; use binary_runtime_measurements"
            )
        if self.template_name == "ima":
            digest, name = self.fields
            # ima_calc_field_array_hash_tfm copies the name into a zeroed 256-byte buffer.
            return digest + name + bytes(IMA_EVENT_NAME_LEN_MAX + 1 - len(name))
        return b"".join(len(data).to_bytes(4, "little") + data for data in self.fields)

    def template_digest(self, bank: str) -> bytes:
        """The template hash computed with ``bank``'s algorithm."""
        return _bank(bank).digest(self.template_hash_input())

    def _field(self, *ids: str) -> bytes | None:
        if self.field_ids is None:
            return None
        for position, field_id in enumerate(self.field_ids):
            if field_id in ids and position < len(self.fields):
                return self.fields[position]
        return None

    @property
    def file_digest(self) -> tuple[str, bytes] | None:
        """(algorithm, digest) of the measured file or buffer; ``ima`` entries are SHA-1."""
        raw = self._field("d")
        if raw is not None:
            return ("sha1" if len(raw) == 20 else "md5", raw)
        data = self._field("d-ng", "d-ngv2")
        if not data:
            return None
        separator = data.find(b":\x00")
        if separator < 0:
            return None
        algorithm = data[:separator].decode("ascii", errors="replace")
        return algorithm, data[separator + 2 :]

    @property
    def file_name(self) -> str | None:
        data = self._field("n-ng", "n")
        if data is None:
            return None
        return data.removesuffix(b"\x00").decode("utf-8", errors="backslashreplace")

    @property
    def signature(self) -> bytes | None:
        return self._field("sig")

    @property
    def buffer(self) -> bytes | None:
        return self._field("buf")

    def to_dict(self) -> dict[str, object]:
        result: dict[str, object] = {
            "index": self.index,
            "offset": self.offset,
            "pcr": self.pcr,
            "template_hash": self.template_hash.hex(),
            "template_hash_bank": self.template_hash_bank,
            "template": self.template_name,
            "violation": self.violation,
        }
        digest = self.file_digest
        if digest is not None:
            result["file_digest"] = f"{digest[0]}:{digest[1].hex()}"
        name = self.file_name
        if name is not None:
            result["file_name"] = name
        if self.signature:
            result["signature"] = self.signature.hex()
        if self.buffer is not None:
            result["buffer"] = self.buffer.hex()
        if self.field_ids is None:
            result["fields"] = [data.hex() for data in self.fields]
        return result


@dataclass(frozen=True)
class ImaLog:
    entries: tuple[ImaEntry, ...]
    source_format: SourceFormat

    @property
    def violations(self) -> int:
        return sum(1 for entry in self.entries if entry.violation)

    @property
    def pcrs(self) -> frozenset[int]:
        return frozenset(entry.pcr for entry in self.entries)

    def replay(
        self,
        bank: str = "sha1",
        *,
        pcr: int = IMA_DEFAULT_PCR,
        start_index: int | None = None,
        starting_pcr: bytes | None = None,
        legacy_padded_sha1: bool = False,
    ) -> bytes:
        """PCR ``pcr``'s value in ``bank`` after these entries; see :func:`replay`."""
        first = self.entries[0].index if self.entries else 0
        return replay(
            self.entries,
            bank,
            pcr=pcr,
            start_index=first if start_index is None else start_index,
            starting_pcr=starting_pcr,
            legacy_padded_sha1=legacy_padded_sha1,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "format": self.source_format,
            "entries": [entry.to_dict() for entry in self.entries],
            "violations": self.violations,
        }


def replay(
    entries: Sequence[ImaEntry],
    bank: str = "sha1",
    *,
    pcr: int = IMA_DEFAULT_PCR,
    start_index: int = 0,
    starting_pcr: bytes | None = None,
    legacy_padded_sha1: bool = False,
) -> bytes:
    """Extend ``starting_pcr`` (default zero) with the entries from ``start_index`` on.

    Entry indices are absolute (see ``first_index`` of the parsers), so a verifier that kept
    the PCR value after entry k-1 replays only the new entries: parse them with
    ``first_index=k`` and call ``replay(new, bank, start_index=k, starting_pcr=kept)``.
    Entries below ``start_index`` are skipped; the rest must be contiguous from it.
    """
    hash_bank = _bank(bank)
    if starting_pcr is None:
        value = bytes(hash_bank.digest_size)
    elif len(starting_pcr) != hash_bank.digest_size:
        raise ImaLogError(
            f"starting PCR value is {len(starting_pcr)} bytes, a {bank} PCR is "
            f"{hash_bank.digest_size}"
        )
    else:
        value = bytes(starting_pcr)
    if entries and start_index > entries[-1].index + 1:
        raise ImaLogError(
            f"entry {start_index}: expected entry {start_index} next, the entries end at "
            f"{entries[-1].index}"
        )
    expected = start_index
    for entry in entries:
        if entry.index < start_index:
            continue
        if entry.index != expected:
            raise ImaLogError(
                f"entry {entry.index}: expected entry {expected} next; replay needs contiguous "
                "entries"
            )
        expected += 1
        if entry.pcr != pcr:
            continue
        value = hash_bank.extend(value, _extended_digest(entry, hash_bank, legacy_padded_sha1))
    return value


def _extended_digest(entry: ImaEntry, bank: HashAlgorithm, legacy_padded_sha1: bool) -> bytes:
    if legacy_padded_sha1 and bank.name != entry.template_hash_bank:
        if entry.template_hash_bank != "sha1":
            raise ImaLogError(
                f"entry {entry.index}: legacy padded-SHA-1 replay needs SHA-1 template hashes"
            )
        sha1 = b"\xff" * 20 if entry.violation else entry.template_hash
        return (sha1 + bytes(bank.digest_size))[: bank.digest_size]
    if entry.violation:
        return b"\xff" * bank.digest_size
    if bank.name == entry.template_hash_bank:
        return entry.template_hash
    return bank.digest(entry.template_hash_input())


# --- Parsing ---


_SHORTFALL: Final = (
    "{what} needs {needed} bytes but only {remaining} remain (truncated list or corrupt length "
    "field)"
)


def _entry_reader(data: bytes, index: int) -> ByteReader:
    """A little-endian reader whose errors name entry ``index`` and the offset in ``data``."""

    def error(at: int, message: str) -> ImaLogError:
        return ImaLogError(f"entry {index} (offset {at}): {message}")

    return ByteReader(data, byteorder="little", error=error, shortfall=_SHORTFALL)


def _as_bytes(data: object, what: str) -> bytes:
    if isinstance(data, str):
        # File names are raw bytes in the kernel; surrogateescape keeps them byte-exact.
        try:
            return data.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError as error:
            raise ImaLogError(
                f"entry 0: {what} text holds an unpaired surrogate at character {error.start}"
            ) from None
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise ImaLogError(f"{what} must be bytes or str, not {type(data).__name__}")


def _check_first_index(first_index: int) -> None:
    if first_index < 0:
        raise ImaLogError(f"entry {first_index}: first_index must not be negative")


def _check_size(data: bytes) -> None:
    if len(data) > MAX_LOG_BYTES:
        raise ImaLogError(
            f"measurement list is {len(data)} bytes, over the {MAX_LOG_BYTES}-byte limit"
        )


def _check_pcr(pcr: int, index: int) -> None:
    if pcr >= PCR_COUNT:
        raise ImaLogError(f"entry {index}: PCR {pcr} is out of range 0-{PCR_COUNT - 1}")


def _check_template_name(raw: bytes, index: int) -> str:
    if not raw or len(raw) > MAX_TEMPLATE_NAME_BYTES or not _TEMPLATE_NAME.fullmatch(raw):
        raise ImaLogError(
            f"entry {index}: template name {raw[:64]!r} is not 1-{MAX_TEMPLATE_NAME_BYTES} "
            "characters of [A-Za-z0-9_|.-]"
        )
    return raw.decode("ascii")


def _check_ima_name(name: bytes, index: int) -> None:
    # The kernel falls back to the basename for longer names (ima_eventname_init_common).
    if len(name) > IMA_EVENT_NAME_LEN_MAX:
        raise ImaLogError(
            f"entry {index}: `ima` template file name is {len(name)} bytes, "
            f"the template allows {IMA_EVENT_NAME_LEN_MAX}"
        )


def _verify(entry: ImaEntry) -> None:
    if entry.violation or not entry.template_data_known:
        return
    computed = entry.template_digest(entry.template_hash_bank)
    if computed != entry.template_hash:
        raise ImaLogError(
            f"entry {entry.index}: template hash mismatch: the list says "
            f"{entry.template_hash.hex()}, the template data hashes to {computed.hex()}"
        )


def parse_ima_binary(
    data: bytes,
    *,
    first_index: int = 0,
    template_hash_bank: str = "sha1",
    verify_template_hashes: bool = True,
) -> ImaLog:
    """Parse ``binary_runtime_measurements`` (little-endian).

    ``first_index`` numbers the entries when ``data`` is a tail of the list (incremental
    shipping). With ``verify_template_hashes`` every non-violation entry's template hash is
    recomputed from its data and a mismatch is an error.
    """
    raw = _as_bytes(data, "binary measurement list")
    _check_size(raw)
    _check_first_index(first_index)
    hash_size = _bank(template_hash_bank).digest_size
    entries: list[ImaEntry] = []
    index = first_index

    def error(at: int, message: str) -> ImaLogError:
        # Reads the loop's current ``index``: one reader serves the whole list.
        return ImaLogError(f"entry {index} (offset {at}): {message}")

    cursor = ByteReader(raw, byteorder="little", error=error, shortfall=_SHORTFALL)
    while cursor.remaining:
        index = first_index + len(entries)
        if len(entries) >= MAX_ENTRIES:
            raise ImaLogError(f"entry {index}: more than {MAX_ENTRIES} entries")
        offset = cursor.offset
        pcr = cursor.u32("PCR")
        _check_pcr(pcr, index)
        template_hash = cursor.take(hash_size, "template hash")
        name_size = cursor.u32("template name length")
        if name_size > MAX_TEMPLATE_NAME_BYTES:
            raise ImaLogError(
                f"entry {index} (offset {offset}): template name length {name_size} is over "
                f"{MAX_TEMPLATE_NAME_BYTES}"
            )
        name = _check_template_name(cursor.take(name_size, "template name"), index)
        if name == "ima":
            # ima_measurements_show: no template data length for `ima`, the digest without a
            # length, the name with its strlen and without the NUL.
            digest = cursor.take(20, "file digest")
            file_name_size = cursor.u32("file name length")
            if file_name_size > IMA_EVENT_NAME_LEN_MAX:
                raise ImaLogError(
                    f"entry {index} (offset {offset}): `ima` template file name length "
                    f"{file_name_size} is over {IMA_EVENT_NAME_LEN_MAX}"
                )
            file_name = cursor.take(file_name_size, "file name")
            fields: tuple[bytes, ...] = (digest, file_name + b"\x00")
            field_ids: tuple[str, ...] | None = TEMPLATE_FIELDS["ima"]
        else:
            data_size = cursor.u32("template data length")
            if data_size > MAX_TEMPLATE_DATA_BYTES:
                raise ImaLogError(
                    f"entry {index} (offset {offset}): template data length {data_size} is over "
                    f"{MAX_TEMPLATE_DATA_BYTES}"
                )
            template_data = cursor.take(data_size, "template data")
            fields = _split_fields(template_data, index)
            field_ids = template_field_ids(name)
            if field_ids is not None and len(field_ids) != len(fields):
                raise ImaLogError(
                    f"entry {index}: template {name} has {len(field_ids)} fields, the entry "
                    f"has {len(fields)}"
                )
        entry = ImaEntry(
            index, offset, pcr, template_hash, name, fields, field_ids, True, template_hash_bank
        )
        if verify_template_hashes:
            _verify(entry)
        entries.append(entry)
    return ImaLog(tuple(entries), "binary")


def _split_fields(template_data: bytes, index: int) -> tuple[bytes, ...]:
    cursor = _entry_reader(template_data, index)
    fields: list[bytes] = []
    while cursor.remaining:
        if len(fields) >= MAX_FIELDS:
            raise ImaLogError(f"entry {index}: more than {MAX_FIELDS} template fields")
        size = cursor.u32(f"template field {len(fields)} length")
        fields.append(cursor.take(size, f"template field {len(fields)}"))
    return tuple(fields)


def parse_ima_ascii(
    text: str | bytes,
    *,
    first_index: int = 0,
    template_hash_bank: str = "sha1",
    verify_template_hashes: bool = True,
) -> ImaLog:
    """Parse ``ascii_runtime_measurements``.

    Field data is rebuilt from the text the way the kernel printed it, so template hashes can
    be checked and non-SHA-1 banks replayed; entries of templates whose fields cannot be rebuilt
    (see :data:`TEMPLATE_FIELDS`) keep their text tokens and can only be replayed in the bank
    of the listed template hash.
    """
    raw = _as_bytes(text, "ASCII measurement list")
    _check_size(raw)
    _check_first_index(first_index)
    hash_size = _bank(template_hash_bank).digest_size
    entries: list[ImaEntry] = []
    offset = 0
    while offset < len(raw):
        index = first_index + len(entries)
        if len(entries) >= MAX_ENTRIES:
            raise ImaLogError(f"entry {index}: more than {MAX_ENTRIES} entries")
        end = raw.find(b"\n", offset, offset + MAX_ASCII_LINE_BYTES + 1)
        if end < 0:
            if len(raw) - offset > MAX_ASCII_LINE_BYTES:
                raise ImaLogError(
                    f"entry {index} (offset {offset}): line longer than {MAX_ASCII_LINE_BYTES}"
                    " bytes"
                )
            end = len(raw)
        entry = _parse_ascii_line(raw[offset:end], index, offset, hash_size, template_hash_bank)
        if verify_template_hashes:
            _verify(entry)
        entries.append(entry)
        offset = end + 1
    return ImaLog(tuple(entries), "ascii")


def _parse_ascii_line(
    line: bytes, index: int, offset: int, hash_size: int, template_hash_bank: str
) -> ImaEntry:
    def fail(reason: str) -> ImaLogError:
        return ImaLogError(f"entry {index} (offset {offset}): {reason}")

    # The PCR is printed with "%2d": PCRs below 10 get a leading space.
    if line.startswith(b" "):
        line = line[1:]
    tokens = line.split(b" ")
    if len(tokens) < 3:
        raise fail("expected '<pcr> <template hash> <template name> <fields...>'")
    pcr_token, hash_token, name_token, *field_tokens = tokens
    if not pcr_token.isdigit() or len(pcr_token) > 2:
        raise fail(f"PCR {pcr_token[:16]!r} is not a decimal number")
    pcr = int(pcr_token)
    _check_pcr(pcr, index)
    if len(hash_token) != 2 * hash_size or not _HEX_TOKEN.fullmatch(hash_token):
        raise fail(f"template hash {hash_token[:140]!r} is not {hash_size} bytes of hex")
    template_hash = bytes.fromhex(hash_token.decode("ascii"))
    name = _check_template_name(name_token, index)
    field_ids = template_field_ids(name)
    if field_ids is None:
        return ImaEntry(
            index,
            offset,
            pcr,
            template_hash,
            name,
            tuple(field_tokens),
            None,
            False,
            template_hash_bank,
        )
    if len(field_tokens) > len(field_ids):
        raise fail(
            f"{len(field_tokens)} fields, template {name} has {len(field_ids)} "
            "(a space in a field?)"
        )
    # The kernel prints " " before every field and nothing for an empty one, so an ima-sig
    # entry without a signature ends in a space; tools that strip it lose the empty token.
    field_tokens += [b""] * (len(field_ids) - len(field_tokens))
    fields = tuple(
        _ascii_field(field_id, token, name, fail)
        for field_id, token in zip(field_ids, field_tokens, strict=True)
    )
    known = all(field_id not in {"xattrnames", "iuid", "igid", "imode"} for field_id in field_ids)
    if name == "ima":
        if len(fields[0]) not in (16, 20):
            raise fail("`ima` template digest must be 20 bytes (SHA-1) or 16 (MD5)")
        _check_ima_name(fields[1][:-1], index)
    return ImaEntry(
        index, offset, pcr, template_hash, name, fields, field_ids, known, template_hash_bank
    )


def _hex(token: bytes, what: str, fail: _Fail) -> bytes:
    if not _HEX_TOKEN.fullmatch(token):
        raise fail(f"{what} {token[:64]!r} is not hex")
    return bytes.fromhex(token.decode("ascii"))


def _ascii_field(field_id: str, token: bytes, template: str, fail: _Fail) -> bytes:
    """Rebuild a field's data from how ima_show_template_* printed it."""
    if field_id in _STRING_FIELDS:
        if b"\x00" in token:
            raise fail(f"{field_id} field contains a NUL byte")
        # Strings are stored with their NUL (ima_write_template_field_data).
        return token + b"\x00"
    if not token:
        return b""
    if field_id in _RAW_DIGEST_FIELDS:
        return _hex(token, f"{template} {field_id} field", fail)
    if field_id in _ALGO_DIGEST_FIELDS:
        # Stored as "<algo>:" NUL <digest>, printed as "<algo>:<hex>" ("ima:sha256:..." for
        # d-ngv2): everything up to the last colon is the prefix.
        colon = token.rfind(b":")
        if colon <= 0:
            raise fail(f"{field_id} field {token[:64]!r} has no '<algorithm>:' prefix")
        prefix = token[: colon + 1]
        if not _TEMPLATE_NAME.fullmatch(prefix[:-1].replace(b":", b"")):
            raise fail(f"{field_id} field prefix {prefix[:64]!r} is not an algorithm name")
        return prefix + b"\x00" + _hex(token[colon + 1 :], f"{field_id} digest", fail)
    if field_id in _HEX_FIELDS:
        return _hex(token, f"{field_id} field", fail)
    # Printed as decimal or text: kept as the token, the entry is marked not rebuildable.
    return token


def read_ima_log(path: str | Path, *, binary: bool | None = None, first_index: int = 0) -> ImaLog:
    """Read a measurement list file; by default ``binary`` in its name selects the format.

    Kernels with per-bank lists (``binary_runtime_measurements_sha256``, Linux 6.x) list the
    template hash of the bank named by the suffix; the suffix selects it here.
    """
    data = read_bounded(
        path,
        MAX_LOG_BYTES,
        "IMA measurement list",
        ImaLogError,
        hint=" (is securityfs mounted and IMA enabled? reading it needs root)",
    )
    name = Path(path).name
    suffix = name.rpartition("_runtime_measurements_")[2] if "_measurements_" in name else ""
    template_hash_bank = suffix if suffix in BANKS else "sha1"
    if binary is None:
        binary = name.startswith("binary")
    if binary:
        return parse_ima_binary(
            data, first_index=first_index, template_hash_bank=template_hash_bank
        )
    return parse_ima_ascii(data, first_index=first_index, template_hash_bank=template_hash_bank)
